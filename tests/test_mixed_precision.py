"""Mixed precision: layers kept by pattern, and the automatic mode that keeps sensitive layers."""

from __future__ import annotations

import pytest

from quantization.errors import InvalidConfigError
from quantization.fidelity import fidelity
from quantization.layers import QuantizedLinear
from quantization.pipeline import quantize_model


def test_keep_patterns_leave_matching_layers_in_fp32(minilm, minilm_ref, texts):
    qm = quantize_model(minilm, "static-int8", {"keep": ["*.output.dense"]})
    kept = [n for n in qm.kept]
    assert len(kept) == 12  # 6 attention output + 6 FFN output projections
    for name in kept:
        assert not isinstance(qm.module.get_submodule(name), QuantizedLinear)
        assert name not in qm.layers
    full = quantize_model(minilm, "static-int8")
    f_kept = fidelity("embed", minilm_ref, minilm.run(qm.module, texts))
    f_full = fidelity("embed", minilm_ref, minilm.run(full.module, texts))
    assert f_kept["min_cosine"] > f_full["min_cosine"]


def test_keep_pattern_that_matches_nothing_names_the_layers(minilm):
    with pytest.raises(InvalidConfigError, match="match no quantizable layer.*model.encoder.layer.0"):
        quantize_model(minilm, "dynamic-int8", {"keep": ["encoder.layers.*"]})


def test_keep_works_for_half_precision_too(minilm, minilm_ref, texts):
    qm = quantize_model(minilm, "fp16", {"keep": ["model.encoder.layer.5.*"]})
    assert len(qm.kept) == 6
    out = minilm.run(qm.module, texts[:32])
    assert fidelity("embed", minilm_ref[:32], out)["mean_cosine"] > 0.9999


@pytest.mark.slow
def test_automatic_mode_keeps_the_most_sensitive_layers_until_the_target(intent, intent_ref, texts, calib):
    """Stock-style per-tensor int8 on the classifier misses 0.99 agreement; auto mode fixes it by
    keeping a few layers, judged on calibration texts, and the held-out agreement follows."""
    params = {"weight_granularity": "tensor", "act_granularity": "tensor", "smooth_alpha": None,
              "auto_target": 0.99, "auto_max_kept": 8}
    qm = quantize_model(intent, "dynamic-int8", params, calibration=calib[:64])
    auto = qm.notes["auto"]
    assert auto["score_all_quantized"] < 0.99
    assert 1 <= len(qm.kept) <= 8
    assert [step["kept"] for step in auto["trajectory"][1:]] == [s["unit"] for s in auto["sensitivity"][:len(qm.kept)]]
    assert auto["reached"] == (auto["final_score"] >= 0.99)
    base = quantize_model(intent, "dynamic-int8", {k: v for k, v in params.items() if not k.startswith("auto")})
    f_auto = fidelity("classify", intent_ref, intent.run(qm.module, texts))
    f_base = fidelity("classify", intent_ref, intent.run(base.module, texts))
    assert f_auto["mean_abs_dprob"] < f_base["mean_abs_dprob"]
