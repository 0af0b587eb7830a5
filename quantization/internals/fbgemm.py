"""FBGEMM's int8 linear kernels, reached through torch's deprecated quantized-tensor API.

The only place that builds quantized tensors (``torch._make_per_channel_quantized_tensor``) or calls
``torch.ops.quantized``. :mod:`quantization.kernels` does the arithmetic around these calls (the
per-row mapping onto [0, 1], the bias); this module packs weights once and runs the products.

Switch: ``fbgemm`` (:mod:`quantization.internals`; also ``QUANTSERVE_FBGEMM=0``). Self-check: packing a
weight must work in this torch build and a 7-bit product on the kernel's own grid must equal int64
arithmetic; otherwise every FBGEMM kernel is off, which leaves oneDNN and the FP32 floor.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import torch

from . import switches

log = logging.getLogger(__name__)

# id(weight tensor) -> (weakref to it, weakref to the scale tensor, their versions when packed, packed weight)
_PACKED: dict[int, tuple[Any, Any, tuple[int, int], Any]] = {}
_CHECKED: str | None | bool = False  # False: not checked yet; None: passed; a sentence: why it is off


def available() -> bool:
    """FBGEMM's dynamic linear is switched on, works in this torch build and computes exactly."""
    global _CHECKED
    if not switches.enabled("fbgemm"):
        return False
    if _CHECKED is False:
        _CHECKED = _self_check()
        if _CHECKED is not None:
            switches.turned_off("fbgemm", _CHECKED)
    return _CHECKED is None


def _self_check() -> str | None:
    """None where a packed 7-bit product on the kernel's own grid equals int64 arithmetic; else why not."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int8)
        q = torch.randint(0, 128, (4, 64), generator=g).float()
        q[:, 0], q[:, 1] = 0, 127  # every row spans the whole grid
        out = grid_product(q, w, True)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"this torch build cannot run it ({type(exc).__name__})"
    exact = (q.to(torch.int64) @ w.to(torch.int64).t()).double()
    err = float((out - exact).abs().max()) / float(exact.abs().max())
    return None if err <= 1e-6 else f"its product is off by {err:.2g} of the largest on a probe"


def grid_product(q: torch.Tensor, weight: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    """FBGEMM's integer product of ``q`` (whole numbers on its grid, 0..127 or 0..255, each row spanning it, so
    the kernel's own quantization gives ``q`` back) with the int8 ``weight``, as float64."""
    levels = 127 if reduce_range else 255
    return linear_dynamic(q / levels, pack(weight, torch.ones(weight.shape[0])), reduce_range).double() * levels


def pack(weight: torch.Tensor, scale: torch.Tensor) -> Any:
    """A per-channel int8 weight (``scale`` per output row) in FBGEMM's packed form (made anew)."""
    n = weight.shape[0]
    scale = scale.double().flatten().expand(n).contiguous()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        q = torch._make_per_channel_quantized_tensor(weight, scale, torch.zeros(n, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(q, None)


def packed(weight: torch.Tensor, scale: torch.Tensor) -> Any:
    """The packed form of ``weight``, made once per weight tensor (again if it is changed in place)."""
    entry = _PACKED.get(id(weight))
    versions = (weight._version, scale._version)
    if entry is not None and entry[0]() is weight and entry[1]() is scale and entry[2] == versions:
        return entry[3]
    made = pack(weight, scale)
    key = id(weight)
    if entry is None:
        weakref.finalize(weight, _PACKED.pop, key, None)
    _PACKED[key] = (weakref.ref(weight), weakref.ref(scale), versions, made)
    return made


def linear_dynamic(x: torch.Tensor, packed_weight: Any, reduce_range: bool) -> torch.Tensor:
    """``x @ dequant(W)^T``, ``x`` quantized with one scale from its own range (8 bits, or 7: ``reduce_range``)."""
    return torch.ops.quantized.linear_dynamic(x.contiguous(), packed_weight, reduce_range)


def linear_static(x: torch.Tensor, scale: float, zero_point: int, packed_weight: Any) -> torch.Tensor:
    """``x @ dequant(W)^T``, ``x`` quantized on a fixed unsigned grid (``scale``, ``zero_point``)."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x.contiguous(), scale, zero_point,
                                                                             packed_weight)


def eager_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    return linear_dynamic(x, packed(weight, scale), reduce_range)


@torch.library.custom_op("quantserve::fbgemm_linear", mutates_args=())
def graph_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    """:func:`eager_linear` as a custom op, so compiled graphs call it as one opaque kernel.

    Eager forwards call :func:`eager_linear` itself: the op's dispatch costs ~30 us a call, more than a
    one-row product.
    """
    return eager_linear(x, weight, scale, reduce_range)


@graph_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
