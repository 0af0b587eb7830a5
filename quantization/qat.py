"""Quantization-aware training: simulate int8 while training, then convert to real int8 layers.

:class:`FakeQuantLinear` is an ``nn.Linear`` whose forward sees its input and its weight as the
int8 model will: ``fake_quantize`` (the library's own quantize-then-dequantize) with the same
schemes as :class:`~quantization.layers.StaticInt8Linear` (weights symmetric int8 per output
channel, min-max; activations asymmetric int8 per tensor, range from a moving-average min-max
observer that is updated in training mode and frozen in eval mode). Rounding has no useful
gradient, so the backward pass is the straight-through estimator: the gradient passes unchanged
where the value lies inside the representable range and is zero where it was clamped.

:func:`convert_qat` turns every fake-quantized layer into a ``StaticInt8Linear`` with exactly
the weight and activation parameters the training saw, so the int8 model computes what the
fake-quantized one did (up to float summation order): same runtime as ``static-int8``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .affine import QParams, QScheme, choose_qparams, fake_quantize, grouped_view, ungrouped
from .layers import StaticInt8Linear, static_act_scheme, weight_scheme
from .observers import MovingAverageMinMaxObserver
from .strategies.base import set_submodule, share_copy


class _StraightThrough(torch.autograd.Function):
    """Forward: fake_quantize(x). Backward: the gradient inside the range, zero where x was clamped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme):
        qp = QParams(scale=scale, zero_point=zero_point, scheme=scheme, shape=x.shape)
        lo = (scheme.qmin - zero_point).float() * scale
        hi = (scheme.qmax - zero_point).float() * scale
        v = grouped_view(x.detach().float(), scheme)
        ctx.save_for_backward(ungrouped((v >= lo) & (v <= hi), x.shape, scheme))
        return fake_quantize(x, qp).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_ste(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``fake_quantize(x, qp)`` with the straight-through gradient."""
    return _StraightThrough.apply(x, qp.scale, qp.zero_point, qp.scheme)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` trained under simulated int8 weights and activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_averaging: float = 0.01) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight_scheme = weight_scheme("channel")
        self.act_observer = MovingAverageMinMaxObserver(static_act_scheme(), averaging_constant=act_averaging)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_averaging: float = 0.01) -> "FakeQuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, act_averaging)
        layer.weight = nn.Parameter(linear.weight.detach().clone())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    def weight_qparams(self) -> QParams:
        return choose_qparams(self.weight.detach(), self.weight_scheme)

    def act_qparams(self) -> QParams:
        return self.act_observer.qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.act_observer.count == 0:
            self.act_observer.observe(x)
        x_q = fake_quantize_ste(x, self.act_qparams())
        w_q = fake_quantize_ste(self.weight, self.weight_qparams())
        return nn.functional.linear(x_q, w_q, self.bias)

    def to_int8(self) -> StaticInt8Linear:
        return StaticInt8Linear.from_linear(self, self.act_qparams(), weight_granularity="channel")

    def to_float(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        layer.weight, layer.bias = self.weight, self.bias
        return layer


def quantizable_units(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if type(m) is nn.Linear]


def prepare_qat(module: nn.Module, units: list[str] | None = None, act_averaging: float = 0.01) -> nn.Module:
    """A trainable copy of ``module`` (left untouched) with every unit fake-quantized."""
    qat = copy.deepcopy(module)
    for name in quantizable_units(module) if units is None else units:
        set_submodule(qat, name, FakeQuantLinear.from_linear(qat.get_submodule(name), act_averaging))
    return qat


def fake_quant_layers(module: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, FakeQuantLinear)}


def convert_qat(qat: nn.Module, kept: frozenset[str] = frozenset()) -> nn.Module:
    """The int8 model: each fake-quantized layer becomes a ``StaticInt8Linear`` (kept ones plain FP32)."""
    out = share_copy(qat)
    for name, layer in fake_quant_layers(qat).items():
        set_submodule(out, name, layer.to_float() if name in kept else layer.to_int8())
    return out.eval()


def strip_fake_quant(qat: nn.Module) -> nn.Module:
    """The QAT-trained model in plain FP32 (what the weights are before rounding)."""
    out = share_copy(qat)
    for name, layer in fake_quant_layers(qat).items():
        set_submodule(out, name, layer.to_float())
    return out.eval()
