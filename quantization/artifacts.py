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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .runtimes import get_runtime
from .strategies import QuantizedModel
from .task_model import TaskModel
from .tasks import get_task

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def runtime_versions(runtime: str) -> dict[str, str]:
    return get_runtime(runtime).versions()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    """A hash of this library's source: a measurement cached beside an artifact is only reused by the same code."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _FINGERPRINT = h.hexdigest()[:20]
    return _FINGERPRINT


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
    """Write ``qm`` (made from ``tm``) to ``directory``; returns the manifest path.

    The files are written beside, then moved in one by one with the manifest last and the old manifest removed
    first, so a reader (another process sharing the directory, or a start after a crash) finds either a
    complete artifact or none; other files in the directory (choices saved beside it) are kept.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
    try:
        files, layer_configs = get_runtime(qm.runtime).save(qm.module, staging)
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
            "files": {f: {"sha256": _sha256(staging / f), "bytes": (staging / f).stat().st_size} for f in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (out / MANIFEST).unlink(missing_ok=True)
        for f in files:
            os.replace(staging / f, out / f)
        os.replace(staging / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / MANIFEST


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


def load_artifact(directory: str | Path, tm: TaskModel) -> QuantizedModel:
    """Rebuild the variant saved in ``directory`` on top of the FP32 ``tm`` without re-quantizing."""
    directory = Path(directory)
    manifest = verify_artifact(directory, tm)
    start = time.perf_counter()
    kept = frozenset(manifest.get("kept", []))
    module = get_runtime(manifest["runtime"]).load(directory, manifest, tm)
    record = manifest.get("record", {})
    return QuantizedModel(module=module, strategy=manifest["strategy"], params=manifest["params"],
                          layers=record.get("layers", {}), kept=sorted(kept), seconds=time.perf_counter() - start,
                          runtime=manifest["runtime"],
                          notes={**record.get("notes", {}), "loaded_from": str(directory),
                                 "quantization_seconds_at_build": record.get("seconds")})
