"""Pick, on this machine, the fastest quantized variant that keeps a fidelity bound (``strategy: auto``).

Accuracy-aware tuning usually runs offline, on whatever machine the engineer has; which int8 route is
fast and which is faithful depends on the CPU it finally runs on (:mod:`quantization.tuning`), and on the
inputs. :func:`auto_select` tries each candidate (a strategy and its parameters) where it will serve:
quantizes it, chooses its kernels for this CPU, measures its fidelity on a probe set against the FP32
model, and times it against the FP32 model at one input and at a full batch, in alternating rounds
(:func:`relative_speed`). The winner is the fastest candidate within the bound that is not slower than
FP32 (among those within ``AS_FAST`` of the fastest, timing noise apart, the most faithful); with none
such, the fastest within the bound; with none within it, the most faithful (which a serving gate will
then refuse). The record lists every candidate with its speed and fidelity, and says
why the winner won.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from .errors import QuantizationError
from .fidelity import bound_problems, ranking_score
from .task_model import TaskModel
from .strategies import QuantizedModel

ROUNDS = 3  # alternating rounds of timing; the median of each side is compared
SLOWER_THAN = 1.1  # above this multiple of FP32's time a candidate counts as slower (timing noise stays below)
AS_FAST = 1.1  # candidates within this multiple of the fastest one's time count as equally fast: fidelity decides


def relative_speed(run: Callable[[Any, list[Any]], Any], module: Any, baseline: Any, items: list[Any],
                   batch: int, rounds: int = ROUNDS) -> dict[str, Any]:
    """``module``'s time over ``baseline``'s on one input and on a full batch of ``items``, medians of rounds in
    which the two alternate (drift on a shared machine hits both alike)."""
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


def _label(strategy: str, params: dict[str, Any]) -> str:
    return strategy + (" " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else "")


def auto_select(tm: TaskModel, candidates: list[tuple[str, dict[str, Any]]], *, bound: dict[str, float],
                run: Callable[[Any, list[Any]], Any], items: list[Any], reference: Any,
                agreement: Callable[[Any, Any], dict[str, float]], batch: int, rounds: int = 2,
                slower_than: float = SLOWER_THAN, quantize: Callable[[str, dict[str, Any]], QuantizedModel],
                tune: Callable[[Any], Any] | None = None,
                batch_only: bool = False) -> tuple[QuantizedModel | None, dict[str, Any]]:
    """(the winning variant, the record of every candidate); the variant is None if no candidate could be built.

    ``run(module, items)`` runs a variant on prepared inputs; ``agreement(reference, outputs)`` measures fidelity
    (the metrics ``bound`` names); ``quantize(strategy, params)`` builds a candidate; ``tune(module)`` chooses
    its kernels (:func:`quantization.tuning.choose_kernels`). Only candidates that can win are timed: those
    within the bound, or with none within it the most faithful. ``batch_only``: judge speed at the full batch
    only (a variant that will be compiled: its eager one-input time says little about its compiled one).
    """
    trials: list[dict[str, Any]] = []
    built: dict[int, QuantizedModel] = {}
    for strategy, params in candidates:
        start = time.perf_counter()
        trial: dict[str, Any] = {"strategy": strategy, "params": params, "label": _label(strategy, params)}
        try:
            qm = quantize(strategy, params)
        except QuantizationError as exc:
            trials.append({**trial, "error": str(exc)})
            continue
        if tune is not None:
            tune(qm.module)
        fid = agreement(reference, run(qm.module, items))
        trial.update(fidelity={k: round(v, 6) for k, v in fid.items()}, problems=bound_problems(bound, fid),
                     seconds=round(time.perf_counter() - start, 2))
        built[len(trials)] = qm
        trials.append(trial)
    ok = sorted(built)
    if not ok:
        return None, {"candidates": trials, "winner": None,
                      "why": "no candidate could be built: " + "; ".join(t["error"] for t in trials)}
    faithful = [i for i in ok if not trials[i]["problems"]]
    timed = faithful or [max(ok, key=lambda i: ranking_score(tm.task, trials[i]["fidelity"]))]
    for i in timed:
        start = time.perf_counter()
        speed = relative_speed(run, built[i].module, tm.module, items, batch, rounds)
        judged = {k: v for k, v in speed.items() if not (batch_only and k == "batch_1")} or speed
        trials[i].update(speed=speed, slower=any(s["time_x"] > slower_than for s in judged.values()),
                         seconds=round(trials[i]["seconds"] + time.perf_counter() - start, 2))
    batch_key = list(trials[timed[0]]["speed"])[-1]

    def batch_time(i: int) -> tuple[float, float]:
        s = trials[i]["speed"]
        return s[batch_key]["time_x"], s["batch_1"]["time_x"]

    good = [i for i in faithful if not trials[i]["slower"]]
    if good:
        fastest = min(batch_time(i)[0] for i in good)
        # speed differences within timing noise do not outweigh fidelity
        near = [i for i in good if batch_time(i)[0] <= fastest * AS_FAST]
        win = max(near, key=lambda i: (ranking_score(tm.task, trials[i]["fidelity"]), -batch_time(i)[0]))
        which = "the fastest" if len(near) == 1 else \
            f"the most faithful of the {len(near)} within {AS_FAST:.2f}x the fastest's time"
        why = (f"{which} of {len(good)} candidate(s) within the fidelity bound and not slower than FP32 "
               f"({trials[win]['speed'][batch_key]['time_x']:.2f}x FP32's time at {batch_key.replace('_', ' ')}, "
               f"{trials[win]['speed']['batch_1']['time_x']:.2f}x at batch 1)")
    elif faithful:
        win = min(faithful, key=batch_time)
        why = "no candidate within the fidelity bound is as fast as FP32 here; this is the fastest within it"
    else:
        win = timed[0]
        why = "no candidate meets the fidelity bound; this is the most faithful (" + \
              ", ".join(trials[win]["problems"]) + ")"
    for i, t in enumerate(trials):
        t["chosen"] = i == win
    return built[win], {"candidates": trials, "winner": trials[win]["label"], "why": trials[win]["label"] + ": " + why,
                        "bound": bound}


__all__ = ["auto_select", "relative_speed", "SLOWER_THAN", "AS_FAST", "ROUNDS"]
