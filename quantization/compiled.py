"""Run a variant through ``torch.compile`` (TorchInductor) instead of eagerly, op by op.

Why: in eager mode an int8 Linear is one fast int8 GEMM surrounded by about ten elementwise
passes over the activations (find each token's range, scale, round, shift, clamp, cast; then
int32 -> float, two scalings, zero-point term, bias), each a full trip through memory. On this
kind of CPU those passes cost ~8x the GEMM itself (see bench/RESULTS.md, "Where an int8 layer's
time goes"). Inductor fuses them into a few loops (quantization into one, the dequantizing
epilogue with the bias, GELU or residual add that follow it), and the layer norms, softmax and
mask arithmetic around them too, while ``torch._int_mm`` stays the same VNNI kernel.

Costs: compiling needs a C++ compiler (``g++``) and, on 2 cores, about a minute per model the
first time; compiled kernels are cached on disk (``TORCHINDUCTOR_CACHE_DIR``; :func:`use_cache_dir`
points it next to saved artifacts) so a restart compiles from the cache. Shapes are symbolic
(``dynamic=True``), so one graph serves every batch size and sequence length above 1; batch size
1 gets its own graph. :func:`warm_up` compiles both before a variant is declared ready; a warmed
module is then served as :class:`Settled`, which skips the guard checks that pick among graphs.

Only the forward of the module changes: its weights, state dict and stored bytes are the
module's own (:func:`original` gives the module back).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Every compiled module adds its graphs (two shape classes each) to the guards of the same code
# objects (BertModel.forward, ...): with torch's default of 8, the fifth compiled variant of one
# architecture in a process would silently run eager.
RECOMPILE_LIMIT = 64
# With dynamic=True dynamo also makes float attributes of modules symbolic (nn.Embedding's norm_type,
# LayerNorm's eps); one of them then forces a restart of the whole analysis after the graph was already
# traced and lowered once. Specialising floats up front (compile_module) traces each graph once: a warm-cache
# compile of MiniLM int8 took 32 s of which 25 s was the discarded first attempt, and 6.4 s without it.


def compiler_problem() -> str | None:
    """Why this machine cannot compile, as one sentence; None when it can."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        return (f"torch.compile needs a C++ compiler and {cxx!r} is not on PATH; install one "
                f"(Debian: apt-get install g++) or set compile: false")
    include = sysconfig.get_paths().get("include")
    if include and not Path(include, "Python.h").is_file():
        return (f"torch.compile needs the Python headers and {include}/Python.h is missing; install them "
                f"(Debian: apt-get install python3-dev) or set compile: false")
    return None


def use_cache_dir(directory: str | os.PathLike[str]) -> Path | None:
    """Keep compiled kernels in ``directory`` (unless the environment already names a cache).

    Inductor writes lock files even when every kernel is already cached, so a read-only cache
    (one baked into a container image) is copied to a writable temporary directory first; a
    read-only place without a cache leaves inductor's default (under the temporary directory).
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        if not path.is_dir():
            return None
        copy = Path(tempfile.gettempdir()) / "quantserve-compile-cache"
        shutil.copytree(path, copy, dirs_exist_ok=True)
        path = copy
    os.environ[CACHE_ENV] = str(path)
    return path


def compile_module(module: nn.Module) -> nn.Module:
    """``module`` with a compiled forward (lazy: the first call of each shape class compiles)."""
    problem = compiler_problem()
    if problem is not None:
        raise RuntimeError(problem)
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.specialize_float = True
    return torch.compile(module, dynamic=True)


class Settled(nn.Module):
    """A compiled module after :func:`warm_up`: each call checks only the guards that tell its graphs apart.

    Before running a graph, dynamo evaluates its guards: about a thousand checks for MiniLM (the type,
    shape and dynamic-dimension marks of every parameter, module attributes, config values), 0.2-0.3 ms
    of a 2-3 ms batch-1 forward (measured interleaved, same process), and more when other compiled
    instances of the same class put their graphs first in the cache. Once every graph a module will
    need exists, ``skip_guard_eval_unsafe`` keeps only the guards that differ between cached graphs
    (batch size 1 or not; which instance), so the right graph still runs.

    An input no cached graph fits (one warm-up did not foresee: tensors made outside inference mode,
    another dtype) makes dynamo refuse under that stance; the call then runs with every guard, which
    compiles the graph it needs, and is counted in ``late_compiles``.

    The stance is process-wide while a call runs: serve every compiled module from one thread (the
    service's model lane) and never call this one inside another compiled region.
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled
        self.late_compiles = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # No cyclic collection inside the call: its finalizers and callbacks would run as frames dynamo
        # intercepts, and under this stance dynamo refuses any frame it has no graph for.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.compiled(*args, **kwargs)
        except RuntimeError as exc:
            if "skip_guard_eval_unsafe" not in str(exc):
                raise
        finally:
            if collecting:
                gc.enable()
        self.late_compiles += 1
        log.warning("a warmed compiled module met an input no compiled graph fits; compiling one now "
                    "(late compile %d)", self.late_compiles)
        return self.compiled(*args, **kwargs)


def original(module: Any) -> Any:
    """The module a compiled one wraps (or ``module`` itself)."""
    if isinstance(module, Settled):
        module = module.compiled
    return getattr(module, "_orig_mod", module)


def is_compiled(module: Any) -> bool:
    return original(module) is not module


def warm_up(run: Callable[[list[Any]], Any], items: list[Any]) -> None:
    """Compile every graph serving will need, here rather than on the first requests.

    A batch of one row and a batch of several (of different lengths, so padded) are the two shape
    classes: dynamic shapes cover every size above 1, and size 1 is specialised. Both are compiled
    even from a single item, since a :class:`Settled` module must never meet a shape class it lacks.
    """
    if not items:
        return
    run(items[:1])
    run(items[:4] if len(items) > 1 else items * 2)
