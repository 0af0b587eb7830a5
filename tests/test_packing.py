"""Bit packing: exact round trips for every width, the dense size, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantization.errors import InvalidConfigError
from quantization.packing import pack_bits, packed_size, unpack_bits

bits_st = st.integers(min_value=1, max_value=8)


@st.composite
def codes(draw: st.DrawFn) -> tuple[int, torch.Tensor]:
    bits = draw(bits_st)
    n = draw(st.integers(min_value=0, max_value=300))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)
    if n:  # always include the extremes, where a lost high bit would show
        values[draw(st.integers(0, n - 1))] = 2**bits - 1
        values[draw(st.integers(0, n - 1))] = 0
    return bits, values


@settings(max_examples=300, deadline=None)
@given(codes())
def test_round_trip_and_dense_size(case: tuple[int, torch.Tensor]) -> None:
    bits, values = case
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(values.numel() * bits / 8) == packed_size(values.numel(), bits)
    out = unpack_bits(packed, bits, values.numel())
    assert out.dtype == torch.uint8
    assert torch.equal(out, values)


@settings(max_examples=100, deadline=None)
@given(codes(), st.integers(min_value=1, max_value=5))
def test_round_trip_keeps_shape_free_and_prefix(case: tuple[int, torch.Tensor], rows: int) -> None:
    """Any shape packs as its flattened values, and unpacking fewer values gives the prefix."""
    bits, values = case
    grid = values.repeat(rows).reshape(rows, -1)
    packed = pack_bits(grid, bits)
    assert torch.equal(unpack_bits(packed, bits, grid.numel()), grid.reshape(-1))
    head = values.numel() // 2
    assert torch.equal(unpack_bits(packed, bits, head), values[:head])


@settings(max_examples=100, deadline=None)
@given(bits_st, st.integers(min_value=1, max_value=64), st.booleans())
def test_out_of_range_values_rejected(bits: int, n: int, negative: bool) -> None:
    values = torch.zeros(n, dtype=torch.int16)
    values[n // 2] = -1 if negative else 2**bits
    with pytest.raises(InvalidConfigError, match=r"\[0, \d+\]"):
        pack_bits(values, bits)


def test_little_endian_layout() -> None:
    # 1 | 2 << 3 | 3 << 6 = 209; the top bit of 3 spills into the second byte
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [209, 0]
    assert pack_bits(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b10001101, 1]


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits_rejected(bits: object) -> None:
    with pytest.raises(InvalidConfigError, match="bits must be an integer from 1 to 8"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="bits must be an integer from 1 to 8"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)  # type: ignore[arg-type]


def test_other_misuse_rejected() -> None:
    with pytest.raises(InvalidConfigError, match="integer tensor"):
        pack_bits(torch.zeros(4), 4)
    with pytest.raises(InvalidConfigError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)
    with pytest.raises(InvalidConfigError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int8), 4, 3)
