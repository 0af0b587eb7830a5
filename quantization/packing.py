"""Dense bit packing of small unsigned integers, for storing 1..8-bit codes at their real size.

Values form one little-endian bit stream: value ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, least significant bit first, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``. ``count`` values take ``ceil(count * bits / 8)`` bytes, whatever
``bits`` is (3, 5, 6 and 7 included), so a 4-bit layer really stores half a byte per weight.

Why blocks: 8 / gcd(bits, 8) values fill exactly bits / gcd(bits, 8) bytes (at most 8 values in
7 bytes), so packing and unpacking are a few vectorised shifts per block in one integer word,
with no Python loop over elements. That keeps unpacking cheap enough to run in every forward.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidConfigError


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ceil(count * bits / 8)."""
    _check_bits(bits)
    if count < 0:
        raise InvalidConfigError(f"count must be non-negative, got {count}")
    return math.ceil(count * bits / 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (any shape, integers in [0, 2**bits)) into a 1-D uint8 tensor."""
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise InvalidConfigError(f"pack_bits needs an integer tensor, got {values.dtype}")
    flat = values.reshape(-1)
    n = flat.numel()
    if n:
        lo, hi = (int(t) for t in torch.aminmax(flat))
        if lo < 0 or hi >= 2**bits:
            raise InvalidConfigError(
                f"values must lie in [0, {2**bits - 1}] to pack in {bits} bits; got values from {lo} to {hi}"
            )
    per, nbytes, _ = _block(bits)
    blocks = math.ceil(n / per)
    v = flat.to(torch.int64)
    if blocks * per > n:  # complete the last block with zeros
        v = torch.cat([v, v.new_zeros(blocks * per - n)])
    words = (v.view(blocks, per) << _shifts(per, bits, v.device)).sum(dim=1, keepdim=True)  # disjoint bits
    out = ((words >> _shifts(nbytes, 8, v.device)) & 0xFF).to(torch.uint8).reshape(-1)
    size = packed_size(n, bits)
    return out if out.numel() == size else out[:size].clone()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` values of a stream written by :func:`pack_bits`, as a 1-D uint8 tensor."""
    codes = unpack_codes(packed, bits, count)
    return codes.clone() if bits == 8 else codes.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Like :func:`unpack_bits`, but in whichever integer dtype the unpacking produced.

    That is uint8 for 1, 2, 4 and 8 bits, int32 for 6 and int64 for 3, 5 and 7: fit for indexing
    or arithmetic as is (at 8 bits, a view of ``packed``: do not modify it). Quantized layers unpack in every forward, and on a busy CPU each extra
    elementwise pass over the weight costs milliseconds, so this skips the final conversion.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise InvalidConfigError(f"unpack_bits needs a uint8 tensor, got {packed.dtype}")
    need = packed_size(count, bits)
    flat = packed.reshape(-1)
    if flat.numel() < need:
        raise InvalidConfigError(
            f"{count} values of {bits} bits need {need} bytes, but the packed tensor has {flat.numel()}"
        )
    if bits == 8:
        return flat[:count]
    per, nbytes, dtype = _block(bits)
    blocks = math.ceil(count / per)
    b = flat[: blocks * nbytes]
    if b.numel() < blocks * nbytes:  # the last block is partial: complete it with zero bytes
        b = torch.cat([flat[:need], flat.new_zeros(blocks * nbytes - need)])
    if nbytes == 1:
        words = b.view(blocks, 1)
    else:
        words = (b.view(blocks, nbytes).to(dtype) << _shifts(nbytes, 8, b.device, dtype)).sum(
            dim=1, keepdim=True, dtype=dtype)
    values = (words >> _shifts(per, bits, b.device, words.dtype)) & (2**bits - 1)
    return values.reshape(-1)[:count]


def _block(bits: int) -> tuple[int, int, torch.dtype]:
    """Values per block, bytes per block, and an integer dtype wide enough for one block.

    The smallest whole number of bytes that holds whole values: 8 / gcd(bits, 8) values in
    bits / gcd(bits, 8) bytes (2 four-bit values in 1 byte, 4 six-bit values in 3 bytes, 8
    five-bit values in 5 bytes).
    """
    g = math.gcd(bits, 8)
    nbytes = bits // g
    return 8 // g, nbytes, (torch.uint8 if nbytes == 1 else torch.int32 if nbytes <= 3 else torch.int64)


def _shifts(n: int, step: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device).mul_(step).to(dtype)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise InvalidConfigError(f"bits must be an integer from 1 to 8, got {bits!r}")


__all__ = ["pack_bits", "unpack_bits", "unpack_codes", "packed_size"]
