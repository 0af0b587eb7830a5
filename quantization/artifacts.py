"""Save a quantized variant and load it back without quantizing again.

An artifact is a directory:

    manifest.json      what it is: strategy, parameters, per-layer configs, the source model and
                       the sha256 of its weights, library / torch / onnxruntime versions, and the
                       sha256 of every file below
    weights.safetensors  the variant's state dict (torch runtimes), or
    model.onnx           the quantized graph (ONNX Runtime)

Loading needs the FP32 source (for the architecture and the layers that were not replaced) and
refuses, with a sentence saying why, an artifact whose files are corrupt, whose source model
hash differs from the model given, or that was written by other library / torch versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ArtifactError
from .layers import QuantizedLinear
from .task_model import TaskModel
from .tasks import get_task
from .strategies import QuantizedModel, get_strategy, parse_params
from .strategies.base import set_submodule, share_copy

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TORCH_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"

log = logging.getLogger(__name__)


def runtime_versions(runtime: str) -> dict[str, str]:
    versions = {"quantization": __version__, "torch": torch.__version__}
    if runtime == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return versions


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_beside(directory: str | Path, name: str, record: dict[str, Any]) -> bool:
    """Write ``record`` as ``name`` (JSON) into an artifact directory: measurements that belong beside a variant,
    such as the kernels or the auto candidate chosen for one CPU profile. False where the directory is read-only
    (the measurement is then made again next time)."""
    path = Path(directory) / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(record), indent=1))
        return True
    except OSError as exc:
        log.info("%s not saved: %s", path, exc)
        return False


def load_beside(directory: str | Path, name: str) -> dict[str, Any] | None:
    """A record :func:`save_beside` wrote, or None if there is none or it is unreadable."""
    try:
        record = json.loads((Path(directory) / name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def save_artifact(tm: TaskModel, qm: QuantizedModel, directory: str | Path) -> Path:
    """Write ``qm`` (made from ``tm``) to ``directory``; returns the manifest path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if qm.runtime == "onnxruntime":
        (out / ONNX_FILE).write_bytes(qm.module.model_bytes)
        files = [ONNX_FILE]
        layer_configs: dict[str, Any] = {}
    else:
        from safetensors.torch import save_model

        save_model(qm.module, str(out / TORCH_FILE))
        files = [TORCH_FILE]
        layer_configs = {name: m.config() for name, m in qm.module.named_modules()
                         if isinstance(m, QuantizedLinear)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"name": tm.name, "task": tm.task, "source": tm.source, "sha256": tm.source_hash},
        "strategy": qm.strategy,
        "params": qm.params,
        "runtime": qm.runtime,
        "kept": qm.kept,
        "layer_configs": layer_configs,
        "record": _json_safe(qm.record()),
        "versions": runtime_versions(qm.runtime),
        "files": {f: {"sha256": _sha256(out / f), "bytes": (out / f).stat().st_size} for f in files},
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; point at a directory written by `python -m quantization quantize --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is corrupt, quantize the model again") from None
    missing = [k for k in ("format_version", "source", "strategy", "params", "runtime", "versions", "files")
               if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; the artifact is incomplete, quantize the model again")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"artifact format {manifest['format_version']} is not the supported format {FORMAT_VERSION}; "
                            "quantize the model again with this library")
    return manifest


def _task_name(recorded: Any) -> str | None:
    """The current name of the task an artifact records (older artifacts say seq2seq for translate)."""
    try:
        return get_task(str(recorded)).name
    except KeyError:
        return None


def verify_artifact(directory: str | Path, tm: TaskModel | None = None) -> dict[str, Any]:
    """Check files, versions and (when ``tm`` is given) the source model; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, meta in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing; quantize the model again")
        if _sha256(path) != meta["sha256"]:
            raise ArtifactError(f"artifact file {path} does not match its recorded sha256 (corrupt or modified); "
                                "quantize the model again")
    wanted, have = manifest["versions"], runtime_versions(manifest["runtime"])
    diffs = [f"{k} {wanted.get(k)} (artifact) vs {have[k]} (installed)" for k in have if wanted.get(k) != have[k]]
    if diffs:
        raise ArtifactError(f"artifact {directory} was written by other versions: {'; '.join(diffs)}; "
                            "re-run `python -m quantization quantize` with the installed versions")
    if tm is not None:
        src = manifest["source"]
        if src.get("sha256") != tm.source_hash or _task_name(src.get("task")) != tm.task:
            raise ArtifactError(
                f"artifact {directory} was made from {src.get('name')!r} ({src.get('task')}, weights sha256 "
                f"{str(src.get('sha256'))[:12]}…) but the model given is {tm.name!r} ({tm.task}, "
                f"{tm.source_hash[:12]}…); quantize this model instead of reusing the artifact")
    return manifest


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


def load_artifact(directory: str | Path, tm: TaskModel) -> QuantizedModel:
    """Rebuild the variant saved in ``directory`` on top of the FP32 ``tm`` without re-quantizing."""
    directory = Path(directory)
    manifest = verify_artifact(directory, tm)
    start = time.perf_counter()
    strategy_cls = get_strategy(manifest["strategy"])  # also registers every layer kind
    kept = frozenset(manifest.get("kept", []))
    if manifest["runtime"] == "onnxruntime":
        from .strategies.onnx import OnnxRuntimeModule

        module: Any = OnnxRuntimeModule.from_file(directory / ONNX_FILE)
    else:
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
            module, _ = impl.build(tm.module, kept)
            if module is tm.module:
                module = share_copy(tm.module)
        try:
            _load_weights(module, directory / TORCH_FILE)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ArtifactError(f"artifact weights in {directory} do not fit model {tm.name!r} ({str(exc)[:200]}); "
                                "quantize this model again") from None
        module.eval()
    record = manifest.get("record", {})
    return QuantizedModel(module=module, strategy=manifest["strategy"], params=manifest["params"],
                          layers=record.get("layers", {}), kept=sorted(kept), seconds=time.perf_counter() - start,
                          runtime=manifest["runtime"],
                          notes={**record.get("notes", {}), "loaded_from": str(directory),
                                 "quantization_seconds_at_build": record.get("seconds")})
