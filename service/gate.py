"""The serving gate: a quantized variant that is slower than its FP32 baseline, or less faithful than its
model's bound, never serves unpinned traffic by default.

It judges each variant at start-up (speed at its served shapes against the baseline, measured in the same
rounds; fidelity on the probe set) and again while serving (shadow agreement). A variant that fails is
*degraded*: listed in /v1/models with one sentence saying why, counted in ``quantserve_variant_degraded``
(which an alert watches), and, with ``gate.action: fallback`` (the default), taken out of the model's
default route and A/B split, so unpinned requests go to the baseline. Pinned requests still reach it.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

from quantization.cpu import CpuProfile, profile as cpu_profile

from .config import UPPER_BOUNDS, GateConfig

log = logging.getLogger("service.gate")
ROUNDS = 3


class GateStop(Exception):
    """gate.action is stop and a variant failed the gate."""


def fidelity_problems(bound: dict[str, float], measured: dict[str, float]) -> list[str]:
    """Each bound ``measured`` misses, as 'metric value < bound'."""
    out = []
    for metric, limit in bound.items():
        value = measured.get(metric)
        if value is None:
            continue
        if metric in UPPER_BOUNDS and value > limit:
            out.append(f"{metric} {value:.4g} > {limit:g}")
        elif metric not in UPPER_BOUNDS and value < limit:
            out.append(f"{metric} {value:.4g} < {limit:g}")
    return out


def served_speed(run: Callable[[Any, list[Any]], Any], module: Any, baseline: Any, items: list[Any],
                 batch: int, rounds: int = ROUNDS) -> dict[str, Any]:
    """Time of ``module`` over ``baseline``'s at one input and at a full batch, measured in alternating rounds."""
    shapes = {"1": items[:1], str(min(batch, len(items))): items[:batch]}
    times: dict[str, dict[str, list[float]]] = {s: {"variant": [], "baseline": []} for s in shapes}
    for _ in range(rounds):
        for shape, chunk in shapes.items():
            for side, m in (("variant", module), ("baseline", baseline)):
                start = time.perf_counter()
                run(m, chunk)
                times[shape][side].append(time.perf_counter() - start)
    out: dict[str, Any] = {}
    for shape, t in times.items():
        v, b = statistics.median(t["variant"]), statistics.median(t["baseline"])
        out[f"batch_{shape}"] = {"variant_ms": round(1e3 * v, 3), "baseline_ms": round(1e3 * b, 3),
                                 "time_x": round(v / b, 3)}
    return out


def cpu_note(prof: CpuProfile) -> str:
    if prof.int8_dot:
        return ""
    return (f" ({prof.vendor} {prof.model}, {prof.isa}: no AVX-512 VNNI or AVX-VNNI, so torch._int_mm has no fast "
            f"kernel here and FBGEMM runs 7-bit activations)")


def judge(variant: str, baseline: str, bound: dict[str, float], fidelity: dict[str, float],
          speed: dict[str, Any] | None, gate: GateConfig, prof: CpuProfile | None = None) -> str | None:
    """One sentence saying why ``variant`` must not be the default, or None when it passes."""
    prof = prof or cpu_profile()
    reasons = []
    slow = [(shape, s["time_x"]) for shape, s in (speed or {}).items() if s["time_x"] > gate.slower_than]
    if slow:
        shape, worst = max(slow, key=lambda p: p[1])
        reasons.append(f"{variant} runs {worst:.2f}x the time of {baseline} at {shape.replace('_', ' ')} on this "
                       f"CPU{cpu_note(prof)}")
    problems = fidelity_problems(bound, fidelity)
    if problems:
        reasons.append(f"{variant} is below its fidelity bound on the probe set ({', '.join(problems)})")
    if not reasons:
        return None
    return "; ".join(reasons)


def live_problem(variant: str, metric: str, mean: float, inputs: int, bound: dict[str, float],
                 gate: GateConfig) -> str | None:
    """The sentence for shadow agreement below the bound (once there are enough comparisons)."""
    limit = bound.get(metric)
    value = mean * 100.0 if metric == "chrf" else mean  # shadow chrF is a sentence score in [0, 1]
    if limit is None or inputs < gate.min_shadow_inputs or value >= limit:
        return None
    return f"{variant}'s live agreement with the baseline fell below its bound ({metric} {value:.4g} < {limit:g} " \
           f"over {inputs} shadow comparisons)"


__all__ = ["judge", "live_problem", "served_speed", "fidelity_problems", "GateStop", "cpu_note"]
