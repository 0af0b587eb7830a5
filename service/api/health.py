"""GET /livez, /readyz and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .deps import CatalogDep

router = APIRouter()


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="200 once every model and variant is built and warmed up; 503 before and while "
                                "shutting down")
async def readyz(request: Request, catalog: CatalogDep) -> JSONResponse:
    draining = request.app.state.lifecycle.draining
    ready = catalog.ready and not draining
    body = {"ready": ready, "draining": draining,
            "models": {m.name: list(m.variants) for m in catalog.models.values()},
            "unavailable": {m.name: m.router.unavailable for m in catalog.models.values() if m.router.unavailable},
            "progress": catalog.progress[-5:], "error": catalog.error}
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
