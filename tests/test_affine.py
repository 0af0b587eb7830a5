"""Properties of the affine primitives, for every bit width, scheme and granularity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantization.affine import (QScheme, choose_qparams, compute_qparams, dequantize, error_stats, fake_quantize,
                                 quantize, sqnr_db)
from quantization.errors import InvalidConfigError

bits_st = st.integers(min_value=2, max_value=8)
schemes = st.builds(QScheme, bits=bits_st, symmetric=st.booleans(), signed=st.booleans())


@st.composite
def tensors(draw, min_dims=1, max_dims=3):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=min_dims, max_size=max_dims)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if draw(st.booleans()):
        x = x + draw(st.floats(-3, 3)) * scale  # shift: asymmetric ranges
    return x


@settings(max_examples=150, deadline=None)
@given(x=tensors(), scheme=schemes)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(x, scheme):
    qp = choose_qparams(x, scheme)
    err = (fake_quantize(x, qp) - x).abs()
    # inside the representable range every value lands within s/2 (plus float rounding slack)
    assert bool(torch.all(err <= qp.scale / 2 * (1 + 1e-4) + 1e-7)), (err.max(), qp.scale)


@settings(max_examples=100, deadline=None)
@given(x=tensors(), scheme=schemes)
def test_zero_is_exactly_representable(x, scheme):
    qp = choose_qparams(x, scheme)
    zero = torch.zeros_like(x)
    assert torch.equal(dequantize(quantize(zero, qp), qp), zero)
    assert bool(torch.all(quantize(zero, qp).to(torch.int32) == qp.zero_point))


@settings(max_examples=100, deadline=None)
@given(x=tensors(min_dims=2, max_dims=3), bits=bits_st, symmetric=st.booleans(), data=st.data())
def test_per_channel_steps_and_error_bound_never_exceed_per_tensor(x, bits, symmetric, data):
    axis = data.draw(st.integers(0, x.dim() - 1))
    qt = choose_qparams(x, QScheme(bits, symmetric, True))
    qc = choose_qparams(x, QScheme(bits, symmetric, True, "channel", axis))
    assert bool(torch.all(qc.scale <= qt.scale * (1 + 1e-6)))
    assert float((fake_quantize(x, qc) - x).abs().max()) <= float(qt.scale) / 2 * (1 + 1e-4) + 1e-7


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_mse_is_below_per_tensor_mse_on_channels_of_different_scale(seed, bits):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 64, generator=g) * torch.logspace(-2, 1, 16)[:, None]
    for symmetric in (True, False):
        e_t = error_stats(x, fake_quantize(x, choose_qparams(x, QScheme(bits, symmetric))))["mse"]
        e_c = error_stats(x, fake_quantize(x, choose_qparams(x, QScheme(bits, symmetric, True, "channel", 0))))["mse"]
        assert e_c <= e_t


@settings(max_examples=100, deadline=None)
@given(x=tensors(), scheme=schemes, factor=st.floats(0.05, 0.9))
def test_values_outside_the_range_clamp_to_the_grid_ends(x, scheme, factor):
    lo, hi = float(x.min()), float(x.max())
    qp = compute_qparams(lo * factor, hi * factor, scheme)
    q = quantize(x, qp).to(torch.int32)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    big = torch.tensor([1e9, -1e9])
    qb = quantize(big, qp).to(torch.int32)
    assert int(qb[0]) == scheme.qmax and int(qb[1]) == scheme.qmin


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_limits_follow_the_textbook(bits):
    assert QScheme(bits, symmetric=False, signed=True).qmin == -(2 ** (bits - 1))
    assert QScheme(bits, symmetric=True, signed=True).qmin == -(2 ** (bits - 1)) + 1
    assert QScheme(bits, symmetric=True, signed=True).qmax == 2 ** (bits - 1) - 1
    assert (QScheme(bits, signed=False).qmin, QScheme(bits, signed=False).qmax) == (0, 2**bits - 1)


def test_formulas_match_the_definition_on_a_worked_example():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    qp = compute_qparams(-1.0, 3.0, QScheme(8, symmetric=False, signed=False))
    s = 4.0 / 255
    z = round(1.0 / s)
    assert float(qp.scale) == pytest.approx(s)
    assert int(qp.zero_point) == z
    expected = torch.clamp(torch.round(x / s) + z, 0, 255)
    assert torch.equal(quantize(x, qp).to(torch.float32), expected)
    assert torch.allclose(dequantize(quantize(x, qp), qp), (expected - z) * s)


def test_per_group_scales_follow_groups_along_the_axis():
    x = torch.cat([torch.full((2, 4), 0.01), torch.full((2, 4), 100.0)], dim=1)
    scheme = QScheme(4, True, True, "group", axis=1, group_size=4)
    qp = choose_qparams(x, scheme)
    assert qp.scale.numel() == 4  # 2 rows x 2 groups
    assert torch.allclose(fake_quantize(x, qp), x)


@pytest.mark.parametrize("bad", [1, 9, 0, 16])
def test_bits_out_of_range_are_refused(bad):
    with pytest.raises(InvalidConfigError, match="bits must be an integer from 2 to 8"):
        QScheme(bits=bad)


def test_group_size_that_does_not_divide_names_divisors():
    with pytest.raises(InvalidConfigError, match="does not divide.*384"):
        choose_qparams(torch.randn(4, 384), QScheme(4, granularity="group", axis=1, group_size=100))


def test_error_measures():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert sqnr_db(x, x) == math.inf
    stats = error_stats(x, x + 0.1)
    assert stats["mse"] == pytest.approx(0.01, rel=1e-5)
    assert stats["max_abs_error"] == pytest.approx(0.1, rel=1e-5)
    assert stats["sqnr_db"] == pytest.approx(10 * math.log10(14 / 0.03), rel=1e-5)
