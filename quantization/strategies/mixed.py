"""Mixed precision for any strategy.

By pattern: ``keep`` names modules (glob patterns) that stay in FP32.

Automatic: measure each unit's sensitivity as the fidelity regained by keeping that unit alone in
FP32 (on a continuous ranking score), then keep units in order of sensitivity, one at a time,
until the primary fidelity score meets the target (or ``auto_max_kept`` is reached). The record
says which units were kept, the scores after each step, and whether the target was reached.

``evaluate(variant)`` returns ``(primary, ranking)``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import Progress, Strategy, no_progress

Evaluate = Callable[[Any], tuple[float, float]]


def auto_keep(strategy: Strategy, module: nn.Module, units: list[str], base_kept: frozenset[str],
              evaluate: Evaluate, target: float, max_kept: int | None,
              progress: Progress = no_progress) -> tuple[Any, dict, frozenset[str], dict[str, Any]]:
    variant, layers = strategy.build(module, base_kept)
    score, base_rank = evaluate(variant)
    trajectory: list[dict[str, Any]] = [{"kept": sorted(base_kept), "score": round(score, 6)}]
    notes: dict[str, Any] = {"target": target, "score_all_quantized": round(score, 6)}
    if score >= target:
        notes.update(reached=True, final_score=round(score, 6), trajectory=trajectory)
        return variant, layers, base_kept, notes

    candidates = [u for u in units if u not in base_kept]
    gain: dict[str, float] = {}
    for i, unit in enumerate(candidates, 1):
        trial, _ = strategy.build(module, base_kept | {unit})
        gain[unit] = evaluate(trial)[1] - base_rank
        progress("measuring layer sensitivity", i, len(candidates))
    ranking = sorted(candidates, key=lambda u: gain[u], reverse=True)
    notes["sensitivity"] = [{"unit": u, "gain": round(gain[u], 6)} for u in ranking]

    kept = set(base_kept)
    limit = len(ranking) if max_kept is None else min(max_kept, len(ranking))
    for step, unit in enumerate(ranking[:limit], 1):
        kept.add(unit)
        variant, layers = strategy.build(module, frozenset(kept))
        score = evaluate(variant)[0]
        trajectory.append({"kept": unit, "score": round(score, 6)})
        progress("keeping sensitive layers (until the target or the limit)", step, limit)
        if score >= target:
            break
    notes.update(reached=score >= target, final_score=round(score, 6), trajectory=trajectory)
    return variant, layers, frozenset(kept), notes
