"""``qat-int8``: quantization-aware training, converted to the ``static-int8`` runtime.

Built by the registry from an FP32 model alone, it has no labels to train on, so it fine-tunes
by distillation: the fake-quantized copy learns to reproduce the FP32 model's outputs on the
calibration texts (``steps`` optimiser steps; 0 only calibrates the activation observers, which
gives a min-max static int8 model). Training on labelled data, which lets the weights adapt to
the task itself, is done by ``python -m quantization finetune --qat`` (:mod:`quantization.finetune`),
which saves the converted model as a ``qat-int8`` artifact next to the trained model.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..qat import convert_qat, fake_quant_layers, prepare_qat
from .base import Batch, Strategy, StrategyParams, register


class QatParams(StrategyParams):
    steps: int = Field(0, ge=0, le=100_000, description="distillation steps on the calibration texts (0: calibrate "
                                                         "the fake-quantization ranges only)")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate of the distillation steps")
    act_averaging: float = Field(0.01, gt=0.0, le=1.0, description="moving-average constant of the activation "
                                                                  "range observers")


@register
class QatInt8(Strategy):
    name = "qat-int8"
    summary = ("quantization-aware training: fake int8 weights and activations with straight-through gradients, "
               "then int8 GEMM layers as static-int8's (labelled training: `python -m quantization finetune --qat`)")
    Params = QatParams
    needs_calibration = True

    def __init__(self, params: QatParams) -> None:
        super().__init__(params)
        self.qat: nn.Module | None = None
        self.losses: list[float] = []

    @classmethod
    def from_trained(cls, qat: nn.Module, params: QatParams | None = None) -> "QatInt8":
        """The strategy holding a model already trained with fake quantization (``prepare`` is skipped)."""
        impl = cls(params or QatParams())
        impl.qat = qat.eval()
        return impl

    def prepare(self, module: nn.Module, calibration: list[Batch] | None) -> None:
        p: QatParams = self.params  # type: ignore[assignment]
        self.qat = prepare_qat(module, self.units(module), p.act_averaging)
        batches = list(calibration or [])
        self.qat.train()
        with torch.no_grad():  # first pass: the observers see real activations before any step
            for batch in batches:
                self.qat(**batch)
        if p.steps:
            self.losses = distill(self.qat, module, batches, p.steps, p.lr, self.progress)
        self.qat.eval()

    def build(self, module: nn.Module, kept: frozenset[str]) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
        variant = convert_qat(self.qat, kept)
        layers = {}
        for name, fq in fake_quant_layers(self.qat).items():
            if name in kept:
                continue
            if fq.frozen_act_qparams is None:
                obs = fq.act_observer.summary()
                activation = {k: obs[k] for k in ("observer", "scheme", "chosen_min", "chosen_max", "scale",
                                                  "zero_point")}
            else:
                qp = fq.frozen_act_qparams
                activation = {"observer": "fixed: calibrated by static-int8 before training",
                              "scale": float(qp.scale), "zero_point": int(qp.zero_point)}
            layers[name] = {"kind": "static-int8", "weight_granularity": "channel", "activation": activation}
        return variant, layers

    def notes(self) -> dict[str, Any]:
        return {"distillation_steps": len(self.losses),
                "distillation_loss": {"first": self.losses[0], "last": self.losses[-1]} if self.losses else None}


def distill(student: nn.Module, teacher: nn.Module, batches: list[Batch], steps: int, lr: float,
            progress: Any) -> list[float]:
    """``steps`` AdamW steps pulling the fake-quantized student's outputs towards the FP32 teacher's."""
    with torch.no_grad():
        targets = [teacher(**b).float() for b in batches]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        i = step % len(batches)
        loss = nn.functional.mse_loss(student(**batches[i]).float(), targets[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress("distillation steps", step + 1, steps)
    return losses
