"""torch: any ``nn.Module``, eager or compiled (torch.compile is its serving form, not another runtime).

Stored as a safetensors state dict plus the config of every quantized layer, rebuilt on a copy of
the FP32 model that shares every tensor the variant did not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..layers import QuantizedLinear
from .base import Runtime, register

WEIGHTS_FILE = "weights.safetensors"


@register
class Torch(Runtime):
    name = "torch"
    compilable = True

    @classmethod
    def save(cls, module: Any, directory: Path) -> tuple[list[str], dict[str, Any]]:
        from safetensors.torch import save_model

        save_model(module, str(directory / WEIGHTS_FILE))
        return [WEIGHTS_FILE], {name: m.config() for name, m in module.named_modules() if isinstance(m, QuantizedLinear)}

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any], tm: Any) -> Any:
        from ..strategies import get_strategy, parse_params
        from ..strategies.base import set_submodule, share_copy

        strategy_cls = get_strategy(manifest["strategy"])  # also registers every layer kind
        configs = manifest.get("layer_configs") or {}
        if configs:
            module = share_copy(tm.module)
            for name, config in configs.items():
                try:
                    set_submodule(module, name, QuantizedLinear.from_config(config))
                except (AttributeError, KeyError, TypeError) as exc:
                    raise ArtifactError(f"artifact layer {name!r} does not fit model {tm.name!r} ({exc}); "
                                        "quantize this model again") from None
        else:  # floating-point variants: casting again is cheaper than storing a skeleton
            impl = strategy_cls(parse_params(strategy_cls, manifest["params"]))
            module, _ = impl.build(tm.module, frozenset(manifest.get("kept", [])))
            if module is tm.module:
                module = share_copy(tm.module)
        try:
            _load_weights(module, directory / WEIGHTS_FILE)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ArtifactError(f"artifact weights in {directory} do not fit model {tm.name!r} ({str(exc)[:200]}); "
                                "quantize this model again") from None
        return module.eval()

    @classmethod
    def stored_bytes(cls, module: Any) -> int:
        """The safetensors bytes of its state dict, tied tensors once."""
        from safetensors.torch import save

        state = {}
        seen: set[tuple[int, int]] = set()
        for name, t in module.state_dict().items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key in seen:  # tied weights are stored once
                continue
            seen.add(key)
            state[name] = t.detach().contiguous()
        return len(save(state))


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a saved state dict into ``module``, a copy that shares its tensors with the FP32 model.

    Tensors equal to the shared ones stay shared (no extra memory); the others (a QAT-trained
    variant's layer norms and embeddings differ from the FP32 model's) are put in place of the
    shared tensor rather than copied into it, which would overwrite the FP32 model.
    """
    from safetensors.torch import load_file

    saved = load_file(str(path))
    current = module.state_dict()
    for name, tensor in saved.items():
        if name in current and current[name].shape == tensor.shape and torch.equal(current[name], tensor):
            saved[name] = current[name]
    # save_model keeps one name of each group of tied tensors: tie the others to it again
    by_storage = {current[n].data_ptr(): n for n in saved if n in current}
    for name in current.keys() - saved.keys():
        twin = by_storage.get(current[name].data_ptr())
        if twin is None:
            raise KeyError(f"the artifact has no tensor {name!r}")
        saved[name] = saved[twin]
    module.load_state_dict(saved, strict=True, assign=True)
