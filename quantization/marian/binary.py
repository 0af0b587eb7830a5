"""Reader for Marian's binary model format (``model.*.bin``), as the Bergamot models ship it.

Layout (little-endian): uint64 version (1), uint64 count N, N headers of four uint64 (name
length with its NUL, type, number of shape dimensions, data bytes), the N NUL-terminated names,
the shapes (int32 each), a uint64 padding count and that many bytes (data starts aligned), then
each tensor's data in header order.

Types: 0x404 is float32. 0x4101 is intgemm int8: rows x cols int8 values followed by a float32
quantization multiplier (value = int8 / multiplier; padding fills the block). Marian's converter
stores every int8 matrix except ``Wemb`` transposed (its "architecture independent" intgemm
layout) while keeping the header's [in, out] shape, so those blocks already read as
[out, in] row-major: exactly ``nn.Linear``'s weight layout. ``Wemb`` is stored as it is used,
[vocab, dim].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

FLOAT32 = 0x404
INTGEMM8 = 0x4101
TEXT = 0x101  # int8 bytes; Marian stores the model's YAML config as ``special:model.yml``


@dataclass
class MarianTensor:
    name: str
    shape: tuple[int, ...]
    kind: int
    values: np.ndarray  # float32, shaped as stored (see the module docstring); empty for text
    multiplier: float | None = None  # int8 tensors only: value = int8 / multiplier
    text: str | None = None  # ``special:*`` entries


def read_marian_binary(path: str | Path) -> dict[str, MarianTensor]:
    path = Path(path)
    data = path.read_bytes()

    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is not a Marian binary model ({why}); give a model.*.bin file")

    if len(data) < 16:
        raise bad("too short")
    version, count = struct.unpack_from("<QQ", data, 0)
    if version != 1 or not 0 < count < 100_000:
        raise bad(f"version {version}, {count} tensors")
    offset = 16
    try:
        headers = [struct.unpack_from("<QQQQ", data, offset + 32 * i) for i in range(count)]
        offset += 32 * count
        names = []
        for name_len, *_ in headers:
            names.append(data[offset:offset + name_len - 1].decode("utf-8"))
            offset += name_len
        shapes = []
        for _, _, dims, _ in headers:
            shapes.append(tuple(struct.unpack_from(f"<{dims}i", data, offset)))
            offset += 4 * dims
        (padding,) = struct.unpack_from("<Q", data, offset)
        offset += 8 + padding
    except (struct.error, UnicodeDecodeError) as exc:
        raise bad(f"unreadable header: {exc}") from None
    tensors: dict[str, MarianTensor] = {}
    for name, (_, kind, _, nbytes), shape in zip(names, headers, shapes):
        block = data[offset:offset + nbytes]
        if len(block) != nbytes:
            raise bad(f"tensor {name!r} runs past the end of the file")
        offset += nbytes
        elements = int(np.prod(shape))
        if kind == FLOAT32:
            values = np.frombuffer(block, dtype="<f4", count=elements).reshape(shape).copy()
            tensors[name] = MarianTensor(name, shape, kind, values)
        elif kind == INTGEMM8:
            q = np.frombuffer(block, dtype=np.int8, count=elements)
            (multiplier,) = struct.unpack_from("<f", block, elements)
            stored = shape if name == "Wemb" else shape[::-1]
            values = (q.astype(np.float32) / np.float32(multiplier)).reshape(stored)
            tensors[name] = MarianTensor(name, shape, kind, values, float(multiplier))
        elif kind == TEXT and name.startswith("special:"):
            text = block.split(b"\0", 1)[0].decode("utf-8")
            tensors[name] = MarianTensor(name, shape, kind, np.empty(0, np.float32), text=text)
        else:
            raise bad(f"tensor {name!r} has type {kind:#x}; only float32 (0x404) and intgemm8 (0x4101) are read")
    return tensors
