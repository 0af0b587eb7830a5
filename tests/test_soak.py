"""Soak: 3000 mixed requests at 48 concurrent clients against ``python -m service`` (bench/soak.py)."""

from __future__ import annotations

import asyncio

import pytest

from bench.live import ServiceProcess
from bench.soak import soak
from quantization.texts import eval_texts

RSS_GROWTH_BOUND = 128 * 2**20  # allocator pools settle over the first thousands of requests (bench/soak.py)


@pytest.mark.slow
def test_3000_requests_at_48_clients_all_answered_with_their_own_input_and_memory_flat():
    service = ServiceProcess("--log-level", "warning")
    try:
        service.wait_ready(timeout=600)
        result = asyncio.run(soak(service.url, eval_texts(), requests=3000, concurrency=48, pid=service.proc.pid))
        assert service.stop() == 0
    finally:
        service.stop()
    assert result.unexpected == 0, result.errors[:10]
    assert result.statuses == {200: 3000}
    assert result.rss_growth < RSS_GROWTH_BOUND, f"RSS grew by {result.rss_growth / 2**20:.1f} MiB"
