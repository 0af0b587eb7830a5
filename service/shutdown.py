"""Graceful shutdown: SIGTERM turns readiness false, refuses new work, lets accepted work finish, exits 0.

On the first SIGTERM or SIGINT the app starts draining: /readyz answers 503, and a request whose
headers arrive after the signal gets 503 with ``Retry-After`` and ``Connection: close`` (never a
reset: the listener stays open for ``drain_delay_s``, so load balancers see the 503s and the
readiness change before connections are refused). Every request whose headers were complete
before the signal (running or queued in a batcher) runs to its answer. After the delay, when none
is left or ``grace_period_s`` more has passed, uvicorn is told to exit; it closes the sockets and
the app's shutdown stops the batchers. A second signal exits at once. uvicorn would re-raise the
signal after a clean exit (exit status 143); a drained shutdown is a success, so it is not re-raised.

In Kubernetes the pod's ``terminationGracePeriodSeconds`` must hold the ``preStop`` hook, the
drain delay and the grace period (tests/test_k8s_manifests.py checks that sum).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn

from .middleware import Lifecycle

log = logging.getLogger("service.shutdown")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_period_s: float,
                 drain_delay_s: float = 0.0) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.grace_period_s = grace_period_s
        self.drain_delay_s = drain_delay_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining or self._loop is None or not self.started:
            self.should_exit = True  # second signal, or nothing started yet: leave now
            self.force_exit = self.lifecycle.draining
            return
        self.lifecycle.start_draining()
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain = asyncio.get_running_loop().create_task(self.drain(sig))

    async def drain(self, sig: int) -> None:
        log.info("event=draining signal=%d inflight=%d delay_seconds=%.1f grace_seconds=%.1f", sig,
                 self.lifecycle.inflight, self.drain_delay_s, self.grace_period_s)
        await asyncio.sleep(self.drain_delay_s)  # the listener stays open: late requests get 503, not a reset
        deadline = time.monotonic() + self.grace_period_s
        while self.lifecycle.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("event=drained inflight=%d", self.lifecycle.inflight)
        # whatever is left gets the rest of the grace period from uvicorn's own shutdown
        self.config.timeout_graceful_shutdown = max(0.1, deadline - time.monotonic())
        self.should_exit = True
