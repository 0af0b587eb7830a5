"""The request path shared by every inference endpoint: route, batch, measure, shadow."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from .batching import BatchResult, QueueFull
from .errors import InferenceFailed, NotReady, Overloaded, ServiceError
from .registry import Registry, ServedModel, Variant
from .tasks import SHADOW_METRIC, TaskAdapter

log = logging.getLogger("service.serving")


@dataclass
class Served:
    model: ServedModel
    variant: Variant
    outputs: list[torch.Tensor]
    tokens: int
    batch: BatchResult


class Serving:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.metrics = registry.metrics
        self._shadow_tasks: set[asyncio.Task] = set()

    def resolve(self, model: str | None, task: str, pinned: str | None, request_key: str | None
                ) -> tuple[ServedModel, Variant]:
        if not self.registry.ready:
            raise NotReady(self.registry.error or "models are still loading; retry shortly",
                           headers={"Retry-After": "5"})
        served = self.registry.get(model, task)
        return served, served.variants[served.router.choose(pinned, request_key)]

    async def infer(self, served: ServedModel, variant: Variant, texts: list[str], endpoint: str,
                    shadow: bool = True, options: dict[str, Any] | None = None) -> Served:
        """``options``: task-specific tokenize options (translate: beam_size, max_new_tokens)."""
        labels = (served.name, served.config.task, variant.name)
        start = time.perf_counter()
        status = "200"
        try:
            items = served.adapter.tokenize(texts, **(options or {}))
            try:
                batch = await variant.batcher.submit(items)
            except QueueFull as exc:
                retry = max(1, round(exc.retry_after_s))
                raise Overloaded(f"variant {variant.name!r} of {served.name!r} has a full queue; retry in {retry} s",
                                 headers={"Retry-After": str(retry)}) from None
            except Exception as exc:  # a failed batch fails its requests only
                log.exception("event=batch_failed model=%s variant=%s", served.name, variant.name)
                raise InferenceFailed(f"inference failed on variant {variant.name!r}: {type(exc).__name__}") from None
        except ServiceError as exc:
            status = str(exc.status)
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(*labels, endpoint, status).inc()
            if status == "200":
                self.metrics.request_seconds.labels(*labels, endpoint).observe(elapsed)
        self.metrics.queue_seconds.labels(*labels).observe(batch.queue_seconds)
        variant.record_latency(elapsed, len(texts))
        result = Served(served, variant, batch.outputs, sum(len(i) for i in items), batch)
        if shadow:
            target = served.router.shadow_target(variant.name)
            if target is not None:
                self._spawn(self._shadow(served, variant, served.variants[target], items, batch.outputs))
        return result

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, served: ServedModel, variant: Variant, target: Variant, items: list[list[int]],
                      outputs: list[torch.Tensor]) -> None:
        """Run the same inputs on ``target`` off the response path and record agreement.

        Agreement is stored on the quantized side of the pair: the variant that is not the baseline.
        """
        try:
            other = await target.batcher.submit(items)
        except Exception:  # shadow traffic must never hurt served traffic
            log.warning("event=shadow_skipped model=%s variant=%s target=%s", served.name, variant.name, target.name)
            return
        task = served.config.task
        baseline = served.config.baseline
        subject, ref, out = (target, outputs, other.outputs) if variant.name == baseline else (variant, other.outputs, outputs)
        labels = (served.name, task, subject.name)
        for r, o in zip(ref, out):
            subject.shadow["n"] += 1
            subject.shadow["sum"] += TaskAdapter.per_input_agreement(task, r, o)
        metric = SHADOW_METRIC[task]
        self.metrics.fidelity.labels(*labels, metric, "shadow").set(subject.shadow["sum"] / subject.shadow["n"])
        self.metrics.shadow_comparisons.labels(*labels).inc(len(ref))

    async def drain_shadow(self) -> None:
        if self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)


def as_results(adapter: TaskAdapter, outputs: list[torch.Tensor], *, normalize: bool = True,
               top_k: int = 1) -> list[dict[str, Any]]:
    if adapter.task == "classify":
        return [{"index": i, "labels": adapter.labels(o, top_k)} for i, o in enumerate(outputs)]
    if adapter.task == "translate":
        return [adapter.result(i, o) for i, o in enumerate(outputs)]
    return [{"index": i, "embedding": adapter.embedding(o, normalize)} for i, o in enumerate(outputs)]
