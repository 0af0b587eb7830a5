"""A real service on 127.0.0.1 for benchmarks and tests: in a thread of this process, or as its own process.

``python -m service`` in a subprocess is what users run (signals, exit status, its own memory);
the thread server lets a test reach into the app (its catalog, its variants) while calling it over HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until_ok(url: str, timeout: float, alive: Callable[[], str | None] = lambda: None,
                  tail: Callable[[], str] = lambda: "", interval: float = 0.25) -> tuple[float, bool]:
    """GET ``url`` until it answers 200: (seconds it took, whether a 503 came first).

    ``alive()`` says why to give up early (the server's process or container exited), or None;
    ``tail()`` adds the server's log to the error. Raises RuntimeError on giving up or timing out.
    """
    start = time.perf_counter()
    saw_503 = False
    while time.perf_counter() - start < timeout:
        gone = alive()
        if gone:
            raise RuntimeError(f"{gone}:\n{tail()}")
        try:
            status = httpx.get(url, timeout=5).status_code
            if status == 200:
                return time.perf_counter() - start, saw_503
            saw_503 = saw_503 or status == 503
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s:\n{tail()}")


def wait_ready(url: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               timeout: float = 900.0) -> tuple[float, bool]:
    """Poll /readyz until 200: (seconds it took, whether a 503 was seen first). Raises if it exits or times out."""
    return poll_until_ok(f"{url}/readyz", timeout,
                         alive=lambda: f"the service exited ({proc.returncode})" if proc and proc.poll() is not None
                         else None,
                         tail=lambda: log.read_text(errors="replace")[-3000:] if log else "")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServiceProcess:
    """``python -m service`` (of the checkout at ``cwd``) on a free port; its combined output goes to ``log``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None,
                 cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="quantserve-", suffix=".log")[1])
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port",
                                          str(self.port), *args], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 900.0) -> float:
        return wait_ready(self.url, self.proc, self.log, timeout)[0]

    def stop(self, timeout: float = 20.0) -> int:
        return stop(self.proc, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def thread_server(app: Any, timeout: float = 900.0) -> Iterator[tuple[str, bool]]:
    """uvicorn in a daemon thread: yields (base url, whether /readyz said 503 before 200); stops on exit."""
    port = free_port()
    from service.connections import protocol_class

    http = protocol_class(app.state.settings.connections, app.state.lifecycle) if hasattr(app.state, "settings") \
        else "auto"  # the service's own connection limits, as python -m service serves it
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _, saw_503 = wait_ready(url, timeout=timeout)
        yield url, saw_503
    finally:
        srv.should_exit = True
        thread.join(60)
