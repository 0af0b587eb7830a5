"""Domain errors and the one place that turns them (and validation errors) into HTTP responses.

Handlers raise; they never build error responses by hand. Every error body has the same shape:

    {"error": {"type": "...", "message": "one sentence", "request_id": "...",
               "fields": [{"field": "inputs", "message": "..."}]}}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .context import current_request_id


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra


class UnknownModel(ServiceError):
    status, type = 404, "unknown_model"


class UnknownVariant(ServiceError):
    status, type = 404, "unknown_variant"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class Overloaded(ServiceError):
    status, type = 429, "overloaded"


class InferenceFailed(ServiceError):
    status, type = 500, "inference_failed"


class InvalidInput(ServiceError):
    status, type = 422, "invalid_request"


class UnsupportedLanguages(ServiceError):
    status, type = 422, "unsupported_languages"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class VariantUnavailable(ServiceError):
    status, type = 503, "variant_unavailable"


class ShuttingDown(ServiceError):
    status, type = 503, "shutting_down"


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready (nginx's 499; nobody reads the body)."""

    status, type = 499, "client_closed_request"


class DeadlineExceeded(ServiceError):
    status, type = 504, "deadline_exceeded"


def error_body(type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "request_id": current_request_id(), **extra}}


def error_response(exc: ServiceError) -> JSONResponse:
    """The one place a ServiceError becomes a response (handlers and middleware both use it)."""
    return JSONResponse(error_body(exc.type, exc.message, **exc.extra), status_code=exc.status, headers=exc.headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    if "min_length" in ctx or "max_length" in ctx:
        return msg.replace("List", "list").replace("String", "string")
    return msg.replace("Value error, ", "")


_HTTP_TYPES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing misses (404, 405) and FastAPI's own body errors (400) in the same body as ours
        message = {404: f"no route {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(_HTTP_TYPES.get(exc.status_code, "http_error"), message),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": _field(tuple(e.get("loc", ()))), "message": _validation_message(e)} for e in exc.errors()]
        first = fields[0] if fields else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        return JSONResponse(error_body("invalid_request", message, fields=fields), status_code=422)
