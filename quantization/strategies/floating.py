"""Floating-point variants: the FP32 baseline, and whole-model FP16 / BF16 casts.

In the half-precision variants, layers kept by mixed precision run in FP32 inside a small island
that casts their input up and their output back down.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from . import register
from .base import Strategy, set_submodule


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


class _HalfCast(Strategy):
    dtype: ClassVar[torch.dtype]

    def build(self, module: nn.Module, kept: frozenset[str]):
        variant = copy.deepcopy(module).to(self.dtype)  # a real copy: casting shared tensors would change FP32
        for name in kept:
            set_submodule(variant, name, Float32Island(copy.deepcopy(module.get_submodule(name)), self.dtype))
        kind = str(self.dtype).replace("torch.", "")
        layers: dict[str, dict[str, Any]] = {n: {"kind": kind} for n in self.units(module) if n not in kept}
        return variant.eval(), layers

    def notes(self) -> dict[str, Any]:
        return {"scope": "every parameter (embeddings and norms included) is cast; kept layers run in FP32"}


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
