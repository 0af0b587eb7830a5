"""Dynamic batching: merge concurrent requests for one (model, variant) into few model calls.

Model calls are far cheaper per item in batches, and they are CPU-bound, so they run in an
executor thread while the event loop keeps accepting requests. One :class:`DynamicBatcher`
per variant owns a FIFO queue of requests; a single worker task cuts batches off its head
(bounded by item count and token cost), runs them one at a time, and hands each request back
exactly its own outputs, in order, even when the request was split across several calls.

Every batcher of a process can share one :class:`ModelLane`: one thread for all model calls.
Each thread that runs torch ops gets its own OpenMP thread team, and once a process has more
team threads than cores, libgomp stops spinning between parallel regions and puts its workers
to sleep and wakes them again in every region: a compiled MiniLM int8 forward of one sentence
took 2.1 ms with one team and 6.9 ms after four other threads had run models. A batcher that
shares the lane cuts its batch only when the lane is its own, so requests that arrive while
another variant's batch runs join the next batch instead of queueing as a batch of their own;
and background work (shadow traffic) gets the lane only when no foreground batch is waiting, only
in batches (:data:`BACKGROUND_BATCH`) and only within a share of the lane's time, so it rarely
stands in front of a client request and cannot eat into the throughput of served traffic.

Long work (decoding: hundreds of decoder steps per batch) passes a
:func:`~quantization.steps.checkpoint` after every step. While such a batch holds the lane, every
other batcher with a client waiting becomes a guest: it cuts its batch at once, and the lane runs
it on its own thread at the host's next checkpoint (one batch per waiting batcher per step, so each
model gets its turn: round-robin over models at the grain of one step or one batch), then the host
takes its next step. At the same checkpoints the host stops (:class:`~quantization.errors.Abandoned`)
once nobody waits for any request of its batch: a passed deadline or a gone client frees the model
within one step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from quantization.errors import Abandoned
from quantization.steps import between_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 16  # items (input strings) per model call
    max_wait_ms: float = 5.0  # how long the first queued item waits for company (when company is likely and
    # keeps coming: QUIET_FRACTION of it without an arrival ends the wait)
    max_batch_tokens: int = 8192  # sum of item costs per model call
    max_queue: int = 1024  # items waiting; beyond it submit() raises QueueFull


# A batch waits for company until max_wait_ms has passed since its first request, or until no request has
# arrived for this fraction of it: closed-loop clients (each waits for its answer before it sends again)
# arrive in a burst after each batch and then not at all, and waiting out max_wait after the burst left
# the model idle. 8 clients, minilm int8, same run: 355-389 -> 405-460 requests/s; 4 clients: 248-262 -> 328-413.
QUIET_FRACTION = 0.2
# background work (shadow traffic) that waited this long for a shared lane is dropped, not run late
BACKGROUND_PATIENCE_S = 1.0
# Background-only work gathers up to this many items (for at most half its patience) before it asks for the
# lane. A model call cannot be interrupted, so each background batch delays the next client request that
# arrives while it runs: one-sentence shadow calls (5% of requests) put a 6-7 ms FP32 forward in front of
# one request in twenty, inside p99; batched by 8 they delay one request in ~160, and cost less model time.
BACKGROUND_BATCH = 8
# Background work may take at most a set share of the lane's wall time (ModelLane.background_share; the
# service's batching.shadow_budget). Unbudgeted, 5% FP32 shadow samples (an FP32 forward costs ~4x an int8
# one) ran after most foreground batches once clients overlapped: the lane passes to a waiting background
# batch whenever the foreground batcher is between batches. minilm int8, 5% shadow, one run, 4 rounds
# (unbudgeted / 2% budget / no shadow): 8 clients 461-538 / 534-603 / 545-661 requests/s, p99 45-53 /
# 27-38 / 26-32 ms; 32 clients 475-522 / 524-583 / 552-617 requests/s; 1 client p99 8.5-9.0 / 5.5-7.5 /
# 4.6-8.3 ms. Credit accrues at the share per second of wall time, for at most this many seconds (a
# burst after a quiet spell stays short).
BACKGROUND_CREDIT_S = 5.0


class Shed(Exception):
    """Background work dropped because foreground batches kept the lane busy."""


class QueueFull(Exception):
    """Raised at once (no waiting) so the handler can answer 429 with a Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Guest:
    """A batch run at the host's next checkpoint, on the lane's thread."""

    run: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class ModelLane:
    """One thread for every model call, lent to one batch at a time, foreground before background.

    Waiters are served by (priority, arrival); a waiter's priority is asked again each time the
    lane frees, because the requests queued behind it can change while it waits. While a batch
    runs in :meth:`run` (the host), foreground waiters are admitted as guests instead (see the module).
    """

    def __init__(self, name: str = "model", background_share: float = 0.02) -> None:
        if not 0.0 <= background_share <= 1.0:
            raise ValueError(f"background_share must be within 0..1, not {background_share}")
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._busy = False
        self._waiters: list[tuple[int, Callable[[], int], asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self.background_share = background_share
        self._credit = background_share * BACKGROUND_CREDIT_S  # seconds of model time background work may take
        self._credit_at = time.perf_counter()
        # guests: read and written under the lock by the loop (admitting) and the lane thread (running)
        self._lock = threading.Lock()
        self._hosting = False  # the batch running on the lane thread has passed a checkpoint: guests welcome
        self._guests: deque[_Guest] = deque()

    async def acquire(self, priority: Callable[[], int] = lambda: 0) -> bool:
        """Wait for the lane. True: admitted as a guest of the running batch (call :meth:`run` with
        ``guest=True``, and do not :meth:`release`); False: the lane is the caller's until it releases it."""
        if not self._busy and not self._waiters:
            self._busy = True
            return False
        if self._hosting and priority() == 0:
            return True
        entry = (next(self._arrivals), priority, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            return await entry[2]
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif entry[2].done() and not entry[2].cancelled() and not entry[2].result():
                self.release()  # the lane was handed over just as the waiter was cancelled
            raise

    def release(self) -> None:
        live = [w for w in self._waiters if not w[2].done()]
        if not live:
            self._waiters.clear()
            self._busy = False
            return
        chosen = min(live, key=lambda w: (w[1](), w[0]))
        self._waiters = [w for w in live if w is not chosen]
        chosen[2].set_result(False)  # the lane passes to it, still busy

    def _admit_guests(self) -> None:
        """On the loop, once a host runs: every foreground waiter becomes its guest."""
        if not self._hosting:
            return
        for entry in [w for w in self._waiters if not w[2].done() and w[1]() == 0]:
            self._waiters.remove(entry)
            entry[2].set_result(True)

    async def run(self, fn: Callable[[], Any], *, guest: bool = False,
                  abandoned: Callable[[], bool] = lambda: False) -> Any:
        """``fn()`` on the lane's thread: as the host (the caller holds the lane), or as a guest at the
        host's next checkpoint. ``abandoned()`` (asked on the lane's thread at each checkpoint): nobody
        waits for the result any more, so stop with :class:`~quantization.errors.Abandoned`."""
        loop = asyncio.get_running_loop()
        step = self._stepper(abandoned, None if guest else loop)
        if guest:
            future = loop.create_future()
            with self._lock:
                hosted = self._hosting
                if hosted:
                    self._guests.append(_Guest(lambda: _stepped(fn, step), loop, future))
            if hosted:
                return await future
            # the host finished in between: the executor's one thread runs it after whatever it has
        return await loop.run_in_executor(self.executor, self._host, fn, step)

    def _stepper(self, abandoned: Callable[[], bool], host: asyncio.AbstractEventLoop | None) -> Callable[[], None]:
        """The checkpoint hook of one batch; a host's first checkpoint opens the lane to guests (a batch that
        never reaches one, an encoder forward, keeps the lane to itself, so waiters keep gathering company)."""
        def step() -> None:
            if host is not None and not self._hosting:
                with self._lock:
                    self._hosting = True
                host.call_soon_threadsafe(self._admit_guests)
            if abandoned():
                raise Abandoned("nobody waits for this batch any more")
            self._run_guests()
            if abandoned():
                raise Abandoned("nobody waits for this batch any more")
        return step

    def _host(self, fn: Callable[[], Any], step: Callable[[], None]) -> Any:
        """On the lane thread: run ``fn`` as the host; guests admitted meanwhile run at its checkpoints,
        and those still queued when it ends run before the lane is handed on."""
        try:
            return _stepped(fn, step)
        finally:
            with self._lock:
                self._hosting = False
            self._run_guests()

    def _run_guests(self) -> None:
        """On the lane thread: the guests queued now, each to its end (theirs may host further guests)."""
        with self._lock:
            guests = list(self._guests)
            self._guests.clear()
        for g in guests:
            try:
                result = g.run()
            except BaseException as exc:  # noqa: BLE001 - delivered to the guest's own caller
                g.loop.call_soon_threadsafe(_settle, g.future, None, exc)
            else:
                g.loop.call_soon_threadsafe(_settle, g.future, result, None)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)

    # -- the background budget ------------------------------------------------------------------
    def _refill(self) -> float:
        now = time.perf_counter()
        cap = self.background_share * BACKGROUND_CREDIT_S
        self._credit = min(cap, self._credit + (now - self._credit_at) * self.background_share)
        self._credit_at = now
        return self._credit

    def background_wait(self) -> float:
        """Seconds until background work may take the lane again (0: now; inf: never, with a share of 0)."""
        credit = self._refill()
        if credit > 0:
            return 0.0
        return -credit / self.background_share if self.background_share > 0 else math.inf

    def charge_background(self, seconds: float) -> None:
        """Count ``seconds`` of model time spent on background work (the credit may go below zero)."""
        self._refill()
        self._credit -= seconds


def _stepped(fn: Callable[[], Any], step: Callable[[], None]) -> Any:
    with between_steps(step):
        return fn()


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the guest's caller was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class BatcherClosed(Exception):
    """The batcher is stopping or stopped: the request was not (fully) run."""


@dataclass
class BatchResult:
    outputs: list[Any]  # one per submitted item, in order
    queue_seconds: float  # submit() until the request's first item entered a model call
    inference_seconds: float  # summed duration of the model calls that carried its items
    batch_sizes: list[int]  # sizes of those model calls


@dataclass(eq=False)
class _Request:
    """One submit() call; `taken` items have left the queue for model calls."""

    items: list[Any]
    costs: list[int]
    future: asyncio.Future[BatchResult]
    submitted: float
    tag: str | None = None  # the caller's name for it (a request id), for log lines about its batch
    background: bool = False  # nobody waits on it for a response (shadow traffic): it yields the lane
    lone: bool = False  # it found the batcher idle and clients are not overlapping: nobody is likely to join it
    outputs: list[Any] = field(default_factory=list)
    taken: int = 0
    done_items: int = 0
    first_start: float | None = None
    inference_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


# A batch is a list of slices: (request, start, end) into request.items.
_Batch = list[tuple[_Request, int, int]]


def _watch(requests: list[_Request]) -> tuple[Callable[[], bool], Callable[[], None]]:
    """(whether every one of ``requests`` is done: answered, failed or given up by its caller, which
    the lane thread may ask; a function that stops watching)."""
    gone = threading.Event()
    live = {r.future for r in requests if not r.future.done()}
    if not live:
        gone.set()

    def done(future: asyncio.Future) -> None:
        live.discard(future)
        if not live:
            gone.set()

    for r in requests:
        r.future.add_done_callback(done)

    def unwatch() -> None:
        for r in requests:
            r.future.remove_done_callback(done)
    return gone.is_set, unwatch


class DynamicBatcher:
    def __init__(self, name: str, run_batch: Callable[[list[Any]], list[Any]], config: BatchConfig,
                 cost: Callable[[Any], int] = lambda item: 1,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 executor: concurrent.futures.Executor | None = None, lane: ModelLane | None = None) -> None:
        if config.max_batch_size < 1 or config.max_queue < 1 or config.max_wait_ms < 0:
            raise ValueError(f"invalid batch config: {config}")
        if executor is not None and lane is not None:
            raise ValueError("give an executor or a lane (which brings its own), not both")
        self.name = name
        self.config = config
        self._run_batch = run_batch
        self._cost = cost
        self._on_batch = on_batch
        self._lane = lane
        executor = lane.executor if lane is not None else executor
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}")
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._queued_cost = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._recent: deque[float] = deque(maxlen=32)  # seconds per recent model call
        self._last_submit = -math.inf
        self._in_flight = 0  # submitted, not yet answered
        self._overlaps: deque[bool] = deque(maxlen=8)  # whether each recent arrival found others in flight

    # -- public ---------------------------------------------------------------------------------
    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def running(self) -> bool:
        """True while submit() is accepted: started, not stopping, worker alive."""
        return self._worker is not None and not self._closing and not self._worker.done()

    async def start(self) -> None:
        """Start the worker on the running loop (the Event must belong to that loop)."""
        if self._worker is not None:
            raise RuntimeError(f"batcher {self.name} already started")
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self, drain: bool = True) -> None:
        """drain: run everything queued first; else fail it. A call already running always finishes."""
        self._closing = True
        if not drain:
            for req in list(self._queue):
                self._fail(req, BatcherClosed(f"batcher {self.name} stopped"))
        if self._worker is not None and self._wakeup is not None:
            self._wakeup.set()
            await asyncio.shield(self._worker)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def submit(self, items: list[Any], cost: list[int] | None = None, tag: str | None = None,
                     background: bool = False) -> BatchResult:
        """Queue `items` and wait for their outputs; cancelling the caller drops what is still queued.

        ``background``: no client waits on these outputs; on a shared lane they run only when no
        foreground batch is waiting and within the lane's background share, gather into batches of
        ``BACKGROUND_BATCH`` (for at most half their patience), and raise :class:`Shed` once they have
        waited ``BACKGROUND_PATIENCE_S`` (under sustained load they would only grow a backlog), or at
        once when the share is spent for longer than that."""
        if self._closing:
            raise BatcherClosed(f"batcher {self.name} is stopped")
        if not items:
            return BatchResult(outputs=[], queue_seconds=0.0, inference_seconds=0.0, batch_sizes=[])
        if self._worker is None or self._wakeup is None:
            raise RuntimeError(f"batcher {self.name} not started")
        costs = [int(c) for c in cost] if cost is not None else [int(self._cost(i)) for i in items]
        if len(costs) != len(items):
            raise ValueError(f"{len(costs)} costs for {len(items)} items")
        if any(c < 0 for c in costs):
            raise ValueError("item costs must be >= 0")
        if background and self._lane is not None and self._lane.background_wait() > BACKGROUND_PATIENCE_S:
            raise Shed(f"batcher {self.name}: the lane's background share "
                       f"({self._lane.background_share:.0%} of its time) is spent")
        if self._queued_items + len(items) > self.config.max_queue:
            raise QueueFull(f"batcher {self.name}: {self._queued_items} items queued, limit "
                            f"{self.config.max_queue}", retry_after_s=self._retry_after())
        now = time.perf_counter()
        # Waiting max_wait for company only pays when company is likely. Not when the batcher is idle
        # and either the previous request came long ago (a quiet spell) or recent requests never
        # overlapped (one client at a time, however quickly it sends: it waits for each answer).
        self._overlaps.append(self._in_flight > 0)
        lone = self._in_flight == 0 and (now - self._last_submit > self.config.max_wait_ms / 1000.0
                                         or not any(self._overlaps))
        req = _Request(items=list(items), costs=costs, future=asyncio.get_running_loop().create_future(),
                       submitted=now, outputs=[None] * len(items), tag=tag, background=background, lone=lone)
        self._last_submit = now
        self._queue.append(req)
        self._queued_items += len(items)
        self._queued_cost += sum(costs)
        self._in_flight += 1
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._unqueue(req)  # client gone: its queued items must never reach the model
            raise
        finally:
            self._in_flight -= 1

    # -- worker ---------------------------------------------------------------------------------
    async def _work(self) -> None:
        assert self._wakeup is not None
        wait_s = self.config.max_wait_ms / 1000.0
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    await self._sleep(None)  # idle: until a submit or stop
                    continue
                self._shed_stale_background()
                if not self._queue:
                    continue
                pause = self._pause(wait_s)
                if pause > 0:
                    await self._sleep(pause)
                    continue  # re-check: the queue may have filled up or shrunk
                guest = False
                if self._lane is not None:
                    # cut the batch once the lane is ours (or we are a running batch's guest): what arrives
                    # while others run joins it
                    guest = await self._lane.acquire(self._lane_priority)
                try:
                    self._shed_stale_background()
                    batch = self._take()
                    try:
                        await self._run(batch, guest)
                    except Exception as exc:  # noqa: BLE001 - e.g. unindexable outputs; keep serving
                        log.exception("batcher %s: delivering a batch failed", self.name)
                        for req, _, _ in batch:
                            self._fail(req, exc)
                finally:
                    if self._lane is not None and not guest:
                        self._lane.release()
        finally:
            for req in list(self._queue):  # only non-empty if the worker itself was cancelled
                self._fail(req, BatcherClosed(f"batcher {self.name} stopped"))

    async def _sleep(self, timeout: float | None) -> None:
        """Until the next submit or stop, or ``timeout`` seconds."""
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _pause(self, wait_s: float) -> float:
        """Seconds the queue's head should still wait before it asks for the lane (<= 0: go now)."""
        hold = self._background_hold()
        if hold > 0:
            return hold
        # wait for company only when it is likely: a request that arrived alone after a quiet spell
        # (one client at a time) goes at once instead of paying max_wait on every call
        lone = len(self._queue) == 1 and self._queue[0].lone
        if self._closing or self._full() or lone:
            return 0.0
        quiet_until = self._last_submit + QUIET_FRACTION * wait_s
        return min(self._queue[0].submitted + wait_s, quiet_until) - time.perf_counter()

    def _background_hold(self) -> float:
        """Seconds background-only work should still wait: for more of its kind, or for the lane's
        background share (0: run it now); at most until the head's patience runs out and it is shed."""
        if self._closing or self._lane is None or any(not req.background for req in self._queue):
            return 0.0
        now = time.perf_counter()
        head = self._queue[0].submitted
        enough = min(BACKGROUND_BATCH, self.config.max_batch_size)
        gather = 0.0 if self._queued_items >= enough else head + BACKGROUND_PATIENCE_S / 2 - now
        hold = max(gather, self._lane.background_wait())
        if hold <= 0:
            return 0.0
        # wake when the head's patience runs out (the worker sheds it then), never to run it over budget
        return max(min(hold, head + BACKGROUND_PATIENCE_S - now), 0.001)

    def _lane_priority(self) -> int:
        """0 when a client waits on something queued here, 1 for background work only."""
        return 0 if any(not req.background for req in self._queue) else 1

    def _shed_stale_background(self) -> None:
        now = time.perf_counter()
        for req in [r for r in self._queue if r.background and r.taken == 0
                    and now - r.submitted > BACKGROUND_PATIENCE_S]:
            self._fail(req, Shed(f"batcher {self.name}: background work waited over {BACKGROUND_PATIENCE_S:g} s "
                                 f"for the model"))

    def _full(self) -> bool:
        """No further item could join the batch at the head, so waiting is pointless."""
        return (self._queued_items >= self.config.max_batch_size
                or self._queued_cost >= self.config.max_batch_tokens)

    def _take(self) -> _Batch:
        """Cut the next batch off the queue head, FIFO, within the size and token budgets."""
        batch: _Batch = []
        n = total = 0
        while self._queue and n < self.config.max_batch_size:
            req = self._queue[0]
            start = req.taken
            while req.taken < len(req.items) and n < self.config.max_batch_size:
                c = req.costs[req.taken]
                if n and total + c > self.config.max_batch_tokens:
                    break  # an oversize item still runs, but only alone
                req.taken += 1
                n += 1
                total += c
            if req.taken > start:
                batch.append((req, start, req.taken))
                self._queued_items -= req.taken - start
                self._queued_cost -= sum(req.costs[start:req.taken])
            if req.taken < len(req.items):
                break
            self._queue.popleft()
        return batch

    async def _run(self, batch: _Batch, guest: bool = False) -> None:
        """One model call on the lane (or executor); deliver results or the error to exactly its requests."""
        if not batch:
            return
        items = [item for req, a, b in batch for item in req.items[a:b]]
        size, total = len(items), sum(c for req, a, b in batch for c in req.costs[a:b])
        start = time.perf_counter()
        for req, _, _ in batch:
            if req.first_start is None:
                req.first_start = start
        abandoned, unwatch = _watch([req for req, _, _ in batch])
        try:
            if self._lane is not None:
                outputs = await self._lane.run(lambda: self._run_batch(items), guest=guest, abandoned=abandoned)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, items)
            if len(outputs) != size:
                raise ValueError(f"run_batch returned {len(outputs)} outputs for {size} items")
        except asyncio.CancelledError:  # worker cancelled (loop shutdown): nobody may wait forever
            for req, _, _ in batch:
                self._fail(req, BatcherClosed(f"batcher {self.name} stopped during a model call"))
            raise
        except Abandoned:
            seconds = time.perf_counter() - start
            self._charge_background(batch, size, seconds)
            log.info("event=batch_abandoned batcher=%s size=%d seconds=%.3f requests=%s", self.name, size, seconds,
                     ",".join(req.tag or "-" for req, _, _ in batch))
            for req, _, _ in batch:
                self._fail(req, BatcherClosed(f"batcher {self.name}: nobody waited for this batch any more"))
            return
        except Exception as exc:  # noqa: BLE001 - any model error fails this batch only
            seconds = time.perf_counter() - start
            self._recent.append(seconds)
            self._charge_background(batch, size, seconds)
            log.warning("event=batch_failed batcher=%s size=%d requests=%s error=%r", self.name, size,
                        ",".join(req.tag or "-" for req, _, _ in batch), exc)
            for req, _, _ in batch:
                self._fail(req, exc)
            return
        finally:
            unwatch()
        seconds = time.perf_counter() - start
        self._recent.append(seconds)
        self._charge_background(batch, size, seconds)
        i = 0
        for req, a, b in batch:
            for j in range(a, b):
                req.outputs[j] = outputs[i]
                i += 1
            req.inference_seconds += seconds
            req.batch_sizes.append(size)
            req.done_items += b - a
            if req.done_items == len(req.items) and not req.future.done():
                req.future.set_result(BatchResult(
                    outputs=req.outputs, queue_seconds=(req.first_start or start) - req.submitted,
                    inference_seconds=req.inference_seconds, batch_sizes=req.batch_sizes))
        if self._on_batch is not None:
            try:
                self._on_batch(size, total, seconds)
            except Exception:  # noqa: BLE001 - a metrics bug must not stop serving
                log.exception("batcher %s: on_batch hook failed", self.name)

    # -- helpers --------------------------------------------------------------------------------
    def _charge_background(self, batch: _Batch, size: int, seconds: float) -> None:
        """Charge the lane for the background items' share of a model call."""
        background = sum(b - a for req, a, b in batch if req.background)
        if background and self._lane is not None:
            self._lane.charge_background(seconds * background / size)

    def _unqueue(self, req: _Request) -> None:
        """Remove the not-yet-taken items of `req` from the queue (cancel, failure, closing)."""
        try:
            self._queue.remove(req)
        except ValueError:
            return
        self._queued_items -= len(req.items) - req.taken
        self._queued_cost -= sum(req.costs[req.taken:])
        req.taken = len(req.items)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        self._unqueue(req)  # the rest of a split request would be wasted work
        if not req.future.done():
            req.future.set_exception(exc)

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained enough: batches ahead x recent batch time."""
        per_batch = (sum(self._recent) / len(self._recent)) if self._recent else 0.05
        per_batch += self.config.max_wait_ms / 1000.0
        batches = math.ceil(max(self._queued_items, 1) / self.config.max_batch_size)
        return max(0.001, batches * per_batch)
