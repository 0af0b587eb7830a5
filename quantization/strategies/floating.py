"""Floating-point variants: the FP32 baseline, and FP16 / BF16.

Where the CPU multiplies the half type natively (bf16: AVX-512 BF16 or AMX; fp16: AVX-512 FP16), the
whole model is cast, and layers kept by mixed precision run in FP32 inside a small island that casts
their input up and their output back down. Elsewhere a half-precision matmul runs on slow generic
code (bf16 at 1.2 GFLOP/s against FP32's 90 on an AVX2 EPYC: 75x slower), so by default
(``compute: auto``) only the Linear weights are *stored* in the half type and every product is
computed in FP32: half the weight memory, FP32's speed, and the half type's rounding of the weights.
``compute: native`` casts regardless.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cpu import profile as cpu_profile
from ..layers import QuantizedLinear
from .base import Strategy, StrategyParams, register, set_submodule


@register
class FP32(Strategy):
    name = "fp32"
    summary = "the FP32 baseline, untouched"

    def build(self, module: nn.Module, kept: frozenset[str]):
        return module, {}


class Float32Island(nn.Module):
    """Runs a module in FP32 inside a half-precision model."""

    def __init__(self, module: nn.Module, outer_dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.float()
        self.outer_dtype = outer_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(self.outer_dtype)


class HalfStoredLinear(QuantizedLinear):
    """A Linear whose weight is stored in float16 or bfloat16 and multiplied in FP32."""

    kind = "half-storage"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: str = "bfloat16") -> None:
        super().__init__(in_features, out_features, has_bias)
        self.dtype_name = dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=getattr(torch, dtype)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "HalfStoredLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    str(dtype).replace("torch.", ""))
        layer.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def config(self) -> dict[str, Any]:
        return {**super().config(), "dtype": self.dtype_name}

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float(), self.bias)


class HalfParams(StrategyParams):
    compute: Literal["auto", "native", "fp32"] = Field(
        "auto", description="auto: cast the whole model where this CPU multiplies the half type natively, "
                            "otherwise store Linear weights in it and compute in FP32; native: cast regardless "
                            "(slow without native kernels); fp32: always store-only")


class _HalfCast(Strategy):
    dtype: ClassVar[torch.dtype]
    Params = HalfParams

    def native(self) -> bool:
        prof = cpu_profile()
        return prof.bf16_gemm if self.dtype == torch.bfloat16 else prof.fp16_gemm

    def mode(self) -> str:
        compute = self.params.compute  # type: ignore[attr-defined]
        if compute == "auto":
            return "native" if self.native() else "fp32"
        return compute

    def build(self, module: nn.Module, kept: frozenset[str]):
        kind = str(self.dtype).replace("torch.", "")
        if self.mode() == "fp32":
            variant = copy.deepcopy(module)
            layers: dict[str, dict[str, Any]] = {}
            for name in self.units(module):
                if name not in kept:
                    set_submodule(variant, name, HalfStoredLinear.from_linear(module.get_submodule(name), self.dtype))
                    layers[name] = {"kind": f"{kind} storage, fp32 compute"}
            return variant.eval(), layers
        variant = copy.deepcopy(module).to(self.dtype)  # a real copy: casting shared tensors would change FP32
        for name in kept:
            set_submodule(variant, name, Float32Island(copy.deepcopy(module.get_submodule(name)), self.dtype))
        layers = {n: {"kind": kind} for n in self.units(module) if n not in kept}
        return variant.eval(), layers

    def notes(self) -> dict[str, Any]:
        kind = str(self.dtype).replace("torch.", "")
        if self.mode() == "fp32":
            why = ("asked for" if self.params.compute == "fp32" else  # type: ignore[attr-defined]
                   f"this CPU ({cpu_profile().isa}) has no native {kind} matrix multiply")
            return {"scope": f"Linear weights stored in {kind}, every product computed in FP32 ({why}); "
                             f"embeddings and norms stay FP32", "compute": "fp32"}
        return {"scope": "every parameter (embeddings and norms included) is cast; kept layers run in FP32",
                "compute": kind}


@register
class FP16(_HalfCast):
    name = "fp16"
    summary = "whole model cast to float16"
    dtype = torch.float16


@register
class BF16(_HalfCast):
    name = "bf16"
    summary = "whole model cast to bfloat16 (AVX-512 BF16 kernels where the CPU has them)"
    dtype = torch.bfloat16
