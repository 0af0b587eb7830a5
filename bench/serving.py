"""The real service over HTTP under closed-loop load, against the same models called in-process.

    .venv/bin/python bench/serving.py            # full run, rewrites its section of bench/RESULTS.md
    .venv/bin/python bench/serving.py --quick    # shorter runs, prints only

Starts ``python -m service`` (default config) on a free port, and C = 1, 8, 32 clients (bench/loadgen.py)
each send one-sentence requests back to back (``quantization.texts.eval_texts()`` in rotation)
for a fixed time after a warm-up, per model and pinned variant. The same variants are built in
this process and timed directly (``Task.run``), before and after the HTTP runs, as baselines:
one sentence per call (for HTTP overhead at C=1) and batches of 32 (for batching efficiency at C=32).

The peer: LitServe serving the same MiniLM int8 variant (built by our library the same way; see
bench/litserve_peer.py) with its own batching, set as the service's default (inputs per batch,
wait), driven by the same load generator at the same concurrencies in the same run, after our
service has stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse, contextlib, os, re, signal, statistics, subprocess, tempfile, time  # noqa: E401,E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.live import ServiceProcess, free_port, poll_until_ok, stop  # noqa: E402
from bench.results import machine_summary, publish  # noqa: E402
from quantization.texts import eval_texts  # noqa: E402
from service.builder import build_catalog  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.config import BatchingConfig, load_settings  # noqa: E402

MODELS = {"minilm": "/v1/embed", "intent": "/v1/classify"}
VARIANTS = ["fp32", "int8"]
CONCURRENCY = [1, 8, 32]
BATCH = 32


def in_process(catalog: Any, texts: list[str], rounds: int) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (model, variant): single-sentence call seconds, and batch-of-32 sentences/s per round.

    Variants take turns within each round, so drift on a shared machine hits them alike.
    """
    batches = [[texts[(i * BATCH + j) % len(texts)] for j in range(BATCH)] for i in range(-(-len(texts) // BATCH))]
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ in range(rounds):
        for model in MODELS:
            served = catalog.models[model]
            run, tok = served.task.run, served.task.tokenize
            for name in VARIANTS:
                module = served.variants[name].module
                s = out.setdefault((model, name), {"single_s": [], "batched_per_s": []})
                run(module, tok(texts[:1]))  # warm-up
                for text in texts:
                    t = time.perf_counter()
                    run(module, tok([text]))
                    s["single_s"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for b in batches:
                    run(module, tok(b))
                s["batched_per_s"].append(len(batches) * BATCH / (time.perf_counter() - t))
    return out


def server_stats(url: str, model: str, variant: str) -> dict[str, float]:
    """Sums and counts of the service's batch-size and queue-time histograms for one variant (/metrics)."""
    got: dict[str, float] = Counter()
    pattern = r"^quantserve_(batch_size|queue_duration_seconds)_(sum|count)\{([^}]*)\} (\S+)$"
    for m in re.finditer(pattern, httpx.get(f"{url}/metrics").text, re.M):
        if f'model="{model}"' in m[3] and f'variant="{variant}"' in m[3]:
            got[f"{m[1]}_{m[2]}"] = float(m[4])
    return got


def _requests(port: int, path: str, variant: str | None, texts: list[str]) -> list[bytes]:
    """One encoded request per text: our API's body, or the peer's ({"input": text}) when variant is None."""
    bodies = [{"inputs": [t], "variant": variant} if variant is not None else {"input": t} for t in texts]
    return loadgen.encode("127.0.0.1", port, path, bodies)


def timed(port: int, requests: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """One timed closed loop (after the caller's warm-up): the client's side of a row."""
    out = loadgen.run(loadgen.closed_loop("127.0.0.1", port, requests, clients, seconds))
    xs = sorted(out.latencies)
    pick = lambda q: 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(xs), "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "per_s": len(xs) / out.elapsed, "errors": sum(out.errors.values()), "error_kinds": dict(out.errors),
            "client_cpu_share": out.cpu_s / out.elapsed, "seconds": out.elapsed}


def load(url: str, port: int, texts: list[str], seconds: float, warmup: float) -> list[dict[str, Any]]:
    """Every model x variant x concurrency in turn: p50/p99 latency, throughput, errors, mean batch."""
    rows = []
    for model, path in MODELS.items():
        for variant in VARIANTS:
            r = httpx.post(f"{url}{path}", json={"inputs": [texts[0]], "variant": variant}, timeout=60)
            if r.status_code != 200 or r.json()["variant"] != variant or len(r.json()["results"]) != 1:
                raise RuntimeError(f"{path} {variant}: unexpected answer {r.status_code} {r.text[:300]}")
            requests = _requests(port, path, variant, texts)
            for c in CONCURRENCY:
                print(f"load: {model} {variant} c={c} ...", file=sys.stderr)
                timed(port, requests, c, warmup)
                before = server_stats(url, model, variant)
                row = timed(port, requests, c, seconds)
                d = {k: v - before[k] for k, v in server_stats(url, model, variant).items()}
                n, queued = d["batch_size_count"], d["queue_duration_seconds_count"]
                rows.append({"model": model, "variant": variant, **row,
                             "mean_batch": d["batch_size_sum"] / n if n else None,
                             "mean_queue_ms": 1000 * d["queue_duration_seconds_sum"] / queued if queued else None})
    return rows


PEER = "int8 via LitServe"


def peer_load(url: str, port: int, texts: list[str], seconds: float, warmup: float) -> list[dict[str, Any]]:
    """LitServe at every concurrency: the same closed loop against its POST /predict."""
    rows = []
    r = httpx.post(f"{url}/predict", json={"input": texts[0]}, timeout=60)
    if r.status_code != 200 or len(r.json()["embedding"]) != 384:
        raise RuntimeError(f"LitServe: unexpected answer {r.status_code} {r.text[:300]}")
    requests = _requests(port, "/predict", None, texts)
    for c in CONCURRENCY:
        print(f"load: LitServe c={c} ...", file=sys.stderr)
        timed(port, requests, c, warmup)
        rows.append({"model": "minilm", "variant": PEER, **timed(port, requests, c, seconds),
                     "mean_batch": None, "mean_queue_ms": None})
    return rows


def run_peer(texts: list[str], seconds: float, warmup: float, batching: BatchingConfig) -> list[dict[str, Any]]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="litserve-", suffix=".log") as log:
        # its own process group: LitServe spawns inference workers that outlive a SIGTERM to the server alone
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "litserve_peer.py"), "--port", str(port),
                                 "--max-batch-size", str(batching.max_batch_size),
                                 "--batch-timeout-ms", str(batching.max_wait_ms)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poll_until_ok(f"http://127.0.0.1:{port}/health", 900,
                          alive=lambda: f"LitServe exited ({proc.returncode})" if proc.poll() is not None else None,
                          tail=lambda: Path(log.name).read_text(errors="replace")[-3000:])
            return peer_load(f"http://127.0.0.1:{port}", port, texts, seconds, warmup)
        finally:
            stop(proc)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s runs; prints, does not write RESULTS.md")
    args = ap.parse_args()
    seconds, warmup, rounds = (3.0, 1.0, 1) if args.quick else (10.0, 2.0, 2)
    texts = eval_texts()
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()

    service = ServiceProcess("--log-level", "warning")
    url = service.url
    try:
        print("building the variants in-process (the service builds its own meanwhile) ...", file=sys.stderr)
        settings = load_settings(probe_texts=8)  # the default config, as the service process loads it
        catalog = build_catalog(settings, Metrics())
        ready_s = service.wait_ready()
        print("timing in-process baselines ...", file=sys.stderr)
        base = in_process(catalog, texts, rounds)
        rows = load(url, service.port, texts, seconds, warmup)
        service.stop()
        print("starting the LitServe peer ...", file=sys.stderr)
        rows += run_peer(texts, seconds, warmup, settings.batching)  # the peer batches as the service does
        print("timing in-process baselines again ...", file=sys.stderr)
        for key, s in in_process(catalog, texts, rounds).items():
            base[key]["single_s"] += s["single_s"]
            base[key]["batched_per_s"] += s["batched_per_s"]
    finally:
        service.stop()
    baselines = {f"{m}/{v}": {"single_ms": 1000 * statistics.median(s["single_s"]),
                              "batched_per_s": statistics.median(s["batched_per_s"])} for (m, v), s in base.items()}
    for r in rows:
        b = baselines[f"{r['model']}/{r['variant'] if r['variant'] != PEER else 'int8'}"]
        r["overhead_ms"] = r["p50_ms"] - b["single_ms"] if r["clients"] == 1 else None
        r["overhead_x"] = r["p50_ms"] / b["single_ms"] if r["clients"] == 1 else None
        r["batched_x"] = r["per_s"] / b["batched_per_s"] if r["clients"] == BATCH else None
    result = {"date": started, "machine": machine_summary(), "texts": len(texts), "seconds": seconds,
              "warmup": warmup, "service_ready_s": ready_s, "batching": settings.batching.model_dump(),
              "baselines": baselines, "rows": rows,
              "command": "bench/serving.py" + (" --quick" if args.quick else ""),
              "wall_s": time.perf_counter() - t0}
    table = render(result)
    print(table)
    print(f"wall time {result['wall_s']:.0f} s", file=sys.stderr)
    if not args.quick:
        publish("http", result, table)
    service.log.unlink(missing_ok=True)
    return 0


def render(result: dict[str, Any]) -> str:
    """The markdown section: one table per model, with its in-process baselines under it."""
    batching = f"{result['batching']['max_batch_size']} inputs / {result['batching']['max_wait_ms']:g} ms"
    lines = [
        "## HTTP serving",
        "",
        f"Measured {result['date']} on {result['machine']} with `{result['command']}`. "
        f"The service (`python -m service`, default config: dynamic batching up to {batching}, 5% shadow "
        f"traffic) runs in its own process; C closed-loop clients (`bench/loadgen.py`: one keep-alive "
        f"connection each, on the same machine) each send "
        f"one-sentence requests back to back for {result['seconds']:.0f} s after a {result['warmup']:.0f} s warm-up, "
        f"cycling through the {result['texts']} evaluation sentences; latency is per request at the client, "
        "requests/s equals sentences/s, and the baselines are the same variants called in-process "
        "(`Task.run`) in the same run: one sentence per call for the overhead at C=1, batches of 32 for "
        "the throughput ratio at C=32.",
    ]
    for model, path in MODELS.items():
        lines += ["", f"`{model}` (`POST {path}`):", "",
                  "| variant | clients | p50 ms | p99 ms | requests/s | errors | mean batch | mean queue ms | "
                  "x in-process batched throughput | overhead over in-process at c=1 (ms, ratio) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["model"] == model and r["variant"] != PEER):
            batched = f"**{r['batched_x']:.2f}**" if r["batched_x"] is not None else "-"
            over = f"+{r['overhead_ms']:.1f} ms, x{r['overhead_x']:.2f}" if r["overhead_ms"] is not None else "-"
            mean = f"{r['mean_batch']:.1f}" if r["mean_batch"] is not None else "-"
            queue = f"{r['mean_queue_ms']:.1f}" if r["mean_queue_ms"] is not None else "-"
            lines.append(f"| {r['variant']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['per_s']:.1f} | {r['errors']} | {mean} | {queue} | {batched} | {over} |")
        base = ", ".join(f"{v} {result['baselines'][f'{model}/{v}']['single_ms']:.1f} ms per sentence alone, "
                         f"{result['baselines'][f'{model}/{v}']['batched_per_s']:.0f} sentences/s in batches of 32"
                         for v in VARIANTS)
        lines += ["", f"In-process: {base}."]
    ours = {r["clients"]: r for r in result["rows"] if r["model"] == "minilm" and r["variant"] == "int8"}
    peer = {r["clients"]: r for r in result["rows"] if r["variant"] == PEER}
    if peer:
        lines += ["", "The peer: LitServe 0.2 serving the same `minilm` int8 variant (same library build, compiled) with "
                  f"its own batching (the same {batching}, one inference worker), same load generator, same run "
                  "(`bench/litserve_peer.py`, `POST /predict`):", "",
                  "| clients | LitServe p50 ms | LitServe p99 ms | LitServe requests/s | ours requests/s x LitServe | "
                  "ours p99 x LitServe |", "|---|---|---|---|---|---|"]
        for c, r in peer.items():
            o = ours.get(c)
            lines.append(f"| {c} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['per_s']:.1f} | "
                         f"**{o['per_s'] / r['per_s']:.2f}** | **{o['p99_ms'] / r['p99_ms']:.2f}** |" if o else "")
    cpu = max(r["client_cpu_share"] for r in result["rows"])
    lines += ["", "Mean batch and mean queue ms (time a request waited for its batch's model call to start) come "
              f"from the service's /metrics; the load generator itself used up to {100 * cpu:.0f}% of one core, "
              f"taken from the same {os.cpu_count()} cores as the service."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
