"""SIGTERM in the middle of a burst against ``python -m service``: nothing accepted is lost, exit 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import torch
import torch.nn.functional as F

from bench.live import ServiceProcess
from quantization.models import load_task_model
from quantization.texts import eval_texts

GRACE_S = 30


@pytest.mark.slow
def test_sigterm_mid_burst_finishes_every_accepted_request_and_exits_0(tmp_path):
    config = tmp_path / "m.yaml"
    config.write_text(f"grace_period_s: {GRACE_S}\nprobe_texts: 4\nbatching: {{max_batch_size: 8}}\n"
                      "models:\n - {name: minilm, task: embed, source: minilm, variants: [{name: fp32, strategy: fp32}]}\n")
    service = ServiceProcess("--config", str(config), "--log-level", "info")
    texts = eval_texts()[:96]
    ref = F.normalize(load_task_model("minilm").run(None, texts), dim=-1)
    try:
        service.wait_ready(timeout=300)
        outcomes: list[tuple[int, float, object]] = []  # (request index, finish time, response or exception)
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=service.url, timeout=120) as c:
                for j in range(4):  # back to back: some of these start after the SIGTERM
                    i = (k * 4 + j) % len(texts)
                    try:
                        r: object = c.post("/v1/embed", json={"inputs": [texts[i]] * 6})
                    except httpx.HTTPError as exc:
                        r = exc
                    with lock:
                        outcomes.append((i, time.monotonic(), r))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(24)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        sigterm_at = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        saw_draining = False
        while service.proc.poll() is None and time.monotonic() - sigterm_at < 3:
            try:
                r = httpx.get(f"{service.url}/readyz", timeout=2)
                saw_draining = saw_draining or (r.status_code == 503 and r.json()["draining"])
            except httpx.HTTPError:
                break
            if saw_draining:
                break
            time.sleep(0.05)
        for t in threads:
            t.join(150)
        code = service.proc.wait(GRACE_S + 10)
        exited_after = time.monotonic() - sigterm_at
    finally:
        service.stop()
    log = service.output()
    assert code == 0, log[-3000:]
    assert exited_after < GRACE_S
    assert saw_draining  # readiness turned false while accepted work was still running
    answered = [(i, at, r) for i, at, r in outcomes if isinstance(r, httpx.Response) and r.status_code == 200]
    refused = [(i, at, r) for i, at, r in outcomes if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    assert any(at > sigterm_at for _, at, _ in answered), "no request was in flight at the SIGTERM"
    for i, _, r in answered:  # every accepted request got its full, correct answer
        got = torch.tensor([x["embedding"] for x in r.json()["results"]])
        assert got.shape == (6, 384) and F.cosine_similarity(got, ref[i].expand_as(got)).min() > 0.9999
    for _, at, r in refused:  # the rest were refused at the door after the signal, never cut off mid-answer
        assert at > sigterm_at
        if isinstance(r, httpx.Response):
            assert r.status_code == 503 and r.json()["error"]["type"] == "shutting_down", r.text
        else:
            assert isinstance(r, httpx.ConnectError), repr(r)
    assert "event=draining" in log and "event=drained inflight=0" in log
    assert any("event=request" in line and "request_id=" in line and "request_id=-" not in line
               for line in log.splitlines())
    assert "Traceback" not in log
