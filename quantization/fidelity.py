"""Fidelity of a variant's outputs against the FP32 model's outputs, measured by the model's task.

Each task (:mod:`quantization.tasks`) owns its measures: embed the cosine similarity of each
embedding (mean and min), classify top-1 agreement and the move in the probability of FP32's top
label, translate the share of identical outputs, chrF and the share of runaway outputs. Each has
one *primary* score in [0, 1] that fidelity targets are stated in, and a continuous *ranking* score
that automatic mixed precision compares layers by. This module holds what is common to all of them.
"""

from __future__ import annotations

from typing import Any

from .tasks import get_task


def fidelity(task: str, reference: Any, output: Any) -> dict[str, float]:
    """``task``'s measures of ``output`` against ``reference`` (both as ``TaskModel.run`` returns them)."""
    return get_task(task).compare(reference, output)


def primary_score(task: str, metrics: dict[str, float]) -> float:
    return get_task(task).primary_score(metrics)


def ranking_score(task: str, metrics: dict[str, float]) -> float:
    """Higher is more faithful; continuous even where the primary score is a count of flips."""
    return get_task(task).ranking_score(metrics)


# metrics where less is better: a bound on them is an upper bound
UPPER_BOUND_METRICS = frozenset({"degenerate", "mean_abs_dprob", "max_abs_dprob"})


def bound_problems(bound: dict[str, float], measured: dict[str, float]) -> list[str]:
    """Each bound that ``measured`` misses, as 'metric value < bound' (or '>' for an upper bound)."""
    out = []
    for metric, limit in bound.items():
        value = measured.get(metric)
        if value is None:
            continue
        if metric in UPPER_BOUND_METRICS and value > limit:
            out.append(f"{metric} {value:.4g} > {limit:g}")
        elif metric not in UPPER_BOUND_METRICS and value < limit:
            out.append(f"{metric} {value:.4g} < {limit:g}")
    return out
