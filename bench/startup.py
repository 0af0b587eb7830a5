"""Start-up of the service on its default config: ready, then optimised, first start and restarts.

    .venv/bin/python bench/startup.py            # rewrites its section of bench/RESULTS.md
    .venv/bin/python bench/startup.py --quick    # background first start and one restart; prints only

``python -m service`` is started as a new user runs it, with no flag: its cache is the user cache, here a
fresh ``XDG_CACHE_HOME`` per series. Each start is timed from process start to

- **ready**: the first 200 from /readyz (every configured variant can answer), and
- **optimised**: no variant left ``serving-eager`` or ``optimizing`` in /v1/models (every compiled variant
  swapped in, from the AOTInductor package a child process built or from the cache).

Starts, in order:

1. inline first start (``QUANTSERVE_OPTIMIZE=inline``, the behaviour before background optimisation: every
   int8 variant compiled with torch.compile before /readyz turns 200), empty cache;
2. background first start (the default), empty cache; one client sends one-sentence embeds to minilm at
   concurrency 1 from ready on, so the latency while the eager form serves and after the swap is measured
   in the same run;
3. and 4. background restarts on the same cache (the spread between them is this machine's noise).

Ratios are to the inline first start. Each compiled variant's time against FP32 (the serving gate's
measurement, at batch 1 and a full batch) is given for both forms: torch.compile (inline) and the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse, json, os, statistics, tempfile, threading, time  # noqa: E401,E402

import httpx  # noqa: E402

from bench.live import ServiceProcess  # noqa: E402
from bench.results import machine_summary, publish  # noqa: E402

PENDING = ("serving-eager", "optimizing")


def _variants(url: str) -> list[dict]:
    return [{"model": m["name"], **v} for m in httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
            for v in m["variants"]]


def start(cache: Path, log: Path, mode: str, probe: bool = False) -> dict:
    env = {"XDG_CACHE_HOME": str(cache), "QUANTSERVE_OPTIMIZE": mode}
    for key in ("QUANTSERVE_ARTIFACTS_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        os.environ.pop(key, None)
    t = time.perf_counter()
    service = ServiceProcess("--log-level", "info", env=env, log=log)
    latencies: list[tuple[float, bool]] = []  # (seconds, whether minilm/int8 was optimised when it was sent)
    stop = threading.Event()
    try:
        service.wait_ready(timeout=1800)
        ready = time.perf_counter() - t
        state_at_ready = {f"{v['model']}/{v['name']}": v["state"] for v in _variants(service.url)}

        def client() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    optimized = optimised_now.is_set()
                    s = time.perf_counter()
                    r = c.post(f"{service.url}/v1/embed", json={"model": "minilm", "inputs": ["How do I reset my "
                                                                                             "password?"]})
                    if r.status_code == 200:
                        latencies.append((time.perf_counter() - s, optimized))
                    time.sleep(0.02)

        optimised_now = threading.Event()
        thread = threading.Thread(target=client, daemon=True) if probe else None
        if thread:
            thread.start()
        while True:
            variants = _variants(service.url)
            if not any(v["state"] in PENDING for v in variants):
                break
            if variants and next((v for v in variants if v["model"] == "minilm" and v["name"] == "int8"),
                                 {}).get("state") == "optimized":
                optimised_now.set()
            if time.perf_counter() - t > 3600:
                raise RuntimeError("variants still optimising after an hour")
            time.sleep(0.5)
        optimised = time.perf_counter() - t
        optimised_now.set()
        time.sleep(10 if probe else 0)  # answers from the swapped-in form
    finally:
        stop.set()
        service.stop()
    compiled = {f"{v['model']}/{v['name']}": {"state": v["state"], "runtime": v["runtime"],
                                              "speed_vs_baseline": v["speed_vs_baseline"],
                                              "optimization": v.get("optimization"),
                                              "compile_seconds": v["compile"]["seconds"]}
                for v in variants if v["compile"]["asked"]}
    out = {"mode": mode, "ready_s": round(ready, 1), "optimised_s": round(optimised, 1),
           "state_at_ready": state_at_ready, "compiled": compiled,
           "from_artifacts": sum(v["loaded_from_artifact"] for v in variants), "variants": len(variants)}
    if probe:
        during = [s for s, opt in latencies if not opt]
        after = [s for s, opt in latencies if opt]
        out["probe"] = {name: {"n": len(xs), "p50_ms": round(1e3 * statistics.median(xs), 2),
                               "p99_ms": round(1e3 * sorted(xs)[int(0.99 * (len(xs) - 1))], 2)}
                        for name, xs in (("while_eager", during), ("after_swap", after)) if xs}
    return out


def _x(speed: dict | None) -> str:
    if not speed:
        return "-"
    return " / ".join(f"{s['time_x']:.2f}" for s in speed.values())


def render(result: dict) -> str:
    runs = result["runs"]
    base = runs[0]["ready_s"]
    lines = ["## Start-up", "",
             f"Measured {result['date']} on {result['machine']} with `{result['command']}`: `python -m service` "
             "with no flag on the default config (10 variants), cache in a fresh user cache directory per series. "
             "Ready: first 200 from /readyz (every variant can answer). Optimised: every `compile: true` variant "
             "swapped to its compiled form. Inline is the former behaviour (torch.compile before ready).", "",
             "| start | ready s | x inline first start | optimised s | variants from the cache | compiled form |",
             "|---|---|---|---|---|---|"]
    names = ["inline, first start", "background, first start", "background, second start",
             "background, third start"]
    for name, run in zip(names, runs):
        forms = {c["runtime"].split("+")[-1] if "+" in c["runtime"] else "eager" for c in run["compiled"].values()}
        lines.append(f"| {name} | {run['ready_s']} | {run['ready_s'] / base:.2f} (**{base / run['ready_s']:.1f}x "
                     f"faster**) | {run['optimised_s']} | {run['from_artifacts']} of {run['variants']} | "
                     f"{', '.join(sorted(forms))} |")
    lines += ["", "Compiled variants, time against FP32 at batch 1 / a full batch (the serving gate's measurement, "
              "in each start's own rounds):", "", "| variant | torch.compile (inline) | AOTInductor package "
              "(background) | package vs eager | package built in s |", "|---|---|---|---|---|"]
    inline, background = runs[0]["compiled"], runs[1]["compiled"]
    for key in inline:
        b = background.get(key, {})
        opt = b.get("optimization") or {}
        lines.append(f"| {key} | {_x(inline[key]['speed_vs_baseline'])} | {_x(b.get('speed_vs_baseline'))} | "
                     f"{_x(opt.get('vs_eager'))} | {opt.get('build_seconds', '-')} |")
    probe = runs[1].get("probe")
    if probe:
        lines += ["", "One client, one-sentence embeds to minilm at concurrency 1 during the background first start: "
                  + "; ".join(f"{k.replace('_', ' ')} p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms ({v['n']} requests)"
                              for k, v in probe.items()) + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="background first start and one restart; prints only")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    with tempfile.TemporaryDirectory(prefix="quantserve-startup-") as tmp:
        plan = [("inline", Path(tmp) / "inline", False)] if not args.quick else []
        plan += [("background", Path(tmp) / "background", True), ("background", Path(tmp) / "background", False)]
        plan += [] if args.quick else [("background", Path(tmp) / "background", False)]
        for i, (mode, cache, probe) in enumerate(plan):
            print(f"start {i + 1}: {mode} ...", file=sys.stderr)
            runs.append(start(cache, Path(tmp) / f"service-{i}.log", mode, probe))
            print(json.dumps({k: runs[-1][k] for k in ("ready_s", "optimised_s")}), file=sys.stderr)
    result = {"date": started, "machine": machine_summary(), "runs": runs,
              "command": "bench/startup.py" + (" --quick" if args.quick else "")}
    if args.quick:
        print(json.dumps(runs, indent=1))
        return 0
    table = render(result)
    print(table)
    publish("startup", result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
