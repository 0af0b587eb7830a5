"""Quantization-aware training: fake quantization is the library's affine math, its gradient is the
straight-through estimator, and the converted int8 model predicts what the fake-quantized one did."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantization.affine import QScheme, choose_qparams, compute_qparams, dequantize, quantize
from quantization.artifacts import load_artifact, save_artifact
from quantization.datasets import movie_reviews
from quantization.finetune import TrainConfig, new_sentiment_model, predict, train_classifier
from quantization.layers import StaticInt8Linear, static_act_scheme, weight_scheme
from quantization.texts import eval_texts
from quantization.pipeline import quantize_model
from quantization.qat import FakeQuantLinear, convert_qat, fake_quantize_ste, prepare_qat_from_static


@pytest.mark.parametrize("scheme", [static_act_scheme(), weight_scheme("channel"), QScheme(bits=4, symmetric=False)])
def test_fake_quant_forward_equals_quantize_then_dequantize(scheme):
    x = torch.randn(48, 64) * 3
    qp = choose_qparams(x[:8], scheme) if scheme.granularity == "tensor" else choose_qparams(x, scheme)
    assert torch.equal(fake_quantize_ste(x, qp), dequantize(quantize(x, qp), qp))


def test_fake_quant_linear_computes_with_dequantized_int8_weights_and_activations():
    torch.manual_seed(0)
    fq = FakeQuantLinear.from_linear(nn.Linear(32, 16))
    x = torch.randn(4, 10, 32)
    fq.train()
    fq(x)  # the observer sees the batch
    fq.eval()
    a, w = fq.act_qparams(), choose_qparams(fq.weight.detach(), weight_scheme("channel"))
    expected = nn.functional.linear(dequantize(quantize(x, a), a), dequantize(quantize(fq.weight.detach(), w), w),
                                    fq.bias)
    assert torch.allclose(fq(x), expected, atol=1e-6)


def test_straight_through_gradient_passes_inside_the_range_and_is_zero_outside():
    qp = compute_qparams(-1.0, 1.0, static_act_scheme())
    x = torch.tensor([-3.0, -1.5, -0.5, 0.0, 0.3, 0.99, 1.5, 40.0], requires_grad=True)
    (fake_quantize_ste(x, qp) * torch.arange(1.0, 9.0)).sum().backward()
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, inside * torch.arange(1.0, 9.0))


def test_weights_get_their_full_gradient_because_their_range_is_their_min_max():
    torch.manual_seed(0)
    fq = FakeQuantLinear.from_linear(nn.Linear(8, 4))
    ref = nn.Linear(8, 4)
    x = torch.randn(16, 8)
    fq.train()
    fq(x).sum().backward()
    # d/dW of sum(x_hat W_hat^T) through the straight-through estimator is the plain linear gradient at x_hat
    a = fq.act_qparams()
    ref.weight = nn.Parameter(fq.weight.detach().clone())
    nn.functional.linear(dequantize(quantize(x, a), a), ref.weight).sum().backward()
    assert torch.allclose(fq.weight.grad, ref.weight.grad, atol=1e-5)


@pytest.fixture(scope="module")
def short_qat():
    """MiniLM + head, fake-quantized from static int8 (as `finetune --qat` does) and trained for a few steps on a
    small slice of the training split."""
    torch.manual_seed(0)
    tm = new_sentiment_model()
    qat = prepare_qat_from_static(tm.module, tm.calibration_batches([e.text for e in movie_reviews("train")[:128]]))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=2e-5, head_lr=1e-3, max_train=96, evals_per_epoch=1)
    best, result = train_classifier(tm, qat, movie_reviews("train"), movie_reviews("dev")[:48], cfg)
    return tm, best, result


def test_a_converted_qat_model_predicts_like_its_fake_quantized_form_on_real_sentences(short_qat):
    tm, qat, result = short_qat
    assert result.steps == 6
    int8 = convert_qat(qat)
    layers = [m for m in int8.modules() if isinstance(m, StaticInt8Linear)]
    assert len(layers) == len([m for m in tm.module.modules() if type(m) is nn.Linear]) > 30
    texts = [e.text for e in movie_reviews("test")[:200]] + eval_texts()[:100]
    agree = (predict(tm, qat, texts) == predict(tm, int8, texts)).float().mean().item()
    assert agree >= 0.99
    # the int8 model is not trivially the FP32 one: its logits differ, a little
    assert not torch.equal(tm.run(int8, texts[:8]), tm.run(tm.module, texts[:8]))


def test_the_qat_strategy_distils_and_its_artifact_loads_without_touching_the_fp32_model(intent, tmp_path, calib):
    before = {k: v.clone() for k, v in intent.module.state_dict().items()}
    qm = quantize_model(intent, "qat-int8", {"steps": 2, "lr": 1e-4}, calibration=calib[:32])
    assert qm.notes["distillation_steps"] == 2 and qm.runtime == "torch"
    assert all(isinstance(qm.module.get_submodule(n), StaticInt8Linear) for n in qm.layers)
    # training moved the layer norms too; the FP32 model is unchanged
    ln = "encoder.model.encoder.layer.0.attention.output.LayerNorm.weight"
    assert not torch.equal(qm.module.state_dict()[ln], before[ln])
    save_artifact(intent, qm, tmp_path / "qat")
    loaded = load_artifact(tmp_path / "qat", intent)
    texts = eval_texts()[:32]
    assert torch.allclose(intent.run(loaded.module, texts), intent.run(qm.module, texts), atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in intent.module.state_dict().items())


def test_qat_refuses_bad_parameters_and_a_missing_calibration_set():
    from quantization.errors import CalibrationError, InvalidConfigError
    from quantization.strategies import quantize

    with pytest.raises(InvalidConfigError, match="steps"):
        quantize(nn.Linear(8, 8), "qat-int8", {"steps": -1})
    with pytest.raises(CalibrationError, match="needs sample texts"):
        quantize(nn.Linear(8, 8), "qat-int8")


def test_qat_from_static_starts_as_exactly_the_static_int8_model(intent, calib):
    """Before any training, converting a QAT model prepared from static-int8 gives static-int8's model."""
    texts = calib[:32]
    qat = prepare_qat_from_static(intent.module, intent.calibration_batches(texts))
    static = quantize_model(intent, "static-int8", calibration=texts)
    probe = eval_texts()[:32]
    converted = intent.run(convert_qat(qat), probe)
    assert torch.allclose(converted, intent.run(static.module, probe), atol=1e-5)
    # and the fake-quantized form predicts what both int8 models predict
    assert torch.equal(intent.run(qat.eval(), probe).argmax(-1), converted.argmax(-1))


def test_distilling_keeps_the_copy_that_agrees_most_with_the_teacher_on_dev_and_trains_without_dropout():
    torch.manual_seed(0)
    tm = new_sentiment_model()
    student = copy.deepcopy(tm.module)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=5e-4, head_lr=1e-2, max_train=48, evals_per_epoch=3,
                      label_weight=1.0, dropout=False)
    dev = movie_reviews("dev")[:48]
    best, result = train_classifier(tm, student, movie_reviews("train"), dev, cfg, teacher=tm.module.eval())
    assert result.selected_by == "dev agreement with the teacher"
    agreements = [row["dev_agreement"] for row in result.history]
    assert len(agreements) == 3 and min(agreements) < 1.0
    assert result.best_dev_agreement == max(agreements)
    kept = next(row for row in result.history if row["dev_agreement"] == max(agreements))
    assert (result.best_step, result.best_dev_accuracy) == (kept["step"], kept["dev_accuracy"])
    texts = [e.text for e in dev]
    assert (predict(tm, best, texts) == predict(tm, tm.module, texts)).float().mean().item() == pytest.approx(
        max(agreements), abs=1e-4)
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, nn.Dropout))
