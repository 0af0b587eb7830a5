"""The inference routes' request path without FastAPI's per-request machinery.

FastAPI answers a request by matching its routes, solving the endpoint's dependencies (the body,
two optional headers, the serving object, a response to put headers on), validating the returned
model against the response model and serializing it. For one sentence on /v1/embed that machinery
took ~110 of the ~160 µs the web process spent on a request outside the model (in-process, the
model call replaced by its answer; hot caches). At one client it runs right after a forward that
evicted it from the caches, so it costs several times that in wall time.

:class:`FastRoutes` answers ``POST`` on the routes registered with :func:`fast_route` itself:
it validates the body with the route's own request model, calls the same answer function that
the FastAPI endpoint calls, and serializes the answer with its response model. Everything else
stays where it was: the outer middleware (request id, deadline, API keys, CORS, body limits)
wraps it, and a :class:`~service.errors.ServiceError` raised by the answer reaches the same error
response. The routes stay declared in FastAPI, which documents them at /docs and answers every
request this path does not take: a body that is not valid JSON for the route's request model
(FastAPI then words its 422 as for every other route), or one without a Content-Type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Awaitable, Callable

from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .serving import Serving

# answer(serving, request, X-Variant header, X-Request-Key header) -> (response body, the variant that served it)
Answer = Callable[[Serving, BaseModel, "str | None", "str | None"], Awaitable[tuple[BaseModel, str]]]


@dataclass(frozen=True)
class FastRoute:
    request_model: type[BaseModel]
    answer: Answer


FAST_ROUTES: dict[str, FastRoute] = {}


def fast_route(path: str, request_model: type[BaseModel]) -> Callable[[Answer], Answer]:
    """Register ``answer`` as what ``POST path`` returns; the FastAPI endpoint of that path must call it too."""
    def register(answer: Answer) -> Answer:
        FAST_ROUTES[path] = FastRoute(request_model, answer)
        return answer
    return register


def _replay(message: Message, receive: Receive) -> Receive:
    """``receive`` again from the start: the message already read, then the rest."""
    pending = [message]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()
    return replayed


class FastRoutes:
    def __init__(self, app: ASGIApp, *, serving: Serving, routes: dict[str, FastRoute] | None = None) -> None:
        self.app = app
        self.serving = serving
        self.routes = FAST_ROUTES if routes is None else routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        message = await receive()
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), value)  # the first of repeated headers, as FastAPI's Header() takes
        request = self._parse(route, message, headers)
        if request is None:
            await self.app(scope, _replay(message, receive), send)
            return
        variant_header, key_header = (headers.get(n) for n in (b"x-variant", b"x-request-key"))
        body, variant = await route.answer(self.serving, request,
                                           None if variant_header is None else variant_header.decode("latin-1"),
                                           None if key_header is None else key_header.decode("latin-1"))
        payload = body.__pydantic_serializer__.to_json(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(payload)).encode()),
                                (b"content-type", b"application/json"), (b"x-variant", variant.encode("latin-1"))]})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _parse(route: FastRoute, message: Message, headers: dict[bytes, bytes]) -> BaseModel | None:
        """The request, or None where FastAPI must answer (it also decides what a body without a type is)."""
        if message["type"] != "http.request" or message.get("more_body", False) or b"content-type" not in headers:
            return None
        try:
            return route.request_model.model_validate(json.loads(message.get("body", b"")))
        except Exception:  # not JSON, not text, nested too deep, or not valid for the model: FastAPI says which
            return None
