"""Marian's binary lexical shortlist (``lex.*.s2t.bin``): which target words may follow a source.

Layout (little-endian): six uint64 (magic 0xF11A48D5013417F5, checksum, ``frequent``, ``best``,
length of the offset table, length of the list), the offset table (uint64, one per source
word plus one), then the target word ids (uint32). A sentence's shortlist is the ``frequent``
most frequent target ids (0 .. frequent-1) plus, for each distinct source id ``w``, the ids
``list[offset[w]:offset[w+1]]``; Marian pads it with the next unused ids to a multiple of 8
(for its int8 GEMM), and this reader does the same so the candidate sets agree.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError

MAGIC = 0xF11A48D5013417F5
ALIGNMENT = 8


class Shortlist:
    def __init__(self, path: str | Path, vocab_size: int) -> None:
        path = Path(path)
        data = path.read_bytes()
        if len(data) < 48:
            raise ModelLoadError(f"{path} is too short to be a Marian binary shortlist")
        magic, _checksum, frequent, best, n_offsets, n_words = struct.unpack_from("<6Q", data, 0)
        expected = 48 + 8 * n_offsets + 4 * n_words
        if magic != MAGIC or expected != len(data):
            raise ModelLoadError(f"{path} is not a Marian binary shortlist (magic {magic:#x}, {len(data)} bytes "
                                 f"where the header implies {expected})")
        self.frequent, self.best, self.vocab_size = int(frequent), int(best), vocab_size
        self.offsets = np.frombuffer(data, dtype="<u8", count=n_offsets, offset=48).astype(np.int64)
        self.words = np.frombuffer(data, dtype="<u4", count=n_words, offset=48 + 8 * n_offsets).astype(np.int64)
        if self.offsets[-1] != n_words or (self.words >= vocab_size).any():
            raise ModelLoadError(f"{path}: offsets or word ids out of range for a vocabulary of {vocab_size}")

    def __deepcopy__(self, memo: dict) -> "Shortlist":
        return self  # read-only tables: every variant of a model shares them

    def allowed(self, source_ids: list[int]) -> torch.Tensor:
        """Boolean mask [vocab] of the target ids this source sentence may produce."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[: self.frequent] = True
        for w in set(source_ids):
            if 0 <= w < len(self.offsets) - 1:
                mask[self.words[self.offsets[w]:self.offsets[w + 1]]] = True
        missing = (-int(mask.sum())) % ALIGNMENT
        if missing:
            free = np.flatnonzero(~mask[self.frequent:])[:missing] + self.frequent
            mask[free] = True
        return torch.from_numpy(mask)
