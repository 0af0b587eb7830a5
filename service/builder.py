"""Builds every configured model's variants at start-up, into the catalog.

For each model: load the FP32 model once; for each variant, load its saved artifact if there is a
valid one (``artifact`` in the config, or ``artifacts_dir/<model>/<variant>``) or quantize it with
the library (saving it to ``artifacts_dir`` when set); choose its int8 kernels for this CPU;
compile it where asked; warm it up; record the seconds it took, its stored weight bytes, how much
resident memory the process grew by, and its fidelity to the FP32 baseline on a built-in probe
set; and judge it with the start-up gate. Each variant comes out as an immutable
:class:`~service.catalog.BuiltVariant`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from quantization import cpu, internals, tuning
from quantization.artifacts import (code_fingerprint, load_artifact, load_beside, read_manifest, save_artifact,
                                    save_beside)
from quantization.errors import ArtifactError, QuantizationError
from quantization.internals.compiled import serve_compiled, use_cache_dir
from quantization.models import load_task_model
from quantization.pipeline import quantize_model
from quantization.report import serialized_bytes
from quantization.runtimes import get_runtime
from quantization.selection import ROUNDS, auto_select, relative_speed
from quantization.task_model import TaskModel
from quantization.texts import probe_texts

from . import gate
from .catalog import BuiltVariant, Catalog, CatalogModel, StartupError
from .config import AUTO, ModelConfig, Settings, VariantConfig
from .metrics import Metrics
from .routing import Router

log = logging.getLogger("service.builder")


class VariantBuilder:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.settings = catalog.settings
        self.metrics = catalog.metrics

    @property
    def cpu(self) -> cpu.CpuProfile:
        return self.catalog.cpu

    def build(self, inline: bool = True) -> Catalog:
        """Load, quantize, compile (``inline``) and measure everything into the catalog (blocking): ``prebuild``
        and tests."""
        self.prepare()
        for mc in self.settings.models:
            self.catalog.add(self.build_model(mc, inline=inline))
        self.finish()
        return self.catalog

    def prepare(self) -> None:
        """Before the first model: threads, the CPU profile, the speed-up switches, the kernel cache."""
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.catalog.cpu = cpu.refresh()
        switches = self.settings.speedups.model_dump()
        internals.configure(**{k: v for k, v in switches.items() if k in internals.SPEEDUPS})
        self.metrics.declare_cpu(self.cpu)
        self.catalog.say(f"event=cpu_profile cpu={self.cpu.summary()!r} key={self.cpu.key}")
        if self.settings.artifacts_dir and any(v.compile for m in self.settings.models for v in m.variants):
            use_cache_dir(Path(self.settings.artifacts_dir) / "compile-cache")
        for name in self.settings.absent_optional_models:
            self.catalog.say(f"event=model_skipped model={name} reason='optional and its source is not on this machine'")

    def build_model(self, mc: ModelConfig, inline: bool) -> CatalogModel:
        """One model with every variant built and measured (blocking). ``inline``: variants with ``compile: true``
        are compiled here (torch.compile); otherwise they come out eager, left to :mod:`service.optimizer`."""
        self.catalog.say(f"event=model_loading model={mc.name} task={mc.task} source={mc.source}")
        tm = self._load(mc)
        served = CatalogModel(mc, tm, mc.task_kind(tm, mc.max_input_tokens), Router(mc))
        if served.task.needs_languages and not served.languages:
            raise StartupError(f"model {mc.name!r}: the language pair of {mc.source!r} is not known; add "
                               f"`languages: <source>-<target>` (e.g. en-pt) to the model's config")
        # a model that reads another language brings its own probe sentences
        n = self.settings.probe_count(mc.task)  # hard sentences first, then ordinary ones
        served.probe_items = served.task.tokenize((tm.probes or probe_texts("en", n))[:n])
        for vc in mc.variants:
            try:
                served.variants[vc.name] = self._build_variant(served, vc, served.probe_items, inline)
            except Exception as exc:  # noqa: BLE001 - judged by on_variant_failure below
                if not isinstance(exc, StartupError):
                    log.exception("event=variant_build_crashed model=%s variant=%s", mc.name, vc.name)
                reason = str(exc) if isinstance(exc, StartupError) else (
                    f"model {mc.name!r} variant {vc.name!r}: {type(exc).__name__}: {exc}")
                if self.settings.on_variant_failure == "stop":
                    raise StartupError(reason) from exc
                served.router.mark_unavailable(vc.name, reason)
                self.catalog.say(f"event=variant_unavailable model={mc.name} variant={vc.name} reason={reason!r}")
        if not served.variants:
            raise StartupError(f"model {mc.name!r}: none of its variants could be built; fix the first: "
                               f"{next(iter(served.router.unavailable.values()))}")
        for v in served.variants.values():
            served.states[v.name] = "optimized" if v.compiled else "serving-eager" if v.config.compile and \
                not inline and v.compile_problem is None else "serving"
            if v.gate_problem:
                self.catalog.degrade(served, v.name, v.gate_problem)
        return served

    def finish(self) -> None:
        """After the last model."""
        if self.settings.speedups.gc_freeze:
            self._freeze_startup_objects()
        self.catalog.say(f"event=speedups {' '.join(f'{k}={v!r}' for k, v in internals.state().items())}")

    def _freeze_startup_objects(self) -> None:
        """Move everything start-up made out of the cyclic garbage collector's sight.

        The built models leave ~750,000 tracked objects (modules, compiled graphs and their guards)
        that live as long as the process; every full collection walked them all, ~0.5 s on 2 cores
        during which no request in flight made progress (the p99 at 32 clients). Objects frozen here
        are still freed by reference counting; only cycles among them would never be collected.
        """
        gc.collect()
        gc.freeze()
        self.catalog.say(f"event=startup_objects_frozen objects={gc.get_freeze_count()}")

    def _load(self, mc: ModelConfig) -> TaskModel:
        try:
            tm = load_task_model(mc.source, mc.task, name=mc.name)
        except QuantizationError as exc:
            raise StartupError(f"model {mc.name!r}: {exc}") from None
        tm.max_length = mc.max_input_tokens
        return tm

    def _artifact_dir(self, mc: ModelConfig, vc: VariantConfig) -> Path | None:
        if vc.artifact:
            return Path(vc.artifact)
        if self.settings.artifacts_dir:
            return Path(self.settings.artifacts_dir) / mc.name / vc.name
        return None

    def _build_variant(self, served: CatalogModel, vc: VariantConfig, probe_items, inline: bool = True) -> BuiltVariant:
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
        qm, from_artifact, saved = None, False, False
        strategy, params, auto, tuned = vc.strategy, vc.params, None, None
        if vc.strategy == AUTO:
            strategy, params, auto, qm, tuned = self._auto(served, vc, probe_items, directory)
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
                self.catalog.say(f"event=artifact_rebuild model={mc.name} variant={vc.name} reason={str(exc)!r}")
        if qm is None or (auto is not None and not auto.get("from_cache")):
            try:
                qm = qm or quantize_model(tm, strategy, params)
            except QuantizationError as exc:
                raise StartupError(f"model {mc.name!r} variant {vc.name!r} ({strategy}): {exc}") from None
            # an fp32 variant is the source model itself, and the native engine reads its own files
            if directory is not None and not vc.artifact and strategy != "fp32" and get_runtime(qm.runtime).saves_artifact:
                saved = self._save(served, vc, qm, directory)
        weight_bytes = serialized_bytes(qm.module)
        kernels = self._choose_kernels(served, vc, qm.module, probe_items, directory, tuned)
        module, runtime, compile_seconds, problem = qm.module, qm.runtime, 0.0, None
        if vc.compile and inline:
            module, compile_seconds, problem = self._compile(served, vc, qm.module, probe_items)
            runtime = f"{qm.runtime}+inductor" if problem is None else runtime
        # fidelity and speed, measured (warming the variant up) or, for this very module on this CPU, cached
        key = self._measure_key(served, vc, strategy, runtime, kernels, directory)
        cached = load_beside(directory, f"measured-{key}.json") if key else None
        if cached is not None:
            served.task.run(module, probe_items[:2])  # warm-up: one padded batch of two
            fid, measured_at = cached["fidelity"], cached["measured_at"]
        else:
            reference = served.reference()
            outputs = reference if module is tm.module else served.task.run(module, probe_items)
            fid, measured_at = served.task.compare_outputs(reference, outputs), None
        seconds = time.perf_counter() - start
        grown = max(0, psutil.Process().memory_info().rss - rss)
        speed, gate_problem = self._gate(served, vc, module, probe_items, fid, cached["speed"] if cached else None)
        if key and cached is None:
            save_beside(directory, f"measured-{key}.json", {
                "fidelity": fid, "speed": speed, "cpu": self.cpu.summary(),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        variant = BuiltVariant(model=mc.name, task=mc.task, name=vc.name, config=vc, module=module, runtime=runtime,
                          quantization_seconds=seconds - compile_seconds, loaded_from_artifact=from_artifact,
                          weight_bytes=weight_bytes, memory_bytes=grown,
                          fidelity={k: round(v, 6) for k, v in fid.items()}, kept=qm.kept,
                          compile_seconds=compile_seconds,
                          compile_problem=problem, kernels=kernels, speed=speed, gate_problem=gate_problem,
                          strategy=strategy, params=qm.params if auto is not None else vc.params, auto=auto,
                          quantized=qm, artifact=directory if (from_artifact or saved) and strategy != "fp32" else None,
                          measured_at=measured_at)
        self.metrics.declare_variant(mc.name, mc.task, vc.name, strategy=strategy, runtime=qm.runtime,
                                     source=mc.source, weight_bytes=variant.weight_bytes, memory_bytes=grown,
                                     quantization_seconds=variant.quantization_seconds, fidelity=fid)
        self.catalog.say(f"event=variant_ready model={mc.name} variant={vc.name} strategy={strategy} "
                  f"seconds={seconds:.2f} compiled={variant.compiled} artifact={from_artifact} weight_bytes={variant.weight_bytes} "
                  f"rss_growth_bytes={grown} fidelity={fid} measured={measured_at or 'now'}")
        return variant

    def _measure_key(self, served: CatalogModel, vc: VariantConfig, strategy: str, runtime: str,
                     kernels: dict[str, Any] | None, directory: Path | None) -> str | None:
        """What a variant's start-up measurements depend on, hashed; None where they cannot be cached (no cache,
        or a module no saved artifact names). The same module (artifact, kernels, form) on the same CPU profile,
        torch and library code, judged on the same probe at the same shapes, measures the same fidelity (its
        speed: within this machine's noise, which the gate's margin covers)."""
        if directory is None:
            return None
        files = None
        if strategy not in ("fp32", "native"):
            try:
                files = read_manifest(directory)["files"]
            except ArtifactError:
                return None
        mc = served.config
        parts = {"strategy": strategy, "params": vc.params, "runtime": runtime, "artifact": files,
                 "source": served.task_model.source_hash, "kernels": (kernels or {}).get("layers"),
                 "cpu": self.cpu.key, "torch": torch.__version__, "code": code_fingerprint(),
                 "probe": [repr(x) for x in served.probe_items], "batch": self._batch(), "baseline": mc.baseline,
                 "rounds": mc.task_kind.timing_rounds or ROUNDS, "max_input_tokens": mc.max_input_tokens}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _save(self, served: CatalogModel, vc: VariantConfig, qm: Any, directory: Path) -> bool:
        """Keep the built variant for the next start; a read-only or full cache only costs that (one log line)."""
        try:
            save_artifact(served.task_model, qm, directory)
            return True
        except OSError as exc:
            self.catalog.say(f"event=artifact_not_saved model={served.name} variant={vc.name} directory={str(directory)!r} "
                             f"reason={f'{exc.strerror or exc}'!r}")
            return False

    def _auto(self, served: CatalogModel, vc: VariantConfig, probe_items: list[Any],
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
            self.catalog.say(f"event=auto_reused model={mc.name} variant={vc.name} winner={record.get('winner')!r}")
            return win["strategy"], win.get("params") or {}, record, None, None
        candidates = [(c["strategy"], c.get("params", {})) for c in vc.params.get("candidates") or []] or \
            mc.task_kind.auto_candidates
        batch = probe_items[: self._batch()]
        tuned: dict[int, dict[str, Any]] = {}  # id(candidate module) -> its kernel choice, while it is alive

        def tune(module: Any) -> None:
            tuned[id(module)] = tuning.choose_kernels(module, lambda m: served.task.run(m, batch))

        qm, record = auto_select(
            tm, candidates, bound=mc.bound, run=served.task.run, items=probe_items, reference=served.reference(),
            agreement=served.task.compare_outputs, batch=self._batch(), slower_than=self.settings.gate.slower_than,
            quantize=lambda strategy, params: quantize_model(tm, strategy, params),
            tune=tune, batch_only=vc.compile)
        if qm is None:
            raise StartupError(f"model {mc.name!r} variant {vc.name!r} (auto): {record['why']}")
        self.catalog.say(f"event=auto_selected model={mc.name} variant={vc.name} why={record['why']!r}")
        if directory is not None:
            save_beside(directory, saved_as, record)
        win = next(c for c in record["candidates"] if c.get("chosen"))
        # the winner's kernels were chosen for an eager forward; a compiled one is timed again
        return win["strategy"], win["params"], record, qm, None if vc.compile else tuned.get(id(qm.module))

    def _batch(self) -> int:
        return self.settings.batching.max_batch_size

    def _choose_kernels(self, served: CatalogModel, vc: VariantConfig, module: Any, probe_items: list[Any],
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
        self.catalog.say(f"event=kernels_chosen model={served.name} variant={vc.name} kernel={summary['kernel']} "
                  f"inexact={sorted(summary['inexact'])} seconds={summary['seconds']} cached={summary['from_cache']}")
        return record

    def _gate(self, served: CatalogModel, vc: VariantConfig, module: Any, probe_items: list[Any],
              fid: dict[str, float], speed: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str | None]:
        """(speed against the baseline, measured now unless given; why the variant fails the serving gate or None)."""
        mc = served.config
        if vc.strategy == "fp32" or mc.baseline is None:
            return None, None  # the baseline itself
        rounds = mc.task_kind.timing_rounds or ROUNDS
        if speed is None:
            speed = relative_speed(served.task.run, module, served.task_model.module, probe_items, self._batch(),
                                   rounds)
        reason = gate.judge(vc.name, mc.baseline, mc.bound, fid, speed, self.settings.gate, self.cpu)
        if reason is not None and self.settings.gate.action == "stop":
            raise StartupError(f"model {mc.name!r}: {reason}; set gate.action to fallback or serve to start anyway")
        return speed, reason

    def _compile(self, served: CatalogModel, vc: VariantConfig, module: Any,
                 probe_items: list[Any]) -> tuple[Any, float, str | None]:
        """The variant's module compiled, warmed up and checked; or, where compiling is off, impossible here or
        does not match eager outputs, the eager module and the reason (the variant still serves, and
        /v1/models says why it is eager)."""
        start = time.perf_counter()
        served_module, problem = serve_compiled(module, served.task.run, probe_items)
        if problem is not None:
            self.catalog.say(f"event=compile_unavailable model={served.name} variant={vc.name} reason={problem!r}")
        return served_module, time.perf_counter() - start, problem


def build_catalog(settings: Settings, metrics: Metrics) -> Catalog:
    """Every configured model built into a new catalog (blocking): what the server does at start-up."""
    return VariantBuilder(Catalog(settings, metrics)).build()


def _full_params(strategy: str, params: dict[str, Any]) -> dict[str, Any]:
    from quantization.strategies import get_strategy, parse_params

    cls = get_strategy(strategy)
    return parse_params(cls, params).model_dump()
