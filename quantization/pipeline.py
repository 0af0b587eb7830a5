"""Quantize a :class:`~quantization.models.TaskModel` with texts instead of tensors.

This is the level the CLI, the benchmarks and the service use: calibration texts become
tokenised batches, and automatic mixed precision is judged on the task's own fidelity measure.
Automatic mode scores candidates on the *calibration* texts, never on the evaluation texts, so
that the fidelity reported afterwards is measured on sentences the choice never saw.
"""

from __future__ import annotations

from typing import Any

from .fidelity import fidelity, primary_score, ranking_score
from .task_model import TaskModel
from .texts import calibration_texts
from .strategies.base import Progress
from .strategies import QuantizedModel, StrategyParams, get_strategy, parse_params, quantize


def quantize_model(tm: TaskModel, strategy: str, params: dict[str, Any] | StrategyParams | None = None, *,
                   calibration: list[str] | None = None,
                   progress: Progress | None = None) -> QuantizedModel:
    """Apply ``strategy`` to ``tm.module``; calibration texts default to the built-in set.

    An explicitly empty ``calibration`` list is passed on as empty, so a strategy that needs
    calibration refuses it rather than silently using the built-in set.
    """
    cls = get_strategy(strategy)
    p = parse_params(cls, params)
    if calibration is None:
        calibration = tm.calibration if tm.calibration is not None else calibration_texts()
    texts = list(calibration)
    batches = tm.calibration_batches(texts) if texts else []
    evaluate = None
    if p.auto_target is not None:
        reference = tm.run(None, texts)

        def evaluate(variant: Any) -> tuple[float, float]:
            metrics = fidelity(tm.task, reference, tm.run(variant, texts))
            return primary_score(tm.task, metrics), ranking_score(tm.task, metrics)

    return quantize(tm.module, strategy, p, calibration=batches, evaluate=evaluate, progress=progress)
