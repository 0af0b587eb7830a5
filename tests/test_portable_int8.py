"""Portable INT8: the CPU profile, kernels checked against exact integers and chosen by measurement, the
serving gate, and the int8 numerics under AVX2 emulation (in subprocesses: the caps are read once, before
torch is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bench.live import ROOT
from quantization import cpu, kernels, tuning
from quantization.texts import eval_texts
from quantization.pipeline import quantize_model

AVX2 = {**os.environ, "QUANTSERVE_CPU_ISA": "avx2"}


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 600) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter, under ``env``."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env or dict(os.environ),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_cpu_profile_names_the_features_that_decide_kernels_and_emulation_caps_them():
    native = cpu.profile()
    assert native.arch and native.model and native.threads == torch.get_num_threads()
    assert set(native.features) <= set(cpu.X86_FEATURES) | set(cpu.ARM_FEATURES.values())
    assert native.key.startswith(native.isa)
    code = """
        import json
        from quantization import cpu
        applied = cpu.emulate()
        import torch
        p = cpu.profile()
        print(json.dumps({"applied": applied, **p.describe()}))
    """
    capped = run_python(code, AVX2)
    assert capped["emulated"] == "avx2" and capped["isa"] in ("avx2", "baseline")
    assert not {"avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"} & set(capped["features"])
    assert capped["caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                              "ATEN_CPU_CAPABILITY": "avx2"}
    assert capped["torch_capability"].lower() in ("avx2", "default")
    assert capped["key"] != native.key  # a kernel choice made natively is never reused under the cap
    assert not capped["int8_dot"] and not capped["bf16_gemm"]
    with pytest.raises(cpu.CpuProfileError, match="native, avx2"):
        cpu.emulate("sse9")


def test_the_exact_integer_check_catches_a_saturating_kernel():
    """FBGEMM's AVX2 kernels sum uint8 x int8 pairs in int16: full 8-bit activations saturate on the adversarial
    row, 7-bit ones never do. Under the AVX2 cap this holds on every x86 host."""
    code = """
        import json, torch
        from quantization import cpu
        cpu.emulate()
        from quantization import kernels
        from quantization.layers import DynamicInt8Linear
        torch.manual_seed(0)
        lin = torch.nn.Linear(384, 256)
        lin.weight.data = lin.weight.data.abs()  # positive weights: pairs of products add up
        layer = DynamicInt8Linear.from_linear(lin)
        x = torch.rand(64, 384)
        out = {k: kernels.exactness(k, layer, x) for k in ("fbgemm-u8", "fbgemm-u7", "fp32")}
        # a static layer (calibrated range [0, 1]) on its own grid: oneDNN's AVX2 kernel saturates too
        from quantization.affine import compute_qparams
        from quantization.layers import StaticInt8Linear, static_act_scheme
        qp = compute_qparams(torch.tensor(0.0), torch.tensor(1.0), static_act_scheme(False))
        static = StaticInt8Linear.from_linear(lin, qp)
        out.update({"static/" + k: kernels.exactness(k, static, x) for k in kernels.KERNELS})
        print(json.dumps(out))
    """
    errors = run_python(code, AVX2)
    assert errors["fbgemm-u8"] > 1e-3, errors           # saturation: caught
    assert errors["fbgemm-u7"] <= kernels.EXACT_TOLERANCE and errors["fp32"] == 0.0
    assert errors["static/onednn"] > 1e-3 and errors["static/fbgemm-u8"] > 1e-3, errors
    assert errors["static/fbgemm-u7"] <= kernels.EXACT_TOLERANCE and errors["static/fp32"] == 0.0


def test_kernels_are_chosen_by_measurement_checked_and_kept_per_cpu_profile(minilm, tmp_path):
    qm = quantize_model(minilm, "dynamic-int8")
    texts = eval_texts()[:16]
    record = tuning.choose_kernels(qm.module, lambda m: minilm.run(m, texts))
    layers = tuning.int8_layers(qm.module)
    assert set(record["layers"]) == set(layers) and record["candidates"][0] == "onednn"
    assert record["candidates"][-1] == "fp32"
    for name, pick in record["layers"].items():
        layer = layers[name]
        assert (layer.row_kernel, layer.few_kernel, layer.batch_kernel) == (pick["row"], pick["few"], pick["batch"])
        for kernel in pick.values():  # whatever won is exact on this CPU, on this layer's real input
            assert kernel not in record["inexact"]
    for shape in record["shapes"]:  # every candidate was timed at one row, a few rows and the full batch
        assert set(shape["row_us"]) == set(shape["few_us"]) == set(shape["batch_us"]) == set(record["candidates"])
        assert shape["rows"] > 100
    if not cpu.profile().int8_dot:
        assert "fbgemm-u8" not in record["candidates"]
    summary = tuning.summary(record)
    assert summary["kernel"]["batch"] in kernels.KERNELS and summary["from_cache"] is False
    # saved beside the artifact under this profile's key: a restart skips the timing
    tuning.save_choice(tmp_path, record)
    other = quantize_model(minilm, "dynamic-int8")
    again = tuning.load_choice(tmp_path, other.module, compiled=False)
    assert again is not None and again["from_cache"] and again["layers"] == record["layers"]
    assert tuning.load_choice(tmp_path, other.module, compiled=True) is None  # compiled forwards are timed apart
    # another CPU (here: the same one capped at AVX2) has another key, so it measures again
    fields = {k: v for k, v in cpu.profile().__dict__.items()}
    capped = cpu.CpuProfile(**{**fields, "features": ("avx2", "fma"), "emulated": "avx2"})
    assert tuning.load_choice(tmp_path, other.module, compiled=False, prof=capped) is None
    # the chosen kernels keep the variant faithful
    ref, out = minilm.run(None, eval_texts()), minilm.run(qm.module, eval_texts())
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    assert cos.mean() > 0.995 and cos.min() > 0.98


def test_a_layer_runs_its_row_few_rows_and_batch_kernels_by_input_size(minilm):
    layer = next(iter(tuning.int8_layers(quantize_model(minilm, "dynamic-int8").module).values()))
    layer.set_kernels("fp32", "onednn", few="fbgemm-u7")
    d = layer.in_features
    assert [layer.kernel_for(torch.zeros(rows, d)) for rows in (1, 2, kernels.FEW_ROWS, kernels.FEW_ROWS + 1)] == \
        ["fp32", "fbgemm-u7", "fbgemm-u7", "onednn"]
    assert layer.kernel_for(torch.zeros(1, 16, d)) == "fbgemm-u7"  # rows are tokens, whatever the batch shape
    layer.set_kernels("fp32", "onednn")  # few defaults to the batch kernel
    assert layer.kernel_for(torch.zeros(4, d)) == "onednn"


def test_the_gate_names_a_slow_or_unfaithful_variant_in_one_sentence():
    from service import gate
    from service.config import GateConfig

    avx2 = cpu.CpuProfile(arch="x86_64", vendor="AuthenticAMD", model="AMD EPYC 7B13", features=("avx2", "fma"),
                          threads=2, torch_capability="AVX2")
    slow = {"batch_1": {"time_x": 0.9}, "batch_16": {"time_x": 20.4}}
    reason = gate.judge("int8", "fp32", {"mean_cosine": 0.995}, {"mean_cosine": 0.999}, slow, GateConfig(), avx2)
    assert reason.startswith("int8 runs 20.40x the time of fp32 at batch 16 on this CPU")
    assert "no AVX-512 VNNI" in reason and "torch._int_mm has no fast kernel" in reason
    fast = {"batch_1": {"time_x": 0.3}, "batch_16": {"time_x": 0.5}}
    assert gate.judge("int8", "fp32", {"mean_cosine": 0.995}, {"mean_cosine": 0.999}, fast, GateConfig(), avx2) is None
    reason = gate.judge("int8", "fp32", {"identical": 0.9, "chrf": 98.0, "degenerate": 0.0},
                        {"identical": 0.875, "chrf": 97.7, "degenerate": 0.05}, fast, GateConfig(), avx2)
    assert reason == ("int8 is below its fidelity bound on the probe set (identical 0.875 < 0.9, chrf 97.7 < 98, "
                      "degenerate 0.05 > 0)")
    # live: shadow agreement below the bound, once there are enough comparisons
    assert gate.live_problem("int8", "chrf", 0.95, 49, {"chrf": 98.0}, GateConfig()) is None
    assert "chrf 95 < 98 over 50" in gate.live_problem("int8", "chrf", 0.95, 50, {"chrf": 98.0}, GateConfig())


@pytest.mark.slow
def test_a_variant_below_its_bound_is_degraded_and_unpinned_traffic_goes_to_fp32(tmp_path):
    from service.config import load_settings
    from service.metrics import Metrics
    from service.builder import build_catalog

    config = tmp_path / "gate.yaml"
    config.write_text(textwrap.dedent("""
        models:
          - name: minilm
            task: embed
            source: minilm
            fidelity_bound: {mean_cosine: 0.99999999}
            variants:
              - {name: fp32, strategy: fp32}
              - {name: int8, strategy: dynamic-int8}
            routing: {default: int8, split: {int8: 1.0, fp32: 0.0}}
    """))
    metrics = Metrics()
    registry = build_catalog(load_settings(config, probe_texts=16), metrics)
    served = registry.models["minilm"]
    why = served.router.degraded.get("int8")
    assert why and "below its fidelity bound" in why and "mean_cosine" in why
    assert served.router.default == "fp32" and all(served.router.choose() == "fp32" for _ in range(20))
    assert served.router.choose("int8") == "int8"  # pinned requests still reach it
    described = registry.describe(served)["variants"][1]
    assert described["state"] == "degraded" and described["kernels"]["kernel"]["batch"] in kernels.KERNELS
    assert set(described["speed_vs_baseline"]) == {"batch_1", "batch_16"}
    text = metrics.render().decode()
    assert 'quantserve_variant_degraded{model="minilm",task="embed",variant="int8"} 1.0' in text
    assert 'quantserve_variant_degraded{model="minilm",task="embed",variant="fp32"}' not in text or \
        'quantserve_variant_degraded{model="minilm",task="embed",variant="fp32"} 0.0' in text
    assert "quantserve_cpu_info{" in text and f'isa="{cpu.profile().isa}"' in text

    # gate.action: stop refuses to start, with the sentence
    from service.catalog import StartupError

    with pytest.raises(StartupError, match="below its fidelity bound.*set gate.action to fallback or serve"):
        build_catalog(load_settings(config, probe_texts=16, gate={"action": "stop"}), Metrics())


@pytest.mark.slow
def test_every_int8_strategy_meets_its_bound_or_is_refused_under_avx2_emulation():
    """The int8 numerics of every task under FBGEMM's, oneDNN's and ATen's AVX2 kernels, with the kernels the
    service would choose: each either keeps its fidelity bound or is refused, with the bound it misses named."""
    code = """
        import json, torch
        from quantization import cpu
        cpu.emulate()
        torch.set_num_threads(2)
        from quantization import tuning
        from quantization.fidelity import bound_problems, fidelity
        from quantization.models import load_task_model
        from quantization.texts import eval_texts, probe_texts
        from quantization.pipeline import quantize_model
        from quantization.selection import auto_select
        from quantization.tasks import get_task
        out = {"profile": cpu.profile().describe()}
        texts = eval_texts()
        for source, task in (("minilm", "embed"), ("intent", "classify")):
            tm = load_task_model(source, task)
            ref = tm.run(None, texts)
            for strategy in ("dynamic-int8", "static-int8", "weight-only-int8"):
                qm = quantize_model(tm, strategy)
                record = tuning.choose_kernels(qm.module, lambda m: tm.run(m, texts[:16]))
                fid = fidelity(task, ref, tm.run(qm.module, texts))
                out[f"{source}/{strategy}"] = {"fidelity": fid, "kernels": tuning.summary(record)["kernel"]
                                               if record else None,
                                               "problems": bound_problems(get_task(task).default_bound, fid)}
                if strategy == "dynamic-int8":  # the kernel a real AVX2 CPU picks (there oneDNN is 40x slower)
                    for layer in tuning.int8_layers(qm.module).values():
                        layer.set_kernels("fbgemm-u7", "fbgemm-u7")
                    fid = fidelity(task, ref, tm.run(qm.module, texts))
                    out[f"{source}/{strategy}/fbgemm-u7"] = {
                        "fidelity": fid, "kernels": None, "problems": bound_problems(get_task(task).default_bound, fid)}
        tm = load_task_model("bergamot-pt-en", "translate")
        src = probe_texts("pt", 32)
        ref = tm.run(None, src)
        winner, record = auto_select(
            tm, get_task("translate").auto_candidates, bound=get_task("translate").default_bound, run=tm.run, items=src,
            reference=ref, agreement=lambda r, o: fidelity("translate", r, o), batch=8, rounds=1,
            quantize=lambda s, p: quantize_model(tm, s, p),
            tune=lambda m: tuning.choose_kernels(m, lambda mm: tm.run(mm, src[:8])))
        out["pt-en/auto"] = {"why": record["why"], "candidates": record["candidates"],
                             "kernels": tuning.summary({"layers": {n: {"row": l.row_kernel, "few": l.few_kernel,
                                                                          "batch": l.batch_kernel}
                                        for n, l in tuning.int8_layers(winner.module).items()},
                                        "candidates": [], "shapes": [], "compiled": False, "profile_key": "",
                                        "seconds": 0})["kernel"] if tuning.int8_layers(winner.module) else None}
        print(json.dumps(out))
    """
    out = run_python(code, AVX2, timeout=900)
    assert out["profile"]["emulated"] == "avx2" and not out["profile"]["int8_dot"]
    for name, row in out.items():
        if name == "profile":
            continue
        if row["kernels"]:  # a kernel that saturates under AVX2 is never chosen
            assert "fbgemm-u8" not in row["kernels"].values(), (name, row)
        if name == "pt-en/auto":  # within the bound, or refused naming the bound it misses
            winner = next(c for c in row["candidates"] if c["chosen"])
            assert winner["problems"] == [] or "no candidate meets the fidelity bound" in row["why"], row
            assert all(" < " in p or " > " in p for c in row["candidates"] for p in c["problems"])
        elif name in ("minilm/dynamic-int8", "intent/dynamic-int8", "minilm/weight-only-int8",
                      "minilm/dynamic-int8/fbgemm-u7"):
            assert row["problems"] == [], (name, row)  # the defaults keep their bounds on every x86 CPU
        else:
            assert all(" < " in p or " > " in p for p in row["problems"]), (name, row)
    print(json.dumps({k: v.get("fidelity") or v.get("why") for k, v in out.items() if k != "profile"}, indent=1))


def test_half_precision_without_native_kernels_stores_half_and_computes_in_fp32():
    """Under the AVX2 cap the CPU profile has no bf16 or fp16 matrix multiply: the variants keep half-precision
    weights and multiply in FP32 (never a 75x slower generic half-precision GEMM), and say so."""
    code = """
        import json, torch
        from quantization import cpu
        cpu.emulate()
        from quantization.models import load_task_model
        from quantization.texts import eval_texts
        from quantization.pipeline import quantize_model
        from quantization.fidelity import fidelity
        from quantization.strategies.floating import HalfStoredLinear
        tm = load_task_model("minilm", "embed")
        texts = eval_texts()[:32]
        ref = tm.run(None, texts)
        out = {}
        for name in ("bf16", "fp16"):
            qm = quantize_model(tm, name)
            linears = [m for m in qm.module.modules() if isinstance(m, torch.nn.Linear)]
            stored = [m for m in qm.module.modules() if isinstance(m, HalfStoredLinear)]
            out[name] = {"notes": qm.notes, "plain_linears": len(linears), "stored": len(stored),
                         "dtypes": sorted({str(m.weight.dtype) for m in stored}),
                         "float_params": sorted({str(p.dtype) for p in qm.module.parameters()}),
                         "fidelity": fidelity("embed", ref, tm.run(qm.module, texts))}
        native = quantize_model(tm, "bf16", {"compute": "native"})
        out["native"] = sorted({str(p.dtype) for p in native.module.parameters()})
        print(json.dumps(out))
    """
    out = run_python(code, AVX2)
    for name, dtype in (("bf16", "torch.bfloat16"), ("fp16", "torch.float16")):
        row = out[name]
        assert row["notes"]["compute"] == "fp32" and "no native" in row["notes"]["scope"], row
        assert row["plain_linears"] == 0 and row["stored"] == 37  # 36 encoder layers and the pooler and row["dtypes"] == [dtype]
        assert row["float_params"] == ["torch.float32"]  # embeddings and norms stay FP32
        assert row["fidelity"]["mean_cosine"] > 0.999
    assert out["native"] == ["torch.bfloat16"]  # compute: native casts regardless


@pytest.mark.slow
def test_strategy_auto_picks_the_fastest_faithful_candidate_and_says_why(tmp_path):
    from service.config import ConfigError, load_settings
    from service.metrics import Metrics
    from service.builder import build_catalog

    config = tmp_path / "auto.yaml"
    config.write_text(textwrap.dedent("""
        models:
          - name: minilm
            task: embed
            source: minilm
            variants:
              - {name: fp32, strategy: fp32}
              - name: int8
                strategy: auto
                params: {candidates: [{strategy: dynamic-int8}, {strategy: weight-only-int8}]}
          - name: strict
            task: embed
            source: minilm
            fidelity_bound: {min_cosine: 0.99999999}
            variants:
              - {name: fp32, strategy: fp32}
              - name: int8
                strategy: auto
                params: {candidates: [{strategy: dynamic-int8, params: {act_granularity: tensor}},
                                      {strategy: weight-only-int8}]}
    """))
    registry = build_catalog(load_settings(config, probe_texts=16, artifacts_dir=tmp_path / "artifacts"), Metrics())
    v = registry.models["minilm"].variants["int8"]
    record = v.auto
    assert [c["label"] for c in record["candidates"]] == ["dynamic-int8", "weight-only-int8"]
    assert sum(c["chosen"] for c in record["candidates"]) == 1
    winner = next(c for c in record["candidates"] if c["chosen"])
    assert v.strategy == winner["strategy"] and record["why"].startswith(winner["label"] + ": ")
    for c in record["candidates"]:  # both within the default bound: both measured for speed and fidelity
        assert c["problems"] == [] and set(c["speed"]) == {"batch_1", "batch_16"}
    if not winner["slower"]:
        others = [c for c in record["candidates"] if not c["chosen"] and not c["slower"]]
        assert all(winner["speed"]["batch_16"]["time_x"] <= c["speed"]["batch_16"]["time_x"] for c in others)
    described = registry.describe(registry.models["minilm"])["variants"][1]
    assert described["configured_strategy"] == "auto" and described["strategy"] == winner["strategy"]
    # no candidate meets an impossible bound: the most faithful is kept, and the gate degrades it
    strict = registry.models["strict"].variants["int8"]
    assert "no candidate meets the fidelity bound" in strict.auto["why"]
    assert strict.strategy == "weight-only-int8"  # per-tensor activations are far less faithful
    assert registry.models["strict"].router.degraded.get("int8") and registry.models["strict"].router.default == "fp32"
    # a restart on the same CPU reuses the selection (and the winner's artifact)
    again = build_catalog(load_settings(config, probe_texts=16, artifacts_dir=tmp_path / "artifacts"), Metrics())
    assert any("event=auto_reused model=minilm" in line for line in again.progress)
    assert again.models["minilm"].variants["int8"].strategy == v.strategy
    assert again.models["minilm"].variants["int8"].loaded_from_artifact
    # a bad candidate list stops start-up with one sentence
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("{strategy: weight-only-int8}]}", "{strategy: int3}]}", 1))
    with pytest.raises(ConfigError, match="params.candidates.1: unknown strategy 'int3'"):
        load_settings(bad)


def test_fbgemm_kernels_run_inside_compiled_graphs_as_in_eager():
    """A CPU without VNNI serves compiled variants through FBGEMM: its custom op must trace, compile and
    compute what the eager layer computes, with no graph break (one graph per shape class)."""
    from quantization.internals.compiled import compile_module, compiler_problem
    from quantization.layers import DynamicInt8Linear

    if compiler_problem():
        pytest.fail(compiler_problem())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    net[0] = DynamicInt8Linear.from_linear(net[0])
    net[2] = DynamicInt8Linear.from_linear(net[2])
    for kernel in ("fbgemm-u7", "fbgemm-u8"):
        for layer in (net[0], net[2]):
            layer.set_kernels(kernel, kernel)
        compiled = compile_module(net)
        with torch.inference_mode():
            for rows in (1, 5, 9):
                x = torch.randn(rows, 64)
                torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)
        assert compiled._quantserve_graphs.compiles == 2, kernel  # rows == 1, and any other count
        torch.compiler.reset()
