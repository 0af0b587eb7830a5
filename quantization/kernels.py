"""The int8 GEMM kernels a dynamic int8 layer can run, and the one door to FBGEMM.

Every kernel computes the same layer (per-channel int8 weights, activations quantized per token from
their own range) on a different library path; which one is fast, and which one is exact, depends on the
CPU (:mod:`quantization.cpu`), so :mod:`quantization.tuning` measures them on each machine:

- ``onednn``: ``torch._int_mm`` (int8 x int8 -> int32) with signed 8-bit activations. oneDNN's VNNI
  kernel where torch's cpuinfo sees AVX-512 VNNI; elsewhere torch runs a plain loop (exact, ~40x slower
  than FP32). Capped at AVX2 by ``ONEDNN_MAX_CPU_ISA`` on a VNNI CPU it is fast but saturates.
- ``fbgemm-u8``: FBGEMM's prepacked dynamic linear, 8-bit activations. Exact with VNNI; without it FBGEMM
  adds pairs of uint8 x int8 products in int16 (``vpmaddubsw``), which saturates: never a candidate where
  the CPU profile has no int8 dot product.
- ``fbgemm-u7``: the same with 7-bit activations (``reduce_range``): a pair of products stays within
  int16 (2 x 127 x 127 < 32767), so it is exact on every x86 CPU, at one bit less activation precision.
- ``fp32``: the dequantized weights in an FP32 GEMM, the floor (exact by construction, never slower than
  the FP32 model's own layer).

FBGEMM quantizes a whole input with one scale. To keep one scale per token, a batch's rows are first
mapped affinely onto [0, 1] (row ``i``: ``(x - lo_i) / r_i``), so the one scale FBGEMM picks *is* every
row's own, and the product is mapped back: ``y = r_i * (x' W^T) + lo_i * sum_k W + b``. One row needs no
mapping (its range is the whole input's).

FBGEMM is reached through torch's deprecated quantized-tensor API, behind :mod:`quantization.internals.fbgemm`
(its switch, ``fbgemm``, or ``QUANTSERVE_FBGEMM=0``, turns every FBGEMM kernel off).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .internals import fbgemm as fb

KERNELS = ("onednn", "fbgemm-u8", "fbgemm-u7", "fp32")
# a layer runs one kernel for one row, one for a few rows (a decoding step of a small batch) and one for more:
# at 16 rows of a 256 x 256 layer FP32 took 25 us and oneDNN 72, at 300 rows both ~230 (Zen 4)
FEW_ROWS = 32
FEW_TIMED = 16  # the rows the "few" kernel is timed on
# activation bits: where two kernels are about as fast, the more precise one is preferred
PRECISION = {"onednn": 8, "fbgemm-u8": 8, "fbgemm-u7": 7, "fp32": 32}


def reduce_range(kernel: str) -> bool:
    """Whether an FBGEMM kernel quantizes its activations to 7 bits (torch's ``reduce_range``)."""
    return PRECISION[kernel] == 7


def normalize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows mapped onto [0, 1], each row's lower end, each row's span)."""
    lo = x2.amin(dim=1, keepdim=True)
    span = (x2.amax(dim=1, keepdim=True) - lo).clamp_min_(1e-12)
    return (x2 - lo).div_(span), lo, span


def fbgemm(layer: Any, x2: torch.Tensor, kernel: str) -> torch.Tensor:
    """A dynamic int8 layer's product through an FBGEMM ``kernel`` (``x2``: flat, smoothed input), bias included."""
    seven = reduce_range(kernel)
    call = fb.graph_linear if layer.graph_form else fb.eager_linear
    if x2.shape[0] == 1:
        y = call(x2, layer.weight_int8, layer.weight_scale, seven)
    else:
        xn, lo, span = normalize_rows(x2)
        y = call(xn, layer.weight_int8, layer.weight_scale, seven).mul_(span)
        y.addr_(lo.flatten(), layer.zero_point_term)
    return y.add_(layer.bias) if layer.bias is not None else y


def fbgemm_static(layer: Any, x2: torch.Tensor, kernel: str) -> torch.Tensor:
    """A static int8 layer's product through FBGEMM on its calibrated grid (``layer.fbgemm_grid``), bias included."""
    scale, zero, lo, hi = layer.fbgemm_grid(kernel)
    if reduce_range(kernel):
        x2 = x2.clamp(lo, hi)
    y = fb.linear_static(x2, scale, zero, fb.packed(layer.weight_int8, layer.weight_scale))
    return y.add_(layer.bias) if layer.bias is not None else y


def fp32(layer: Any, x2: torch.Tensor) -> torch.Tensor:
    """The floor: the layer's dequantized weights (smoothing left folded in) in an FP32 GEMM."""
    return F.linear(x2, layer.float_weight(), layer.bias)


def exactness(kernel: str, layer: Any, x2: torch.Tensor) -> float:
    """Worst error of ``kernel``'s integer product against int64 arithmetic, relative to the largest product.

    0 for an exact kernel. The inputs are ``x2`` (real activations) plus one adversarial row (every
    activation at the top of its range but one), the pattern that saturates int16 pair sums.
    """
    w = layer.weight_int8
    if kernel == "fp32":
        return 0.0
    if kernel == "onednn":
        q, _, _ = layer._quantize_input(torch.cat([x2, _adversarial(x2)]))
        acc = torch._int_mm(q, w.t()).to(torch.int64)
        exact = q.to(torch.int64) @ w.to(torch.int64).t()
        return float((acc - exact).abs().max()) / max(1.0, float(exact.abs().max()))
    xs = torch.cat([x2, _adversarial(x2)])
    grid = getattr(layer, "fbgemm_grid", None)
    if grid is not None:  # a static layer: its calibrated grid
        scale, zero, lo, hi = grid(kernel)
        q = torch.round(xs.clamp(lo, hi) / scale)  # minus the zero point: what multiplies the weights
        # inputs on the grid (q * scale): the kernel's own quantization gives back q exactly
        acc = (fbgemm_static(layer, q * scale, kernel) - (layer.bias if layer.bias is not None else 0)).double()
        acc = acc / (scale * layer.weight_scale.double())
    else:
        levels = 2 ** PRECISION[kernel] - 1
        xn, _, _ = normalize_rows(xs)
        q = torch.round(xn * levels)
        acc = fb.grid_product(q, w, reduce_range(kernel))  # each row spans the grid: quantizing gives back q
    exact = (q.to(torch.int64) @ w.to(torch.int64).t()).double()
    return float((acc - exact).abs().max()) / max(1.0, float(exact.abs().max()))


def _adversarial(x2: torch.Tensor) -> torch.Tensor:
    row = torch.full((1, x2.shape[1]), float(x2.abs().max().clamp_min(1.0)))
    row[0, -1] = -row[0, -1]
    return row


EXACT_TOLERANCE = 1e-6  # float rounding of the dequantized product; one saturated pair is far above it


__all__ = ["KERNELS", "PRECISION", "fbgemm", "fbgemm_static", "fp32", "exactness", "normalize_rows", "EXACT_TOLERANCE",
           "FEW_ROWS", "FEW_TIMED"]
