"""Background optimisation: variants serve in their eager form at once; a compiled form replaces each when ready.

A variant with ``compile: true`` (and ``optimize: background``, the default) leaves start-up as
``serving-eager``. :class:`Optimizer` takes those variants one at a time:

1. ``optimizing``: an AOTInductor package of the exact module served (its saved artifact and kernel choice)
   is looked up beside the artifact under a key naming the torch build, the CPU profile and the module
   (:func:`quantization.internals.aoti.package_key`), or built by a child process
   (``python -m quantization.internals.aoti``) at the lowest CPU priority (nice 19) on one thread: the build
   takes the cycles serving leaves, never the interpreter, and a crash in it costs the build only.
   Each model's variants are taken as soon as the model serves, while the next models build; judging and
   swapping (below) wait until every model serves.
2. The package is loaded (~0.1 s) and judged on the model lane, between batches, like a variant at
   start-up: its outputs on the probe set against the eager form (worst cosine at least
   ``COMPILE_MIN_COSINE``) and against FP32 (the model's fidelity bound), its time against the baseline
   (the serving gate) and against the eager form (what it bought).
3. It replaces the eager variant through :meth:`service.engine.Engine.replace`: requests already queued
   finish on the eager form, new ones go to the package; no request sees both. ``optimized``.

A package that fails to build or to match the eager outputs leaves the variant serving eagerly
(``serving``, with the reason in /v1/models and one log line; a mismatching package file is deleted, so the
next start builds it again). Every outcome is counted in ``quantserve_optimizations_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from quantization import internals
from quantization.artifacts import read_manifest, save_artifact
from quantization.internals import aoti
from quantization.internals.compiled import COMPILE_MIN_COSINE, worst_cosine
from quantization.selection import ROUNDS, relative_speed

from . import gate
from .catalog import BuiltVariant, Catalog, CatalogModel
from .engine import Engine

log = logging.getLogger("service.optimizer")

BUILD_TIMEOUT_S = 1800.0
TRACE_TEXTS = ["A short sentence.", "A somewhat longer sentence, so that the batch is padded when traced.",
               "Third.", "And a fourth one to trace with."]


class OptimizationFailed(Exception):
    """One sentence: why a variant keeps its eager form."""


class Optimizer:
    def __init__(self, catalog: Catalog, engine: Engine | None) -> None:
        self.catalog = catalog
        self.engine = engine
        self.settings = catalog.settings
        self._scratch: Path | None = None  # packages and artifacts where the cache is off or read-only
        self._child: asyncio.subprocess.Process | None = None
        self._queue: asyncio.Queue[CatalogModel | None] = asyncio.Queue()
        self._all_serving = asyncio.Event()

    def pending(self) -> list[tuple[CatalogModel, str]]:
        return [(m, name) for m in self.catalog.models.values() for name, state in m.states.items()
                if state == "serving-eager"]

    def offer(self, served: CatalogModel | None) -> None:
        """A model that serves now (its variants waiting for optimisation are taken in turn); None: no more, every
        model serves."""
        self._queue.put_nowait(served)
        if served is None:
            self._all_serving.set()

    async def run(self) -> None:
        """Optimise the variants of each model offered, one at a time, until None is offered. The first model's
        package builds while the next models are still being built, on the cycles the build leaves (the child
        runs at nice 19); judging and swapping wait until every model serves, so they never delay readiness."""
        while (served := await self._queue.get()) is not None:
            for name, state in list(served.states.items()):
                if state == "serving-eager":
                    await self.optimize(served, name)
        self.catalog.say("event=optimization_done")

    async def stop(self) -> None:
        if self._child is not None and self._child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    async def optimize(self, served: CatalogModel, name: str) -> None:
        v = served.variants[name]
        catalog, metrics, labels = self.catalog, self.catalog.metrics, served.labels(name)
        if not internals.enabled("aoti"):
            self._keep_eager(served, name, "the aoti speed-up is switched off", None)
            return
        catalog.set_state(served, name, "optimizing")
        catalog.say(f"event=optimizing model={served.name} variant={name}")
        start = time.perf_counter()
        try:
            path, built_s, cached = await self._package(served, v)
            packaged = await self._load(served, name, path, cached)
            if packaged is None:  # a cached package that would not load: built again
                path, built_s, cached = await self._package(served, v)
                packaged = await self._load(served, name, path, cached)
            await self._all_serving.wait()
            try:
                checked = await self._on_lane(lambda: self._judge(served, v, packaged))
            except Exception as exc:  # noqa: BLE001 - a package that fails on the probe is never served
                checked = {"problem": f"the package failed on the probe ({type(exc).__name__}: {str(exc)[:200]})"}
        except OptimizationFailed as exc:
            self._keep_eager(served, name, str(exc), "failed")
            return
        if checked["problem"] is not None:
            Path(path).unlink(missing_ok=True)  # never served, and the next start builds it afresh
            self._keep_eager(served, name, checked["problem"], "rejected")
            return
        record = {"form": "aoti", "package": str(path), "from_cache": cached, "build_seconds": round(built_s, 2),
                  "seconds": round(time.perf_counter() - start, 2), "vs_eager": checked["vs_eager"]}
        # the eager module goes with the old batcher (quantized: it is saved; holding it would keep it alive)
        new = replace(v, module=packaged, runtime=f"{v.runtime}+aoti", compile_seconds=built_s, compile_problem=None,
                      fidelity=checked["fidelity"], speed=checked["speed"], gate_problem=checked["gate"],
                      optimization=record, quantized=None)
        await self.engine.replace(served, new)
        metrics.optimizations.labels(*labels, "swapped").inc()
        catalog.set_state(served, name, "optimized")
        if checked["gate"] is not None:
            catalog.degrade(served, name, checked["gate"])
        elif name in served.router.degraded:
            served.router.restore(name)
            metrics.degraded.labels(*labels).set(0)
            catalog.set_state(served, name, "optimized")
            catalog.say(f"event=variant_restored model={served.name} variant={name} default={served.router.default}")
        x = {shape: s["time_x"] for shape, s in checked["vs_eager"].items()}
        catalog.say(f"event=variant_optimized model={served.name} variant={name} form=aoti cached={cached} "
                    f"build_seconds={built_s:.1f} time_x_eager={x} fidelity={checked['fidelity']}")

    async def _load(self, served: CatalogModel, name: str, path: Path, cached: bool) -> Any:
        """The loaded package; None where a cached one is unreadable (deleted, with one log line)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, aoti.load, path)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: torch says so in its own words
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if not cached:
                raise OptimizationFailed(f"the package just built does not load ({why})") from None
            Path(path).unlink(missing_ok=True)
            self.catalog.say(f"event=package_rebuild model={served.name} variant={name} reason={why!r}")
            return None

    def _keep_eager(self, served: CatalogModel, name: str, why: str, outcome: str | None) -> None:
        v = served.variants[name]
        served.variants[name] = replace(v, compile_problem=why)
        if outcome:
            self.catalog.metrics.optimizations.labels(*served.labels(name), outcome).inc()
        self.catalog.set_state(served, name, "serving")
        self.catalog.say(f"event=optimization_skipped model={served.name} variant={name} reason={why!r}")

    # -- the package -------------------------------------------------------------------------------
    async def _package(self, served: CatalogModel, v: BuiltVariant) -> tuple[Path, float, bool]:
        """(the package's path, seconds its build took, whether it was found already built)."""
        spec, path = self.spec(served, v)
        if path.is_file():
            return path, 0.0, True
        spec_file = _spec_file(spec, path)
        start = time.perf_counter()
        try:
            self._child = await asyncio.create_subprocess_exec(
                *_command(spec_file), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(self._child.communicate(), BUILD_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._child.kill()
                raise OptimizationFailed(f"building the package took more than {BUILD_TIMEOUT_S:.0f} s") from None
            if self._child.returncode != 0:
                raise _build_failed(err.decode(errors="replace"))
        finally:
            spec_file.unlink(missing_ok=True)
        if not path.is_file():
            raise OptimizationFailed(f"the package builder exited without writing {path}")
        return path, time.perf_counter() - start, False

    def build_blocking(self, served: CatalogModel, v: BuiltVariant) -> Path:
        """``v``'s package, found or built now (blocking; ``python -m service.prebuild``)."""
        spec, path = self.spec(served, v)
        if not path.is_file():
            spec_file = _spec_file(spec, path)
            try:
                done = subprocess.run(_command(spec_file), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            finally:
                spec_file.unlink(missing_ok=True)
            if done.returncode != 0 or not path.is_file():
                raise _build_failed(done.stderr)
        return path

    def spec(self, served: CatalogModel, v: BuiltVariant) -> tuple[dict[str, Any], Path]:
        """What the child builds from, and where the package goes (beside the artifact, keyed)."""
        mc = served.config
        artifact = v.artifact
        if artifact is None and v.strategy != "fp32":  # the cache is off or read-only: save it where we can
            artifact = self._writable(mc.name, v.name)
            try:
                save_artifact(served.task_model, v.quantized, artifact)
            except OSError as exc:
                raise OptimizationFailed(f"the variant could not be saved for the package builder ({exc})") from None
        identity = {"model": mc.name, "variant": v.name, "strategy": v.strategy, "cpu": self.catalog.cpu.key,
                    "max_input_tokens": mc.max_input_tokens, "source": served.task_model.source_hash,
                    "artifact": read_manifest(artifact)["files"] if artifact else None,
                    "kernels": (v.kernels or {}).get("layers")}
        name = f"aoti-{aoti.package_key(identity)}{aoti.SUFFIX}"
        # where one may already be (a read-only cache baked into an image included), else where to build it
        places = [p for p in (artifact, self.settings.artifacts_dir and Path(self.settings.artifacts_dir) / mc.name
                              / v.name) if p is not None]
        path = next((p / name for p in places if (p / name).is_file()), None)
        if path is None:
            for place in places:
                with contextlib.suppress(OSError):
                    place.mkdir(parents=True, exist_ok=True)
            home = next((p for p in places if os.access(p, os.W_OK)), None) or self._writable(mc.name, v.name)
            path = home / name
        spec = {"nice": 19, "source": mc.source, "task": mc.task, "name": mc.name,
                "max_input_tokens": mc.max_input_tokens,
                "artifact": str(artifact) if artifact else None, "kernels": v.kernels, "texts": TRACE_TEXTS,
                "out": str(path)}
        return spec, path

    def _writable(self, model: str, variant: str) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="quantserve-optimize-"))
        path = self._scratch / model / variant
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- judging, on the lane -------------------------------------------------------------------------
    async def _on_lane(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the model lane, when no client batch waits for it (background priority)."""
        lane = self.engine.lane
        guest = await lane.acquire(lambda: 1)
        try:
            return await lane.run(fn, guest=guest)
        finally:
            if not guest:
                lane.release()

    def _judge(self, served: CatalogModel, v: BuiltVariant, packaged: Any) -> dict[str, Any]:
        """The package against the eager form and FP32 on the probe set, and its speed (the serving gate)."""
        mc, task, probe = served.config, served.task, served.probe_items
        eager = task.run(v.module, probe)
        outputs = task.run(packaged, probe)
        worst = worst_cosine(eager, outputs)
        if worst < COMPILE_MIN_COSINE:
            return {"problem": f"the package's outputs differ from the eager form's on the probe (worst cosine "
                               f"{worst:.4f} < {COMPILE_MIN_COSINE})"}
        fid = {k: round(x, 6) for k, x in task.compare_outputs(served.reference(), outputs).items()}
        batch, rounds = self.settings.batching.max_batch_size, mc.task_kind.timing_rounds or ROUNDS
        vs_eager = relative_speed(task.run, packaged, v.module, probe, batch, rounds)
        speed = None
        verdict = None
        if v.strategy != "fp32" and mc.baseline is not None:
            speed = relative_speed(task.run, packaged, served.task_model.module, probe, batch, rounds)
            verdict = gate.judge(v.name, mc.baseline, mc.bound, fid, speed, self.settings.gate, self.catalog.cpu)
        return {"problem": None, "fidelity": fid, "speed": speed, "gate": verdict, "vs_eager": vs_eager}


def _spec_file(spec: dict[str, Any], path: Path) -> Path:
    spec_file = path.with_name(f".{path.stem}.{os.getpid()}.json")
    spec_file.write_text(json.dumps(spec, default=str))
    return spec_file


def _command(spec_file: Path) -> list[str]:
    return [sys.executable, "-m", "quantization.internals.aoti", str(spec_file)]


def _build_failed(stderr: str) -> OptimizationFailed:
    """The child's last line (it reports its failure as one) as the reason."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    return OptimizationFailed(f"building the package failed: {lines[-1][:300]}")
