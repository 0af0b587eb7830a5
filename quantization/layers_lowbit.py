"""Low-bit weight-only replacements for ``nn.Linear``: grouped affine codes, and shared weights.

Both keep activations in float and store weights below 8 bits per value, densely packed
(:mod:`quantization.packing`), so ``state_dict()`` holds exactly what a deployment stores. Each
forward unpacks the codes, rebuilds the float32 weight and runs ``F.linear``: the saving is in
memory and storage, not in arithmetic.

- :class:`WeightOnlyLinear`: affine codes of ``bits`` (2..8) bits with one float32 scale (and,
  when asymmetric, one packed zero point) per group of ``group_size`` consecutive inputs of an
  output row. Small groups follow the weight's local range, which is what makes 4 bits usable.
- :class:`SharedWeightLinear`: weight sharing (Han et al., *Deep Compression*): 1-D k-means over
  the layer's weights into ``2**bits`` float32 centroids; each weight stores only its cluster index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .affine import QScheme, choose_qparams, quantize
from .errors import InvalidConfigError
from .layers import QuantizedLinear
from .observers import Observer
from .packing import pack_bits, packed_size, unpack_codes


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending: the group sizes a dimension of size ``n`` allows."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_group_size(in_features: int, group_size: int, layer: str | None = None) -> None:
    """Raise :class:`InvalidConfigError` naming the valid group sizes unless ``group_size`` divides ``in_features``."""
    if isinstance(group_size, int) and group_size >= 1 and in_features % group_size == 0:
        return
    where = f"layer {layer!r}" if layer else "the layer"
    raise InvalidConfigError(
        f"group_size {group_size!r} does not divide in_features={in_features} of {where}; "
        f"choose one of its divisors: {', '.join(map(str, divisors(in_features)))}"
    )


def weight_only_scheme(bits: int, group_size: int, symmetric: bool) -> QScheme:
    """Groups along the input dimension (axis 1 of an ``[out, in]`` weight).

    Symmetric schemes are signed with the restricted range (zero point 0); asymmetric ones are
    unsigned so that their codes and zero points are already in [0, 2**bits) for packing.
    """
    return QScheme(bits=bits, symmetric=symmetric, signed=symmetric, granularity="group", axis=1,
                   group_size=group_size)


class WeightOnlyLinear(QuantizedLinear):
    """Packed ``bits``-bit affine weight codes with per-group float32 scales; float activations.

    Stored: ``weight_packed`` (uint8, ``ceil(out*in*bits/8)`` bytes), ``weight_scale``
    (float32 ``[out, in/group_size]``) and, if asymmetric, ``weight_zero_point`` (packed
    ``bits``-bit codes, one per group). Symmetric codes are stored offset by ``2**(bits-1)`` so
    they are unsigned; that constant offset is their zero point and is not stored.
    """

    kind = "weight-only"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False, input_scale: bool = False) -> None:
        super().__init__(in_features, out_features, has_bias)
        self.has_input_scale = input_scale
        if input_scale:  # activation-aware (AWQ): weight column j was multiplied by input_scale[j]
            self.register_buffer("input_scale", torch.ones(in_features))
        self.scheme = weight_only_scheme(bits, group_size, symmetric)  # validates bits (2..8)
        check_group_size(in_features, group_size)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(packed_size(out_features * in_features, bits),
                                                          dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups))
        if not symmetric:
            self.register_buffer("weight_zero_point",
                                 torch.zeros(packed_size(out_features * groups, bits), dtype=torch.uint8))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "input_scale": self.has_input_scale}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                    weight_observer: Observer | None = None,
                    input_scale: torch.Tensor | None = None) -> "WeightOnlyLinear":
        """Quantize ``linear``'s weight; ``weight_observer`` (with this layer's scheme) may choose the ranges.

        ``input_scale`` (AWQ): quantize W * s column-wise and divide it back out at run time, so
        the input channels that carry large activations get finer steps.
        """
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, symmetric,
                    input_scale is not None)
        w = linear.weight.detach().float()
        if input_scale is not None:
            layer.input_scale.copy_(input_scale)
            w = w * input_scale
        if weight_observer is not None:
            if weight_observer.scheme != layer.scheme:
                raise InvalidConfigError(f"the weight observer's scheme ({weight_observer.scheme.describe()}) is not "
                                         f"this layer's ({layer.scheme.describe()}); build it with weight_only_scheme()")
            weight_observer.observe(w)
            qp = weight_observer.qparams()
        else:
            qp = choose_qparams(w, layer.scheme)
        q = quantize(w, qp).to(torch.int16)
        layer.weight_packed.copy_(pack_bits(q + layer._offset(), bits))
        layer.weight_scale.copy_(qp.scale.reshape(layer.weight_scale.shape))
        if not symmetric:
            layer.weight_zero_point.copy_(pack_bits(qp.zero_point.reshape(-1), bits))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def _offset(self) -> int:
        return 2 ** (self.bits - 1) if self.symmetric else 0

    def dequantized_weight(self) -> torch.Tensor:
        """(q - z) * s per group: :func:`affine.dequantize`, bit for bit, in three passes over the weight.

        This runs in every forward, so it avoids the general function's int32 copies.
        """
        codes = unpack_codes(self.weight_packed, self.bits, self.out_features * self.in_features)
        w = codes.view(-1, self.group_size).float()
        if self.symmetric:
            w.sub_(self._offset())
        else:
            w.sub_(unpack_codes(self.weight_zero_point, self.bits, self.weight_scale.numel()).view(-1, 1))
        w = w.mul_(self.weight_scale.view(-1, 1)).view(self.out_features, self.in_features)
        return w.div_(self.input_scale) if self.has_input_scale else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.scheme.describe()}"


@dataclass(frozen=True)
class KMeansResult:
    """Sorted centroids, each value's cluster index, and how the fit went."""

    centroids: torch.Tensor  # float32 [k], ascending
    labels: torch.Tensor  # int64 [n]
    iterations: int
    inertia: float  # mean squared distance of a value to its centroid (the weight MSE)
    converged: bool
    empty_reseeded: int  # clusters that fell empty and were moved to the worst-fitted values

    def summary(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "inertia": self.inertia, "converged": self.converged,
                "codebook_size": int(self.centroids.numel()), "empty_reseeded": self.empty_reseeded}


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = 3000, tol: float = 1e-6) -> KMeansResult:
    """Lloyd's k-means on scalars, initialised linearly between min and max.

    Linear initialisation (rather than random or density-based) keeps centroids out in the tails,
    where the few large-magnitude weights that matter most live (Deep Compression, sec. 3.1).

    In 1-D the nearest centroid is decided by the midpoints of the sorted centroids, so every
    cluster is a contiguous run of the sorted values. A Lloyd step then needs only where the
    midpoints fall among the sorted values (k binary searches) and prefix sums for the cluster
    means: the same iterates as bucketize + scatter_add/bincount over all n weights, at O(k log n)
    per step. That matters because Lloyd converges slowly from a linear start (hundreds to
    thousands of steps on MiniLM's layers at 64-256 clusters) and stopping early measurably hurts
    fidelity. The loop over k-sized arrays runs in NumPy: its per-call overhead is about a
    microsecond, where torch's is several and, for an op over the n sorted values that wakes the
    thread pool on a busy CPU, milliseconds. Each weight's final index is ``torch.bucketize``
    against the final midpoints.

    Stops when no assignment changes, when the largest centroid move is at most ``tol`` times the
    value range, or after ``max_iter`` steps. A cluster that falls empty is moved onto the value
    currently fitted worst, so no code is wasted.
    """
    if k < 1 or max_iter < 1:
        raise InvalidConfigError(f"k-means needs k >= 1 and max_iter >= 1, got k={k}, max_iter={max_iter}")
    x = values.detach().reshape(-1).cpu().numpy().astype(np.float64)
    if x.size == 0:
        raise InvalidConfigError("cannot cluster an empty tensor")
    xs = np.sort(x)
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    span = float(xs[-1] - xs[0])
    centroids = np.linspace(xs[0], xs[-1], k)
    bounds = _run_bounds(xs, centroids)
    iterations, converged, reseeded = 0, False, 0
    for iterations in range(1, max_iter + 1):
        counts = np.diff(bounds)
        new = np.where(counts > 0, (csum[bounds[1:]] - csum[bounds[:-1]]) / np.maximum(counts, 1), centroids)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            new[empty] = _worst_fitted(xs, bounds, new, empty.size)
            reseeded += int(empty.size)
        new.sort()
        shift = float(np.abs(new - centroids).max())
        centroids = new
        new_bounds = _run_bounds(xs, centroids)
        unchanged = bool(np.array_equal(new_bounds, bounds))
        bounds = new_bounds
        if unchanged or shift <= tol * span:
            converged = True
            break
    inertia = float(np.mean((xs - np.repeat(centroids, np.diff(bounds))) ** 2))
    c = torch.from_numpy(centroids)
    labels = torch.bucketize(torch.from_numpy(x), (c[1:] + c[:-1]) / 2)
    return KMeansResult(c.float(), labels, iterations, inertia, converged, reseeded)


def _run_bounds(xs: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Offsets of each cluster's run in the sorted values: cluster j is ``xs[b[j]:b[j+1]]``.

    ``side="right"`` puts a value equal to a midpoint in the lower cluster, as ``bucketize`` does.
    """
    bounds = np.empty(centroids.size + 1, dtype=np.int64)
    bounds[0], bounds[-1] = 0, xs.size
    bounds[1:-1] = np.searchsorted(xs, (centroids[1:] + centroids[:-1]) / 2, side="right")
    return bounds


def _worst_fitted(xs: np.ndarray, bounds: np.ndarray, centroids: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` values farthest from their centroid (cycling through them if there are fewer).

    A cluster is a sorted run, so its worst-fitted value is its first or its last: 2k candidates
    instead of n values.
    """
    full = bounds[1:] > bounds[:-1]
    candidates = np.concatenate([xs[bounds[:-1][full]], xs[bounds[1:][full] - 1]])
    err = (candidates - np.tile(centroids[full], 2)) ** 2
    order = np.argsort(-err, kind="stable")
    return candidates[order[np.arange(m) % order.size]]


class SharedWeightLinear(QuantizedLinear):
    """Weights replaced by the nearest of ``2**bits`` shared float32 values (a k-means codebook).

    Stored: ``codebook`` (float32 ``[2**bits]``) and ``weight_packed`` (the packed ``bits``-bit
    index of each weight). ``clustering`` (not stored) summarises the k-means fit of a freshly built
    layer: iterations, inertia (weight MSE), convergence, codebook size.
    """

    kind = "weight-sharing"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, bits: int = 6) -> None:
        super().__init__(in_features, out_features, has_bias)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise InvalidConfigError(f"weight sharing needs bits from 1 to 8 (2 to 256 shared values), got {bits!r}")
        self.bits = bits
        self.register_buffer("codebook", torch.zeros(2**bits))
        self.register_buffer("weight_packed", torch.zeros(packed_size(out_features * in_features, bits),
                                                          dtype=torch.uint8))
        self.clustering: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bits": self.bits}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 6, max_iter: int = 3000,
                    tol: float = 1e-6) -> "SharedWeightLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits)
        fit = kmeans_1d(linear.weight.detach().float(), 2**bits, max_iter=max_iter, tol=tol)
        layer.codebook.copy_(fit.centroids)
        layer.weight_packed.copy_(pack_bits(fit.labels, bits))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        layer.clustering = fit.summary()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        idx = unpack_codes(self.weight_packed, self.bits, self.out_features * self.in_features)
        if idx.dtype == torch.uint8:  # index_select takes int32 or int64 indices
            idx = idx.int()
        return self.codebook.index_select(0, idx).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, codebook={2**self.bits}"


__all__ = ["WeightOnlyLinear", "SharedWeightLinear", "KMeansResult", "kmeans_1d", "weight_only_scheme",
           "check_group_size", "divisors"]
