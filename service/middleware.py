"""ASGI middleware, outermost first: request context, API keys, body guard.

- :class:`RequestContextMiddleware` gives each request its id (``X-Request-ID``, accepted or made),
  its deadline, one access-log line, the in-flight count graceful shutdown waits for, refusal while
  draining, and a uniform 500 body (with the id) for anything a handler did not expect.
- :class:`ApiKeyMiddleware` asks for ``Authorization: Bearer <key>`` outside the public paths.
- :class:`BodyGuardMiddleware` refuses non-JSON bodies (415) and bodies over the limit (413) before
  anything parses them, then watches the connection so a client that leaves has its queued work dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .connections import received_at
from .context import REQUEST_ID_HEADER, TIMEOUT_HEADER, RequestContext, activate, current, deactivate, request_id_from
from .errors import (BadRequest, InferenceFailed, InvalidInput, PayloadTooLarge, ServiceError, ShuttingDown,
                     Unauthorized, UnsupportedMediaType, error_response)
from .logs import quote

log = logging.getLogger("service.http")
HEALTH_PATHS = ("/livez", "/readyz", "/metrics")  # answered while draining: probes must see the truth


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _reply(exc: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc)(scope, receive, send)


class Lifecycle:
    """Shared between the middleware and the shutdown path: how many requests are in, and are we leaving."""

    def __init__(self) -> None:
        self.inflight = 0
        self.drain_started: float | None = None  # time.monotonic() of the signal

    @property
    def draining(self) -> bool:
        return self.drain_started is not None

    def start_draining(self) -> None:
        self.drain_started = time.monotonic()

    def admits(self, scope: Scope) -> bool:
        """Whether a request is served: always before the signal; after it, only one whose headers were
        complete before it (a stamp from service.connections), and health probes."""
        if not self.draining or scope["path"] in HEALTH_PATHS:
            return True
        arrived = received_at(scope)
        return arrived is not None and arrived < self.drain_started


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, lifecycle: Lifecycle, request_timeout_s: float) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        ctx = RequestContext(request_id_from(headers.get(REQUEST_ID_HEADER.lower())),
                             time.monotonic() + self.request_timeout_s)
        token = activate(ctx)
        start = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), ctx.request_id.encode())]
            await send(message)

        admitted = False
        try:
            timeout = headers.get(TIMEOUT_HEADER.lower())
            if timeout is not None:
                ctx.deadline = time.monotonic() + self._client_timeout(timeout)
            if not self.lifecycle.admits(scope):
                raise ShuttingDown("the service is shutting down; retry on another replica",
                                   headers={"Retry-After": "1", "Connection": "close"})
            self.lifecycle.inflight += 1
            admitted = True
            await self.app(scope, receive, send_with_id)
        except ServiceError as exc:
            await _reply(exc, scope, receive, send_with_id)
        except Exception:  # a bug: answer 500 with the id so the log line can be found, keep serving
            log.exception("event=unhandled_error method=%s path=%s", quote(scope["method"]), quote(scope["path"]))
            if status["code"] == 0:
                await _reply(InferenceFailed("the service failed to handle this request; the request id "
                                             "names it in the logs"), scope, receive, send_with_id)
        finally:
            if admitted:
                self.lifecycle.inflight -= 1
            if scope["path"] not in HEALTH_PATHS or status["code"] >= 400:
                log.info("event=request method=%s path=%s status=%s seconds=%.4f", quote(scope["method"]),
                         quote(scope["path"]), status["code"], time.perf_counter() - start)
            deactivate(token)

    def _client_timeout(self, value: str) -> float:
        """A client may shorten its deadline, never lengthen it past the configured one."""
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (seconds > 0 and math.isfinite(seconds)):
            raise InvalidInput(f"{TIMEOUT_HEADER}: must be a positive number of seconds, got {value[:40]!r}",
                               fields=[{"field": TIMEOUT_HEADER, "message": "positive number of seconds"}])
        return min(seconds, self.request_timeout_s)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, keys: list[str], public_paths: list[str],
                 public_prefixes: list[str] = ()) -> None:
        self.app = app
        # digests of equal length: compare_digest's time then depends on neither key's length nor content
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]
        self._public = set(public_paths)
        self._public_prefixes = tuple(public_prefixes)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
        matches = [hmac.compare_digest(digest, d) for d in self._digests]  # no early exit
        return scheme.lower() == "bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if len(given) > 1:  # parts of the stack would read the first, others the last: refuse the ambiguity
            await _reply(BadRequest(f"{len(given)} Authorization headers; send exactly one"), scope, receive, send)
            return
        if (scope["path"] in self._public or scope["path"].startswith(self._public_prefixes)
                or scope["method"] == "OPTIONS" or self._authorized(given[0] if given else None)):
            await self.app(scope, receive, send)
            return
        await _reply(Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'",
                                  headers={"WWW-Authenticate": 'Bearer realm="quantserve"'}), scope, receive, send)


class BodyGuardMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
            said = f"Content-Type {ctype!r} is not accepted" if ctype else "the request has no Content-Type"
            await _reply(UnsupportedMediaType(f"{said}; send JSON with 'Content-Type: application/json'"),
                         scope, receive, send)
            return
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        body = bytearray()
        if declared <= self.max_body_bytes:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # nobody is left to answer
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes or not message.get("more_body", False):
                    break
        if declared > self.max_body_bytes or len(body) > self.max_body_bytes:
            await _reply(PayloadTooLarge(f"the request body is larger than the limit of {self.max_body_bytes} "
                                         f"bytes (limits.max_body_bytes); send fewer or shorter inputs",
                                         headers={"Connection": "close"}), scope, receive, send)
            return
        await self._call_watching(scope, receive, send, bytes(body))

    async def _call_watching(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        ctx = current()
        gone = ctx.disconnected if ctx else asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
