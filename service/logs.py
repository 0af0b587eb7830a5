"""Structured logs: one event a line, with the request id of the request it is about.

``text``: ``<time> level=INFO logger=service.http request_id=ab12 event=request ...`` (key=value);
``json``: one JSON object a line with the same fields. Keys and request bodies are never logged.

A value a client controls (a path, a header) is written with :func:`quote`: a JSON string, so
spaces, ``=``, quotes, CR, LF and terminal escapes stay inside one value and cannot forge a field or
a line. Both formats also escape every control character left in a message, and the text format
writes a traceback as one quoted ``exception=`` field, so every event stays one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from .context import RequestIdFilter

TEXT_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s request_id=%(request_id)s %(message)s"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def quote(value: object) -> str:
    """A client-controlled value as one log field: a JSON string (quoted, every control character escaped)."""
    return json.dumps(str(value))


def _escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: json.dumps(m.group())[1:-1] if m.group() in "\n\r\t" else f"\\x{ord(m.group()):02x}",
                        text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        try:
            line = _escape_controls(super().format(record))
        finally:
            record.exc_info = exc_info
        if exc_info:
            line += f" exception={quote(self.formatException(exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)  # ASCII: C1 controls and line separators escaped too


def configure_logging(level: str, fmt: str = "text", stream=None) -> logging.Handler:
    """Route every logger (ours, uvicorn's, the library's) through one handler on the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own handlers would print without the request id
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler
