"""DynamicBatcher: merging, budgets, ordering, timing, failure isolation, cancellation, shutdown.

Plain test functions drive their own event loop with asyncio.run (no pytest-asyncio plugin).
The fake model records every call so the tests can check batch composition directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import pytest
import torch

from service.batching import BatchConfig, BatchResult, BatcherClosed, DynamicBatcher, ModelLane, QueueFull

T = TypeVar("T")


class FakeModel:
    """Upper-cases strings; records each call's items and thread; can block on a gate or fail."""

    def __init__(self, sleep_s: float = 0.002, fail_on: str | None = None, gated: bool = False) -> None:
        self.sleep_s = sleep_s
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self.threads: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        self.threads.append(threading.get_ident())
        self.entered.set()
        assert self.gate.wait(timeout=10), "test forgot to open the gate"
        time.sleep(self.sleep_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"model failed on {self.fail_on}")
        return [s.upper() for s in items]

    @property
    def ran(self) -> list[str]:
        return [item for call in self.calls for item in call]


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not pred():
        assert time.perf_counter() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def arun(main: Callable[[], Awaitable[T]], *models: FakeModel, timeout: float = 10.0) -> T:
    """asyncio.run with a deadline, so a batcher bug fails the test instead of hanging it."""

    async def guarded() -> T:
        try:
            return await asyncio.wait_for(main(), timeout)
        finally:
            for m in models:
                m.gate.set()  # never leave an executor thread blocked behind a failed test

    return asyncio.run(guarded())


def run_with(model: Callable[[list[Any]], list[Any]], config: BatchConfig,
             body: Callable[[DynamicBatcher], Awaitable[T]], **kwargs: Any) -> T:
    """Start a batcher, run the test body, always stop (drain) it."""

    async def main() -> T:
        b = DynamicBatcher("test/fp32", model, config, **kwargs)
        await b.start()
        try:
            return await body(b)
        finally:
            if isinstance(model, FakeModel):
                model.gate.set()
            await b.stop(drain=True)

    return arun(main, *([model] if isinstance(model, FakeModel) else []))


def test_concurrent_requests_are_merged_and_answered_with_their_own_outputs() -> None:
    model = FakeModel(sleep_s=0.005)
    requests = [[f"r{r}i{i}" for i in range(1 + r % 3)] for r in range(64)]

    async def body(b: DynamicBatcher) -> list[BatchResult]:
        return await asyncio.gather(*(b.submit(items) for items in requests))

    results = run_with(model, BatchConfig(max_batch_size=16, max_wait_ms=20), body)
    for items, res in zip(requests, results):
        assert res.outputs == [s.upper() for s in items]
        assert all(size <= 16 for size in res.batch_sizes)
        assert res.queue_seconds >= 0 and res.inference_seconds > 0
    total = sum(len(r) for r in requests)
    assert sorted(model.ran) == sorted(i for r in requests for i in r)  # every item ran exactly once
    assert all(len(c) <= 16 for c in model.calls)
    assert len(model.calls) <= total // 16 + 3  # far fewer calls than the 64 requests


def test_fifo_order_across_requests() -> None:
    model = FakeModel()

    async def body(b: DynamicBatcher) -> None:
        tasks = [asyncio.create_task(b.submit([f"{r}-{i}" for i in range(3)])) for r in range(10)]
        await asyncio.gather(*tasks)

    run_with(model, BatchConfig(max_batch_size=4, max_wait_ms=10), body)
    assert model.ran == [f"{r}-{i}" for r in range(10) for i in range(3)]


def test_token_budget_is_respected_and_an_oversize_item_runs_alone() -> None:
    model = FakeModel()
    words = ["aaaa", "bb", "cccccc", "d", "eeeee", "ff", "gggggggggggggggggggg", "hhh", "iiiiiii", "j"]

    async def body(b: DynamicBatcher) -> list[BatchResult]:
        return await asyncio.gather(*(b.submit([w]) for w in words))

    results = run_with(model, BatchConfig(max_batch_size=32, max_wait_ms=20, max_batch_tokens=10), body,
                       cost=len)
    assert [r.outputs for r in results] == [[w.upper()] for w in words]
    for call in model.calls:
        assert sum(map(len, call)) <= 10 or len(call) == 1
    assert ["gggggggggggggggggggg"] in model.calls  # cost 20 > budget: still runs, alone
    assert model.ran == words


def test_explicit_costs_override_the_cost_function() -> None:
    model = FakeModel()

    async def body(b: DynamicBatcher) -> BatchResult:
        return await b.submit(["a", "b", "c", "d"], cost=[6, 6, 6, 6])

    res = run_with(model, BatchConfig(max_batch_size=32, max_wait_ms=1, max_batch_tokens=12), body)
    assert model.calls == [["a", "b"], ["c", "d"]]
    assert res.outputs == ["A", "B", "C", "D"] and res.batch_sizes == [2, 2]


def test_oversize_request_is_split_and_reassembled_in_order() -> None:
    model = FakeModel()
    items = [f"w{i:02d}" for i in range(20)]

    async def body(b: DynamicBatcher) -> BatchResult:
        return await b.submit(items)

    res = run_with(model, BatchConfig(max_batch_size=8, max_wait_ms=1), body)
    assert res.outputs == [s.upper() for s in items]
    assert res.batch_sizes == [8, 8, 4]
    assert [len(c) for c in model.calls] == [8, 8, 4]
    assert res.inference_seconds >= 3 * model.sleep_s


def test_a_request_after_a_quiet_spell_runs_at_once() -> None:
    """One client at a time: nobody is likely to join, so waiting max_wait would be pure latency."""
    model = FakeModel(sleep_s=0.01)

    async def body(b: DynamicBatcher) -> tuple[float, BatchResult]:
        t0 = time.perf_counter()
        res = await b.submit(["solo"])
        return time.perf_counter() - t0, res

    elapsed, res = run_with(model, BatchConfig(max_batch_size=8, max_wait_ms=60), body)
    assert res.outputs == ["SOLO"]
    assert res.queue_seconds < 0.03 and elapsed < 0.05


def test_one_client_sending_back_to_back_never_waits_for_company() -> None:
    """Each request comes well within max_wait of the previous one, but only after its answer: nobody joins."""
    model = FakeModel(sleep_s=0.002)

    async def body(b: DynamicBatcher) -> list[BatchResult]:
        return [await b.submit([f"r{i}"]) for i in range(8)]

    results = run_with(model, BatchConfig(max_batch_size=8, max_wait_ms=60), body)
    assert all(r.batch_sizes == [1] and r.queue_seconds < 0.03 for r in results)


def test_a_request_close_behind_another_waits_for_company_while_company_keeps_coming() -> None:
    """A request that arrives while another is in flight: clients overlap, so it waits for company, as
    long as requests keep arriving (gaps under QUIET_FRACTION of max_wait) and at most max_wait."""
    import service.batching as batching

    model = FakeModel(sleep_s=0.01)
    quiet = batching.QUIET_FRACTION * 0.1  # of max_wait_ms=100

    async def body(b: DynamicBatcher) -> list[BatchResult]:
        first = asyncio.ensure_future(b.submit(["a"]))  # alone: runs at once
        await asyncio.sleep(0.002)
        rest = []
        for i in range(4):  # while the first runs, a trickle closer together than the quiet gap
            rest.append(asyncio.ensure_future(b.submit([f"t{i}"])))
            await asyncio.sleep(quiet / 3)
        await asyncio.sleep(0.3)
        late = asyncio.ensure_future(b.submit(["late"]))  # after a quiet spell, with nobody in flight: at once
        return [await first, *[await r for r in rest], await late]

    first, *rest, late = run_with(model, BatchConfig(max_batch_size=8, max_wait_ms=100), body)
    assert first.batch_sizes == [1] and first.queue_seconds < 0.03
    assert all(r.batch_sizes == [4] for r in rest)  # the trickle went as one batch ...
    # ... cut a quiet gap after its last arrival, well before max_wait
    assert quiet <= rest[0].queue_seconds < 0.1 - quiet / 2
    assert late.batch_sizes == [1] and late.queue_seconds < 0.03


def test_company_that_keeps_coming_waits_no_longer_than_max_wait() -> None:
    import service.batching as batching

    model = FakeModel(sleep_s=0.005)
    wait_s = 0.05

    async def body(b: DynamicBatcher) -> list[BatchResult]:
        first = asyncio.ensure_future(b.submit(["a"]))
        await asyncio.sleep(0.001)
        rest = []
        deadline = time.perf_counter() + 2.5 * wait_s
        while time.perf_counter() < deadline:  # an endless trickle
            rest.append(asyncio.ensure_future(b.submit(["t"])))
            await asyncio.sleep(batching.QUIET_FRACTION * wait_s / 4)
        return [await first, *[await r for r in rest]]

    first, *rest = run_with(model, BatchConfig(max_batch_size=64, max_wait_ms=1000 * wait_s), body)
    assert len(rest) > 10
    assert max(r.queue_seconds for r in rest) < 2 * wait_s  # max_wait still bounds the wait


def test_full_batch_runs_without_waiting() -> None:
    model = FakeModel()

    async def body(b: DynamicBatcher) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(b.submit([f"x{i}"]) for i in range(4)))
        return time.perf_counter() - t0

    elapsed = run_with(model, BatchConfig(max_batch_size=4, max_wait_ms=3000), body)
    assert elapsed < 1.0
    assert model.calls == [["x0", "x1", "x2", "x3"]]


def test_failure_is_isolated_to_its_batch() -> None:
    model = FakeModel(fail_on="boom", gated=True)

    async def body(b: DynamicBatcher) -> None:
        first = asyncio.create_task(b.submit(["warm"]))  # occupies the model while we queue
        await wait_until(model.entered.is_set)
        same_batch = [asyncio.create_task(b.submit(["x"])), asyncio.create_task(b.submit(["boom"]))]
        next_batch = [asyncio.create_task(b.submit(["y"])), asyncio.create_task(b.submit(["z"]))]
        await wait_until(lambda: b.queued_items == 4)
        model.gate.set()
        assert (await first).outputs == ["WARM"]
        for t in same_batch:
            with pytest.raises(RuntimeError, match="boom"):
                await t
        assert [(await t).outputs for t in next_batch] == [["Y"], ["Z"]]
        assert b.running
        assert (await b.submit(["later"])).outputs == ["LATER"]

    run_with(model, BatchConfig(max_batch_size=2, max_wait_ms=5), body)
    assert model.calls == [["warm"], ["x", "boom"], ["y", "z"], ["later"]]


def test_failed_part_of_a_split_request_drops_its_remaining_items() -> None:
    model = FakeModel(fail_on="boom")

    async def body(b: DynamicBatcher) -> None:
        with pytest.raises(RuntimeError):
            await b.submit(["boom", "a", "b", "c", "d"])
        assert b.queued_items == 0
        assert (await b.submit(["ok"])).outputs == ["OK"]

    run_with(model, BatchConfig(max_batch_size=2, max_wait_ms=1), body)
    assert model.calls == [["boom", "a"], ["ok"]]


def test_wrong_output_count_fails_the_batch() -> None:
    async def body(b: DynamicBatcher) -> None:
        with pytest.raises(ValueError, match="outputs"):
            await b.submit(["a", "b"])
        assert b.running

    run_with(lambda items: items[:1], BatchConfig(max_wait_ms=1), body)


def test_unusable_outputs_fail_the_batch_not_the_worker() -> None:
    async def body(b: DynamicBatcher) -> None:
        with pytest.raises(TypeError):
            await b.submit(["a", "b"])  # a set has the right length but cannot be indexed
        assert b.running
        assert (await b.submit(["ok"])).outputs == ["ok"]

    run_with(lambda items: set(items) if len(items) > 1 else items, BatchConfig(max_wait_ms=1), body)


def test_cancelled_request_is_dropped_from_queue_and_never_runs() -> None:
    model = FakeModel(gated=True)

    async def body(b: DynamicBatcher) -> None:
        running = asyncio.create_task(b.submit(["first"]))
        await wait_until(model.entered.is_set)
        doomed = asyncio.create_task(b.submit(["gone1", "gone2"]))
        kept = asyncio.create_task(b.submit(["kept"]))
        await wait_until(lambda: b.queued_items == 3)
        doomed.cancel()
        await asyncio.sleep(0)
        assert doomed.cancelled() and b.queued_items == 1
        running.cancel()  # already in the model: its result is discarded silently
        model.gate.set()
        assert (await kept).outputs == ["KEPT"]
        assert running.cancelled()
        assert (await b.submit(["after"])).outputs == ["AFTER"]

    run_with(model, BatchConfig(max_batch_size=8, max_wait_ms=5), body)
    assert model.ran == ["first", "kept", "after"]


def test_queue_overflow_raises_queue_full_at_once() -> None:
    model = FakeModel(gated=True)

    async def body(b: DynamicBatcher) -> None:
        first = asyncio.create_task(b.submit(["busy"]))
        await wait_until(model.entered.is_set)
        waiting = asyncio.create_task(b.submit(["a", "b", "c"]))
        await wait_until(lambda: b.queued_items == 3)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as err:
            await b.submit(["d", "e"])
        assert time.perf_counter() - t0 < 0.05
        assert err.value.retry_after_s > 0
        assert b.queued_items == 3
        model.gate.set()
        await asyncio.gather(first, waiting)
        assert (await b.submit(["d", "e"])).outputs == ["D", "E"]

    run_with(model, BatchConfig(max_batch_size=8, max_wait_ms=1, max_queue=4), body)


def test_stop_with_drain_finishes_pending_work() -> None:
    model = FakeModel(gated=True)

    async def main() -> None:
        b = DynamicBatcher("t", model, BatchConfig(max_batch_size=2, max_wait_ms=1000))
        await b.start()
        tasks = [asyncio.create_task(b.submit([f"p{i}"])) for i in range(5)]
        await wait_until(model.entered.is_set)
        stopper = asyncio.create_task(b.stop(drain=True))
        await asyncio.sleep(0.01)
        assert not b.running and not stopper.done()
        with pytest.raises(BatcherClosed):
            await b.submit(["late"])
        model.gate.set()
        t0 = time.perf_counter()
        await stopper
        assert time.perf_counter() - t0 < 0.5  # the last partial batch does not wait max_wait
        assert [(await t).outputs for t in tasks] == [[f"P{i}"] for i in range(5)]
        assert b.queued_items == 0

    arun(main, model)
    assert model.ran == [f"p{i}" for i in range(5)]


def test_stop_without_drain_fails_queued_requests() -> None:
    model = FakeModel(gated=True)

    async def main() -> None:
        b = DynamicBatcher("t", model, BatchConfig(max_batch_size=1, max_wait_ms=1))
        await b.start()
        running = asyncio.create_task(b.submit(["r"]))
        await wait_until(model.entered.is_set)
        queued = [asyncio.create_task(b.submit([f"q{i}"])) for i in range(3)]
        await wait_until(lambda: b.queued_items == 3)
        stopper = asyncio.create_task(b.stop(drain=False))
        for t in queued:
            with pytest.raises(BatcherClosed):
                await t
        model.gate.set()
        await stopper
        assert (await running).outputs == ["R"]  # the call already running still completes
        assert not b.running

    arun(main, model)
    assert model.ran == ["r"]


def test_run_batch_runs_off_the_event_loop_thread() -> None:
    model = FakeModel()

    async def body(b: DynamicBatcher) -> int:
        await asyncio.gather(*(b.submit([f"t{i}"]) for i in range(10)))
        return threading.get_ident()

    loop_thread = run_with(model, BatchConfig(max_batch_size=4, max_wait_ms=5), body)
    assert model.threads and loop_thread not in model.threads


def test_custom_executor_is_used() -> None:
    names: list[str] = []

    def model(items: list[str]) -> list[str]:
        names.append(threading.current_thread().name)
        return items

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="custom-pool") as pool:
        run_with(model, BatchConfig(max_wait_ms=1), lambda b: b.submit(["a"]), executor=pool)
    assert names and names[0].startswith("custom-pool")


def test_on_batch_reports_sizes_costs_and_durations() -> None:
    model = FakeModel(sleep_s=0.003)
    seen: list[tuple[int, int, float, int]] = []

    def on_batch(size: int, cost: int, seconds: float) -> None:
        seen.append((size, cost, seconds, threading.get_ident()))

    async def body(b: DynamicBatcher) -> int:
        await b.submit([f"item{i}" for i in range(7)])
        return threading.get_ident()

    loop_thread = run_with(model, BatchConfig(max_batch_size=3, max_wait_ms=1), body, cost=len, on_batch=on_batch)
    assert [s[0] for s in seen] == [len(c) for c in model.calls] == [3, 3, 1]
    assert [s[1] for s in seen] == [sum(map(len, c)) for c in model.calls]
    assert all(s[2] >= 0.003 and s[3] == loop_thread for s in seen)


def test_empty_submit_and_misuse() -> None:
    model = FakeModel()

    async def main() -> None:
        b = DynamicBatcher("t", model, BatchConfig())
        with pytest.raises(RuntimeError):
            await b.submit(["not started"])
        await b.start()
        t0 = time.perf_counter()
        res = await b.submit([])
        assert res.outputs == [] and res.batch_sizes == [] and time.perf_counter() - t0 < 0.05
        with pytest.raises(ValueError):
            await b.submit(["a", "b"], cost=[1])
        await b.stop()
        await b.stop()  # idempotent

    arun(main, model)
    assert model.calls == []


def test_idle_worker_does_not_spin() -> None:
    async def body(b: DynamicBatcher) -> float:
        await b.submit(["x"])
        cpu0 = time.process_time()
        await asyncio.sleep(0.3)
        return time.process_time() - cpu0

    cpu = run_with(FakeModel(), BatchConfig(max_wait_ms=1), body)
    assert cpu < 0.1


def test_torch_batched_results_equal_one_by_one() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)

    def features(text: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, text)))
        return torch.randn(16, generator=g)

    @torch.inference_mode()
    def run_batch(items: list[str]) -> list[torch.Tensor]:
        return list(layer(torch.stack([features(t) for t in items])).unbind(0))

    texts = [f"sentence number {i}" for i in range(40)]
    alone = [run_batch([t])[0] for t in texts]
    sizes: list[int] = []

    async def body(b: DynamicBatcher) -> list[BatchResult]:
        return await asyncio.gather(*(b.submit(texts[i:i + 3]) for i in range(0, 40, 3)))

    results = run_with(run_batch, BatchConfig(max_batch_size=8, max_wait_ms=20), body,
                       on_batch=lambda n, c, s: sizes.append(n))
    batched = [out for r in results for out in r.outputs]
    assert len(batched) == 40 and max(sizes) > 1
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- a lane shared by several batchers --------------------------------------------------------------

def _lane_pair(body: Callable[..., Awaitable[T]], first: FakeModel, second: FakeModel,
               config: BatchConfig = BatchConfig(max_batch_size=32, max_wait_ms=1)) -> T:
    async def main() -> T:
        lane = ModelLane("test-lane")
        a = DynamicBatcher("m/a", first, config, lane=lane)
        b = DynamicBatcher("m/b", second, config, lane=lane)
        await a.start()
        await b.start()
        try:
            return await body(a, b)
        finally:
            first.gate.set()
            second.gate.set()
            await a.stop(drain=True)
            await b.stop(drain=True)
            lane.shutdown()

    return arun(main, first, second)


def test_batchers_sharing_a_lane_run_one_batch_at_a_time_on_one_thread() -> None:
    first, second = FakeModel(sleep_s=0.004), FakeModel(sleep_s=0.004)
    running, overlap = [0], [0]

    def counting(model: FakeModel):
        def run(items: list[str]) -> list[str]:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
            try:
                return model(items)
            finally:
                running[0] -= 1
        return run

    async def main() -> None:
        lane = ModelLane("test-lane")
        a = DynamicBatcher("m/a", counting(first), BatchConfig(max_batch_size=4, max_wait_ms=1), lane=lane)
        b = DynamicBatcher("m/b", counting(second), BatchConfig(max_batch_size=4, max_wait_ms=1), lane=lane)
        await a.start()
        await b.start()
        results = await asyncio.gather(*(x.submit([f"{x.name}-{i}"]) for i in range(20) for x in (a, b)))
        await a.stop()
        await b.stop()
        lane.shutdown()
        assert [r.outputs[0] for r in results] == [f"{x}-{i}".upper() for i in range(20) for x in ("m/a", "m/b")]

    arun(main, first, second)
    assert overlap[0] == 1
    assert len(set(first.threads + second.threads)) == 1


def test_a_batch_is_cut_when_the_lane_is_free_so_late_arrivals_join_it() -> None:
    busy, other = FakeModel(gated=True), FakeModel()

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> list[list[str]]:
        hold = asyncio.ensure_future(a.submit(["long"]))
        await wait_until(busy.entered.is_set)  # the lane is busy with a's batch
        waiting = [asyncio.ensure_future(b.submit([f"x{i}"])) for i in range(3)]
        await asyncio.sleep(0.02)  # b's first request is well past max_wait: without a lane it would run alone
        waiting += [asyncio.ensure_future(b.submit([f"y{i}"])) for i in range(3)]
        await asyncio.sleep(0.01)
        busy.gate.set()
        await asyncio.gather(hold, *waiting)
        return other.calls

    calls = _lane_pair(body, busy, other)
    assert calls == [["x0", "x1", "x2", "y0", "y1", "y2"]]


def test_background_work_yields_the_lane_to_foreground_batches() -> None:
    busy, shadowed, served = FakeModel(gated=True), FakeModel(), FakeModel()
    order: list[str] = []

    async def main() -> None:
        lane = ModelLane("test-lane")
        config = BatchConfig(max_batch_size=32, max_wait_ms=1)
        batchers = [DynamicBatcher(n, m, config, lane=lane) for n, m in
                    (("m/busy", busy), ("m/fp32", shadowed), ("m/int8", served))]
        for b in batchers:
            await b.start()
        hold = asyncio.ensure_future(batchers[0].submit(["hold"]))
        await wait_until(busy.entered.is_set)
        shadow = asyncio.ensure_future(batchers[1].submit(["s"], background=True))
        shadow.add_done_callback(lambda _: order.append("shadow"))
        await asyncio.sleep(0.01)  # the shadow batch waits first ...
        fg = asyncio.ensure_future(batchers[2].submit(["f"]))
        fg.add_done_callback(lambda _: order.append("foreground"))
        await asyncio.sleep(0.01)
        busy.gate.set()
        await asyncio.gather(hold, shadow, fg)
        for b in batchers:
            await b.stop()
        lane.shutdown()

    arun(main, busy, shadowed, served)
    assert order == ["foreground", "shadow"]  # ... but the waiting client's batch runs first


def test_a_cancelled_lane_waiter_does_not_block_the_lane() -> None:
    async def main() -> None:
        lane = ModelLane("test-lane")
        await lane.acquire()
        waiter = asyncio.ensure_future(lane.acquire())
        later = asyncio.ensure_future(lane.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        lane.release()
        await asyncio.wait_for(later, 1)  # the lane went to the live waiter
        lane.release()
        await asyncio.wait_for(lane.acquire(), 1)  # and is free again afterwards
        lane.release()
        lane.shutdown()

    arun(main)


def test_background_work_that_waited_too_long_for_the_lane_is_shed_not_run(monkeypatch) -> None:
    import service.batching as batching

    monkeypatch.setattr(batching, "BACKGROUND_PATIENCE_S", 0.05)
    busy, shadowed = FakeModel(gated=True), FakeModel()

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> None:
        hold = asyncio.ensure_future(a.submit(["hold"]))
        await wait_until(busy.entered.is_set)
        shadow = asyncio.ensure_future(b.submit(["s"], background=True))
        await asyncio.sleep(0.1)  # longer than the patience, behind a foreground batch
        busy.gate.set()
        await hold
        with pytest.raises(batching.Shed):
            await shadow
        assert (await b.submit(["fresh"], background=True)).outputs == ["FRESH"]  # an idle lane runs it

    _lane_pair(body, busy, shadowed)
    assert shadowed.ran == ["fresh"]


def test_background_work_gathers_into_batches_before_it_takes_the_lane(monkeypatch) -> None:
    import service.batching as batching

    monkeypatch.setattr(batching, "BACKGROUND_PATIENCE_S", 0.4)
    served, shadowed = FakeModel(), FakeModel()

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> None:
        start = time.perf_counter()
        trickle = []
        for i in range(3):  # shadow samples trickle in while clients are served
            trickle.append(asyncio.ensure_future(b.submit([f"s{i}"], background=True)))
            assert (await a.submit([f"f{i}"])).outputs == [f"F{i}"]  # a client never waits for them
            await asyncio.sleep(0.01)
        assert shadowed.calls == []  # still gathering
        await asyncio.gather(*trickle)
        assert 0.19 <= time.perf_counter() - start < 0.4  # run together after half the patience, not shed
        full = [asyncio.ensure_future(b.submit([f"t{i}"], background=True)) for i in range(batching.BACKGROUND_BATCH)]
        start = time.perf_counter()
        await asyncio.gather(*full)
        assert time.perf_counter() - start < 0.15  # a full background batch goes at once
        # foreground work queued on the same batcher takes the background items with it, without holding
        mixed = [asyncio.ensure_future(b.submit(["u"], background=True)), asyncio.ensure_future(b.submit(["v"]))]
        start = time.perf_counter()
        await asyncio.gather(*mixed)
        assert time.perf_counter() - start < 0.15

    _lane_pair(body, served, shadowed)
    assert shadowed.calls == [["s0", "s1", "s2"], [f"t{i}" for i in range(8)], ["u", "v"]]


def test_background_work_takes_no_more_than_the_lanes_background_share(monkeypatch) -> None:
    """Shadow samples beyond the share are shed (at once once the credit is spent), foreground never is."""
    import service.batching as batching

    monkeypatch.setattr(batching, "BACKGROUND_PATIENCE_S", 0.2)
    served, shadowed = FakeModel(sleep_s=0.001), FakeModel(sleep_s=0.02)
    share = 0.05
    outcome = {"ran": 0, "shed": 0}

    async def main() -> float:
        lane = ModelLane("test-lane", background_share=share)
        config = BatchConfig(max_batch_size=32, max_wait_ms=1)
        a = DynamicBatcher("m/int8", served, config, lane=lane)
        b = DynamicBatcher("m/fp32", shadowed, config, lane=lane)
        await a.start()
        await b.start()

        async def shadow(i: int) -> None:
            try:
                await b.submit([f"s{i}"], background=True)
                outcome["ran"] += 1
            except batching.Shed:
                outcome["shed"] += 1

        start = time.perf_counter()
        tasks = []
        for i in range(300):  # a client sends back to back; every request is shadowed
            assert (await a.submit([f"f{i}"])).outputs == [f"F{i}"]
            tasks.append(asyncio.ensure_future(shadow(i)))
            await asyncio.sleep(0.003)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        await a.stop()
        await b.stop()
        lane.shutdown()
        return elapsed

    elapsed = arun(main, served, shadowed, timeout=30)
    assert len(served.calls) == 300  # every client request ran
    assert outcome["ran"] + outcome["shed"] == 300 and outcome["shed"] > 0 and outcome["ran"] > 0
    assert outcome["ran"] == len(shadowed.ran)
    # 20 ms per background call: within the initial credit plus the share of the elapsed time, one call over
    credit = share * (batching.BACKGROUND_CREDIT_S + elapsed)
    assert len(shadowed.calls) * shadowed.sleep_s <= credit + shadowed.sleep_s + 0.01


def test_a_batcher_takes_an_executor_or_a_lane_not_both() -> None:
    lane = ModelLane("test-lane")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        with pytest.raises(ValueError, match="not both"):
            DynamicBatcher("m/a", FakeModel(), BatchConfig(), executor=pool, lane=lane)
    finally:
        pool.shutdown()
        lane.shutdown()


def test_a_background_share_of_zero_sheds_all_background_work() -> None:
    served, shadowed = FakeModel(), FakeModel()

    async def main() -> None:
        import service.batching as batching

        lane = ModelLane("test-lane", background_share=0.0)
        config = BatchConfig(max_batch_size=32, max_wait_ms=1)
        a = DynamicBatcher("m/a", served, config, lane=lane)
        b = DynamicBatcher("m/b", shadowed, config, lane=lane)
        await a.start()
        await b.start()
        with pytest.raises(batching.Shed):
            await b.submit(["s"], background=True)
        assert (await b.submit(["f"])).outputs == ["F"]  # foreground work on the same batcher runs
        await a.stop()
        await b.stop()
        lane.shutdown()

    arun(main, served, shadowed)
    assert shadowed.ran == ["f"]
    with pytest.raises(ValueError):
        ModelLane("bad", background_share=1.5)


# -- long work: guests at its checkpoints, stopped once nobody waits -------------------------------

class SteppedModel:
    """Long work of ``steps`` steps, each passing quantization.steps.checkpoint(); records what it did."""

    def __init__(self, steps: int = 200, step_s: float = 0.005) -> None:
        self.steps, self.step_s = steps, step_s
        self.taken = 0
        self.entered = threading.Event()
        self.finished = threading.Event()
        self.gate = threading.Event()  # never closed: only so it can stand where a FakeModel does
        self.threads: list[int] = []

    def __call__(self, items: list[str]) -> list[str]:
        from quantization.steps import checkpoint

        self.threads.append(threading.get_ident())
        self.entered.set()
        try:
            for _ in range(self.steps):
                checkpoint()
                time.sleep(self.step_s)
                self.taken += 1
        finally:
            self.finished.set()
        return [s.lower() for s in items]


def _stepped_pair(body: Callable[..., Awaitable[T]], host: SteppedModel, other: FakeModel) -> T:
    return _lane_pair(body, host, other, BatchConfig(max_batch_size=8, max_wait_ms=1))  # type: ignore[arg-type]


def test_other_models_run_between_the_steps_of_long_work_on_the_same_thread() -> None:
    host, other = SteppedModel(steps=200), FakeModel(sleep_s=0.001)

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> None:
        long = asyncio.ensure_future(a.submit(["LONG"]))
        await wait_until(host.entered.is_set)
        for i in range(3):  # one after another, each while the long batch still runs
            start = time.perf_counter()
            assert (await b.submit([f"s{i}"])).outputs == [f"S{i}"]
            assert time.perf_counter() - start < 0.5, "a short batch waited for the long one"
        assert not long.done() and host.taken < host.steps
        assert (await long).outputs == ["long"] and host.taken == host.steps

    _stepped_pair(body, host, other)
    assert set(other.threads) == set(host.threads), "guests must run on the lane's one thread"


def test_long_work_nobody_waits_for_stops_at_its_next_step() -> None:
    host, other = SteppedModel(steps=2000, step_s=0.002), FakeModel(sleep_s=0.001)

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> None:
        long = asyncio.ensure_future(a.submit(["LONG"]))
        await wait_until(host.entered.is_set)
        await asyncio.sleep(0.05)
        long.cancel()  # its deadline passed, or its client left
        start = time.perf_counter()
        await wait_until(host.finished.is_set, timeout=2)
        assert time.perf_counter() - start < 0.2
        assert host.taken < 200
        assert (await b.submit(["after"])).outputs == ["AFTER"]  # the lane is free again
        assert (await a.submit(["again"])).outputs == ["again"]  # and the batcher serves on

    _stepped_pair(body, host, other)


def test_long_work_with_one_request_still_waited_for_runs_to_its_end() -> None:
    host, other = SteppedModel(steps=100, step_s=0.002), FakeModel()

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> None:
        gone = asyncio.ensure_future(a.submit(["GONE"]))
        kept = asyncio.ensure_future(a.submit(["KEPT"]))
        await wait_until(host.entered.is_set)
        gone.cancel()
        assert (await kept).outputs == ["kept"]
        assert host.taken == host.steps

    _stepped_pair(body, host, other)


def test_background_work_is_no_guest_of_long_work() -> None:
    host, other = SteppedModel(steps=100, step_s=0.003), FakeModel()

    async def body(a: DynamicBatcher, b: DynamicBatcher) -> None:
        long = asyncio.ensure_future(a.submit(["LONG"]))
        await wait_until(host.entered.is_set)
        shadow = asyncio.ensure_future(b.submit(["s"] * 8, background=True))
        await long
        assert not other.calls or host.finished.is_set()
        await shadow

    _stepped_pair(body, host, other)
