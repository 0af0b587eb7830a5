"""Structured logs: one event a line, with the request id of the request it is about.

``text``: ``<time> level=INFO logger=service.http request_id=ab12 event=request ...`` (key=value);
``json``: one JSON object a line with the same fields. Keys and request bodies are never logged.
"""

from __future__ import annotations

import json
import logging
import sys

from .context import RequestIdFilter

TEXT_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s request_id=%(request_id)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text", stream=None) -> logging.Handler:
    """Route every logger (ours, uvicorn's, the library's) through one handler on the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own handlers would print without the request id
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler
