"""What the service knows about the request being handled: its id, its deadline, whether its client left.

The request middleware sets it once per HTTP request; the handlers, the serving path and every log
line read it through a context variable, so no signature has to carry it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "X-Request-ID"
TIMEOUT_HEADER = "X-Request-Timeout"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # what we accept from a client verbatim


@dataclass
class RequestContext:
    request_id: str
    deadline: float  # time.monotonic() by which the answer is due
    started: float = field(default_factory=time.monotonic)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request", default=None)


def current() -> RequestContext | None:
    return _current.get()


def current_request_id() -> str | None:
    ctx = _current.get()
    return ctx.request_id if ctx else None


def activate(ctx: RequestContext) -> contextvars.Token:
    return _current.set(ctx)


def deactivate(token: contextvars.Token) -> None:
    _current.reset(token)


def request_id_from(header: str | None) -> str:
    """The client's id if it is a sane token, else a fresh one (ids end up in logs and headers)."""
    if header and _CLIENT_ID.match(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record made while a request is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        return True
