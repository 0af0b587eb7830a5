"""Bad input to the library gets a clear error naming what is valid."""

from __future__ import annotations

import pytest
from torch import nn

from quantization.errors import CalibrationError, InvalidConfigError, NoQuantizableLayersError, UnknownStrategyError
from quantization.pipeline import quantize_model
from quantization.strategies import quantize, strategy_names


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(UnknownStrategyError) as err:
        quantize(nn.Linear(4, 4), "int3")
    for name in strategy_names():
        assert name in str(err.value)


@pytest.mark.parametrize("strategy", ["dynamic-int8", "weight-only-int4", "bf16", "weight-sharing"])
def test_a_model_without_linear_layers_is_refused(strategy):
    with pytest.raises(NoQuantizableLayersError, match="found no layer it can quantize"):
        quantize(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), strategy)


def test_empty_calibration_set_is_refused(minilm):
    with pytest.raises(CalibrationError, match="needs sample texts"):
        quantize_model(minilm, "static-int8", calibration=[])
    with pytest.raises(CalibrationError, match="give calibration texts or set smooth_alpha to null"):
        quantize_model(minilm, "dynamic-int8", calibration=[])


@pytest.mark.parametrize("strategy, params, message", [
    ("dynamic-int8", {"weight_granularity": "row"}, "weight_granularity"),
    ("static-int8", {"act_observer": "kl"}, "'minmax', 'moving-average', 'percentile' or 'mse'"),
    ("static-int8", {"smooth_alpha": 2}, "smooth_alpha"),
    ("dynamic-int8", {"auto_target": 1.5}, "auto_target"),
    ("fp16", {"bits": 4}, "unknown parameter 'bits'"),
])
def test_bad_parameters_name_the_field_and_the_limit(strategy, params, message):
    with pytest.raises(InvalidConfigError, match=message):
        quantize(nn.Linear(8, 8), strategy, params)
