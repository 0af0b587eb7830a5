"""Quantized replacements for ``nn.Linear``.

Every layer here stores only what a real deployment stores (integer weights, scales, zero points,
codebooks) as buffers, so ``state_dict()`` *is* the stored form and its byte count is the real
size. Each layer can describe itself (:meth:`QuantizedLinear.config`), be rebuilt empty from that
description (:meth:`QuantizedLinear.from_config`, used when loading a saved artifact), and give
back the weight it effectively computes with (:meth:`QuantizedLinear.dequantized_weight`, used
for per-layer error reports).

The int8 GEMM layers run ``torch._int_mm`` (int8 x int8 -> int32, VNNI kernels on x86) with
symmetric int8 weights, one scale per output channel by default:

    y = (s_x * s_w) * (q_x @ q_w^T - z_x * sum_k q_w) + b
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .affine import QScheme, choose_qparams, compute_qparams, quantize
from .calibration import layers_sharing_inputs

INT8_SYM = QScheme(bits=8, symmetric=True, signed=True)


def weight_scheme(granularity: str) -> QScheme:
    if granularity == "channel":
        return QScheme(bits=8, symmetric=True, signed=True, granularity="channel", axis=0)
    return INT8_SYM


class QuantizedLinear(nn.Module):
    """Base class: a Linear layer whose weights are stored in some quantized form."""

    kind: ClassVar[str] = "quantized-linear"
    registry: ClassVar[dict[str, type["QuantizedLinear"]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        QuantizedLinear.registry[cls.kind] = cls

    def __init__(self, in_features: int, out_features: int, has_bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if has_bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "has_bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizedLinear":
        config = dict(config)
        kind = config.pop("kind")
        return cls.registry[kind](**config)

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of everything stored for the weight (not the bias)."""
        return sum(t.numel() * t.element_size() for n, t in self.state_dict().items() if n != "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


# made on demand from the stored buffers, dropped when they change: float copies of the weight, FBGEMM input grids
DERIVED = ("_float_weight", "_input_weight", "_grids")


class Int8GemmLinear(QuantizedLinear):
    """int8 weights for an int8 GEMM, with an optional per-input-channel ``smooth`` vector, and the kernels it
    runs for one row, a few rows and more (:mod:`quantization.kernels`).

    Smoothing (SmoothQuant) divides activation channel j by smooth[j] before rounding; the
    weight's column j was multiplied by smooth[j] before quantization, so the product is
    unchanged while activation outlier channels shrink.
    """

    # until quantization.tuning has measured this CPU: oneDNN, exact on every CPU (fast only with VNNI)
    row_kernel: str = "onednn"
    few_kernel: str = "onednn"  # up to kernels.FEW_ROWS rows
    batch_kernel: str = "onednn"
    # the serving form, chosen when the model is built: True in a module prepared for torch.compile
    # (quantization.internals.compiled.compile_module), whose graphs call FBGEMM through a custom op and
    # share input GEMMs; forwards never ask the compiler whether it is tracing them
    graph_form: bool = False

    def __init__(self, in_features: int, out_features: int, has_bias: bool, weight_granularity: str = "channel",
                 smooth: bool = False) -> None:
        super().__init__(in_features, out_features, has_bias)
        self.weight_granularity = weight_granularity
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        n = out_features if weight_granularity == "channel" else 1
        self.register_buffer("weight_scale", torch.ones(n))
        self.has_smooth = smooth
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features))
        self._refresh()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "weight_granularity": self.weight_granularity, "smooth": self.has_smooth}

    def _load_weight(self, linear: nn.Linear, weight_observer: Any | None = None,
                     smooth: torch.Tensor | None = None) -> None:
        w = linear.weight.detach().float()
        if smooth is not None:
            self.smooth.copy_(smooth)
            w = w * smooth
        if weight_observer is not None:
            weight_observer.observe(w)
            qp = weight_observer.qparams()
        else:
            qp = choose_qparams(w, weight_scheme(self.weight_granularity))
        self.weight_int8.copy_(quantize(w, qp))
        self.weight_scale.copy_(qp.scale.reshape(-1))
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach().float())
        self._refresh()

    def scaled_weight(self) -> torch.Tensor:
        """The int8 weight times its scales: what the GEMM multiplies smoothed inputs by."""
        scale = self.weight_scale.reshape(-1, 1) if self.weight_scale.numel() > 1 else self.weight_scale
        return self.weight_int8.float() * scale

    def dequantized_weight(self) -> torch.Tensor:
        w = self.scaled_weight()
        return w / self.smooth if self.has_smooth else w

    def _flat_input(self, x: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        return x2 / (self.smooth if smooth is None else smooth) if self.has_smooth else x2

    def _gemm(self, q: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor | None,
              weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
              ) -> torch.Tensor:
        """Dequantized product; large [tokens, out] temporaries are made twice only (int32, float32).

        ``weight``: (int8 weight, weight scale, zero-point term, bias) to use instead of the layer's own.
        """
        w, w_scale, zp_term, bias = weight or (self.weight_int8, self.weight_scale, self.zero_point_term, self.bias)
        y = torch._int_mm(q, w.t()).to(torch.float32)
        y.mul_(x_scale)
        y.mul_(w_scale)
        if x_zero is not None:
            # sum_k (q_x - z) q_w = q_x @ q_w^T - z * sum_k q_w, applied after scaling as one rank-1 update
            if x_zero.numel() == 1:
                y.sub_((x_zero * x_scale).reshape(()) * zp_term)
            else:
                y.addr_((x_zero * x_scale).flatten(), zp_term, alpha=-1)
        if bias is not None:
            y.add_(bias)
        return y

    def _refresh(self) -> None:
        """Derived from the stored buffers once, not per call: (sum_k q_w) * s_w, the zero-point term.

        A non-persistent buffer, so it is not part of the stored form; recomputed whenever weights
        are loaded. Computing it lazily inside ``forward`` would also make ``torch.compile`` trace a
        module whose attributes change on the first call (a recompile).
        """
        term = self.weight_int8.sum(dim=1, dtype=torch.int32).to(torch.float32) * self.weight_scale
        self.register_buffer("zero_point_term", term, persistent=False)
        for key in DERIVED:  # new weights
            self.__dict__.pop(key, None)

    # -- kernels (quantization.kernels; chosen per CPU by quantization.tuning) ---------------------------------
    def float_weight(self) -> torch.Tensor:
        """The dequantized weight for smoothed inputs (the ``fp32`` kernel's), made once when first asked for."""
        w = self.__dict__.get("_float_weight")
        if w is None:
            w = self.__dict__["_float_weight"] = self.scaled_weight()
        return w

    def input_weight(self) -> torch.Tensor:
        """The dequantized weight with smoothing divided back out: it reads the layer's raw input, so an ``fp32``
        kernel call costs what ``nn.Linear`` costs (no flattening, no division, no cast)."""
        if not self.has_smooth:
            return self.float_weight()
        w = self.__dict__.get("_input_weight")
        if w is None:
            w = self.__dict__["_input_weight"] = self.dequantized_weight()
            self.__dict__.pop("_float_weight", None)  # one float copy per layer is enough
        return w

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in DERIVED}  # made again on demand

    def set_kernels(self, row: str, batch: str, few: str | None = None) -> None:
        """The kernels for one-row inputs, for up to ``kernels.FEW_ROWS`` rows (default: ``batch``'s) and for more
        (:mod:`quantization.kernels`)."""
        few = batch if few is None else few
        for kernel in (row, few, batch):
            if kernel not in kernels.KERNELS:
                raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(kernels.KERNELS)}")
        self.row_kernel, self.few_kernel, self.batch_kernel = row, few, batch

    def kernel_for(self, x: torch.Tensor) -> str:
        n = x.numel()
        if n == self.in_features:
            return self.row_kernel
        # compared only where the two differ, so a compiled forward (one kernel for both) gets no guard on the rows
        if self.few_kernel != self.batch_kernel and n <= kernels.FEW_ROWS * self.in_features:
            return self.few_kernel
        return self.batch_kernel

    def fp32_fast(self, x: torch.Tensor, kernel: str) -> bool:
        """Whether ``kernel`` is the FP32 floor on a float32 input: then the layer calls ``F.linear`` on its raw
        input and costs what ``nn.Linear`` costs (where FP32 won the timing, one-row products of small layers
        mostly, nothing may cost more than the FP32 model's own layer: a decoding step calls a dozen)."""
        return kernel == "fp32" and x.dtype == torch.float32


    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()


class DynamicInt8Linear(Int8GemmLinear):
    """int8 weights; activations quantized at run time from each batch's own range.

    ``act_granularity="token"`` gives every row (token) its own scale, which is what keeps
    outlier tokens from crushing the others; ``"tensor"`` is the classic one scale per batch.
    """

    kind = "dynamic-int8"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, weight_granularity: str = "channel",
                 smooth: bool = False, act_granularity: str = "token", act_symmetric: bool = False) -> None:
        super().__init__(in_features, out_features, has_bias, weight_granularity, smooth)
        self.act_granularity = act_granularity
        self.act_symmetric = act_symmetric
        self.shared_columns: tuple[int, int] | None = None  # set by share_input_gemms

    def config(self) -> dict[str, Any]:
        return {**super().config(), "act_granularity": self.act_granularity, "act_symmetric": self.act_symmetric}

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_observer: Any | None = None, smooth: torch.Tensor | None = None,
                    **options: Any) -> "DynamicInt8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, smooth=smooth is not None,
                    **options)
        layer._load_weight(linear, weight_observer, smooth)
        return layer

    def _quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 activations, their scale, zero point or None) from the batch's own range."""
        dim = 1 if self.act_granularity == "token" else None
        if self.act_symmetric:
            amax = x2.abs().amax(dim=1, keepdim=True) if dim else x2.abs().amax()
            scale = (amax / 127.0).clamp_min(1e-12)
            return (x2 / scale).round_().clamp_(-127, 127).to(torch.int8), scale, None
        lo = (x2.amin(dim=1, keepdim=True) if dim else x2.amin()).clamp(max=0)
        hi = (x2.amax(dim=1, keepdim=True) if dim else x2.amax()).clamp(min=0)
        scale = ((hi - lo) / 255.0).clamp_min(1e-12)
        zero = (-128 - torch.round(lo / scale)).clamp_(-128, 127)
        return (x2 / scale).round_().add_(zero).clamp_(-128, 127).to(torch.int8), scale, zero

    def run_kernel(self, kernel: str, x2: torch.Tensor) -> torch.Tensor:
        """The product of a flat, smoothed input through ``kernel``, as a [rows, out] float tensor."""
        if kernel == "onednn":
            q, scale, zero = self._quantize_input(x2)
            return self._gemm(q, scale, zero)
        if kernel == "fp32":
            return kernels.fp32(self, x2)
        return kernels.fbgemm(self, x2, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        kernel = self.kernel_for(x)
        if self.fp32_fast(x, kernel):
            return F.linear(x, self.input_weight(), self.bias)
        if kernel.startswith("fbgemm") and (x.requires_grad or self.act_symmetric):
            kernel = "onednn"  # FBGEMM's kernels have no backward and quantize asymmetrically
        if kernel == "onednn" and self.shared_columns is not None and self.graph_form:
            # every layer of the group computes the whole shared product from the same input with the same
            # tensors; the compiler merges the identical computations into one, and each layer keeps its columns
            q, scale, zero = self._quantize_input(self._flat_input(x, self.shared_smooth))
            start, stop = self.shared_columns
            y = self._gemm(q, scale, zero, (self.shared_weight, self.shared_scale, self.shared_zero_point_term,
                                            self.shared_bias))[:, start:stop]
        else:
            y = self.run_kernel(kernel, self._flat_input(x))
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class StaticInt8Linear(Int8GemmLinear):
    """int8 weights and int8 activations whose (scale, zero point) were fixed by calibration."""

    kind = "static-int8"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, weight_granularity: str = "channel",
                 smooth: bool = False) -> None:
        super().__init__(in_features, out_features, has_bias, weight_granularity, smooth)
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_qparams: Any, smooth: torch.Tensor | None = None,
                    weight_observer: Any | None = None, **options: Any) -> "StaticInt8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    smooth=smooth is not None, **options)
        layer._load_weight(linear, weight_observer, smooth)
        layer.act_scale.copy_(act_qparams.scale.reshape(()))
        layer.act_zero_point.copy_(act_qparams.zero_point.reshape(()))
        layer._refresh()
        return layer

    def _refresh(self) -> None:
        super()._refresh()
        # a plain bool, so the forward has no data-dependent branch (one graph under torch.compile)
        self.has_zero_point = bool(getattr(self, "act_zero_point", torch.zeros(())) != 0)

    def _quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 activations, their scale, zero point or None) on the calibrated grid."""
        zero = self.act_zero_point
        q = (x2 / self.act_scale).round_().add_(zero).clamp_(-128, 127).to(torch.int8)
        return q, self.act_scale, zero if self.has_zero_point else None

    def fbgemm_grid(self, kernel: str) -> tuple[float, int, float, float]:
        """(scale, zero point, lowest, highest input) of the calibrated range on FBGEMM's unsigned grid: the same
        grid shifted by 128 for 8-bit activations; for 7-bit ones the range re-cut into 127 steps, with inputs
        clamped to it so that no quantized value exceeds 127 (what keeps int16 pair sums exact without VNNI)."""
        grids = self.__dict__.setdefault("_grids", {})
        if kernel not in grids:
            scale, zero = float(self.act_scale), int(self.act_zero_point)
            lo, hi = (-128 - zero) * scale, (127 - zero) * scale
            if kernels.reduce_range(kernel):
                scale = max((hi - lo) / 127.0, 1e-12)
                zero_u = min(127, max(0, round(-lo / scale)))
            else:
                zero_u = zero + 128
            top = 127 if kernels.reduce_range(kernel) else 255
            grids[kernel] = (scale, zero_u, -zero_u * scale, (top - zero_u) * scale)
        return grids[kernel]

    def run_kernel(self, kernel: str, x2: torch.Tensor) -> torch.Tensor:
        """The product of a flat, smoothed input through ``kernel``, as a [rows, out] float tensor."""
        if kernel == "onednn":
            return self._gemm(*self._quantize_input(x2))
        if kernel == "fp32":
            return kernels.fp32(self, x2)
        return kernels.fbgemm_static(self, x2, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for(x)
        if self.fp32_fast(x, kernel):
            return F.linear(x, self.input_weight(), self.bias)
        if kernel.startswith("fbgemm") and (x.requires_grad or self.graph_form):
            kernel = "onednn"  # no backward, and compiled graphs reach FBGEMM only through the dynamic layers' op
        y = self.run_kernel(kernel, self._flat_input(x))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def set_graph_form(module: nn.Module, on: bool) -> None:
    """Choose the serving form of every int8 GEMM layer of ``module``: for compiled graphs, or eager."""
    for m in module.modules():
        if isinstance(m, Int8GemmLinear):
            m.graph_form = on


def share_input_gemms(module: nn.Module, probe: Callable[[nn.Module], Any]) -> int:
    """Let dynamic int8 layers that always read the same input share one GEMM when compiled; the group count.

    Attention's query, key and value projections read the same hidden states: three int8 GEMMs of
    [tokens x 384] x [384 x 384] are one of [384 x 1152]. At batch 1 (16 tokens) the three took 48 µs
    and the one 28 µs on this kind of CPU: every ``torch._int_mm`` call pays a fixed cost (oneDNN's
    GEMM packs both operands on every call) that one wider call pays once.

    ``probe(module)`` runs one eager forward; layers that received the very same input tensor on every
    call form a group, if they quantize it alike (the same smoothing factors: dynamic-int8 smooths such
    layers jointly). Each layer of a group gets the concatenated weights as non-persistent buffers
    shared by the group (the state dict and stored form are unchanged; a few MB more int8 in memory)
    and its column range. Only the graph form uses them (:func:`set_graph_form`, which ``compile_module``
    calls): there the quantized input and the product
    are the same computation in every layer of the group, which the compiler's common-subexpression
    elimination runs once. Eager forms are unchanged. Call it before ``torch.compile``, and do not
    move the module afterwards (a move copies each layer's buffers apart).
    """
    names = [n for n, m in module.named_modules()
             if type(m) is DynamicInt8Linear and m.weight_granularity == "channel"]
    fused = 0
    for group in layers_sharing_inputs(module, names, lambda: probe(module)):
        members = [module.get_submodule(n) for n in group]
        if not _compatible(members):
            continue
        shared = {"shared_weight": torch.cat([m.weight_int8 for m in members]),
                  "shared_scale": torch.cat([m.weight_scale for m in members]),
                  "shared_zero_point_term": torch.cat([m.zero_point_term for m in members]),
                  "shared_bias": torch.cat([m.bias for m in members]) if members[0].bias is not None else None,
                  "shared_smooth": members[0].smooth if members[0].has_smooth else None}
        start = 0
        for m in members:
            for name, tensor in shared.items():
                m.register_buffer(name, tensor, persistent=False)
            m.shared_columns = (start, start + m.out_features)
            start += m.out_features
        fused += 1
    return fused


def _compatible(layers: list[DynamicInt8Linear]) -> bool:
    """Same input quantization (so one quantized input serves all), and all or none with a bias."""
    first = layers[0]
    return all(m.in_features == first.in_features and m.batch_kernel == "onednn" and m.act_granularity == first.act_granularity
               and m.act_symmetric == first.act_symmetric and m.has_smooth == first.has_smooth
               and (not m.has_smooth or torch.equal(m.smooth, first.smooth))
               and (m.bias is None) == (first.bias is None) for m in layers)


def static_act_scheme(symmetric: bool = False) -> QScheme:
    """Activations of static int8 layers: signed int8, asymmetric by default (GELU outputs are)."""
    return QScheme(bits=8, symmetric=symmetric, signed=True)


__all__ = ["QuantizedLinear", "DynamicInt8Linear", "StaticInt8Linear", "weight_scheme", "static_act_scheme",
           "compute_qparams", "set_graph_form", "share_input_gemms"]
