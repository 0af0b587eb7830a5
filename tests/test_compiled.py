"""Variants run through torch.compile: same outputs as eager, every graph compiled before serving,
and a machine that cannot compile still serves (eager, saying why)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import httpx
import torch
import torch._dynamo

from quantization.internals.compiled import Settled, compile_module, compiler_problem, is_compiled, original, warm_up
from quantization.fidelity import fidelity
from quantization.layers import share_input_gemms
from quantization.pipeline import quantize_model
from service.metrics import Metrics
from service.builder import build_catalog
from service.config import load_settings
from live_service import running_service

CONFIG = """
models:
  - name: minilm
    task: embed
    source: minilm
    max_input_tokens: 64
    variants:
      - {name: fp32, strategy: fp32}
      - {name: int8, strategy: dynamic-int8, compile: true}
    routing: {default: int8}
"""


def test_importing_the_library_leaves_the_kernel_cache_location_alone():
    # torch._inductor sets TORCHINDUCTOR_CACHE_DIR when imported; the service must still be able to choose it
    code = "import os, quantization.internals.compiled, service.builder; assert 'TORCHINDUCTOR_CACHE_DIR' not in os.environ"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def test_this_machine_can_compile():
    # set-up installs g++; without it the default int8 routes would quietly run eager
    assert compiler_problem() is None


def test_compiled_int8_matches_eager_int8_on_every_batch_shape_without_recompiling(minilm, texts):
    qm = quantize_model(minilm, "dynamic-int8")
    compiled = compile_module(qm.module)
    assert is_compiled(compiled) and original(compiled) is qm.module
    warm_up(lambda batch: minilm.run(compiled, batch), texts[:12])
    # after warm-up no new shape (batch sizes 1..12, padded to different lengths) may compile again
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (texts[:1], texts[5:6], texts[:2], texts[3:10], texts[20:32]):
            out = minilm.run(compiled, batch)
            # the same int8 arithmetic, fused: not bit-equal (a rounding lands on the other side of .5 and the
            # error grows from there like int8's own), so close to eager int8 ...
            assert fidelity("embed", minilm.run(qm.module, batch), out)["min_cosine"] > 0.995
            # ... and as faithful to FP32 as the served int8 variant must be
            fid = fidelity("embed", minilm.run(None, batch), out)
            assert fid["mean_cosine"] >= 0.995 and fid["min_cosine"] >= 0.98, fid


def test_layers_reading_one_input_share_one_gemm_when_compiled(minilm, texts):
    qm = quantize_model(minilm, "dynamic-int8")
    attention = qm.module.model.encoder.layer[0].attention
    q, k, v = attention.self.query, attention.self.key, attention.self.value
    # smoothed jointly (one factor vector for the three layers reading the same hidden states), others not
    assert torch.equal(q.smooth, k.smooth) and torch.equal(q.smooth, v.smooth)
    assert not torch.equal(q.smooth, attention.output.dense.smooth)
    keys = set(qm.module.state_dict())
    plain = quantize_model(minilm, "dynamic-int8").module
    shared = compile_module(qm.module, probe=lambda m: minilm.run(m, texts[:2]))
    assert [layer.shared_columns for layer in (q, k, v)] == [(0, 384), (384, 768), (768, 1152)]
    assert attention.output.dense.shared_columns is None and set(qm.module.state_dict()) == keys  # stored form
    unshared = compile_module(plain)
    for c in (shared, unshared):
        warm_up(lambda batch: minilm.run(c, batch), texts[:4])
    from torch.profiler import ProfilerActivity, profile

    for batch in (texts[:1], texts[4:11]):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = minilm.run(shared, batch)
        gemms = sum(e.count for e in prof.key_averages() if e.key == "aten::_int_mm")
        assert gemms == 6 * 4, gemms  # per layer: query/key/value as one, attention output, two FFN (was 6 * 6)
        # the very same integer arithmetic as three GEMMs, and eager is untouched
        assert all(torch.equal(a, b) for a, b in zip(got, minilm.run(unshared, batch)))
        assert all(torch.equal(a, b) for a, b in zip(minilm.run(qm.module, batch), minilm.run(plain, batch)))
    # smoothed layer by layer, the three quantize their input differently: nothing to share
    apart = quantize_model(minilm, "dynamic-int8", {"smooth_jointly": False}).module
    assert share_input_gemms(apart, lambda m: minilm.run(m, texts[:2])) == 0


def test_repeated_pure_computations_are_merged_but_not_random_or_mutated_ones():
    from quantization.internals.compiled import _merge_repeated

    def f(x, y):
        a, b = x.abs() + 1, x.abs() + 1  # merged
        r1, r2 = torch.rand(3), torch.rand(3)  # random: kept apart
        buf1, buf2 = y.clone(), y.clone()  # each mutated below: kept apart
        buf1.add_(1)
        buf2.add_(2)
        return a * b, r1, r2, buf1, buf2

    from torch.fx.experimental.proxy_tensor import make_fx

    x, y = torch.randn(3), torch.zeros(3)
    gm = make_fx(f)(x, y)  # aten operations, as inductor's graphs have
    assert _merge_repeated(gm.graph) == 2  # x.abs(), then the + 1 on it
    gm.recompile()
    prod, r1, r2, buf1, buf2 = gm(x, y)
    assert torch.equal(prod, (x.abs() + 1) ** 2) and not torch.equal(r1, r2)
    assert torch.equal(buf1, torch.ones(3)) and torch.equal(buf2, torch.full((3,), 2.0))


class TwoGraphs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        torch._dynamo.graph_break()
        return self.linear(y.relu())


def test_settled_modules_call_their_own_graph_directly_for_every_shape(minilm, texts):
    # two compiled instances of one class share dynamo's cache (same code object): called directly, each must
    # still run its own graph, the one of the input's shape class (batch of one or not), on the input's values
    first, second = quantize_model(minilm, "dynamic-int8").module, quantize_model(minilm, "dynamic-int8").module
    with torch.no_grad():  # same graph, other outputs (the int8 layers' own buffers; LayerNorms are shared with FP32)
        for layer in second.model.encoder.layer:
            layer.output.dense.weight_scale.mul_(1.5)
    compiled = [compile_module(m) for m in (first, second)]
    for c in compiled:
        warm_up(lambda batch: minilm.run(c, batch), texts[:1])  # one item still compiles both shape classes
    settled = [Settled(c) for c in compiled]
    assert all(is_compiled(s) and original(s) is m for s, m in zip(settled, (first, second)))

    def tokens(batch, length):  # same shape for different texts
        with torch.inference_mode():
            return dict(minilm.tokenizer(batch, padding="max_length", truncation=True, max_length=length,
                                         return_tensors="pt"))

    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for size, length in ((1, 12), (7, 20), (3, 12), (1, 30)):
            # the first call of a shape goes through dynamo and is recorded, the next ones straight to the graph
            for start in (0, 40, 80):
                batch = tokens(texts[start:start + size], length)
                want = [c(**batch) for c in compiled]
                got = [s(**batch) for s in settled]
                assert all(torch.equal(w, g) for w, g in zip(want, got))  # the very same graph ran
                assert fidelity("embed", got[0], got[1])["mean_cosine"] < 0.99  # and each instance its own
    assert all(sum(plan is not None for plan in s._direct.values()) == 4 for s in settled)  # called directly
    assert [s.late_compiles for s in settled] == [0, 0]
    # an input no warmed graph fits (tensors made outside inference mode) compiles late instead of failing
    batch = {k: v.clone() for k, v in minilm.tokenizer(texts[:3], padding=True, return_tensors="pt").items()}
    metrics = Metrics()  # the service counts them per variant after each batch
    on_batch = metrics.batch_observer(("minilm", "embed", "int8"), settled[0])
    with torch.inference_mode():
        got = settled[0](**batch)
        assert settled[0].late_compiles == 1 and torch.equal(got, compiled[0](**batch))
        assert torch.equal(settled[0](**batch), got) and settled[0].late_compiles == 1  # once
    late = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "quantserve_late_compiles_total", {"model": "minilm", "task": "embed", "variant": "int8"})
    on_batch(3, 30, 0.01)
    assert late() == 1
    on_batch(3, 30, 0.01)
    assert late() == 1
    # a signature dynamo runs as more than one graph is never called directly
    plain = TwoGraphs()
    x = torch.randn(3, 4)
    s = Settled(compile_module(plain))
    assert torch.allclose(s(x), plain(x)) and torch.allclose(s(x), plain(x))
    assert list(s._direct.values()) == [None]


def test_the_service_serves_the_compiled_variant_and_says_so(minilm, texts, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    eager = quantize_model(minilm, "dynamic-int8")
    with running_service(path) as (base, _):
        int8 = httpx.get(f"{base}/v1/models/minilm", timeout=30).json()["variants"]
        by_name = {v["name"]: v for v in int8}
        assert by_name["int8"]["runtime"] == "torch+inductor"
        assert by_name["int8"]["compile"]["compiled"] and by_name["int8"]["compile"]["seconds"] > 0
        assert by_name["fp32"]["runtime"] == "torch" and not by_name["fp32"]["compile"]["asked"]
        for batch in (texts[:1], texts[:7]):
            r = httpx.post(f"{base}/v1/embed", json={"inputs": batch, "normalize": False}, timeout=60)
            assert r.status_code == 200 and r.json()["variant"] == "int8"
            got = torch.tensor([d["embedding"] for d in r.json()["results"]])
            # int8 either way, so they differ by about int8's own error, and are as faithful to FP32
            assert fidelity("embed", minilm.run(eager.module, batch), got)["min_cosine"] > 0.995
            fid = fidelity("embed", minilm.run(None, batch), got)
            assert fid["mean_cosine"] >= 0.995 and fid["min_cosine"] >= 0.98, fid


def test_without_a_compiler_the_variant_serves_eager_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    registry = build_catalog(load_settings(path, probe_texts=8), Metrics())
    v = registry.models["minilm"].variants["int8"]
    assert not v.compiled and v.runtime == "torch" and not is_compiled(v.module)
    assert "no-such-c++-compiler" in v.compile_problem and "compile: false" in v.compile_problem
    assert v.describe()["compile"] == {"asked": True, "compiled": False, "seconds": 0.0, "problem": v.compile_problem}
    assert any("event=compile_unavailable" in line for line in registry.progress)
    # what start-up built is out of the cyclic collector's sight (a full collection walked it all, ~0.5 s)
    assert any("event=startup_objects_frozen" in line for line in registry.progress)
    assert gc.get_freeze_count() > 10_000
    collected = {id(o) for o in gc.get_objects()}
    assert id(v.module) not in collected and id(registry.models["minilm"].task_model.module) not in collected
