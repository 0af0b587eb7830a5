"""create_app(settings): the FastAPI application, its start-up and its shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from fastapi import FastAPI

from .api import dashboard, health, inference, models
from .config import Settings
from .errors import install_error_handlers
from .metrics import Metrics
from .registry import Registry, StartupError
from .serving import Serving

log = logging.getLogger("service")


def create_app(settings: Settings, on_startup_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The app; models are built in the background so /livez answers while /readyz says 503.

    ``on_startup_failure(message)`` is called with one sentence if a model cannot be built
    (``python -m service`` uses it to stop the server and exit non-zero).
    """
    metrics = Metrics()
    registry = Registry(settings, metrics)
    serving = Serving(registry)

    async def build() -> None:
        try:
            await asyncio.to_thread(registry.build)
            await registry.start_batchers()
            log.info("event=ready models=%s", ",".join(registry.models))
        except StartupError as exc:
            registry.error = str(exc)
        except Exception as exc:  # anything else is a bug, but must still stop start-up visibly
            log.exception("event=startup_crashed")
            registry.error = f"start-up failed: {type(exc).__name__}: {exc}"
        if registry.error:
            log.error("event=startup_failed error=%r", registry.error)
            if on_startup_failure:
                on_startup_failure(registry.error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.get_running_loop().create_task(build())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await serving.drain_shadow()
            await registry.stop()

    app = FastAPI(title="quantserve", version="0.1.0", lifespan=lifespan,
                  description="Serves every quantized variant of each model side by side, with live latency, "
                              "memory and fidelity against FP32.")
    app.state.settings, app.state.metrics, app.state.registry, app.state.serving = settings, metrics, registry, serving
    install_error_handlers(app)
    for router in (inference.router, models.router, health.router):
        app.include_router(router)
    app.include_router(dashboard.router)
    return app
