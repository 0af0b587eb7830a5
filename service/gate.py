"""The serving gate: a quantized variant that is slower than its FP32 baseline, or less faithful than its
model's bound, never serves unpinned traffic by default.

It judges each variant at start-up (speed at its served shapes against the baseline, measured in the same
rounds; fidelity on the probe set) and again while serving (shadow agreement). A variant that fails is
*degraded*: listed in /v1/models with one sentence saying why, counted in ``quantserve_variant_degraded``
(which an alert watches), and, with ``gate.action: fallback`` (the default), taken out of the model's
default route and A/B split, so unpinned requests go to the baseline. Pinned requests still reach it.
"""

from __future__ import annotations

from typing import Any

from quantization.cpu import CpuProfile, profile as cpu_profile
from quantization.fidelity import bound_problems

from .config import GateConfig



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
    problems = bound_problems(bound, fidelity)
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


__all__ = ["judge", "live_problem", "cpu_note"]
