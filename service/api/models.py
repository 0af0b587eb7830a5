"""GET /v1/models and /v1/models/{name}: variants, sizes, start-up fidelity and live latency."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..errors import UnknownModel
from ..schemas import error_responses
from .deps import CatalogDep

router = APIRouter(prefix="/v1")


@router.get("/models", summary="Every model with its variants")
async def list_models(catalog: CatalogDep) -> dict[str, Any]:
    settings = catalog.settings
    return {"ready": catalog.ready, "cpu": catalog.cpu.describe(),
            "models": [catalog.describe(m) for m in catalog.models.values()],
            "configured": settings.model_names(),
            "limits": {**settings.limits.model_dump(), "max_queue": settings.batching.max_queue,
                       "max_input_tokens": {m.name: m.max_input_tokens for m in settings.models}}}


@router.get("/models/{name}", summary="One model with its variants", responses=error_responses(404))
async def get_model(name: str, catalog: CatalogDep) -> dict[str, Any]:
    served = catalog.models.get(name)
    if served is None:
        names = catalog.settings.model_names()
        raise UnknownModel(f"no model named {name!r}; available: {', '.join(names)}", available=names)
    return catalog.describe(served)
