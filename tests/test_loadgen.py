"""The serving benchmark's load generator against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench import loadgen
from bench.live import thread_server

seen: list[dict] = []


async def echo(request: Request) -> Response:
    body = await request.json()
    seen.append(body)
    if body.get("fail"):
        return JSONResponse({"error": "bad"}, status_code=422)
    if body.get("close"):  # the server ends the connection after this answer: the client must reconnect
        return JSONResponse({"echo": body}, headers={"Connection": "close"})
    return JSONResponse({"echo": body})


async def readyz(request: Request) -> Response:
    return JSONResponse({"ready": True})


app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/readyz", readyz)])


def test_a_connection_sends_the_encoded_body_and_reads_the_whole_answer():
    with thread_server(app, timeout=60) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        body = {"inputs": ["héllo wörld " * 50], "variant": "int8"}
        [request] = loadgen.encode("127.0.0.1", port, "/echo", [body])

        async def three() -> list[tuple[int, bytes]]:
            conn = loadgen.Connection("127.0.0.1", port)
            try:
                return [await conn.send(request) for _ in range(3)]  # keep-alive: the same connection answers again
            finally:
                conn.close()

        for status, payload in loadgen.run(three()):
            assert status == 200 and json.loads(payload) == {"echo": body}


def test_closed_loop_counts_answers_and_errors_and_survives_closed_connections():
    seen.clear()
    bodies = [{"n": 0}, {"n": 1, "fail": True}, {"n": 2, "close": True}, {"n": 3}]
    with thread_server(app, timeout=60) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        out = loadgen.run(loadgen.closed_loop("127.0.0.1", port, loadgen.encode("127.0.0.1", port, "/echo", bodies),
                                              clients=4, seconds=1.0))
    answered = len(out.latencies) + sum(out.errors.values())
    assert answered == len(seen) > 20  # every request sent was answered and counted once
    assert set(out.errors) == {"422"}  # closed connections were reopened, not failed
    assert abs(out.errors["422"] - answered / 4) <= 4  # one body in four fails, in rotation
    assert all(0 < x < 1.0 for x in out.latencies) and out.elapsed >= 1.0
