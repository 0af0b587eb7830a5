"""The catalog: every built model with its variants, looked up by name and task, and each one's routing state.

The builder (:mod:`service.builder`) fills it at start-up with immutable :class:`BuiltVariant`
records; afterwards only routing state changes: which variants are unavailable or degraded
(:class:`~service.routing.Router`). Live figures (latency, shadow agreement) are the measurement
sink's (:class:`~service.metrics.Metrics`); :meth:`Catalog.describe` puts the three together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantization import cpu, tuning
from quantization.internals.compiled import is_compiled
from quantization.task_model import TaskModel
from quantization.tasks import Task

from .config import ModelConfig, Settings, VariantConfig
from .errors import NotReady, UnknownModel
from .metrics import Metrics
from .routing import Router

log = logging.getLogger("service.catalog")


class StartupError(Exception):
    """A model or variant could not be built; the message says what and how to fix it."""


@dataclass(frozen=True)
class BuiltVariant:
    """One variant as start-up built it: its module and how it was made and measured. Never changes afterwards."""

    model: str
    task: str
    name: str
    config: VariantConfig
    module: Any
    runtime: str
    strategy: str                              # the strategy built (strategy: auto names the one it chose)
    params: dict[str, Any]
    quantization_seconds: float
    loaded_from_artifact: bool
    weight_bytes: int
    memory_bytes: int
    fidelity: dict[str, float]
    kept: list[str]
    compile_seconds: float = 0.0
    compile_problem: str | None = None
    kernels: dict[str, Any] | None = None      # quantization.tuning's record: the int8 kernels and their times
    speed: dict[str, Any] | None = None        # time against the baseline at the served shapes (serving gate)
    gate_problem: str | None = None            # why the start-up gate keeps unpinned traffic off it
    auto: dict[str, Any] | None = None         # strategy: auto's candidates, their speed and fidelity, and why
    quantized: Any = None                      # the library's QuantizedModel (what an artifact is saved from)
    artifact: Path | None = None               # a directory holding this variant's saved artifact, if any
    optimization: dict[str, Any] | None = None  # the background optimisation that made this form: time, speed-up
    measured_at: str | None = None             # when fidelity and speed were measured, where they come from the cache

    @property
    def compiled(self) -> bool:
        return is_compiled(self.module)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "strategy": self.strategy, "params": self.params,
            "configured_strategy": self.config.strategy, "auto": self.auto,
            "runtime": self.runtime, "weight_bytes": self.weight_bytes, "memory_bytes": self.memory_bytes,
            "quantization_seconds": round(self.quantization_seconds, 4),
            "loaded_from_artifact": self.loaded_from_artifact, "kept_in_fp32": self.kept,
            "compile": {"asked": self.config.compile, "compiled": self.compiled,
                        "seconds": round(self.compile_seconds, 2), "problem": self.compile_problem},
            "startup_fidelity": self.fidelity, "speed_vs_baseline": self.speed, "measured_at": self.measured_at, "kernels": tuning.summary(self.kernels),
            "optimization": self.optimization,
        }


@dataclass
class CatalogModel:
    """A model in the catalog: its config, the loaded FP32 model, its task (bound to it), routing, variants."""

    config: ModelConfig
    task_model: TaskModel
    task: Task  # encodes, runs and answers this model's requests
    router: Router
    variants: dict[str, BuiltVariant] = field(default_factory=dict)  # a variant is replaced whole, never changed
    states: dict[str, str] = field(default_factory=dict)  # variant -> one of STATES (degraded: see router)
    probe_items: list[Any] = field(default_factory=list)  # the start-up probe, tokenized: every form is judged on it
    _reference: list[Any] | None = None

    def reference(self) -> list[Any]:
        """The FP32 model's outputs on the probe, computed at first use (on the model lane): a start whose
        measurements all come from the cache never needs them."""
        if self._reference is None:
            self._reference = self.task.run(self.task_model.module, self.probe_items)
        return self._reference

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def languages(self) -> str | None:
        """``src-tgt`` where the task translates: the config's ``languages``, else the model's own."""
        return self.config.languages or self.task_model.info.get("languages")

    def labels(self, variant: str) -> tuple[str, str, str]:
        """The (model, task, variant) labels of every measurement of ``variant``."""
        return self.name, self.config.task, variant


class Catalog:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, CatalogModel] = {}
        self.ready = False
        self.error: str | None = None
        self.progress: list[str] = []  # start-up events, newest last (/readyz shows the last few)
        self.cpu = cpu.profile()

    def add(self, model: CatalogModel) -> None:
        """``model`` is built: it serves from now on (its batchers must exist), and its state is published."""
        self.models[model.name] = model
        for name, state in model.states.items():
            self.set_state(model, name, state)
        self.metrics.model_ready.labels(model.name, model.config.task).set(1)
        self.say(f"event=model_ready model={model.name} variants={','.join(model.variants)}")

    def set_state(self, model: CatalogModel, variant: str, state: str) -> None:
        model.states[variant] = state
        self.metrics.state.labels(*model.labels(variant)).state(self.state(model, variant))

    @staticmethod
    def state(model: CatalogModel, variant: str) -> str:
        """The variant's state: a pending optimisation first (the gate judges the form it brings again), then
        degraded, then the form it serves (``optimized`` or ``serving``)."""
        state = model.states.get(variant, "serving")
        if state in ("serving-eager", "optimizing"):
            return state
        return "degraded" if variant in model.router.degraded else state

    def say(self, message: str) -> None:
        self.progress.append(message)
        log.info(message)

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str | None, task: str) -> CatalogModel:
        if name is None:
            name = next((m for m in self.settings.model_names(task)), None)
            if name is None:
                raise UnknownModel(f"no {task} model is configured; configured models: "
                                   f"{', '.join(self.settings.model_names())}", available=self.settings.model_names())
        model = self.models.get(name)
        if model is None and self.error is None and name in self.settings.model_names(task):
            raise NotReady(f"model {name!r} is still being built; retry shortly (GET /readyz shows progress)",
                           headers={"Retry-After": "5"})
        if model is None or model.config.task != task:
            available = self.settings.model_names(task)
            raise UnknownModel(f"no {task} model named {name!r}; available: {', '.join(available) or 'none'}",
                               available=available)
        return model

    def models_of(self, task: str) -> list[CatalogModel]:
        """The built models of ``task``, in config order."""
        return [m for m in self.models.values() if m.config.task == task]

    # -- routing state -------------------------------------------------------------------------
    def degrade(self, model: CatalogModel, variant: str, reason: str) -> None:
        """Take ``variant`` out of unpinned traffic (gate.action fallback) and say so: state, metric, log."""
        fallback = self.settings.gate.action == "fallback"
        model.router.mark_degraded(variant, reason, fallback=fallback)
        self.metrics.degraded.labels(*model.labels(variant)).set(1)
        self.metrics.state.labels(*model.labels(variant)).state(self.state(model, variant))
        self.say(f"event=variant_degraded model={model.name} variant={variant} default={model.router.default} "
                 f"reason={reason!r}")

    def describe(self, model: CatalogModel) -> dict[str, Any]:
        c = model.config
        variants = []
        for v in model.variants.values():
            degraded = model.router.degraded.get(v.name)
            variants.append({**v.describe(), "state": self.state(model, v.name), "degraded": degraded,
                             **self.metrics.live(*model.labels(v.name))})
        return {"name": c.name, "task": c.task, "source": c.source, "default_variant": c.default_variant,
                "baseline": c.baseline, "max_input_tokens": c.max_input_tokens,
                "routing": c.routing.model_dump(), "labels": len(model.task_model.labels or []) or None,
                "fidelity_bound": c.bound, "variants": variants,
                "unavailable": [{"name": n, "error": e} for n, e in model.router.unavailable.items()]}
