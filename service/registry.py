"""Builds every configured model's variants at start-up and holds them while the service runs.

For each model: load the FP32 model once; for each variant, load its saved artifact if there is a
valid one (``artifact`` in the config, or ``artifacts_dir/<model>/<variant>``) or quantize it with
the library (saving it to ``artifacts_dir`` when set); warm it up; record the seconds it took,
its stored weight bytes, how much resident memory the process grew by, and its fidelity to the
FP32 baseline on a built-in probe set. Ready only when all of that is done.
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from quantization import cpu, tuning
from quantization.artifacts import load_artifact, load_beside, read_manifest, save_artifact, save_beside
from quantization import internals
from quantization.internals.compiled import is_compiled, serve_compiled, use_cache_dir
from quantization.errors import ArtifactError, QuantizationError
from quantization.models import load_task_model
from quantization.task_model import TaskModel
from quantization.tasks import Task
from quantization.texts import probe_texts
from quantization.pipeline import quantize_model
from quantization.report import serialized_bytes
from quantization.runtimes import get_runtime
from quantization.selection import ROUNDS, auto_select, relative_speed

from .batching import BatchConfig, DynamicBatcher, ModelLane
from . import gate
from .config import AUTO, ModelConfig, Settings, VariantConfig
from .errors import UnknownModel
from .metrics import Metrics
from .routing import Router

log = logging.getLogger("service.registry")
LATENCY_WINDOW = 2048


class StartupError(Exception):
    """A model or variant could not be built; the message says what and how to fix it."""


@dataclass
class Variant:
    model: str
    task: str
    name: str
    config: VariantConfig
    module: Any
    runtime: str
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
    degraded: str | None = None                # why the serving gate keeps unpinned traffic off it
    strategy: str = ""                         # the strategy built (strategy: auto names the one it chose)
    params: dict[str, Any] = field(default_factory=dict)
    auto: dict[str, Any] | None = None         # strategy: auto's candidates, their speed and fidelity, and why
    batcher: DynamicBatcher | None = None
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    requests: int = 0
    inputs: int = 0
    shadow: dict[str, float] = field(default_factory=lambda: {"n": 0, "sum": 0.0})

    @property
    def compiled(self) -> bool:
        return is_compiled(self.module)

    def record_latency(self, seconds: float, inputs: int) -> None:
        self.latencies.append(seconds)
        self.requests += 1
        self.inputs += inputs

    def latency_percentiles(self) -> dict[str, float | None]:
        if not self.latencies:
            return {"p50": None, "p90": None, "p99": None}
        xs = sorted(self.latencies)
        pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 6)  # noqa: E731
        return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "strategy": self.strategy or self.config.strategy,
            "params": self.params if self.strategy else self.config.params, "configured_strategy": self.config.strategy,
            "auto": self.auto,
            "runtime": self.runtime, "weight_bytes": self.weight_bytes, "memory_bytes": self.memory_bytes,
            "quantization_seconds": round(self.quantization_seconds, 4),
            "loaded_from_artifact": self.loaded_from_artifact, "kept_in_fp32": self.kept,
            "compile": {"asked": self.config.compile, "compiled": self.compiled,
                        "seconds": round(self.compile_seconds, 2), "problem": self.compile_problem},
            "startup_fidelity": self.fidelity,
            "state": "degraded" if self.degraded else "serving", "degraded": self.degraded,
            "speed_vs_baseline": self.speed, "kernels": tuning.summary(self.kernels),
            "shadow_agreement": ({"inputs": int(self.shadow["n"]), "mean": self.shadow["sum"] / self.shadow["n"]}
                                 if self.shadow["n"] else {"inputs": 0, "mean": None}),
            "requests": self.requests, "inputs": self.inputs,
            "latency_seconds": self.latency_percentiles(),
        }


@dataclass
class ServedModel:
    config: ModelConfig
    task_model: TaskModel
    task: Task  # the model's task, bound to it: encodes, runs and answers its requests
    router: Router
    variants: dict[str, Variant] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def languages(self) -> str | None:
        """``src-tgt`` where the task translates: the config's ``languages``, else the model's own."""
        return self.config.languages or self.task_model.info.get("languages")

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"name": c.name, "task": c.task, "source": c.source, "default_variant": c.default_variant,
                "baseline": c.baseline, "max_input_tokens": c.max_input_tokens,
                "routing": c.routing.model_dump(), "labels": len(self.task_model.labels or []) or None,
                "fidelity_bound": c.bound,
                "variants": [v.describe() for v in self.variants.values()],
                "unavailable": [{"name": n, "error": e} for n, e in self.router.unavailable.items()]}


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.error: str | None = None
        self.progress: list[str] = []
        self.cpu = cpu.profile()
        # every model call of the process, start-up included, runs on this one thread (one OpenMP team)
        self.lane = ModelLane(background_share=settings.batching.shadow_budget)

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str | None, task: str) -> ServedModel:
        if name is None:
            name = next((m for m in self.settings.model_names(task)), None)
            if name is None:
                raise UnknownModel(f"no {task} model is configured; configured models: "
                                   f"{', '.join(self.settings.model_names())}", available=self.settings.model_names())
        model = self.models.get(name)
        if model is None or model.config.task != task:
            available = self.settings.model_names(task)
            raise UnknownModel(f"no {task} model named {name!r}; available: {', '.join(available) or 'none'}",
                               available=available)
        return model

    def models_of(self, task: str) -> list[ServedModel]:
        """The built models of ``task``, in config order."""
        return [m for m in self.models.values() if m.config.task == task]

    # -- start-up ------------------------------------------------------------------------------
    def build(self) -> None:
        """Load, quantize and measure everything (blocking; run it on ``self.lane.executor``)."""
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.cpu = cpu.refresh()
        switches = self.settings.speedups.model_dump()
        internals.configure(**{k: v for k, v in switches.items() if k in internals.SPEEDUPS})
        self.metrics.declare_cpu(self.cpu)
        self._say(f"event=cpu_profile cpu={self.cpu.summary()!r} key={self.cpu.key}")
        if self.settings.artifacts_dir and any(v.compile for m in self.settings.models for v in m.variants):
            use_cache_dir(Path(self.settings.artifacts_dir) / "compile-cache")
        for name in self.settings.absent_optional_models:
            self._say(f"event=model_skipped model={name} reason='optional and its source is not on this machine'")
        for mc in self.settings.models:
            self._say(f"event=model_loading model={mc.name} task={mc.task} source={mc.source}")
            tm = self._load(mc)
            served = ServedModel(mc, tm, mc.task_kind(tm, mc.max_input_tokens), Router(mc))
            # a model that reads another language brings its own probe sentences
            n = self.settings.probe_count(mc.task)  # hard sentences first, then ordinary ones
            probe_items = served.task.tokenize((tm.probes or probe_texts("en", n))[:n])
            reference = served.task.run(tm.module, probe_items)
            for vc in mc.variants:
                try:
                    served.variants[vc.name] = self._build_variant(served, vc, probe_items, reference)
                except Exception as exc:  # noqa: BLE001 - judged by on_variant_failure below
                    if not isinstance(exc, StartupError):
                        log.exception("event=variant_build_crashed model=%s variant=%s", mc.name, vc.name)
                    reason = str(exc) if isinstance(exc, StartupError) else (
                        f"model {mc.name!r} variant {vc.name!r}: {type(exc).__name__}: {exc}")
                    if self.settings.on_variant_failure == "stop":
                        raise StartupError(reason) from exc
                    served.router.mark_unavailable(vc.name, reason)
                    self._say(f"event=variant_unavailable model={mc.name} variant={vc.name} reason={reason!r}")
            if not served.variants:
                raise StartupError(f"model {mc.name!r}: none of its variants could be built; fix the first: "
                                   f"{next(iter(served.router.unavailable.values()))}")
            for v in served.variants.values():
                if v.degraded:
                    self.degrade(served, v, v.degraded)
            self.models[mc.name] = served
        if self.settings.speedups.gc_freeze:
            self._freeze_startup_objects()
        self._say(f"event=speedups {' '.join(f'{k}={v!r}' for k, v in internals.state().items())}")

    def _freeze_startup_objects(self) -> None:
        """Move everything start-up made out of the cyclic garbage collector's sight.

        The built models leave ~750,000 tracked objects (modules, compiled graphs and their guards)
        that live as long as the process; every full collection walked them all, ~0.5 s on 2 cores
        during which no request in flight made progress (the p99 at 32 clients). Objects frozen here
        are still freed by reference counting; only cycles among them would never be collected.
        """
        gc.collect()
        gc.freeze()
        self._say(f"event=startup_objects_frozen objects={gc.get_freeze_count()}")

    def _say(self, message: str) -> None:
        self.progress.append(message)
        log.info(message)

    def _load(self, mc: ModelConfig) -> TaskModel:
        try:
            tm = load_task_model(mc.source, mc.task, name=mc.name)
        except QuantizationError as exc:
            raise StartupError(f"model {mc.name!r}: {exc}") from None
        if mc.task_kind.needs_languages and not (mc.languages or tm.info.get("languages")):
            raise StartupError(f"model {mc.name!r}: the language pair of {mc.source!r} is not known; add "
                               f"`languages: <source>-<target>` (e.g. en-pt) to the model's config")
        tm.max_length = mc.max_input_tokens
        return tm

    def _artifact_dir(self, mc: ModelConfig, vc: VariantConfig) -> Path | None:
        if vc.artifact:
            return Path(vc.artifact)
        if self.settings.artifacts_dir:
            return Path(self.settings.artifacts_dir) / mc.name / vc.name
        return None

    def _build_variant(self, served: ServedModel, vc: VariantConfig, probe_items, reference) -> Variant:
        mc, tm = served.config, served.task_model
        rss = psutil.Process().memory_info().rss
        start = time.perf_counter()
        # a variant only training can make (QAT on labelled data) ships inside the model's directory
        bundled = tm.artifacts.get(vc.strategy) if not vc.artifact and not vc.params else None
        if bundled is None and not vc.artifact and not vc.params and vc.strategy in tm.trained_strategies:
            raise StartupError(f"model {mc.name!r} variant {vc.name!r}: {vc.strategy} of this model is made by "
                               f"training and its directory holds none yet; run `python -m quantization finetune "
                               f"--qat`, or give the variant params (e.g. {{steps: 200}}) to build it from "
                               f"calibration texts instead")
        directory = bundled or self._artifact_dir(mc, vc)
        qm, from_artifact = None, False
        strategy, params, auto, tuned = vc.strategy, vc.params, None, None
        if vc.strategy == AUTO:
            strategy, params, auto, qm, tuned = self._auto(served, vc, probe_items, reference, directory)
        if qm is None and directory is not None and (directory / "manifest.json").is_file():
            try:
                manifest = read_manifest(directory)
                if manifest["strategy"] != strategy or (bundled is None and
                                                        manifest["params"] != _full_params(strategy, params)):
                    raise ArtifactError(f"it holds {manifest['strategy']} {manifest['params']}, not what the config asks")
                qm, from_artifact = load_artifact(directory, tm), True
            except ArtifactError as exc:
                if vc.artifact or bundled:
                    raise StartupError(f"model {mc.name!r} variant {vc.name!r}: {exc}") from None
                self._say(f"event=artifact_rebuild model={mc.name} variant={vc.name} reason={str(exc)!r}")
        if qm is None or (auto is not None and not auto.get("from_cache")):
            try:
                qm = qm or quantize_model(tm, strategy, params)
            except QuantizationError as exc:
                raise StartupError(f"model {mc.name!r} variant {vc.name!r} ({strategy}): {exc}") from None
            # an fp32 variant is the source model itself, and the native engine reads its own files
            if directory is not None and not vc.artifact and strategy != "fp32" and get_runtime(qm.runtime).saves_artifact:
                save_artifact(tm, qm, directory)
        weight_bytes = serialized_bytes(qm.module)
        kernels = self._choose_kernels(served, vc, qm.module, probe_items, directory, tuned)
        module, runtime, compile_seconds, problem = qm.module, qm.runtime, 0.0, None
        if vc.compile:
            module, compile_seconds, problem = self._compile(served, vc, qm.module, probe_items)
            runtime = f"{qm.runtime}+inductor" if problem is None else runtime
        # warm-up and fidelity in one pass; the untouched FP32 module already produced the reference
        outputs = reference if module is tm.module else served.task.run(module, probe_items)
        seconds = time.perf_counter() - start
        grown = max(0, psutil.Process().memory_info().rss - rss)
        fid = served.task.compare_outputs(reference, outputs)
        speed, degraded = self._gate(served, vc, module, probe_items, fid)
        variant = Variant(model=mc.name, task=mc.task, name=vc.name, config=vc, module=module, runtime=runtime,
                          quantization_seconds=seconds - compile_seconds, loaded_from_artifact=from_artifact,
                          weight_bytes=weight_bytes, memory_bytes=grown,
                          fidelity={k: round(v, 6) for k, v in fid.items()}, kept=qm.kept,
                          compile_seconds=compile_seconds,
                          compile_problem=problem, kernels=kernels, speed=speed, degraded=degraded,
                          strategy=strategy, params=qm.params if auto is not None else vc.params, auto=auto)
        self.metrics.declare_variant(mc.name, mc.task, vc.name, strategy=strategy, runtime=qm.runtime,
                                     source=mc.source, weight_bytes=variant.weight_bytes, memory_bytes=grown,
                                     quantization_seconds=variant.quantization_seconds, fidelity=fid)
        self._say(f"event=variant_ready model={mc.name} variant={vc.name} strategy={strategy} "
                  f"seconds={seconds:.2f} compiled={variant.compiled} artifact={from_artifact} weight_bytes={variant.weight_bytes} "
                  f"rss_growth_bytes={grown} fidelity={fid}")
        return variant

    def _auto(self, served: ServedModel, vc: VariantConfig, probe_items: list[Any], reference: Any,
              directory: Path | None) -> tuple[str, dict[str, Any], dict[str, Any], Any, dict[str, Any] | None]:
        """``strategy: auto``: (strategy, params, the selection's record, the winner and its kernel choice if built
        here).

        The selection saved beside the artifact for this CPU profile is reused; otherwise every candidate is
        built, its kernels chosen, its fidelity and speed measured (quantization.selection.auto_select).
        """
        mc, tm = served.config, served.task_model
        saved_as = f"auto-{self.cpu.key}.json"
        record = load_beside(directory, saved_as) if directory is not None else None
        win = next((c for c in (record or {}).get("candidates", []) if c.get("chosen") and "strategy" in c), None)
        if record is not None and win is not None:
            record["from_cache"] = True
            self._say(f"event=auto_reused model={mc.name} variant={vc.name} winner={record.get('winner')!r}")
            return win["strategy"], win.get("params") or {}, record, None, None
        candidates = [(c["strategy"], c.get("params", {})) for c in vc.params.get("candidates") or []] or \
            mc.task_kind.auto_candidates
        batch = probe_items[: self._batch()]
        tuned: dict[int, dict[str, Any]] = {}  # id(candidate module) -> its kernel choice, while it is alive

        def tune(module: Any) -> None:
            tuned[id(module)] = tuning.choose_kernels(module, lambda m: served.task.run(m, batch))

        qm, record = auto_select(
            tm, candidates, bound=mc.bound, run=served.task.run, items=probe_items, reference=reference,
            agreement=served.task.compare_outputs, batch=self._batch(), slower_than=self.settings.gate.slower_than,
            quantize=lambda strategy, params: quantize_model(tm, strategy, params),
            tune=tune, batch_only=vc.compile)
        if qm is None:
            raise StartupError(f"model {mc.name!r} variant {vc.name!r} (auto): {record['why']}")
        self._say(f"event=auto_selected model={mc.name} variant={vc.name} why={record['why']!r}")
        if directory is not None:
            save_beside(directory, saved_as, record)
        win = next(c for c in record["candidates"] if c.get("chosen"))
        # the winner's kernels were chosen for an eager forward; a compiled one is timed again
        return win["strategy"], win["params"], record, qm, None if vc.compile else tuned.get(id(qm.module))

    def _batch(self) -> int:
        return self.settings.batching.max_batch_size

    def _choose_kernels(self, served: ServedModel, vc: VariantConfig, module: Any, probe_items: list[Any],
                        directory: Path | None, tuned: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Each int8 GEMM layer's kernels on this CPU (dynamic or static): ``tuned`` (chosen moments ago, by auto),
        the saved choice for this CPU profile, or measured now."""
        if not tuning.int8_layers(module):
            return None
        record = tuned
        if record is None and directory is not None:
            record = tuning.load_choice(directory, module, compiled=vc.compile)
        if record is None:
            batch = probe_items[: self._batch()]
            record = tuning.choose_kernels(module, lambda m: served.task.run(m, batch), compiled=vc.compile)
        if directory is not None and record is not None and not record.get("from_cache"):
            tuning.save_choice(directory, record)
        summary = tuning.summary(record)
        self._say(f"event=kernels_chosen model={served.name} variant={vc.name} kernel={summary['kernel']} "
                  f"inexact={sorted(summary['inexact'])} seconds={summary['seconds']} cached={summary['from_cache']}")
        return record

    def _gate(self, served: ServedModel, vc: VariantConfig, module: Any, probe_items: list[Any],
              fid: dict[str, float]) -> tuple[dict[str, Any] | None, str | None]:
        """(speed against the baseline, why the variant fails the serving gate or None)."""
        mc = served.config
        if vc.strategy == "fp32" or mc.baseline is None:
            return None, None  # the baseline itself
        rounds = mc.task_kind.timing_rounds or ROUNDS
        speed = relative_speed(served.task.run, module, served.task_model.module, probe_items, self._batch(),
                                  rounds)
        reason = gate.judge(vc.name, mc.baseline, mc.bound, fid, speed, self.settings.gate, self.cpu)
        if reason is not None and self.settings.gate.action == "stop":
            raise StartupError(f"model {mc.name!r}: {reason}; set gate.action to fallback or serve to start anyway")
        return speed, reason

    def degrade(self, served: ServedModel, variant: Variant, reason: str) -> None:
        """Take ``variant`` out of unpinned traffic (gate.action fallback) and say so: state, metric, log."""
        variant.degraded = reason
        fallback = self.settings.gate.action == "fallback"
        served.router.mark_degraded(variant.name, reason, fallback=fallback)
        self.metrics.degraded.labels(served.name, served.config.task, variant.name).set(1)
        self._say(f"event=variant_degraded model={served.name} variant={variant.name} "
                  f"default={served.router.default} reason={reason!r}")

    def _compile(self, served: ServedModel, vc: VariantConfig, module: Any,
                 probe_items: list[Any]) -> tuple[Any, float, str | None]:
        """The variant's module compiled, warmed up and checked; or, where compiling is off, impossible here or
        does not match eager outputs, the eager module and the reason (the variant still serves, and
        /v1/models says why it is eager)."""
        start = time.perf_counter()
        served_module, problem = serve_compiled(module, served.task.run, probe_items)
        if problem is not None:
            self._say(f"event=compile_unavailable model={served.name} variant={vc.name} reason={problem!r}")
        return served_module, time.perf_counter() - start, problem

    async def start_batchers(self) -> None:
        b = self.settings.batching
        config = BatchConfig(max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms,
                             max_batch_tokens=b.max_batch_tokens, max_queue=b.max_queue)
        for served in self.models.values():
            for v in served.variants.values():
                v.batcher = DynamicBatcher(f"{served.name}/{v.name}", _runner(served.task, v.module), config,
                                           cost=len, on_batch=_observer(self.metrics, v), lane=self.lane)
                await v.batcher.start()
        self.ready = True
        self.metrics.ready.set(1)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for served in self.models.values():
            for v in served.variants.values():
                if v.batcher is not None:
                    await v.batcher.stop(drain=True)
        self.lane.shutdown()


def _full_params(strategy: str, params: dict[str, Any]) -> dict[str, Any]:
    from quantization.strategies import get_strategy, parse_params

    cls = get_strategy(strategy)
    return parse_params(cls, params).model_dump()


def _runner(task: Task, module: Any):
    return lambda items: task.run(module, items)


def _observer(metrics: Metrics, v: Variant):
    labels = (v.model, v.task, v.name)
    seen = {"late_compiles": getattr(v.module, "late_compiles", 0)}

    def on_batch(size: int, cost: int, seconds: float) -> None:
        metrics.batch_size.labels(*labels).observe(size)
        metrics.inference_seconds.labels(*labels).observe(seconds)
        metrics.inputs.labels(*labels).inc(size)
        metrics.tokens.labels(*labels).inc(cost)
        late = getattr(v.module, "late_compiles", 0)  # a compiled variant's count (quantization.internals.compiled.Settled)
        if late > seen["late_compiles"]:
            metrics.late_compiles.labels(*labels).inc(late - seen["late_compiles"])
            seen["late_compiles"] = late

    return on_batch
