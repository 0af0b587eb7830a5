"""Bounded connections: how long and how much a client may take to send a request.

uvicorn bounds neither: a connection that sends nothing, or half its headers, stays open for ever;
there is no limit on header count or size (50,000 headers, or one 8 MB header, got a 200); and a
body trickled at one byte every 2 s held a graceful shutdown for its whole grace period.
:func:`protocol_class` makes uvicorn's httptools protocol (an uvicorn internal: this is the one
module that touches it; ``connections.guard: false`` serves with the plain protocol) enforce:

- ``header_timeout_s``: from the connection's opening (or a keep-alive request's first byte) to
  the end of the request's headers. Nothing sent: the connection is closed; half a request: 408.
- ``max_headers`` and ``max_header_bytes`` (request line and headers): 431, checked while the bytes
  arrive, so an 8 MB header is refused after its first ``max_header_bytes``.
- ``body_min_rate`` after ``body_grace_s``: a body arriving slower is cut off with 408.
- ``drain_body_s``: once the service drains, a body still arriving after this is cut off.

It also stamps each request with the moment its headers were complete
(:func:`received_at`), so a drain refuses only requests that arrived after the signal.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .config import ConnectionsConfig

log = logging.getLogger("service.http")
EXTENSION = "quantserve.received_at"
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def received_at(scope: dict[str, Any]) -> float | None:
    """time.monotonic() when the request's headers were complete (None: not served by the guarded protocol)."""
    return (scope.get("extensions") or {}).get(EXTENSION)


def protocol_class(limits: ConnectionsConfig, lifecycle: Any) -> Any:
    """The protocol class for ``uvicorn.Config(http=...)``, or "auto" (uvicorn's own) when the guard is off."""
    if not limits.guard:
        return "auto"
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without httptools: serve, but say that connections are unbounded
        log.warning("event=connection_guard_off reason=\"httptools is not installed\"")
        return "auto"

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._guard_timer: Any = None
            self._request_started()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        # -- headers ------------------------------------------------------------------------
        def _request_started(self) -> None:
            self._in_headers, self._header_bytes, self._header_count, self._body_started = True, 0, 0, 0.0
            self._arm(limits.header_timeout_s)

        def data_received(self, data: bytes) -> None:
            if self._in_headers and self._header_bytes == 0 and self.cycle is not None \
                    and self.cycle.response_complete and not self.pipeline:
                self._request_started()  # a keep-alive connection's next request: its clock starts now
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and not self.transport.is_closing() and self._header_bytes > limits.max_header_bytes:
                self._refuse(431, f"the request line and headers are over the limit of {limits.max_header_bytes} "
                                  f"bytes (connections.max_header_bytes)")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers = True

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._header_bytes = 0
            if self._header_count > limits.max_headers:
                self._refuse(431, f"{self._header_count} headers, over the limit of {limits.max_headers} "
                                  f"(connections.max_headers)")
                return
            self._header_count = 0
            self.scope.setdefault("extensions", {})[EXTENSION] = time.monotonic()
            super().on_headers_complete()
            headers = dict(self.headers)
            if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") not in (b"0", b""):
                self._body_bytes, self._body_started = 0, time.monotonic()
                self._arm(1.0)
            else:
                self._stop_timer()

        # -- body -----------------------------------------------------------------------------
        def on_body(self, body: bytes) -> None:
            self._body_bytes += len(body)
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._stop_timer()
            self._body_started = 0.0
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # idle until the next request's first byte (uvicorn's keep-alive timeout covers that wait)
            self._stop_timer()
            self._in_headers, self._header_bytes, self._body_started = True, 0, 0.0

        # -- the one timer ------------------------------------------------------------------
        def _arm(self, seconds: float) -> None:
            self._stop_timer()
            self._guard_timer = self.loop.call_later(seconds, self._check)

        def _stop_timer(self) -> None:
            timer = getattr(self, "_guard_timer", None)
            if timer is not None:
                timer.cancel()
                self._guard_timer = None

        def _check(self) -> None:
            self._guard_timer = None
            if self.transport.is_closing():
                return
            now = time.monotonic()
            if self._in_headers:
                if self._header_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
                    self.transport.close()  # nothing sent: nobody to answer
                else:
                    self._refuse(408, f"the request's headers did not arrive within {limits.header_timeout_s:g} s "
                                      f"(connections.header_timeout_s)")
                return
            if not self._body_started:
                return
            elapsed = now - self._body_started
            draining_for = now - lifecycle.drain_started if lifecycle.draining else 0.0
            if draining_for > limits.drain_body_s:
                self._cut_body(f"the service is shutting down and the body was still arriving after "
                               f"{limits.drain_body_s:g} s (connections.drain_body_s)")
            elif elapsed > limits.body_grace_s and self._body_bytes < limits.body_min_rate * elapsed:
                self._cut_body(f"the body arrived at {self._body_bytes / elapsed:.0f} bytes/s, under the minimum of "
                               f"{limits.body_min_rate} (connections.body_min_rate)")
            else:
                self._arm(1.0)

        def _cut_body(self, reason: str) -> None:
            log.info("event=slow_body_cut client=%s reason=%s", json.dumps(str(self.client)), json.dumps(reason))
            if self.cycle is not None and not self.cycle.response_started:
                self._refuse(408, reason)
            else:
                self.transport.close()

        def _refuse(self, status: int, reason: str) -> None:
            """Answer ``status`` with the service's JSON error body and close (nothing of the request is read on)."""
            self._stop_timer()
            body = json.dumps({"error": {"type": "request_timeout" if status == 408 else "headers_too_large",
                                         "message": reason, "request_id": None}}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
            if self.cycle is not None:
                self.cycle.response_started = self.cycle.response_complete = True  # the app's answer goes nowhere
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedHttpToolsProtocol
