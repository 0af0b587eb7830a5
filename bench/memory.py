"""Resident memory of the service per deployment shape: what the Kubernetes requests/limits are sized from.

    .venv/bin/python bench/memory.py            # rewrites its section of bench/RESULTS.md
    .venv/bin/python bench/memory.py --quick    # fewer requests, prints only

For each model config the Kubernetes manifests ship (the base's default config, the int8-only
overlay, and the two sides of the A/B overlay), as the container runs it: the variants are
first built into an artifacts directory (``python -m service.prebuild``), then
``python -m service --artifacts-dir`` starts on a free port. Measured from /proc: resident memory
once ready (idle), then under load (4 clients sending batches of 32 inputs to every model and
variant in turn; every other batch is of long inputs, cut at the 256-token limit, so a batch
reaches the batcher's 8,192-token cap), and the peak (VmHWM) over the whole run. Ratios are to
the default config.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse, json, subprocess, tempfile, threading, time  # noqa: E401,E402

import httpx  # noqa: E402
import yaml  # noqa: E402

from bench.results import machine_summary, publish  # noqa: E402
from bench.live import ServiceProcess  # noqa: E402
from quantization.texts import eval_texts  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
CONFIGS = {
    "default (base)": K8S / "base" / "app" / "models.yaml",
    "int8-only": K8S / "overlays" / "int8-only" / "models.yaml",
    "A/B: fp32 side": K8S / "overlays" / "ab" / "fp32" / "models.yaml",
    "A/B: int8 side": K8S / "overlays" / "ab" / "int8" / "models.yaml",
}
ENDPOINT = {"embed": "/v1/embed", "classify": "/v1/classify"}
CLIENTS, BATCH = 4, 32


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def load(url: str, config: Path, requests_per_client: int) -> int:
    models = yaml.safe_load(config.read_text())["models"]
    targets = [(ENDPOINT[m["task"]], m["name"], v["name"]) for m in models for v in m["variants"]]
    texts = eval_texts()
    long_texts = [" ".join(texts[i:i + 16]) for i in range(0, len(texts) - 16, 16)]  # > 256 tokens each
    sent = [0]

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(requests_per_client):
                path, model, variant = targets[(k + i) % len(targets)]
                pool = long_texts if i % 2 else texts
                batch = [pool[(k * 7 + i * BATCH + j) % len(pool)] for j in range(BATCH)]
                c.post(path, json={"model": model, "variant": variant, "inputs": batch}).raise_for_status()
                sent[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent[0]


def measure(name: str, config: Path, requests_per_client: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "artifacts"
        subprocess.run([sys.executable, "-m", "service.prebuild", "--config", str(config), "--artifacts-dir",
                        str(artifacts)], cwd=ROOT, check=True, capture_output=True)
        service = ServiceProcess("--config", str(config), "--artifacts-dir", str(artifacts), "--log-level", "warning",
                                 log=Path(tmp) / "service.log")
        try:
            ready_s = service.wait_ready()
            time.sleep(2)
            idle = proc_status(service.proc.pid)["VmRSS"]
            sent = load(service.url, config, requests_per_client)
            after = proc_status(service.proc.pid)
        finally:
            service.stop()
    row = {"config": name, "file": str(config.relative_to(ROOT)), "ready_seconds": round(ready_s, 1),
           "idle_rss_bytes": idle, "loaded_rss_bytes": after["VmRSS"], "peak_rss_bytes": after["VmHWM"],
           "requests": sent, "inputs_per_request": BATCH}
    print(json.dumps(row), flush=True)
    return row


def render(result: dict) -> str:
    base = result["rows"][0]
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["## Resident memory per deployment shape", "",
             f"Measured {result['date']} on {result['machine']} with `{result['command']}`: each config started as "
             f"the container runs it (saved artifacts), resident memory once ready, after {CLIENTS} clients sent "
             f"{result['rows'][0]['requests']} requests of {BATCH} inputs (half of them at the 256-token limit), and the "
             "peak; ratios to the default config.",
             "", "| config | ready s | idle MiB | under load MiB | peak MiB | peak x default |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} (`{r['file']}`) | {r['ready_seconds']} | {mib(r['idle_rss_bytes'])} | "
                     f"{mib(r['loaded_rss_bytes'])} | {mib(r['peak_rss_bytes'])} | "
                     f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    per_client = 4 if args.quick else 12
    rows = [measure(name, path, per_client) for name, path in CONFIGS.items()]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_summary(),
              "command": "python bench/memory.py" + (" --quick" if args.quick else ""), "rows": rows}
    table = render(result)
    print(table)
    if not args.quick:
        publish("memory", result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
