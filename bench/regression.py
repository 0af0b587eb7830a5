"""No-regression check: two commits' speed, interleaved in one invocation on one machine.

    .venv/bin/python bench/regression.py --old HEAD~1 --new HEAD           # 5 rounds, rewrites its section
    .venv/bin/python bench/regression.py --old main --new HEAD --rounds 7 --quick   # prints only

Each commit is exported (``git archive``) to a temporary directory and runs from there with this
environment's Python:

- strategies: a worker process per commit builds MiniLM's fp32, dynamic-int8 and dynamic-int8 compiled,
  as ``bench/strategies.py`` does, and times them with that commit's own ``bench/strategies.py`` timing
  code (batch 32 x 128 and batch 1 x 16) when asked;
- serving: each commit's ``python -m service`` serves MiniLM and the intent classifier (their entries
  of the default config), and ``bench/serving.py``'s closed loop drives ``/v1/embed`` and
  ``/v1/classify``, fp32 and int8, at 1 client (p50 latency) and 32 clients (requests/s).

Kernels are chosen by measurement, and two measurements differ: the old commit's worker and service
choose (kernels, and strategy ``auto``'s winner), and the new commit's reuse those choices (the worker
applies the same kernel record; the service loads the artifacts and kernel choices the old one saved),
so both serve the same variants and only the code differs.

Both commits are built and started first; then every round measures old and new back to back (the
order alternates between rounds), so drift on a shared machine hits both alike. A figure's ratio is
new over old for rates, old over new for times (above 1: the new commit is faster); the check passes
when the median ratio of each benchmark is at least 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse, json, statistics, subprocess, tempfile, time  # noqa: E401,E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from bench.live import ServiceProcess  # noqa: E402
from bench.results import machine_summary, publish  # noqa: E402
from bench.serving import _requests, timed  # noqa: E402
from quantization.texts import eval_texts  # noqa: E402

BAR = 0.95
SERVED = {"minilm": "/v1/embed", "intent": "/v1/classify"}
CLIENTS = (1, 32)

# Runs inside the exported commit (its own library and its own bench/strategies.py timing code).
WORKER = r"""
import copy, json, sys
sys.path.insert(0, ".")
from bench.strategies import fixed_batch, time_rounds
import os
# by file, not by trying the import: an editable install would find the newer module in the checkout
if os.path.exists("quantization/internals/compiled.py"):
    from quantization.internals.compiled import Settled, compile_module, compiler_problem, warm_up
else:  # commits before quantization/internals/
    from quantization.compiled import Settled, compile_module, compiler_problem, warm_up
from quantization.models import load_task_model
from quantization.pipeline import quantize_model
from quantization.texts import eval_texts
from quantization.tuning import apply_choice, choose_kernels

texts = eval_texts()
mini = load_task_model("minilm")
variants = {"fp32": mini.module}
qm = quantize_model(mini, "dynamic-int8")
compiled = copy.deepcopy(qm.module)
# the kernels are measured once, by the first commit's worker, and the second applies the same choice
records_path, mode = sys.argv[1], sys.argv[2]
records = json.load(open(records_path)) if mode == "read" else {}
if mode == "read":
    apply_choice(qm.module, records["eager"])
else:
    records["eager"] = choose_kernels(qm.module, lambda m: mini.run(m, texts[:16]))
variants["dynamic-int8"] = qm.module
if compiler_problem() is None:
    if mode == "read":
        apply_choice(compiled, records["compiled"])
    else:
        records["compiled"] = choose_kernels(compiled, lambda m: mini.run(m, texts[:16]), compiled=True)
    c = compile_module(compiled, probe=lambda m: mini.run(m, texts[:2]))
    mini.run(c, texts)
    warm_up(lambda batch: mini.run(c, batch), texts[:4])
    variants["dynamic-int8 + torch.compile"] = Settled(c)
if mode == "write":
    json.dump(records, open(records_path, "w"))
shapes = {"batch32x128": fixed_batch(mini, texts, 32, 128), "batch1x16": fixed_batch(mini, texts, 1, 16)}
print(json.dumps({"ready": list(variants)}), flush=True)
for line in sys.stdin:
    out = {}
    for shape, batch in shapes.items():
        for name, seconds in time_rounds(variants, batch, 1 if shape == "batch32x128" else 5).items():
            out[f"{name} {shape} s"] = seconds
    print(json.dumps(out), flush=True)
"""


class Commit:
    """One commit, exported, with its strategies worker and its service."""

    def __init__(self, label: str, rev: str, workdir: Path, first: bool) -> None:
        self.label, self.rev = label, rev
        self.sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", rev], text=True).strip()
        self.dir = workdir / label
        self.dir.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", self.sha], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(self.dir)], input=archive.stdout, check=True)
        config = yaml.safe_load((self.dir / "service" / "default_config.yaml").read_text())
        config["models"] = [m for m in config["models"] if m["name"] in SERVED]
        (self.dir / "regression.yaml").write_text(yaml.safe_dump(config))
        # the first commit measures kernels and picks auto's candidates; the second reuses both (the kernel
        # record, and the saved artifacts with their kernel choice), so the two serve the same variants
        self.worker = subprocess.Popen([sys.executable, "-c", WORKER, str(workdir / "kernels.json"),
                                        "write" if first else "read"], cwd=self.dir, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self.service = ServiceProcess("--config", str(self.dir / "regression.yaml"), "--log-level", "warning",
                                      "--artifacts-dir", str(workdir / "artifacts"), cwd=self.dir)

    def ready(self) -> None:
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} strategies worker exited ({self.worker.wait()})")
        self.service.wait_ready()

    def strategies(self) -> dict[str, float]:
        self.worker.stdin.write("round\n")
        self.worker.stdin.flush()
        return json.loads(self.worker.stdout.readline())

    def serving(self, texts: list[str], seconds: float) -> dict[str, float]:
        out = {}
        port = self.service.port
        for (model, variant) in [(m, v) for m in SERVED for v in ("fp32", "int8")]:
            reqs = _requests(port, SERVED[model], variant, texts)
            for clients in CLIENTS:
                timed(port, reqs, clients, min(1.0, seconds))  # warm-up
                row = timed(port, reqs, clients, seconds)
                if row["errors"]:
                    raise RuntimeError(f"{self.label} {model}/{variant}: {row['error_kinds']}")
                if clients == 1:
                    out[f"{model} {variant} c=1 p50 s"] = row["p50_ms"] / 1000
                else:
                    out[f"{model} {variant} c={clients} per_s"] = row["per_s"]
        return out

    def close(self) -> None:
        self.service.stop()
        self.worker.stdin.close()
        self.worker.wait(30)


def ratio(key: str, old: float, new: float) -> float:
    """Above 1: the new commit is faster (rates new/old, times old/new)."""
    return new / old if key.endswith("per_s") else old / new


def summarize(rounds: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    benches: dict[str, Any] = {}
    for bench in ("strategies", "serving"):
        keys = list(rounds[0]["old"][bench])
        per_key = {k: statistics.median(ratio(k, r["old"][bench][k], r["new"][bench][k]) for r in rounds)
                   for k in keys}
        old = {k: statistics.median(r["old"][bench][k] for r in rounds) for k in keys}
        new = {k: statistics.median(r["new"][bench][k] for r in rounds) for k in keys}
        median = statistics.median(per_key.values())
        benches[bench] = {"ratios": per_key, "old": old, "new": new, "median_ratio": median, "passed": median >= BAR}
    return benches


def render(result: dict[str, Any]) -> str:
    lines = [f"## No regression: {result['new']['rev']} ({result['new']['sha'][:10]}) against "
             f"{result['old']['rev']} ({result['old']['sha'][:10]})", "",
             f"Measured {result['date']} on {result['machine']} with `{result['command']}`: {result['rounds']} "
             f"rounds, old and new back to back in each (order alternating), {result['seconds']:g} s per serving "
             f"load. Ratio: new/old for rates, old/new for times; above 1 the new commit is faster. Bar: median "
             f"ratio of each benchmark >= {BAR}.", ""]
    for bench, b in result["benches"].items():
        lines += [f"**{bench}: median ratio {b['median_ratio']:.3f} ({'passed' if b['passed'] else 'FAILED'})**", "",
                  "| figure | old (median) | new (median) | ratio (median of rounds) |", "|---|---|---|---|"]
        for key, r in b["ratios"].items():
            unit = 1000 if key.endswith(" s") else 1
            shown = key[:-2] + " ms" if key.endswith(" s") else key
            lines.append(f"| {shown} | {b['old'][key] * unit:.2f} | {b['new'][key] * unit:.2f} | {r:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the commit before the change (any git revision)")
    ap.add_argument("--new", default="HEAD", help="the commit after it (default HEAD)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per serving load (after a warm-up)")
    ap.add_argument("--quick", action="store_true", help="prints, does not write RESULTS.md")
    args = ap.parse_args()
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    texts = eval_texts()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="regression-") as tmp:
        commits = []
        try:
            print("building both commits' variants and services, one after the other ...", file=sys.stderr)
            for label, rev in (("old", args.old), ("new", args.new)):
                commits.append(Commit(label, rev, Path(tmp), first=not commits))
                commits[-1].ready()
            for i in range(args.rounds):
                order = commits if i % 2 == 0 else commits[::-1]
                got: dict[str, Any] = {}
                for c in order:
                    got[c.label] = {"strategies": c.strategies()}
                for c in order:
                    got[c.label]["serving"] = c.serving(texts, args.seconds)
                rounds.append(got)
                print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for c in commits:
                c.close()
    result = {"date": started, "machine": machine_summary(), "rounds": args.rounds, "seconds": args.seconds,
              "old": {"rev": args.old, "sha": commits[0].sha}, "new": {"rev": args.new, "sha": commits[1].sha},
              "benches": summarize(rounds), "raw": rounds, "wall_s": time.perf_counter() - t0,
              "command": f"bench/regression.py --old {args.old} --new {args.new} --rounds {args.rounds}"}
    table = render(result)
    print(table)
    print(f"wall time {result['wall_s']:.0f} s", file=sys.stderr)
    if not args.quick:
        publish("regression", result, table)
    return 0 if all(b["passed"] for b in result["benches"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
