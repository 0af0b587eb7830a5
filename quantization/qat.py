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
    """An ``nn.Linear`` trained under simulated int8 weights and activations.

    Optionally initialised from post-training static quantization: ``smooth`` (SmoothQuant
    factors: the input is divided by them and the weight's columns multiplied, as in
    ``StaticInt8Linear``) and ``act_qparams`` (a calibrated activation range, then held fixed
    while the weights adapt to it). Training then starts from the PTQ model's exact int8 function.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_averaging: float = 0.01,
                 smooth: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight_scheme = weight_scheme("channel")
        self.act_observer = MovingAverageMinMaxObserver(static_act_scheme(), averaging_constant=act_averaging)
        self.frozen_act_qparams: QParams | None = None
        self.has_smooth = smooth
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_averaging: float = 0.01, smooth: torch.Tensor | None = None,
                    act_qparams: QParams | None = None) -> "FakeQuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, act_averaging,
                    smooth=smooth is not None)
        layer.weight = nn.Parameter(linear.weight.detach().clone())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        if smooth is not None:
            layer.smooth.copy_(smooth)
        layer.frozen_act_qparams = act_qparams
        return layer

    def _smoothed_weight(self) -> torch.Tensor:
        return self.weight * self.smooth if self.has_smooth else self.weight

    def weight_qparams(self) -> QParams:
        return choose_qparams(self._smoothed_weight().detach(), self.weight_scheme)

    def act_qparams(self) -> QParams:
        return self.frozen_act_qparams if self.frozen_act_qparams is not None else self.act_observer.qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_smooth:
            x = x / self.smooth
        if self.frozen_act_qparams is None and (self.training or self.act_observer.count == 0):
            self.act_observer.observe(x)
        x_q = fake_quantize_ste(x, self.act_qparams())
        w_q = fake_quantize_ste(self._smoothed_weight(), self.weight_qparams())
        return nn.functional.linear(x_q, w_q, self.bias)

    def to_int8(self) -> StaticInt8Linear:
        return StaticInt8Linear.from_linear(self, self.act_qparams(), weight_granularity="channel",
                                            smooth=self.smooth if self.has_smooth else None)

    def to_float(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        layer.weight, layer.bias = self.weight, self.bias
        return layer


def quantizable_units(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if type(m) is nn.Linear]


def prepare_qat(module: nn.Module, units: list[str] | None = None, act_averaging: float = 0.01,
                smooth: dict[str, torch.Tensor] | None = None,
                act_qparams: dict[str, QParams] | None = None) -> nn.Module:
    """A trainable copy of ``module`` (left untouched) with every unit fake-quantized.

    ``smooth`` and ``act_qparams`` (by unit name, e.g. from a calibrated ``static-int8``) start
    training from that post-training int8 model; units without an entry observe their own range.
    """
    qat = copy.deepcopy(module)
    smooth, act_qparams = smooth or {}, act_qparams or {}
    for name in quantizable_units(module) if units is None else units:
        set_submodule(qat, name, FakeQuantLinear.from_linear(qat.get_submodule(name), act_averaging,
                                                             smooth=smooth.get(name), act_qparams=act_qparams.get(name)))
    return qat


def prepare_qat_from_static(module: nn.Module, calibration: list[dict[str, torch.Tensor]]) -> nn.Module:
    """``prepare_qat`` starting from ``static-int8`` (default parameters) calibrated on ``calibration``.

    The fake-quantized model then computes exactly what the post-training int8 model does, so
    training starts from it: SmoothQuant factors and percentile activation ranges, held fixed.
    """
    from .strategies.int8 import StaticInt8, StaticParams

    ptq = StaticInt8(StaticParams())
    ptq.prepare(module, calibration)
    return prepare_qat(module, smooth=ptq.smooth, act_qparams={n: o.qparams() for n, o in ptq.act_observers.items()})


def fake_quant_layers(module: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, FakeQuantLinear)}


def convert_qat(qat: nn.Module, kept: frozenset[str] = frozenset()) -> nn.Module:
    """The int8 model: each fake-quantized layer becomes a ``StaticInt8Linear`` (kept ones plain FP32)."""
    out = share_copy(qat)
    for name, layer in fake_quant_layers(qat).items():
        set_submodule(out, name, layer.to_float() if name in kept else layer.to_int8())
    return out.eval()
