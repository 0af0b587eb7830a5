"""Helpers for the deployment tests: the real app under uvicorn on 127.0.0.1, and required tools.

A missing tool fails the test (it never skips): `.ci/setup` installs every one of them, and a
skip would hide a missing install step.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(name: str) -> str:
    """The tool's path: in .venv/bin (PyPI tools) or on PATH (Debian packages); fails if absent."""
    venv = ROOT / ".venv" / "bin" / name
    path = str(venv) if venv.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run .ci/setup, which installs it")
    return path


def wait_ready(base: str, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{base} did not become ready within {seconds:.0f} s")


@contextlib.contextmanager
def running_service(config: str | Path | None = None, **overrides):
    """Yield (base_url, app) for the real app built from ``config`` (default: the built-in one)."""
    port = free_port()
    app = create_app(load_settings(config, port=port, **overrides))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(60)
