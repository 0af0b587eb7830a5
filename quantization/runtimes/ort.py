"""onnxruntime: a quantized ONNX graph in an ONNX Runtime session (strategy onnx-int8).

Stored as the serialized graph itself, weights included: its length is what the variant stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Runtime, register

GRAPH_FILE = "model.onnx"


@register
class OnnxRuntime(Runtime):
    name = "onnxruntime"

    @classmethod
    def versions(cls) -> dict[str, str]:
        import onnxruntime

        return {**super().versions(), "onnxruntime": onnxruntime.__version__}

    @classmethod
    def save(cls, module: Any, directory: Path) -> tuple[list[str], dict[str, Any]]:
        (directory / GRAPH_FILE).write_bytes(module.model_bytes)
        return [GRAPH_FILE], {}

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any], tm: Any) -> Any:
        from ..strategies.onnx import OnnxRuntimeModule

        return OnnxRuntimeModule.from_file(directory / GRAPH_FILE)

    @classmethod
    def stored_bytes(cls, module: Any) -> int:
        return len(module.model_bytes)
