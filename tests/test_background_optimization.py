"""Variants serve eagerly at once and are swapped for their compiled form while serving (service.optimizer).

Real servers on 127.0.0.1, the real child process that builds AOTInductor packages, real requests under
load across the swap; a second start finds the package cached, a corrupt package is rebuilt.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from bench.live import thread_server
from quantization.internals.compiled import compiler_problem
from service.app import create_app
from service.config import load_settings

pytestmark = [pytest.mark.skipif(compiler_problem() is not None, reason="needs a C++ compiler"), pytest.mark.slow]

CONFIG = """
batching: {max_batch_size: 2, max_wait_ms: 2}   # a request of 5 inputs runs as 3 batches: a swap can fall between
gate: {action: serve}
models:
  - name: minilm
    task: embed
    source: minilm
    variants:
      - {name: fp32, strategy: fp32}
      - {name: int8, strategy: dynamic-int8, compile: true}
    routing: {default: int8}
"""
TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today.", "Cats sleep most of the day.",
         "Set a timer for ten minutes, please.", "Where is the nearest train station?"]


def _app(tmp_path: Path):
    path = tmp_path / "models.yaml"
    path.write_text(CONFIG)
    return create_app(load_settings(path, probe_texts=16, artifacts_dir=str(tmp_path / "cache"), optimize="background"))


def _int8(base: str) -> dict:
    return next(v for v in httpx.get(f"{base}/v1/models/minilm").json()["variants"] if v["name"] == "int8")


def _state_metric(base: str) -> str:
    lines = [line for line in httpx.get(f"{base}/metrics").text.splitlines()
             if line.startswith("quantserve_variant_state{") and 'variant="int8"' in line and line.endswith(" 1.0")]
    assert len(lines) == 1, lines
    return lines[0].split('quantserve_variant_state="')[1].split('"')[0]


def _embed(base: str, client: httpx.Client) -> torch.Tensor:
    r = client.post(f"{base}/v1/embed", json={"model": "minilm", "inputs": TEXTS}, headers={"X-Variant": "int8"})
    assert r.status_code == 200, r.text
    return torch.tensor([d["embedding"] for d in r.json()["results"]])


def _wait_optimized(base: str, timeout: float = 900.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = _int8(base)
        if v["state"] not in ("serving-eager", "optimizing"):
            return v
        time.sleep(1.0)
    raise AssertionError("the variant was not optimised in time")


def _expected(app, module) -> torch.Tensor:
    served = app.state.catalog.models["minilm"]
    return torch.nn.functional.normalize(torch.stack(served.task.run(module, served.task.tokenize(TEXTS))), dim=-1)


def test_eager_serves_before_the_compiled_form_which_is_swapped_in_under_load_without_a_mixed_answer(tmp_path):
    app = _app(tmp_path)
    with thread_server(app) as (base, _):
        # ready while the package is still being built: the eager form answers
        first = _int8(base)
        assert httpx.get(f"{base}/readyz").json()["models"]["minilm"]["ready"] is True
        assert first["state"] in ("serving-eager", "optimizing") and first["compile"]["compiled"] is False
        assert _state_metric(base) in ("serving-eager", "optimizing")
        eager_module = app.state.catalog.models["minilm"].variants["int8"].module
        answers: list[list[torch.Tensor]] = [[] for _ in range(4)]  # per client, in the order received
        failures: list[str] = []
        stop = threading.Event()

        def client(mine: list[torch.Tensor]) -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    try:
                        mine.append(_embed(base, c))
                    except (AssertionError, httpx.HTTPError) as exc:
                        failures.append(repr(exc)[:300])
                    time.sleep(0.05)  # steady load that leaves the package's builder some of the cores

        clients = [threading.Thread(target=client, args=(mine,)) for mine in answers]
        for t in clients:
            t.start()
        try:
            optimized = _wait_optimized(base)
            time.sleep(1.0)  # answers from the new form too
        finally:
            stop.set()
            for t in clients:
                t.join(60)
        assert failures == []
        assert optimized["state"] == "optimized", optimized
        assert optimized["runtime"].endswith("+aoti") and optimized["optimization"]["from_cache"] is False
        assert set(optimized["optimization"]["vs_eager"]) == {"batch_1", "batch_2"}
        assert optimized["startup_fidelity"]["mean_cosine"] >= 0.995
        assert _state_metric(base) == "optimized"
        swapped = httpx.get(f"{base}/metrics").text
        assert 'quantserve_optimizations_total{model="minilm",outcome="swapped",task="embed",variant="int8"} 1.0' \
            in swapped
        packaged = app.state.catalog.models["minilm"].variants["int8"].module
        assert packaged is not eager_module
        old, new = _expected(app, eager_module), _expected(app, packaged)
        assert (old - new).abs().max() > 1e-4  # the two forms are told apart by their outputs
        for mine in answers:
            kinds = []
            for answer in mine:  # every input of a request from the same form, within batching's rounding
                d_old, d_new = (answer - old).abs().amax(-1), (answer - new).abs().amax(-1)
                nearest = ["old" if a < b else "new" for a, b in zip(d_old, d_new)]
                assert len(set(nearest)) == 1, (d_old, d_new)
                assert float(torch.minimum(d_old, d_new).max()) < 2e-3
                kinds.append(nearest[0])
            assert kinds.count("old") > 0 and kinds.count("new") > 0
            assert kinds == sorted(kinds, key=lambda k: k == "new")  # once a client saw the new form, only it


def test_a_second_start_loads_the_package_and_a_corrupt_one_is_rebuilt(tmp_path):
    app = _app(tmp_path)
    with thread_server(app) as (base, _):
        built = _wait_optimized(base)
    assert built["state"] == "optimized"
    package = Path(built["optimization"]["package"])
    assert package.is_file() and package.parent == tmp_path / "cache" / "minilm" / "int8"

    app = _app(tmp_path)
    with thread_server(app) as (base, _):
        again = _wait_optimized(base, timeout=120)
        assert again["state"] == "optimized" and again["optimization"]["from_cache"] is True
        assert again["optimization"]["build_seconds"] == 0.0

    package.write_bytes(package.read_bytes()[: package.stat().st_size // 3])  # a truncated copy
    app = _app(tmp_path)
    with thread_server(app) as (base, _):
        rebuilt = _wait_optimized(base)
        assert rebuilt["state"] == "optimized" and rebuilt["optimization"]["from_cache"] is False
        said = [line for line in app.state.catalog.progress if "event=package_rebuild" in line]
        assert len(said) == 1 and "model=minilm variant=int8" in said[0]
    assert package.is_file()
