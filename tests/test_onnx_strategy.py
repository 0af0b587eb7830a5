"""The onnx-int8 strategy on the real models: fidelity, stored size, keep patterns, round trip.

Each model is exported once per module (the strategy's prepare()); tests build variants from it.
Bounds sit a little under what was measured on CPU with onnxruntime 1.32 (see each test).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import onnx
import pytest
import torch

import quantization
from quantization.errors import CalibrationError, InvalidConfigError
from quantization.fidelity import fidelity
from quantization.models import load_task_model
from quantization.strategies import get_strategy, parse_params, quantize
from quantization.strategies.base import match_patterns
from quantization.strategies.onnx import OnnxInt8, OnnxParams, OnnxRuntimeModule

DATA = Path(quantization.__file__).parent / "data"
N_EVAL = 120


def _lines(name: str) -> list[str]:
    return [t for t in (DATA / name).read_text(encoding="utf-8").splitlines() if t.strip()]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _lines("eval_sentences.txt")[:N_EVAL]


@pytest.fixture(scope="module")
def minilm():
    return load_task_model("minilm")


@pytest.fixture(scope="module")
def minilm_ref(minilm, texts) -> torch.Tensor:
    return minilm.run(None, texts)


@pytest.fixture(scope="module")
def minilm_onnx(minilm) -> OnnxInt8:
    """MiniLM exported and fused once; tests build variants from it."""
    strategy = OnnxInt8(OnnxParams())
    strategy.prepare(minilm.module, None)
    return strategy


@pytest.fixture(scope="module")
def minilm_dynamic(minilm, minilm_onnx):
    variant, layers = minilm_onnx.build(minilm.module, frozenset())
    return variant, layers, minilm_onnx.notes()


def _graph(variant: OnnxRuntimeModule) -> onnx.ModelProto:
    return onnx.load_from_string(variant.model_bytes)


# -- parameters ----------------------------------------------------------------------------------

def test_registered_with_strict_params():
    cls = get_strategy("onnx-int8")
    assert cls is OnnxInt8 and cls.runtime == "onnxruntime"
    p = parse_params(cls, None)
    assert (p.mode, p.per_channel, p.optimize, p.opset) == ("dynamic", True, True, 17)
    with pytest.raises(InvalidConfigError, match="unknown parameter"):
        parse_params(cls, {"reduce_range": True})
    with pytest.raises(InvalidConfigError):
        parse_params(cls, {"mode": "static", "activation_type": "QInt8", "weight_type": "QUInt8"})
    with pytest.raises(InvalidConfigError):
        parse_params(cls, {"calibrate_method": "mse"})


@pytest.mark.parametrize("calibration", [None, []])
def test_static_without_calibration_raises(minilm, calibration):
    with pytest.raises(CalibrationError):
        quantize(minilm.module, "onnx-int8", {"mode": "static"}, calibration=calibration)


# -- MiniLM, dynamic -----------------------------------------------------------------------------

def test_minilm_dynamic_fidelity(minilm, minilm_ref, minilm_dynamic, texts):
    variant, _, _ = minilm_dynamic
    fid = fidelity("embed", minilm_ref, minilm.run(variant, texts))
    # measured: mean 0.9920, min 0.9640
    assert fid["mean_cosine"] >= 0.99
    assert fid["min_cosine"] >= 0.955


def test_minilm_fusion_and_records(minilm, minilm_dynamic):
    variant, layers, notes = minilm_dynamic
    assert notes["optimized"] and notes["attention"] == "eager" and notes["shape_inference"]
    assert notes["fused_nodes"] == {"Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6,
                                    "EmbedLayerNormalization": 1}
    assert notes["unmapped_units"] == ["model.pooler.dense"]  # SentenceEncoder never runs the pooler
    assert notes["export_seconds"] > 0 and notes["quantize_seconds"] > 0 and notes["onnxruntime"]
    assert len(layers) == 36 and notes["quantized_nodes"] == 24  # 6 QAttention + 18 MatMulInteger
    for name, rec in layers.items():
        out = minilm.module.get_submodule(name).out_features
        fused = rec["op_type"] == "Attention"
        assert rec["quantized_op"] == ("QAttention" if fused else "MatMulInteger")
        assert rec["per_channel"] and rec["weight_scales"] == out * (3 if fused else 1)
        assert rec["weight_dtype"] == "INT8"
    q = layers["model.encoder.layer.2.attention.self.query"]
    assert q["node"] == "Attention_2" and len(q["fused_with"]) == 2
    assert layers["model.encoder.layer.2.output.dense"]["node"] == "/model/encoder/layer.2/output/dense/MatMul"


def test_minilm_dynamic_size(minilm, minilm_dynamic):
    variant, layers, notes = minilm_dynamic
    assert notes["int8_onnx_bytes"] == len(variant.model_bytes) == variant.nbytes
    # measured 58.57 MB of 90.28 MB (0.649): the 46.9 MB FP32 word embeddings stay as they are
    assert len(variant.model_bytes) <= 0.66 * notes["fp32_onnx_bytes"]
    embeddings = minilm.module.model.embeddings.word_embeddings.weight
    assert len(variant.model_bytes) > embeddings.numel() * 4
    fp32_linear = sum(minilm.module.get_submodule(n).weight.numel() * 4 for n in layers)
    assert sum(r["weight_bytes"] for r in layers.values()) <= 0.26 * fp32_linear  # int8 + scales


def test_from_bytes_reproduces_outputs(minilm, minilm_dynamic, texts, tmp_path):
    variant, _, _ = minilm_dynamic
    assert variant.eval() is variant
    batch = minilm.encode(texts[:24])
    expected = variant(**batch)
    assert expected.dtype == torch.float32 and expected.shape == (24, 384)
    path = tmp_path / "minilm-int8.onnx"
    variant.save(path)
    assert path.read_bytes() == variant.model_bytes
    for loaded in (OnnxRuntimeModule.from_bytes(path.read_bytes()), OnnxRuntimeModule.from_file(path),
                   pickle.loads(pickle.dumps(variant))):
        assert torch.equal(loaded(**batch), expected)
    no_types = {k: v for k, v in batch.items() if k != "token_type_ids"}
    assert torch.equal(variant(**no_types), expected)  # zeros, as the HF model assumes


def test_keep_excludes_nodes(minilm, minilm_onnx, minilm_ref, texts):
    units = minilm_onnx.units(minilm.module)
    kept = frozenset(match_patterns(units, ["model.encoder.layer.3.output.dense",
                                            "model.encoder.layer.1.attention.self.query"]))
    variant, layers = minilm_onnx.build(minilm.module, kept)
    notes = minilm_onnx.notes()
    ops = {n.name: n.op_type for n in _graph(variant).graph.node}
    # the plain MatMul stays FP32
    assert "model.encoder.layer.3.output.dense" not in layers
    assert ops["/model/encoder/layer.3/output/dense/MatMul"] == "MatMul"
    assert "/model/encoder/layer.3/output/dense/MatMul_quant" not in ops
    # keeping query keeps the fused Attention node, and so key and value, in FP32
    assert ops["Attention_1"] == "Attention" and "Attention_1_quant" not in ops
    assert notes["kept_with_fused"] == ["model.encoder.layer.1.attention.self.key",
                                        "model.encoder.layer.1.attention.self.value"]
    assert not any(".layer.1.attention.self." in n for n in layers)
    assert len(layers) == 36 - 4 and notes["quantized_nodes"] == 22
    assert ops["Attention_2_quant"] == "QAttention"
    fid = fidelity("embed", minilm_ref, minilm.run(variant, texts))
    assert fid["mean_cosine"] >= 0.99


def test_optimizer_failure_falls_back_to_plain_export(minilm, minilm_ref, texts, monkeypatch):
    import quantization.strategies.onnx as onnx_strategy

    def broken(*_args, **_kwargs):
        raise RuntimeError("no fusion today")

    monkeypatch.setattr(onnx_strategy, "_optimize", broken)
    qm = quantize(minilm.module, "onnx-int8", {"keep": ["model.encoder.layer.0.attention.self.key"]})
    assert not qm.notes["optimized"] and "no fusion today" in qm.notes["optimize_error"]
    assert qm.notes["fused_nodes"]["Attention"] == 0
    # unfused, query/key/value are separate MatMuls: keeping key keeps only key
    assert len(qm.layers) == 35 and qm.notes["kept_with_fused"] == []
    assert qm.layers["model.encoder.layer.0.attention.self.query"]["node"] == \
        "/model/encoder/layer.0/attention/self/query/MatMul"
    assert fidelity("embed", minilm_ref, minilm.run(qm.module, texts))["mean_cosine"] >= 0.99  # measured 0.992


# -- MiniLM, static ------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_static(minilm, minilm_ref, texts):
    calibration = minilm.calibration_batches(_lines("calibration_sentences.txt"))
    qm = quantize(minilm.module, "onnx-int8", {"mode": "static"}, calibration=calibration)
    assert qm.runtime == "onnxruntime" and isinstance(qm.module, OnnxRuntimeModule)
    assert qm.notes["fused_nodes"]["Attention"] == 0  # static quantizers have no Attention op
    assert len(qm.layers) == 36 and all(r["per_channel"] for r in qm.layers.values())
    graph = _graph(qm.module).graph
    # activations really are quantized (a graph without tensor types silently skips them)
    quantized_inputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert len(quantized_inputs) >= 24
    fid = fidelity("embed", minilm_ref, minilm.run(qm.module, texts))
    # measured: mean 0.9242, min 0.7540 (one activation scale per tensor; MiniLM's outliers)
    assert fid["mean_cosine"] >= 0.91
    assert fid["min_cosine"] >= 0.70


# -- intent classifier, dynamic ------------------------------------------------------------------

@pytest.mark.slow
def test_intent_dynamic_top1(texts):
    tm = load_task_model("intent")
    ref = tm.run(None, texts)
    strategy = OnnxInt8(OnnxParams())
    strategy.prepare(tm.module, None)
    variant, layers = strategy.build(tm.module, frozenset())
    assert layers["head"]["quantized_op"] == "MatMulInteger" and layers["head"]["weight_scales"] == 157
    # measured 0.917-0.925 at batch size 32 (0.975 one sentence at a time): ORT scales each
    # activation tensor as a whole, so the batch's outlier tokens coarsen every sentence's step
    assert fidelity("classify", ref, tm.run(variant, texts))["top1_agreement"] >= 0.90
    # keeping what automatic mixed precision (target 0.98) chose on these texts: measured 0.983
    kept = frozenset(match_patterns(strategy.units(tm.module), [
        "*.layer.0.attention.self.*", "*.layer.1.intermediate.dense", "*.layer.1.output.dense"]))
    variant, layers = strategy.build(tm.module, kept)
    assert len(layers) == 38 - 5 - 1  # 36 encoder Linears + pooler + head, less 5 kept and the unused pooler
    assert fidelity("classify", ref, tm.run(variant, texts))["top1_agreement"] >= 0.975
