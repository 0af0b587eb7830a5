"""AOTInductor packages: a variant compiled ahead of time into a shared library, loaded in a fraction of a second.

Why: ``torch.compile`` compiles inside the serving process, on first calls: about a minute per model on
2 cores, all of it Python (dynamo) holding the interpreter lock that the requests being served need, and
again after every restart (a warm kernel cache still re-traces: ~6 s per model). An AOTInductor package is
the same inductor code, exported once (``torch.export`` with symbolic batch and sequence dimensions, batch 1
included) and compiled by :func:`build` in a child process (``python -m quantization.internals.aoti
SPEC.json``, at lower priority and one thread) into one ``.pt2`` file, which :func:`load` maps in ~0.1 s.
MiniLM int8 on a Zen 4 core pair (one process, medians): batch 16 eager 49 ms, ``torch.compile`` 32 ms,
package 25 ms; batch 1 9.2 / 4.4 / 2.8 ms.

A package is tied to the torch build, the CPU profile (inductor writes code for the ISA it finds) and the
exact module (weights, kernel choice, the code of the layers): :func:`package_key` names all of them, so a
package found under its key is the one :func:`build` would make now. The caller checks a loaded package's
outputs against the eager module before serving it (a stale or corrupt file is then rebuilt).
Switch: ``aoti`` (off: variants that ask to be compiled stay eager unless compiled in-process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SUFFIX = ".pt2"
MAX_BATCH = 1024
# code that shapes the exported graph: a change to any of these files makes a new package
_SHAPING = ("layers.py", "models.py", "kernels.py", "affine.py", "internals/aoti.py", "internals/fbgemm.py")


def package_key(parts: dict[str, Any]) -> str:
    """A short hash of what a package depends on: ``parts`` (the module's identity: artifact hashes, kernel
    choice, CPU profile key) plus the torch build and the library code that shapes the graph."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(torch.__version__.encode())
    for name in _SHAPING:
        path = root / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def export_and_compile(module: torch.nn.Module, example: dict[str, torch.Tensor], path: Path, max_tokens: int) -> Path:
    """``module`` (called with keyword tensors shaped [batch, tokens], like ``example``) exported with both
    dimensions symbolic (tokens up to ``max_tokens``, the model's input limit) and compiled into the package
    ``path`` (written beside, then moved in)."""
    from torch._inductor import aoti_compile_and_package

    from ..layers import set_graph_form

    set_graph_form(module, True)  # the int8 layers' traceable form, as for torch.compile
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    tokens = torch.export.Dim("tokens", min=2, max=max_tokens)
    with torch.no_grad():  # export traces with autograd's view of the module; inference tensors refuse that
        program = torch.export.export(module, (), kwargs=example,
                                      dynamic_shapes={name: {0: batch, 1: tokens} for name in example})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{SUFFIX}")
    try:
        aoti_compile_and_package(program, package_path=str(partial), inductor_configs={"compile_threads": 1})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


class Packaged:
    """A loaded package, called like the module it was made from (keyword tensors in, one tensor out)."""

    ahead_of_time = True  # internals.compiled.is_compiled

    def __init__(self, path: Path) -> None:
        from torch._inductor import aoti_load_package

        self.path = Path(path)
        self._runner = aoti_load_package(str(path))

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self._runner(**inputs)


def load(path: str | os.PathLike[str]) -> Packaged:
    return Packaged(Path(path))


def build(spec: dict[str, Any]) -> Path:
    """In the child process: rebuild the served module from ``spec`` and compile it into ``spec["out"]``.

    ``spec``: ``source``, ``task``, ``name``, ``max_input_tokens``, ``artifact`` (a saved variant's directory,
    or None for the FP32 model itself), ``kernels`` (quantization.tuning's record, or None), ``texts`` (a few
    inputs to trace with) and ``out``.
    """
    from ..artifacts import load_artifact
    from ..models import load_task_model
    from ..tasks import get_task
    from ..tuning import apply_choice

    tm = load_task_model(spec["source"], spec["task"], name=spec["name"])
    tm.max_length = spec["max_input_tokens"]
    module = load_artifact(spec["artifact"], tm).module if spec.get("artifact") else tm.module
    if spec.get("kernels"):
        apply_choice(module, spec["kernels"])
    task = get_task(spec["task"])(tm, spec["max_input_tokens"])
    example = task.collate(task.tokenize(spec["texts"][:4]))
    return export_and_compile(module, example, Path(spec["out"]), spec["max_input_tokens"])


def main(argv: list[str] | None = None) -> int:
    """``python -m quantization.internals.aoti SPEC.json``: build one package at low priority, on one thread."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m quantization.internals.aoti SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    if hasattr(os, "nice"):
        os.nice(int(spec.get("nice", 10)))  # the serving process keeps the cores it needs
    torch.set_num_threads(int(spec.get("threads", 1)))
    logging.basicConfig(level="WARNING", stream=sys.stderr)
    start = time.perf_counter()
    try:
        path = build(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(f"{type(exc).__name__}: {str(exc)[:300]}".replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps({"package": str(path), "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
