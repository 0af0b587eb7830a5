"""The fast path of the inference routes: what it answers itself and what it leaves to FastAPI.

That its answers equal FastAPI's on the real models is tested in test_service.py; here the route
table holds one small route, so each decision can be seen.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel, ConfigDict

from service.errors import UnknownModel
from service.fastroutes import FastRoute, FastRoutes


class EchoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: list[str]


class EchoResponse(BaseModel):
    inputs: list[str]
    variant: str | None
    key: str | None


async def answer(serving, req: EchoRequest, x_variant, x_request_key):
    if req.inputs == ["unknown"]:
        raise UnknownModel("no model named 'unknown'")
    return EchoResponse(inputs=req.inputs, variant=x_variant, key=x_request_key), x_variant or "int8"


def call(body: bytes, *, path="/v1/echo", method="POST", headers=None, chunks=None):
    """Run one request through FastRoutes; returns (messages sent, what the fallback app received or None)."""
    fallback: dict = {}

    async def app(scope, receive, send):
        received = [await receive()]
        while received[-1].get("more_body"):
            received.append(await receive())
        fallback["body"] = b"".join(m.get("body", b"") for m in received)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"fallback"})

    messages = chunks or [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json")] if headers is None else headers
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    routes = {"/v1/echo": FastRoute(EchoRequest, answer)}
    asyncio.run(FastRoutes(app, serving=None, routes=routes)(scope, receive, send))
    return sent, fallback.get("body")


def test_a_valid_body_is_answered_without_fastapi_with_the_route_model_and_headers():
    sent, fallback = call(b'{"inputs": ["a", "b"]}', headers=[
        (b"content-type", b"application/json"), (b"x-variant", b"fp32"), (b"x-variant", b"int8"),
        (b"x-request-key", b"user-\xe9")])
    assert fallback is None
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 200 and headers[b"content-type"] == b"application/json"
    assert headers[b"x-variant"] == b"fp32" and int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"]) == {"inputs": ["a", "b"], "variant": "fp32", "key": "user-é"}


@pytest.mark.parametrize("body, headers", [
    (b'{"inputs": ["a"]', None),                        # not JSON
    (b"", None),                                        # no body
    (b'{"inputs": ["a"]}', []),                         # no Content-Type: FastAPI decides what that is
    (b"\xff\xfe\x00\xd8", None),                        # not text
    (b"[" * 5000 + b"]" * 5000, None),                  # nested past the parser's recursion limit
    (b'[{"inputs": ["a"]}]', None),                     # not an object
    (b'{"inputs": [1]}', None),                         # not valid for the model (strict)
    (b'{"inputs": ["a"], "colour": "red"}', None),      # unknown field
])
def test_bodies_fastapi_must_word_the_error_for_reach_it_unchanged(body, headers):
    sent, fallback = call(body, headers=headers)
    assert fallback == body and sent[0]["status"] == 299


def test_a_streamed_body_other_methods_and_other_paths_go_to_fastapi():
    chunks = [{"type": "http.request", "body": b'{"inputs"', "more_body": True},
              {"type": "http.request", "body": b': ["a"]}', "more_body": False}]
    assert call(b"", chunks=chunks)[1] == b'{"inputs": ["a"]}'
    assert call(b'{"inputs": ["a"]}', method="PUT")[1] == b'{"inputs": ["a"]}'
    assert call(b'{"inputs": ["a"]}', path="/v1/echo/")[1] == b'{"inputs": ["a"]}'


def test_a_service_error_from_the_answer_reaches_the_error_middleware():
    with pytest.raises(UnknownModel):
        call(b'{"inputs": ["unknown"]}')
