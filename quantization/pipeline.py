"""Quantize a :class:`~quantization.models.TaskModel` with texts instead of tensors.

This is the level the CLI, the benchmarks and the service use: calibration texts become
tokenised batches, and automatic mixed precision is judged on the task's own fidelity measure.
Automatic mode scores candidates on the *calibration* texts, never on the evaluation texts, so
that the fidelity reported afterwards is measured on sentences the choice never saw.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

from .fidelity import fidelity, primary_score, ranking_score
from .models import TaskModel
from .strategies.base import Progress
from .strategies import QuantizedModel, StrategyParams, get_strategy, parse_params, quantize


@lru_cache(maxsize=None)
def _data_file(name: str) -> tuple[str, ...]:
    text = resources.files("quantization").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def calibration_texts() -> list[str]:
    """128 varied English sentences used to calibrate activation ranges."""
    return list(_data_file("calibration_sentences.txt"))


def eval_texts() -> list[str]:
    """240 varied English sentences, disjoint from the calibration set, used to measure fidelity."""
    return list(_data_file("eval_sentences.txt"))


def translation_texts(language: str) -> list[str]:
    """200 varied sentences written in ``language`` (``en`` or ``pt``) for translation fidelity."""
    return list(_data_file(f"translate_{language}.txt"))


def hard_texts(language: str = "en") -> list[str]:
    """32 sentences unlike the calibration texts (``en`` or ``pt``): formal letters, numbers, dates, addresses,
    amounts, codes, and long sentences of 40-70 words."""
    return list(_data_file(f"hard_{language}.txt"))


def probe_texts(language: str = "en", n: int = 64) -> list[str]:
    """The start-up probe set: the hard sentences first, then ordinary ones (evaluation, or translation texts in
    ``language``), ``n`` in all; what a variant's fidelity bound is checked on."""
    ordinary = eval_texts() if language == "en" else translation_texts(language)
    hard = hard_texts(language) if language in ("en", "pt") else []
    return (hard[: n // 2] + ordinary)[:n]


def calibration_texts_for(language: str | None) -> list[str]:
    """Calibration sentences in ``language``: the English set, or 48 Portuguese ones."""
    return list(_data_file("calibration_sentences_pt.txt")) if language == "pt" else calibration_texts()


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
