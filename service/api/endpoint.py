"""One declaration per inference endpoint: the answer function feeds both the fast path and FastAPI.

``@inference_endpoint(router, "/embed", EmbedRequest, EmbedResponse, summary=...)`` on
``async def embed(serving, req, x_variant, x_request_key) -> (body, variant)`` registers the answer
with :mod:`service.fastroutes` (which answers well-formed requests itself) and adds the FastAPI
route that documents the endpoint at /openapi.json and answers every other request with the same
function: the request model, the X-Variant and X-Request-Key headers, and the X-Variant response
header are stated here once.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel

from ..fastroutes import Answer, fast_route
from .deps import RequestKeyHeader, ServingDep, VariantHeader


def inference_endpoint(router: APIRouter, path: str, request_model: type[BaseModel],
                       response_model: type[BaseModel], *, summary: str) -> Any:
    def declare(answer: Answer) -> Answer:
        fast_route(router.prefix + path, request_model)(answer)

        async def route(req: Any, response: Response, serving: Any, x_variant: Any = None,
                        x_request_key: Any = None) -> Any:
            body, response.headers["X-Variant"] = await answer(serving, req, x_variant, x_request_key)
            return body

        # FastAPI reads the parameters' types from the signature: the concrete request model, the headers
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        route.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
            inspect.Parameter("req", kind, annotation=request_model),
            inspect.Parameter("response", kind, annotation=Response),
            inspect.Parameter("serving", kind, annotation=ServingDep),
            inspect.Parameter("x_variant", kind, default=None, annotation=VariantHeader),
            inspect.Parameter("x_request_key", kind, default=None, annotation=RequestKeyHeader),
        ], return_annotation=response_model)
        route.__name__ = route.__qualname__ = answer.__name__
        route.__doc__ = answer.__doc__
        router.add_api_route(path, route, methods=["POST"], response_model=response_model, summary=summary)
        return answer
    return declare
