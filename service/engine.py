"""The engine: the one model lane, a dynamic batcher per variant, and the measurement sink they report to.

Every model call of the process, start-up included, runs on the lane's one thread (one OpenMP
team). After start-up each variant gets a :class:`~service.batching.DynamicBatcher` that cuts
batches from its queue and runs them on the lane through the model's task; each batch is reported
to :class:`~service.metrics.Metrics`.
"""

from __future__ import annotations

from typing import Any

from quantization.tasks import Task

from .batching import BatchConfig, DynamicBatcher, ModelLane
from .catalog import BuiltVariant, Catalog, CatalogModel
from .config import Settings
from .metrics import Metrics


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lane = ModelLane(background_share=settings.batching.shadow_budget)
        self._batchers: dict[tuple[str, str], DynamicBatcher] = {}

    def batcher(self, model: str, variant: str) -> DynamicBatcher:
        return self._batchers[(model, variant)]

    async def start(self, catalog: Catalog) -> None:
        """A batcher for every built variant of the catalog."""
        for model in catalog.models.values():
            await self.add(model)

    async def add(self, model: CatalogModel) -> None:
        """A batcher for each variant of ``model``."""
        for v in model.variants.values():
            self._batchers[(model.name, v.name)] = await self._start(model, v)

    async def replace(self, model: CatalogModel, variant: BuiltVariant) -> None:
        """Serve ``variant`` in place of the one of the same name: requests submitted from now on go to its new
        batcher; those already queued or running finish on the old one, which then stops. Every item of a
        request goes to one batcher, so no answer mixes the two."""
        new = await self._start(model, variant)
        old = self._batchers.get((model.name, variant.name))
        self._batchers[(model.name, variant.name)] = new
        model.variants[variant.name] = variant
        if old is not None:
            await old.stop(drain=True)

    async def _start(self, model: CatalogModel, v: BuiltVariant) -> DynamicBatcher:
        b = self.settings.batching
        config = BatchConfig(max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms,
                             max_batch_tokens=b.max_batch_tokens, max_queue=b.max_queue)
        batcher = DynamicBatcher(f"{model.name}/{v.name}", _runner(model.task, v.module), config, cost=len,
                                 on_batch=self.metrics.batch_observer(model.labels(v.name), v.module), lane=self.lane)
        await batcher.start()
        return batcher

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop(drain=True)
        self.lane.shutdown()


def _runner(task: Task, module: Any):
    return lambda items: task.run(module, items)
