"""Domain errors and the one place that turns them (and validation errors) into HTTP responses.

Handlers raise; they never build error responses by hand. Every error body has the same shape:

    {"error": {"type": "...", "message": "one sentence", "request_id": "...",
               "fields": [{"field": "inputs", "message": "..."}]}}
"""

from __future__ import annotations

import re
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


class BadRequest(ServiceError):
    """The request itself is malformed (its body is not JSON, a header is repeated), not a field's value."""

    status, type = 400, "invalid_body"


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


# pydantic names the member of a union it tried in the error's location ("constrained-str", "list[...]")
_UNION_MEMBER = re.compile(r"^(?:[a-z]+-[a-z-]+|[a-z-]+\[.*\])$")


def _field(loc: tuple) -> str:
    body = bool(loc) and loc[0] == "body"
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and not (body and isinstance(p, str) and _UNION_MEMBER.match(p))]
    return ".".join(parts) or "body"


def _relevant(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop a union member's "not this type" error where another member says what is wrong with the value
    ("input: at most 2048 items", not "input: should be a valid string" for a list that is too long)."""
    def mismatch(e: dict[str, Any]) -> bool:
        loc = tuple(e.get("loc", ()))
        return (str(e.get("type", "")).endswith("_type") and bool(loc) and isinstance(loc[-1], str)
                and bool(_UNION_MEMBER.match(loc[-1])))

    def field(e: dict[str, Any]) -> str:
        return _field(tuple(e.get("loc", ())[:-1] if mismatch(e) else e.get("loc", ())))

    explained = {field(e) for e in errors if not mismatch(e)}
    return [e for e in errors if not (mismatch(e) and any(f == field(e) or f.startswith(field(e) + ".")
                                                          for f in explained))]


def _validation_message(err: dict[str, Any], settings: Any = None) -> str:
    ctx = err.get("ctx") or {}
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    field = _field(tuple(err.get("loc", ())))
    if (err.get("type") in ("too_long", "string_too_long") and settings is not None
            and field.split(".")[0] in ("inputs", "input")):
        # the schema's hard ceiling was hit: state the limit this process applies (as /openapi.json does)
        if err.get("type") == "string_too_long":
            return (f"{len(err.get('input') or '')} characters, more than the limit of "
                    f"{min(ctx['max_length'], settings.limits.max_chars)} (limits.max_chars)")
        return (f"{ctx.get('actual_length')} inputs, more than the limit of "
                f"{min(ctx['max_length'], settings.limits.max_inputs)} per request (limits.max_inputs); split the request")
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
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:  # not a field's value: the body itself
            loc = broken.get("loc", ())
            where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            reason = (broken.get("ctx") or {}).get("error", "malformed")
            return JSONResponse(error_body("invalid_body", f"the body is not valid JSON ({reason}{where}); send one "
                                                           f"JSON object"), status_code=400)
        limits = getattr(request.app.state, "settings", None)
        fields = [{"field": _field(tuple(e.get("loc", ()))), "message": _validation_message(e, limits)}
                  for e in _relevant(errors)]
        first = fields[0] if fields else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        return JSONResponse(error_body("invalid_request", message, fields=fields), status_code=422)
