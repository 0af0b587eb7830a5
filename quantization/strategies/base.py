"""What every strategy is: parameters, the units it quantizes, and how it builds a variant.

A strategy never changes the FP32 model it is given. :meth:`Strategy.build` returns a new module
in which every quantizable *unit* (a module name, usually an ``nn.Linear``) is replaced, except
the units in ``kept``, which stay as they are in FP32. That one method is what mixed precision,
by pattern or automatic, is built on (see :mod:`quantization.strategies.mixed`).
"""

from __future__ import annotations

import copy
import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

Batch = dict[str, torch.Tensor]
Progress = Callable[[str, int, int], None]  # (stage, done, total): drives the CLI's progress bars


def no_progress(_stage: str, _done: int, _total: int) -> None:
    """The default: report nothing."""


class StrategyParams(BaseModel):
    """Parameters every strategy accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: list[str] = Field(
        default_factory=list,
        description="glob patterns of module names kept in higher precision, e.g. 'encoder.layer.3.output.dense' or '*.output.dense'",
    )
    auto_target: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="automatic mixed precision: keep the most sensitive layers in FP32 until the task's primary "
                    "fidelity score (mean cosine, top-1 agreement, chrF/100) reaches this value",
    )
    auto_max_kept: int | None = Field(default=None, ge=0, description="automatic mode keeps at most this many layers")


@dataclass
class QuantizedModel:
    """A ready variant and the record of what the strategy did."""

    module: Any
    strategy: str
    params: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    seconds: float = 0.0
    runtime: str = "torch"
    notes: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "params": self.params, "runtime": self.runtime,
                "seconds": round(self.seconds, 4), "quantized_layers": len(self.layers),
                "kept": self.kept, "layers": self.layers, "notes": self.notes}


class Strategy(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    needs_calibration: ClassVar[bool] = False
    runtime: ClassVar[str] = "torch"

    def __init__(self, params: StrategyParams) -> None:
        self.params = params
        self.progress: Progress = no_progress

    # -- what can be quantized ------------------------------------------------------------------
    def units(self, module: nn.Module) -> list[str]:
        """Names of the modules this strategy replaces (default: every ``nn.Linear``)."""
        return [n for n, m in module.named_modules() if type(m) is nn.Linear]

    def prepare(self, module: nn.Module, calibration: list[Batch] | None) -> None:
        """Anything done once before building: calibration, clustering, export."""

    @abstractmethod
    def build(self, module: nn.Module, kept: frozenset[str]) -> tuple[Any, dict[str, dict[str, Any]]]:
        """A new variant with every unit not in ``kept`` quantized, and a record per quantized unit."""

    def notes(self) -> dict[str, Any]:
        return {}


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: a module of this package that defines a strategy registers it by name."""
    STRATEGIES[cls.name] = cls
    return cls


def share_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor with the original.

    Replacing submodules in the copy leaves the original untouched while the unchanged parts
    (embeddings, layer norms) cost no extra memory.
    """
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def match_patterns(units: list[str], patterns: list[str]) -> set[str]:
    return {u for u in units if any(fnmatch.fnmatchcase(u, p) for p in patterns)}


class LayerwiseStrategy(Strategy):
    """A strategy that replaces each ``nn.Linear`` independently with a quantized layer."""

    def __init__(self, params: StrategyParams) -> None:
        super().__init__(params)
        self._cache: dict[str, nn.Module] = {}

    @abstractmethod
    def convert(self, name: str, linear: nn.Linear) -> nn.Module:
        """The quantized replacement for one layer."""

    def describe_layer(self, name: str, layer: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": getattr(layer, "kind", type(layer).__name__)}
        if hasattr(layer, "config"):
            out.update({k: v for k, v in layer.config().items() if k not in ("kind",)})
        return out

    def build(self, module: nn.Module, kept: frozenset[str]) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
        variant = share_copy(module)
        layers: dict[str, dict[str, Any]] = {}
        todo = [n for n in self.units(module) if n not in kept and n not in self._cache]
        for name in self.units(module):
            if name in kept:
                continue
            if name not in self._cache:
                self._cache[name] = self.convert(name, module.get_submodule(name))
                self.progress("quantizing layers", todo.index(name) + 1, len(todo))
            set_submodule(variant, name, self._cache[name])
            layers[name] = self.describe_layer(name, self._cache[name])
        return variant.eval(), layers
