"""GET /dashboard: every variant side by side, live, and a form that compares them on one text.

The page, its script and styles, and the charting library (uPlot, vendored under
static/vendor/ with its license) are package data served from here, so the page works where no
CDN can be reached. The page reads /v1/models and posts to /v1/compare; it holds no state of its own.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import ServiceError

router = APIRouter(include_in_schema=False)
STATIC = resources.files("service").joinpath("static")
STATIC_PREFIX = "/dashboard/static/"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", "": "text/plain"}


class UnknownFile(ServiceError):
    status, type = 404, "not_found"


def _static_files() -> dict[str, str]:
    """Every servable file by its path under static/; nothing outside this list is ever opened."""
    found: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif not child.name.startswith("."):
                found[prefix + child.name] = str(child)

    walk(STATIC, "")
    return found


FILES = _static_files()


@router.get("/dashboard")
async def dashboard() -> HTMLResponse:
    return HTMLResponse(STATIC.joinpath("dashboard.html").read_text(encoding="utf-8"),
                        headers={"Cache-Control": "no-cache"})


@router.get(STATIC_PREFIX + "{path:path}")
async def static_file(path: str) -> FileResponse:
    file = FILES.get(path)
    if file is None:
        raise UnknownFile(f"no dashboard file {path!r}")
    suffix = path[path.rfind("."):] if "." in path.rsplit("/", 1)[-1] else ""
    return FileResponse(file, media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
                        headers={"Cache-Control": "public, max-age=3600"})
