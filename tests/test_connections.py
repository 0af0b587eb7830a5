"""Connection limits on a real uvicorn server: slow or oversized requests are cut off, normal ones are not.

The server runs with short limits (header timeout 1 s, body grace 1 s) so the test waits seconds, not
the defaults' tens of seconds; the mechanism is the same.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from bench.live import thread_server
from service.app import create_app
from service.config import load_settings

HEADER_TIMEOUT_S = 1.0
CONFIG = f"""
connections: {{header_timeout_s: {HEADER_TIMEOUT_S}, max_headers: 50, max_header_bytes: 16384, body_grace_s: 1,
               body_min_rate: 1024}}
models:
  - {{name: minilm, task: embed, source: minilm, variants: [{{name: fp32, strategy: fp32}}]}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("connections") / "m.yaml"
    path.write_text(CONFIG)
    with thread_server(create_app(load_settings(path, probe_texts=4))) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        yield base, (host, int(port))


def _connect(addr) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    return s


def _closed_by_server(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within ``within`` seconds, what it sent before)."""
    s.settimeout(within)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
        return True, data
    except ConnectionResetError:
        return True, data
    except socket.timeout:
        return False, data


def _embed_request(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")


def test_idle_and_half_header_connections_are_closed_after_the_header_timeout(server):
    _, addr = server
    idle = [_connect(addr) for _ in range(25)]
    half = [_connect(addr) for _ in range(25)]
    for s in half:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Ty")
    start = time.monotonic()
    deadline = start + HEADER_TIMEOUT_S + 5  # one wait for all of them
    results = [_closed_by_server(s, max(0.01, deadline - time.monotonic())) for s in idle + half]
    took = time.monotonic() - start
    for s in idle + half:
        s.close()
    assert all(closed for closed, _ in results)
    assert all(data == b"" for _, data in results[:25])  # nothing was sent: closed without an answer
    assert all(data.startswith(b"HTTP/1.1 408 ") for _, data in results[25:])
    assert json.loads(results[25][1].split(b"\r\n\r\n", 1)[1])["error"]["type"] == "request_timeout"
    assert took < HEADER_TIMEOUT_S + 4
    assert httpx.post(f"{server[0]}/v1/embed", json={"inputs": ["still serving"]}).status_code == 200


def test_an_8_mb_header_and_too_many_headers_get_431(server):
    _, addr = server
    s = _connect(addr)
    sent = 0
    try:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        while sent < 8 * 1024 * 1024:
            s.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused long before the 8 MB were sent
    closed, data = _closed_by_server(s, 5)
    s.close()
    assert closed and data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert sent < 8 * 1024 * 1024

    many = b"".join(b"X-H%d: v\r\n" % i for i in range(60))
    s = _connect(addr)
    s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    closed, data = _closed_by_server(s, 5)
    s.close()
    assert closed and data.startswith(b"HTTP/1.1 431 ") and b"61 headers" in data.split(b"\r\n\r\n", 1)[1]


def test_a_trickled_body_is_cut_off_and_a_fast_one_is_served(server):
    base, addr = server
    body = json.dumps({"inputs": ["hello there"] * 40}).encode()
    s = _connect(addr)
    s.sendall(_embed_request(body))
    start = time.monotonic()
    cut = False
    for i in range(len(body)):
        if time.monotonic() - start > 10:
            break  # never cut off: the assertion below fails
        try:
            s.sendall(body[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            cut = True
            break
        s.settimeout(0.5)
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        cut = True
        assert data.startswith(b"HTTP/1.1 408 ") and b"body_min_rate" in data, data[:300]
        break
    s.close()
    assert cut and time.monotonic() - start < 6
    r = httpx.post(f"{base}/v1/embed", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["results"]) == 40


def _response(s: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    return head


def test_a_keep_alive_connection_idle_past_the_header_timeout_still_serves_its_next_request(server):
    _, addr = server
    body = json.dumps({"inputs": ["hello"]}).encode()
    s = _connect(addr)
    try:
        for _ in range(3):
            s.sendall(_embed_request(body) + body)
            assert _response(s).startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_TIMEOUT_S + 0.5)  # idle between requests: the keep-alive timeout's business
    finally:
        s.close()
