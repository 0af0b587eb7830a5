"""create_app(settings): the FastAPI application, its start-up and its shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .api import dashboard, health, inference, models, translate
from .config import Settings
from .errors import install_error_handlers
from .fastroutes import FastRoutes
from .metrics import Metrics
from .openapi import customize as customize_openapi
from .middleware import ApiKeyMiddleware, BodyGuardMiddleware, Lifecycle, RequestContextMiddleware
from .builder import VariantBuilder
from .catalog import Catalog, StartupError
from .engine import Engine
from .optimizer import Optimizer
from .schemas import COMMON_ERRORS
from .serving import Serving

log = logging.getLogger("service")
UI_PATHS = ["/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/dashboard"]


def create_app(settings: Settings, on_startup_failure: Callable[[str], None] | None = None, *,
               fast_routes: bool = True) -> FastAPI:
    """The app; models are built in the background so /livez answers while /readyz says 503.

    ``on_startup_failure(message)`` is called with one sentence if a model cannot be built
    (``python -m service`` uses it to stop the server and exit non-zero). ``fast_routes=False`` leaves
    the inference routes to FastAPI's own request handling (the reference the fast path is tested against).
    """
    metrics = Metrics()
    catalog = Catalog(settings, metrics)
    engine = Engine(settings, metrics)
    serving = Serving(catalog, engine)

    optimizer = Optimizer(catalog, engine)

    async def build() -> None:
        loop = asyncio.get_running_loop()
        builder = VariantBuilder(catalog)
        inline = settings.optimize == "inline"
        optimizing = loop.create_task(optimizer.run())
        try:
            # every model call runs on the engine's one lane thread, the builder's included; a model serves
            # as soon as its own variants are built, while the next one builds
            await loop.run_in_executor(engine.lane.executor, builder.prepare)
            for mc in settings.models:
                served = await loop.run_in_executor(engine.lane.executor, builder.build_model, mc, inline)
                await engine.add(served)
                catalog.add(served)
                optimizer.offer(served)
            optimizer.offer(None)
            await loop.run_in_executor(engine.lane.executor, builder.finish)
            catalog.ready = True
            metrics.ready.set(1)
            log.info("event=ready models=%s", ",".join(catalog.models))
        except asyncio.CancelledError:  # shut down while building
            optimizing.cancel()
            raise
        except StartupError as exc:
            catalog.error = str(exc)
        except Exception as exc:  # anything else is a bug, but must still stop start-up visibly
            log.exception("event=startup_crashed")
            catalog.error = f"start-up failed: {type(exc).__name__}: {exc}"
        if catalog.error:
            optimizing.cancel()
            log.error("event=startup_failed error=%r", catalog.error)
            if on_startup_failure:
                on_startup_failure(catalog.error)
            return
        try:
            await optimizing
        except Exception:  # noqa: BLE001 - the eager forms keep serving; the optimizer's own bug is logged
            log.exception("event=optimizer_crashed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.get_running_loop().create_task(build())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await optimizer.stop()
            await serving.drain_shadow()
            catalog.ready = False
            metrics.ready.set(0)
            await engine.stop()

    app = FastAPI(title="quantserve", version="0.1.0", lifespan=lifespan, responses=COMMON_ERRORS,
                  description="Serves every quantized variant of each model side by side, with live latency, "
                              "memory and fidelity against FP32.")
    app.state.settings, app.state.metrics, app.state.serving = settings, metrics, serving
    app.state.catalog, app.state.engine, app.state.optimizer = catalog, engine, optimizer
    app.state.lifecycle = lifecycle = Lifecycle()
    install_error_handlers(app)
    for router in (inference.router, translate.router, models.router, health.router):
        app.include_router(router)
    app.include_router(dashboard.router)
    # added innermost first: the request context wraps everything, so every answer carries its id
    if fast_routes:
        app.add_middleware(FastRoutes, serving=serving)
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    keys = settings.auth.keys()
    # the API's description and the dashboard's page and files hold no data: /docs and /dashboard ask for the key
    public = [*settings.auth.public_paths, *UI_PATHS]
    log.info("event=auth enabled=%s keys=%d", "true" if keys else "false", len(keys))
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys, public_paths=public, public_prefixes=[dashboard.STATIC_PREFIX])
    customize_openapi(app, settings, public, bearer=bool(keys))
    if settings.cors.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors.allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=settings.cors.allow_headers, expose_headers=["X-Request-ID", "X-Variant"])
    app.add_middleware(RequestContextMiddleware, lifecycle=lifecycle,
                       request_timeout_s=settings.limits.request_timeout_s)
    return app
