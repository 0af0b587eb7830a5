"""GET /livez, /readyz and /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..catalog import Catalog
from ..errors import UnknownModel
from ..schemas import error_responses
from .deps import CatalogDep

router = APIRouter()


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="200 once every model can answer (or, with ?model=NAME, that model); 503 before, "
                                "and while shutting down", responses=error_responses(404))
async def readyz(request: Request, catalog: CatalogDep, model: str | None = None) -> JSONResponse:
    """Ready means every configured variant can answer: a variant being optimised in the background answers
    in its eager form. ``optimize: inline`` keeps the older meaning, fully compiled (it compiles before
    serving). Per model: ``models`` in the body, and ``?model=NAME`` answers for that model alone."""
    draining = request.app.state.lifecycle.draining
    models = {name: _model_status(catalog, name) for name in catalog.settings.model_names()}
    if model is not None and model not in models:
        raise UnknownModel(f"no model named {model!r}; available: {', '.join(models)}", available=list(models))
    ready = (models[model]["ready"] if model is not None else catalog.ready) and not draining and not catalog.error
    body = {"ready": ready, "draining": draining, "models": models,
            "unavailable": {m.name: m.router.unavailable for m in catalog.models.values() if m.router.unavailable},
            "progress": catalog.progress[-5:], "error": catalog.error}
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})


def _model_status(catalog: Catalog, name: str) -> dict[str, Any]:
    served = catalog.models.get(name)
    if served is None:
        return {"ready": False, "variants": {}}
    return {"ready": True, "variants": {v: catalog.state(served, v) for v in served.variants}}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
