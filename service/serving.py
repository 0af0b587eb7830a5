"""The request path shared by every inference endpoint: route, batch, measure, shadow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from quantization.errors import InputTooLong

from . import context, gate
from .batching import BatcherClosed, BatchResult, QueueFull, Shed
from .errors import (ClientGone, DeadlineExceeded, InferenceFailed, InvalidInput, NotReady, Overloaded,
                     ServiceError, ShuttingDown)
from .catalog import BuiltVariant, Catalog, CatalogModel
from .engine import Engine

log = logging.getLogger("service.serving")


@dataclass
class InferenceResult:
    """What one request got from its variant: outputs in input order, with what it cost."""

    model: CatalogModel
    variant: BuiltVariant
    outputs: list[Any]
    tokens: int
    truncated: list[int]
    batch: BatchResult


class Serving:
    def __init__(self, catalog: Catalog, engine: Engine) -> None:
        self.catalog = catalog
        self.engine = engine
        self.metrics = engine.metrics
        self._shadow_tasks: set[asyncio.Task] = set()

    def resolve(self, model: str | None, task: str, pinned: str | None, request_key: str | None
                ) -> tuple[CatalogModel, BuiltVariant]:
        if self.catalog.error:
            raise NotReady(self.catalog.error, headers={"Retry-After": "5"})
        served = self.catalog.get(model, task)  # a model still being built: 503 with Retry-After
        return served, served.variants[served.router.choose(pinned, request_key)]

    def check_limits(self, served: CatalogModel, variant: BuiltVariant, texts: list[str], field: str = "inputs",
                     options: dict[str, Any] | None = None) -> None:
        """The model's limits, the same on every endpoint (the request schemas hold the widest ones)."""
        settings = self.catalog.settings
        task = served.config.task
        max_inputs, max_chars = settings.input_limit(task), settings.char_limit(task)
        if len(texts) > max_inputs:
            raise InvalidInput(f"{field}: {len(texts)} inputs, more than the limit of {max_inputs} per request for "
                               f"{served.name!r} (limits.max_inputs, {task} models at most "
                               f"{served.task.max_inputs or max_inputs}); split the request",
                               fields=[{"field": field, "message": f"at most {max_inputs}"}])
        for i, text in enumerate(texts):
            if len(text) > max_chars:
                raise InvalidInput(f"{field}.{i}: {len(text)} characters, more than the limit of {max_chars} for "
                                   f"{served.name!r} (limits.max_chars)",
                                   fields=[{"field": f"{field}.{i}", "message": f"at most {max_chars} characters"}])
        work = served.task.work(variant.module, len(texts), **(options or {}))
        budget = settings.limits.max_decode_work
        if work is not None and work > budget:
            raise InvalidInput(f"{field}: {len(texts)} inputs x beam_size x max_new_tokens come to {work} decoder "
                               f"steps, more than the limit of {budget} per request (limits.max_decode_work); send "
                               f"fewer inputs, a smaller beam_size or max_new_tokens",
                               fields=[{"field": field, "message": f"inputs x beams x new tokens at most {budget}"}])

    async def infer(self, served: CatalogModel, variant: BuiltVariant, texts: list[str], endpoint: str,
                    shadow: bool = True, truncation: str | None = None, field: str = "inputs",
                    options: dict[str, Any] | None = None) -> InferenceResult:
        """Tokenize, queue on the variant's batcher and wait, within the request's deadline, for the outputs.

        ``options``: task-specific tokenize options (translate: beam_size, max_new_tokens).
        """
        labels = served.labels(variant.name)
        start = time.perf_counter()
        status = "200"
        try:
            self.check_limits(served, variant, texts, field, options)
            encoded = self._encode(served, texts, truncation or self.catalog.settings.limits.truncation, field,
                                   options or {})
            batch = await self._submit(served, variant, encoded.items)
        except ServiceError as exc:
            status = str(exc.status)
            raise
        finally:
            self.metrics.record_request(labels, endpoint, status, time.perf_counter() - start, len(texts))
        self.metrics.record_queue(labels, batch.queue_seconds)
        items = encoded.items
        result = InferenceResult(served, variant, batch.outputs, sum(len(i) for i in items), encoded.truncated, batch)
        if shadow:
            target = served.router.shadow_target(variant.name)
            if target is not None:
                self._spawn(self._shadow(served, variant, served.variants[target], items, batch.outputs))
        return result

    @staticmethod
    def _encode(served: CatalogModel, texts: list[str], truncation: str, field: str, options: dict[str, Any]):
        try:
            return served.task.encode(texts, truncation, **options)
        except InputTooLong as exc:
            limit = exc.limit
            raise InvalidInput(f"{field}.{exc.indices[0]}: longer than the model's limit of {limit} tokens; shorten "
                               f"it or send \"truncation\": \"truncate\"",
                               fields=[{"field": f"{field}.{i}", "message": f"over {limit} tokens"}
                                       for i in exc.indices]) from None

    async def _submit(self, served: CatalogModel, variant: BuiltVariant, items: list[list[int]]) -> BatchResult:
        """Wait for the batcher; a passed deadline or a gone client cancels the wait, which unqueues the items."""
        ctx = context.current()
        if ctx is None:  # called outside an HTTP request (tests, tools): no deadline
            return await self._batch(served, variant, items, None)
        remaining = ctx.remaining()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the model")
        work = asyncio.ensure_future(self._batch(served, variant, items, ctx.request_id))
        gone = asyncio.ensure_future(ctx.disconnected.wait())
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work in done:
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        if ctx.disconnected.is_set():
            log.info("event=client_gone model=%s variant=%s queued_items_dropped=%d", served.name, variant.name,
                     len(items))
            raise ClientGone("the client closed the connection; its queued work was dropped")
        log.warning("event=deadline_exceeded model=%s variant=%s", served.name, variant.name)
        raise DeadlineExceeded(f"no answer within the request's deadline of {ctx.deadline - ctx.started:.3f} s; "
                               f"retry later, send fewer inputs or raise X-Request-Timeout (server limit "
                               f"{self.catalog.settings.limits.request_timeout_s:g} s)")

    async def _batch(self, served: CatalogModel, variant: BuiltVariant, items: list[list[int]],
                     request_id: str | None) -> BatchResult:
        try:
            return await self.engine.batcher(served.name, variant.name).submit(items, tag=request_id)
        except QueueFull as exc:
            retry = max(1, round(exc.retry_after_s))
            raise Overloaded(f"variant {variant.name!r} of {served.name!r} has a full queue; retry in {retry} s",
                             headers={"Retry-After": str(retry)}) from None
        except BatcherClosed:
            raise ShuttingDown("the service is shutting down; retry on another replica",
                               headers={"Retry-After": "1"}) from None
        except Exception as exc:  # a failed batch fails its requests only
            log.exception("event=batch_failed model=%s variant=%s", served.name, variant.name)
            raise InferenceFailed(f"inference failed on variant {variant.name!r} ({type(exc).__name__}); the "
                                  f"request id names it in the logs") from None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, served: CatalogModel, variant: BuiltVariant, target: BuiltVariant, items: list[list[int]],
                      outputs: list[Any]) -> None:
        """Run the same inputs on ``target`` off the response path and record agreement.

        Agreement is stored on the quantized side of the pair: the variant that is not the baseline.
        """
        task = served.task
        subject = target if variant.name == served.config.baseline else variant
        labels = served.labels(subject.name)
        try:
            other = await self.engine.batcher(served.name, target.name).submit(items, background=True)
        except Shed:  # served traffic kept the model busy: expected under load, counted, not logged
            self.metrics.record_shadow_shed(labels)
            return
        except Exception:  # shadow traffic must never hurt served traffic
            log.warning("event=shadow_skipped model=%s variant=%s target=%s", served.name, variant.name, target.name)
            return
        ref, out = (outputs, other.outputs) if subject is target else (other.outputs, outputs)
        metric = task.agreement_metric
        mean, n = self.metrics.record_shadow(labels, metric, [task.agreement(r, o) for r, o in zip(ref, out)])
        if subject.name not in served.router.degraded and subject.name != served.config.baseline:
            reason = gate.live_problem(subject.name, metric, mean, n, served.config.bound, self.catalog.settings.gate)
            if reason is not None:
                self.catalog.degrade(served, subject.name, reason)

    async def drain_shadow(self) -> None:
        if self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)
