"""Domain errors and the one place that turns them (and validation errors) into HTTP responses.

Handlers raise; they never build error responses by hand. Every error body has the same shape:

    {"error": {"type": "...", "message": "one sentence", "fields": [{"field": "inputs", "message": "..."}]}}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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


def error_body(type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, **extra}}


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.type, exc.message, **exc.extra), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": _field(tuple(e.get("loc", ()))), "message": _validation_message(e)} for e in exc.errors()]
        first = fields[0] if fields else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        return JSONResponse(error_body("invalid_request", message, fields=fields), status_code=422)
