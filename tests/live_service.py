"""Helpers for the deployment tests: required tools, and the real app on 127.0.0.1.

A missing tool fails the test (it never skips): `.ci/setup` installs every one of them, and a
skip would hide a missing install step.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from bench.live import ROOT, free_port, thread_server
from service.app import create_app
from service.config import load_settings

__all__ = ["ROOT", "free_port", "require_tool", "running_service"]


def require_tool(name: str) -> str:
    """The tool's path: in .venv/bin (PyPI tools) or on PATH (Debian packages); fails if absent."""
    venv = ROOT / ".venv" / "bin" / name
    path = str(venv) if venv.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run .ci/setup, which installs it")
    return path


@contextlib.contextmanager
def running_service(config: str | Path | None = None, **overrides):
    """Yield (base_url, app) for the real app built from ``config`` (default: the built-in one)."""
    app = create_app(load_settings(config, **overrides))
    with thread_server(app, timeout=600) as (base, _):
        yield base, app
