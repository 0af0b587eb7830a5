"""Observers record what they saw and choose parameters that fit it."""

from __future__ import annotations

import pytest
import torch

from quantization.affine import QScheme, error_stats, fake_quantize
from quantization.errors import CalibrationError, InvalidConfigError
from quantization.observers import OBSERVERS, make_observer


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(8):
        x = torch.randn(16, 64, generator=g)
        x[:, 3] *= 40  # an outlier channel, as in transformer activations
        out.append(x)
    return out


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_every_observer_records_what_it_saw_and_what_it_chose(name):
    obs = make_observer(name, QScheme(8, symmetric=False))
    for x in _batches():
        obs.observe(x)
    s = obs.summary()
    allx = torch.cat(_batches())
    assert s["observations"] == 8 and s["elements"] == allx.numel()
    assert s["observed_min"] == pytest.approx(float(allx.min()))
    assert s["observed_max"] == pytest.approx(float(allx.max()))
    assert s["chosen_min"] <= 0 <= s["chosen_max"]
    assert error_stats(allx, fake_quantize(allx, obs.qparams()))["sqnr_db"] > 10


def test_percentile_and_mse_clip_inside_the_minmax_range():
    data = _batches()
    ranges = {}
    for name in ("minmax", "percentile", "mse"):
        obs = make_observer(name, QScheme(4, symmetric=True))
        for x in data:
            obs(x)
        ranges[name] = (obs.summary()["chosen_min"], obs.summary()["chosen_max"])
    assert ranges["percentile"][1] <= ranges["minmax"][1]
    assert ranges["mse"][1] <= ranges["minmax"][1]


def test_mse_search_beats_minmax_on_outlier_heavy_data_at_low_bits():
    allx = torch.cat(_batches())
    errs = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, QScheme(4, symmetric=True))
        obs(allx)
        errs[name] = error_stats(allx, fake_quantize(allx, obs.qparams()))["mse"]
    assert errs["mse"] < errs["minmax"]


def test_moving_average_follows_batches_not_the_single_extreme():
    obs = make_observer("moving-average", QScheme(8, symmetric=False), averaging_constant=0.1)
    for _ in range(20):
        obs(torch.linspace(-1, 1, 100))
    obs(torch.tensor([-100.0, 100.0]))
    s = obs.summary()
    assert s["observed_max"] == 100.0 and s["chosen_max"] < 15


def test_per_channel_observer_gives_one_scale_per_channel():
    obs = make_observer("minmax", QScheme(8, granularity="channel", axis=1))
    for x in _batches():
        obs(x)
    assert obs.qparams().scale.numel() == 64


def test_observer_without_data_refuses_to_choose():
    with pytest.raises(CalibrationError, match="saw no data"):
        make_observer("minmax").qparams()


def test_unknown_observer_lists_the_valid_ones():
    with pytest.raises(InvalidConfigError, match="choose one of: minmax, moving-average, percentile, mse"):
        make_observer("kl")
