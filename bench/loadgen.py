"""A lean closed-loop HTTP/1.1 load generator for the serving benchmarks.

It shares the machine's cores with the server it measures, so it does as little as it can per
request: request bodies are JSON-encoded once up front, each client keeps one keep-alive
connection, and a response is read as its status line, headers and ``Content-Length`` bytes,
without building header or JSON objects (a general client such as httpx spends several times the
CPU per request, taken from the server under test). Runs on uvloop when it is installed.
Answers are checked only for status; the benchmarks check one full answer per variant first.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs pre-encoded JSON bodies."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one complete request (see ``encode``); the answer's status and body."""
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise ConnectionError("connection closed before an answer")
        status = int(raw[9:12])
        lower = raw.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            self.close()
            raise ConnectionError("answer without Content-Length")
        length = int(lower[at + 17:lower.index(b"\r\n", at + 17)])
        payload = await self.reader.readexactly(length)
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, payload


@dataclass
class Outcome:
    """What one closed loop measured: latencies of 200 answers, everything else counted by kind."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0
    cpu_s: float = 0.0


def encode(host: str, port: int, path: str, bodies: list[Any]) -> list[bytes]:
    """Each JSON body as complete request bytes (request line, headers, body)."""
    out = []
    for b in bodies:
        data = json.dumps(b).encode()
        out.append(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return out


async def closed_loop(host: str, port: int, requests: list[bytes], clients: int, seconds: float) -> Outcome:
    """``clients`` connections each send the next request as soon as the last one was answered, for ``seconds``."""
    out = Outcome()
    turn = itertools.count()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        conn = Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                req = requests[next(turn) % len(requests)]
                t = time.perf_counter()
                try:
                    status, _ = await conn.send(req)
                except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                    out.errors[type(exc).__name__] += 1
                    conn.close()
                    continue
                if status == 200:
                    out.latencies.append(time.perf_counter() - t)
                else:
                    out.errors[str(status)] += 1
        finally:
            conn.close()

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    out.elapsed, out.cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return out


def run(coro: Any) -> Any:
    """asyncio.run on uvloop when available (the cheaper loop leaves more CPU to the server)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
