"""The CI guard of the benchmark: the INT8 variants stay faithful and faster than FP32 (compiled >= 1.5x) in one run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.live import ROOT


@pytest.mark.slow
def test_quick_benchmark_guard_passes_for_the_default_int8_variant():
    r = subprocess.run([sys.executable, "bench/strategies.py", "--quick", "--strategies", "fp32", "dynamic-int8",
                        "--check"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "guard passed: dynamic-int8" in r.stderr
    # where a C++ compiler is present (set-up installs one) the served, compiled int8 is guarded too
    assert "dynamic-int8 + torch.compile" in r.stderr.split("guard passed:")[1] or "GUARD SKIPPED" in r.stderr
