"""The strategy registry and the one function that applies a strategy to a module."""

from __future__ import annotations

import time
from typing import Any, Callable

from pydantic import ValidationError
from torch import nn

from ..errors import CalibrationError, InvalidConfigError, NoQuantizableLayersError, UnknownStrategyError
from ..plugins import discover
from .base import (STRATEGIES, Batch, LayerwiseStrategy, Progress, QuantizedModel, Strategy, StrategyParams,
                   match_patterns, no_progress, register)
from .mixed import auto_keep

def get_strategy(name: str) -> type[Strategy]:
    _load_builtin()
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}"
        ) from None


def strategy_names() -> list[str]:
    _load_builtin()
    return list(STRATEGIES)


def parse_params(cls: type[Strategy], params: dict[str, Any] | StrategyParams | None) -> StrategyParams:
    if isinstance(params, StrategyParams):
        return params
    try:
        return cls.Params(**(params or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "params"
            if err["type"] == "extra_forbidden":
                valid = ", ".join(cls.Params.model_fields)
                problems.append(f"unknown parameter {where!r} (valid: {valid})")
            else:
                problems.append(f"{where}: {err['msg']}")
        raise InvalidConfigError(f"strategy {cls.name!r}: " + "; ".join(problems)) from None


def quantize(module: nn.Module, strategy: str, params: dict[str, Any] | StrategyParams | None = None, *,
             calibration: list[Batch] | None = None,
             evaluate: Callable[[Any], tuple[float, float]] | None = None,
             progress: Progress | None = None) -> QuantizedModel:
    """Apply ``strategy`` to ``module`` (left unchanged) and return the variant with its record.

    ``calibration``: tokenised batches (model keyword arguments) for strategies that observe
    activations. ``evaluate``: variant -> (primary fidelity score, ranking score), needed by
    ``auto_target`` (see :mod:`quantization.strategies.mixed`).
    """
    cls = get_strategy(strategy)
    p = parse_params(cls, params)
    impl = cls(p)
    impl.progress = progress or no_progress
    units = impl.units(module)
    if not units:
        raise NoQuantizableLayersError(
            f"strategy {strategy!r} found no layer it can quantize in {type(module).__name__}; "
            "it quantizes nn.Linear layers, so give it a model that has some"
        )
    kept = frozenset(match_patterns(units, p.keep))
    unmatched = [pat for pat in p.keep if not match_patterns(units, [pat])]
    if unmatched:
        raise InvalidConfigError(
            f"keep pattern(s) {unmatched} match no quantizable layer; layer names look like {units[0]!r} "
            f"(there are {len(units)}; glob patterns such as '*.output.dense' are allowed)"
        )
    if cls.needs_calibration and not calibration:
        raise CalibrationError(
            f"strategy {strategy!r} calibrates activation ranges and needs sample texts; give at least one calibration text"
        )
    if p.auto_target is not None and evaluate is None:
        raise InvalidConfigError("auto_target needs an evaluation function (quantize a TaskModel with quantize_model)")

    start = time.perf_counter()
    impl.prepare(module, calibration)
    notes: dict[str, Any] = {}
    if p.auto_target is not None:
        variant, layers, kept, notes["auto"] = auto_keep(impl, module, units, kept, evaluate, p.auto_target,
                                                        p.auto_max_kept, impl.progress)
    else:
        variant, layers = impl.build(module, kept)
    seconds = time.perf_counter() - start
    notes.update(impl.notes())
    return QuantizedModel(module=variant, strategy=strategy, params=p.model_dump(), layers=layers,
                          kept=sorted(kept), seconds=seconds, runtime=cls.runtime, notes=notes)


def _load_builtin() -> None:
    """Every module of this package registers the strategies it defines (``@register``)."""
    discover(__name__, __path__, STRATEGIES)


__all__ = ["STRATEGIES", "register", "get_strategy", "strategy_names", "parse_params", "quantize",
           "QuantizedModel", "Strategy", "StrategyParams", "LayerwiseStrategy"]
