"""python -m service [--host H] [--port P] [--config FILE]: serve the configured models with uvicorn."""

from __future__ import annotations

import os

# Before torch loads libgomp, which reads it once. Every model call runs on one thread (one OpenMP team, see
# service/batching.py); after each parallel region libgomp's default keeps that team's threads spinning for
# about 300,000 iterations, taking a core from the event loop that must answer the batch just finished. 1000 is
# enough between the regions of one forward. Measured at 32 clients (bench/serving.py --quick, minilm int8):
# mean batch 5-6 -> 13, 0.29-0.31 -> 0.37-0.40 of in-process batched throughput, p99 560-620 -> 230-270 ms.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from quantization.cpu import CpuProfileError, emulate  # noqa: E402  (imports no torch)

from .memory import limit_malloc_arenas  # noqa: E402

# QUANTSERVE_CPU_ISA=avx2 serves as an AVX2-only CPU would (oneDNN, FBGEMM and ATen capped; the CPU profile
# and every kernel choice follow): before torch is imported, since the libraries read their caps once.
try:
    emulate()
except CpuProfileError as exc:
    print(f"quantserve: {exc}", file=__import__("sys").stderr)
    raise SystemExit(2) from None

limit_malloc_arenas()  # before torch and the server start threads that allocate

import argparse  # noqa: E402
import sys  # noqa: E402

import uvicorn  # noqa: E402

from .app import create_app  # noqa: E402
from .config import ConfigError, load_settings  # noqa: E402
from .connections import protocol_class  # noqa: E402
from .logs import configure_logging  # noqa: E402
from .shutdown import GracefulServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    ap.add_argument("--host", help="address to listen on (env QUANTSERVE_HOST, default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (env QUANTSERVE_PORT, default 8000)")
    ap.add_argument("--config", help="YAML file of models (env QUANTSERVE_CONFIG, default: built-in)")
    ap.add_argument("--artifacts-dir", help="keep built variants here and reuse them on restart (default: the user "
                                            "cache; off: none) "
                                            "(env QUANTSERVE_ARTIFACTS_DIR)")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.config, host=args.host, port=args.port, log_level=args.log_level,
                                 artifacts_dir=args.artifacts_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    failure: list[str] = []
    server: GracefulServer | None = None

    def stop(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_startup_failure=stop)
    # log_config=None: keep our handler; access lines come from the request middleware, with the request id
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.grace_period_s, timeout_keep_alive=settings.keep_alive_s,
                            http=protocol_class(settings.connections, app.state.lifecycle))
    server = GracefulServer(config, app.state.lifecycle, settings.grace_period_s, settings.drain_delay_s)
    server.run()
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
