"""int8 GEMM strategies: dynamic (activation ranges per batch) and static (ranges calibrated).

Both store symmetric int8 weights with one scale per output channel by default and run the
matrix multiply in int8 (``torch._int_mm``). Why per-channel weights and per-token activations
are the defaults: torch's stock ``quantize_dynamic`` uses one scale for a whole weight matrix and
one for a whole batch of activations, so a single outlier (MiniLM's FFN output weights reach 79x
their standard deviation; a few activation channels dwarf the rest) sets the step size for every
other value. See README, "What limits INT8 fidelity".
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import CalibrationError
from ..calibration import collect_layer_inputs, smoothing_factors
from ..layers import DynamicInt8Linear, StaticInt8Linear, static_act_scheme, weight_scheme
from ..observers import Observer, make_observer
from .base import Batch, LayerwiseStrategy, StrategyParams, register

ObserverName = Literal["minmax", "moving-average", "percentile", "mse"]


class Int8WeightParams(StrategyParams):
    weight_granularity: Literal["channel", "tensor"] = Field(
        "channel", description="one weight scale per output channel, or one per matrix")
    weight_observer: Literal["minmax", "mse"] = Field(
        "minmax", description="how weight ranges are chosen: full range, or MSE-optimal clipping")


def _weight_observer(p: Int8WeightParams) -> Observer | None:
    if p.weight_observer == "minmax":
        return None
    return make_observer(p.weight_observer, weight_scheme(p.weight_granularity))


SMOOTH_DESCRIPTION = ("SmoothQuant migration strength: divide activation channel j by max|x_j|^a / max|w_j|^(1-a) "
                      "(measured on calibration texts) and fold it into the weights; null turns smoothing off")
SMOOTH_FLOOR_DESCRIPTION = (
    "smoothing counts each activation channel's calibration maximum as at least this multiple of the layer's "
    "median channel maximum, so a channel the calibration texts never used (a ReLU output that stayed 0) is not "
    "divided by ~0 once real input uses it (Bergamot pt-en, 32 hard sentences: 0% identical to FP32 at 0, 88% "
    "at 0.5; MiniLM min cosine 0.9956 -> 0.9949)")


def _smooth_floor() -> Any:
    return Field(0.5, ge=0.0, le=10.0, description=SMOOTH_FLOOR_DESCRIPTION)


class DynamicParams(Int8WeightParams):
    act_granularity: Literal["token", "tensor"] = Field(
        "token", description="activation scale per token (row), or one per batch as torch's quantize_dynamic does")
    act_symmetric: bool = Field(False, description="symmetric activation range (zero point 0); asymmetric uses the int8 grid better for GELU outputs")
    smooth_alpha: float | None = Field(0.5, ge=0.0, le=1.0, description=SMOOTH_DESCRIPTION)
    smooth_floor: float = _smooth_floor()
    smooth_jointly: bool = Field(
        True, description="one smoothing vector for layers that read the same input (attention's query, key and "
                          "value), so that compiled forwards run them as one GEMM; per-layer vectors fit each "
                          "layer slightly better (MiniLM cosine 0.9993 / 0.9956 jointly, 0.9994 / 0.9962 per "
                          "layer; Bergamot en-pt: 94% / 99% of translations identical to FP32), which is worth "
                          "it where nothing is compiled")


@register
class DynamicInt8(LayerwiseStrategy):
    name = "dynamic-int8"
    summary = ("int8 weights (per-channel); activations quantized at run time per token; int8 GEMM; "
               "SmoothQuant factors measured on calibration texts")
    Params = DynamicParams

    def __init__(self, params: DynamicParams) -> None:
        super().__init__(params)
        self.smooth: dict[str, torch.Tensor] = {}

    def prepare(self, module: nn.Module, calibration: list[Batch] | None) -> None:
        p: DynamicParams = self.params  # type: ignore[assignment]
        if p.smooth_alpha is None:
            return
        if not calibration:
            raise CalibrationError("dynamic-int8 with smooth_alpha measures activation channels on sample texts; "
                                   "give calibration texts or set smooth_alpha to null")
        self.smooth = smoothing_factors(module, self.units(module), calibration, p.smooth_alpha,
                                         joint=p.smooth_jointly, floor=p.smooth_floor)

    def convert(self, name: str, linear: nn.Linear) -> nn.Module:
        p: DynamicParams = self.params  # type: ignore[assignment]
        return DynamicInt8Linear.from_linear(
            linear, _weight_observer(p), smooth=self.smooth.get(name), weight_granularity=p.weight_granularity,
            act_granularity=p.act_granularity, act_symmetric=p.act_symmetric)


class StaticParams(Int8WeightParams):
    act_observer: ObserverName = Field("percentile", description="how activation ranges are chosen from calibration data")
    act_percentile: float = Field(99.99, gt=50.0, le=100.0, description="percentile for the percentile observer")
    act_symmetric: bool = Field(False, description="symmetric activation range; asymmetric suits GELU outputs")
    smooth_alpha: float | None = Field(0.8, ge=0.0, le=1.0, description=SMOOTH_DESCRIPTION)
    smooth_floor: float = _smooth_floor()


@register
class StaticInt8(LayerwiseStrategy):
    name = "static-int8"
    summary = "int8 weights and activations; activation ranges fixed by calibration on sample texts; int8 GEMM"
    Params = StaticParams
    needs_calibration = True

    def __init__(self, params: StaticParams) -> None:
        super().__init__(params)
        self.act_observers: dict[str, Observer] = {}
        self.smooth: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def prepare(self, module: nn.Module, calibration: list[Batch] | None) -> None:
        p: StaticParams = self.params  # type: ignore[assignment]
        names = self.units(module)
        self.tokens = int(sum(int(b["attention_mask"].sum()) for b in calibration or [] if "attention_mask" in b))
        if p.smooth_alpha is not None:
            self.smooth = smoothing_factors(module, names, calibration, p.smooth_alpha, floor=p.smooth_floor)
        options: dict[str, Any] = {"percentile": p.act_percentile} if p.act_observer == "percentile" else {}
        scheme = static_act_scheme(p.act_symmetric)
        self.act_observers = {n: make_observer(p.act_observer, scheme, **options) for n in names}

        def observe(name: str, x: torch.Tensor) -> None:
            if name in self.smooth:
                x = x / self.smooth[name]
            self.act_observers[name].observe(x)

        collect_layer_inputs(module, names, calibration, observe)

    def convert(self, name: str, linear: nn.Linear) -> nn.Module:
        p: StaticParams = self.params  # type: ignore[assignment]
        return StaticInt8Linear.from_linear(linear, self.act_observers[name].qparams(), smooth=self.smooth.get(name),
                                            weight_observer=_weight_observer(p), weight_granularity=p.weight_granularity)

    def describe_layer(self, name: str, layer: nn.Module) -> dict[str, Any]:
        out = super().describe_layer(name, layer)
        obs = self.act_observers[name].summary()
        out["activation"] = {k: obs[k] for k in ("observer", "scheme", "observed_min", "observed_max",
                                                 "chosen_min", "chosen_max", "scale", "zero_point")}
        return out

    def notes(self) -> dict[str, Any]:
        first = next(iter(self.act_observers.values()), None)
        return {"calibration_batches": first.count if first else 0,
                "calibration_tokens": self.tokens}
