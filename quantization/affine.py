"""Affine (uniform) quantization, as the textbook defines it.

    q     = clamp(round(x / s) + z, qmin, qmax)
    x_hat = (q - z) * s

A :class:`QScheme` says how: bit width (2..8), symmetric or asymmetric, signed or unsigned
integers, and the granularity of the parameters: one (scale, zero point) per tensor, per channel
along any axis, or per group of ``group_size`` consecutive elements along an axis.

Conventions (the ones PyTorch and ONNX Runtime use):
- the range always contains 0, so 0.0 is represented exactly (q == z);
- symmetric signed schemes use the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1] so that the
  grid is symmetric around zero and the zero point is 0; symmetric unsigned schemes put the zero
  point in the middle, 2^(b-1);
- asymmetric schemes use the full range and round the zero point to an integer inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import InvalidConfigError

Granularity = Literal["tensor", "channel", "group"]
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QScheme:
    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise InvalidConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise InvalidConfigError(
                f"granularity must be one of 'tensor', 'channel', 'group', got {self.granularity!r}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise InvalidConfigError(
                    f"group granularity needs a positive integer group_size, got {self.group_size!r}"
                )

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        sign = "int" if self.signed else "uint"
        where = {"tensor": "per-tensor", "channel": f"per-channel(axis={self.axis})",
                 "group": f"per-group({self.group_size}, axis={self.axis})"}[self.granularity]
        return f"{sign}{self.bits} {kind} {where}"


@dataclass
class QParams:
    """Scale and zero point, shaped to broadcast against :func:`grouped_view` of the tensor."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: QScheme
    shape: torch.Size | None = field(default=None)  # the original tensor's shape


# ---------------------------------------------------------------------------------------------
# Views: every granularity becomes "reduce over the last dimension(s) of a view"
# ---------------------------------------------------------------------------------------------

def _axis(x: torch.Tensor, axis: int) -> int:
    if not -x.dim() <= axis < max(x.dim(), 1):
        raise InvalidConfigError(f"axis {axis} is out of range for a tensor of {x.dim()} dimensions")
    return axis % max(x.dim(), 1)


def grouped_view(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """A view of ``x`` in which each quantization group is one row of the last dimension."""
    if scheme.granularity == "tensor":
        return x.reshape(1, -1)
    axis = _axis(x, scheme.axis)
    if scheme.granularity == "channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    size = x.shape[axis]
    gs = scheme.group_size
    if size % gs != 0:
        raise InvalidConfigError(
            f"group_size {gs} does not divide dimension {axis} of size {size}; "
            f"choose a divisor of {size} such as {_divisors_hint(size)}"
        )
    moved = x.movedim(axis, -1)
    return moved.reshape(-1, gs)


def ungrouped(v: torch.Tensor, x_shape: torch.Size, scheme: QScheme) -> torch.Tensor:
    """Inverse of :func:`grouped_view`."""
    if scheme.granularity == "tensor":
        return v.reshape(x_shape)
    axis = scheme.axis % max(len(x_shape), 1)
    others = [d for i, d in enumerate(x_shape) if i != axis]
    if scheme.granularity == "channel":
        return v.reshape([x_shape[axis], *others]).movedim(0, axis)
    return v.reshape([*others, x_shape[axis]]).movedim(-1, axis)


def _divisors_hint(n: int) -> str:
    divs = [d for d in (32, 64, 128, 256) if n % d == 0] or [d for d in range(2, min(n, 65)) if n % d == 0][:4]
    return ", ".join(map(str, divs)) if divs else str(n)


# ---------------------------------------------------------------------------------------------
# Choosing parameters
# ---------------------------------------------------------------------------------------------

def compute_qparams(min_val: torch.Tensor | float, max_val: torch.Tensor | float, scheme: QScheme,
                    shape: torch.Size | None = None) -> QParams:
    """Scale and zero point for a range [min_val, max_val] (tensors shaped like the groups)."""
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if bool(torch.any(min_val > max_val)):
        raise InvalidConfigError("min_val must not exceed max_val")
    lo = torch.minimum(min_val, torch.zeros_like(min_val))
    hi = torch.maximum(max_val, torch.zeros_like(max_val))
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        if scheme.signed:
            scale = amax / qmax
            zp = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = amax / ((qmax - qmin) / 2)
            zp = torch.full_like(scale, (qmax + qmin + 1) // 2, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = _safe_scale(scale)
    if not scheme.symmetric:
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return QParams(scale=scale, zero_point=zp, scheme=scheme, shape=shape)


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group has no range: any positive scale represents it exactly.
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale > 0, scale.clamp_min(tiny), torch.ones_like(scale))


def minmax(x: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of ``x`` (keepdim, shaped to broadcast against the grouped view)."""
    v = grouped_view(x.detach().float(), scheme)
    if v.numel() == 0:
        raise InvalidConfigError("cannot choose quantization parameters for an empty tensor")
    return v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)


def choose_qparams(x: torch.Tensor, scheme: QScheme) -> QParams:
    """Min-max parameters for ``x`` under ``scheme``."""
    lo, hi = minmax(x, scheme)
    return compute_qparams(lo, hi, scheme, shape=x.shape)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------

def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """q = clamp(round(x / s) + z, qmin, qmax), stored as int8 (signed) or uint8 (unsigned)."""
    s = qp.scheme
    v = grouped_view(x.float(), s)
    q = torch.clamp(torch.round(v / qp.scale) + qp.zero_point, s.qmin, s.qmax)
    return ungrouped(q.to(s.storage_dtype), x.shape, s)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """x_hat = (q - z) * s, as float32."""
    s = qp.scheme
    v = grouped_view(q.to(torch.int32), s)
    return ungrouped((v - qp.zero_point).float() * qp.scale, q.shape, s)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """dequantize(quantize(x)): the value the quantized model will actually see."""
    return dequantize(quantize(x, qp), qp)


# ---------------------------------------------------------------------------------------------
# Error measures
# ---------------------------------------------------------------------------------------------

def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(torch.mean((x.double() - x_hat.double()) ** 2))


def max_abs_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(torch.max(torch.abs(x.double() - x_hat.double()))) if x.numel() else 0.0


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - x_hat)^2)."""
    signal = float(torch.sum(x.double() ** 2))
    noise = float(torch.sum((x.double() - x_hat.double()) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def error_stats(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    return {"mse": mse(x, x_hat), "max_abs_error": max_abs_error(x, x_hat), "sqnr_db": sqnr_db(x, x_hat)}
