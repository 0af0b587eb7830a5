"""python -m service.prebuild --artifacts-dir DIR [--config FILE]: build, save and check every variant, then exit.

The container image runs this at build time, so a pod loads saved artifacts (and, for variants compiled
in the background, their AOTInductor packages for this CPU profile) at start-up instead of calibrating,
quantizing and compiling again; the same code path as the server's start-up
builds them (service.builder), so what is saved is exactly what the server would have made.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_settings
from .builder import VariantBuilder
from .catalog import Catalog, StartupError
from .metrics import Metrics
from .optimizer import OptimizationFailed, Optimizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.prebuild", description=__doc__)
    ap.add_argument("--artifacts-dir", required=True, help="where to save the built variants")
    ap.add_argument("--config", help="YAML file of models (default: the built-in config)")
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s level=%(levelname)s %(message)s")
    try:
        settings = load_settings(args.config, artifacts_dir=args.artifacts_dir)
        inline = settings.optimize == "inline"
        catalog = VariantBuilder(Catalog(settings, Metrics())).build(inline=inline)
        optimizer = Optimizer(catalog, None)
        packages = {(m.name, name): optimizer.build_blocking(m, m.variants[name]) for m, name in optimizer.pending()}
    except (ConfigError, StartupError, OptimizationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for served in catalog.models.values():
        for v in served.variants.values():
            package = packages.get((served.name, v.name))
            print(f"{served.name}/{v.name}: {v.config.strategy} fidelity={v.fidelity}"
                  + (f" package={package.name}" if package else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
