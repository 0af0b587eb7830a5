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
from .catalog import Catalog
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
        b = self.settings.batching
        config = BatchConfig(max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms,
                             max_batch_tokens=b.max_batch_tokens, max_queue=b.max_queue)
        for model in catalog.models.values():
            for v in model.variants.values():
                batcher = DynamicBatcher(f"{model.name}/{v.name}", _runner(model.task, v.module), config, cost=len,
                                         on_batch=self.metrics.batch_observer(model.labels(v.name), v.module),
                                         lane=self.lane)
                self._batchers[(model.name, v.name)] = batcher
                await batcher.start()

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop(drain=True)
        self.lane.shutdown()


def _runner(task: Task, module: Any):
    return lambda items: task.run(module, items)
