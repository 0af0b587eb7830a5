"""Typed dependencies that keep route signatures short."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from ..catalog import Catalog
from ..serving import Serving


# async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request for a lookup
async def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def get_serving(request: Request) -> Serving:
    return request.app.state.serving


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
ServingDep = Annotated[Serving, Depends(get_serving)]
VariantHeader = Annotated[str | None, Header(alias="X-Variant", description="pin a variant")]
RequestKeyHeader = Annotated[str | None, Header(alias="X-Request-Key",
                                                description="sticky key for the A/B split (e.g. a user id)")]
