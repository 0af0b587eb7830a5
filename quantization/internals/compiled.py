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
module is then served as :class:`Settled`, which calls its graphs without dynamo's per-call work.

Only the forward of the module changes: its weights, state dict and stored bytes are the
module's own (:func:`original` gives the module back). :func:`serve_compiled` is the checked way in:
it compiles, warms up, and keeps each step only where its outputs match the plainer form's
(switches ``compile``, ``settled`` and ``merge_pass``; see :mod:`quantization.internals`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import switches

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
RECOMPILE_LIMIT = 64  # why: process_settings


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


def compile_module(module: nn.Module, probe: Callable[[nn.Module], Any] | None = None) -> nn.Module:
    """``module`` with a compiled forward (lazy: the first call of each shape class compiles).

    ``probe(module)``, one eager forward, shows which int8 layers read the same input; those then share one
    GEMM in the compiled forward (:func:`quantization.layers.share_input_gemms`).
    """
    problem = compiler_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from ..layers import set_graph_form, share_input_gemms

    if probe is not None and switches.enabled("merge_pass"):
        share_input_gemms(module, probe)
    set_graph_form(module, True)
    process_settings()
    graphs = _Graphs()
    compiled = torch.compile(module, dynamic=True, backend=graphs)
    compiled._quantserve_graphs = graphs
    return compiled


def process_settings() -> None:
    """The process-wide torch settings compiled variants need, applied here and nowhere else (idempotent).

    - ``recompile_limit`` at least 64: every compiled variant of one architecture adds its graphs to the guards
      of the same code objects (``BertModel.forward``, ...); at torch's default of 8 the fifth compiled variant
      in a process would silently run eager.
    - ``specialize_float``: with ``dynamic=True`` dynamo otherwise makes float module attributes (LayerNorm's
      eps) symbolic, and one of them restarts the whole analysis after the graph was traced and lowered once
      (a warm-cache compile of MiniLM int8: 32 s, 25 of them the discarded attempt; 6.4 s specialised).
    """
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    if hasattr(dynamo_config, name):
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    if hasattr(dynamo_config, "specialize_float"):
        dynamo_config.specialize_float = True


def serve_compiled(module: nn.Module, run: Callable[[Any, list[Any]], list[Any]],
                   items: list[Any]) -> tuple[Any, str | None]:
    """``module`` compiled, warmed up on ``items`` and settled, each step kept only where it checks out.

    ``run(module, items)`` gives one output tensor per item. Returns the module to serve and, where it is
    not compiled, why (one sentence, also logged): compiling switched off or impossible here, or compiled
    outputs on ``items`` that do not match eager ones. A settled module whose outputs differ from dynamo's
    is served through dynamo (logged; still compiled).
    """
    problem = compiler_problem() if switches.enabled("compile") else "the compile speed-up is switched off"
    if problem is not None:
        return module, problem
    from ..layers import set_graph_form

    probe = items[:8]
    eager = run(module, probe)
    try:
        compiled = compile_module(module, probe=lambda m: run(m, items[:2]))
        warm_up(lambda batch: run(compiled, batch), items)
        reference = run(compiled, probe)
        worst = worst_cosine(eager, reference)
        why = None if worst >= COMPILE_MIN_COSINE else \
            f"compiled outputs differ from eager ones on the probe (worst cosine {worst:.4f})"
    except Exception as exc:  # noqa: BLE001 - a torch whose internals differ from the ones this was built on
        why = f"compiling failed with this torch {torch.__version__} ({type(exc).__name__}: {str(exc)[:200]})"
    if why is not None:
        set_graph_form(module, False)
        log.warning("event=compile_fallback reason=%r", why)
        return module, why
    if not switches.enabled("settled"):
        return compiled, None
    settled = Settled(compiled)
    run(settled, probe)  # the first call of a signature goes through dynamo and records its graph call
    if not all(torch.equal(a, b) for a, b in zip(reference, run(settled, probe))):
        log.warning("event=settled_fallback reason='settled graph calls differ from dynamo on the probe'")
        return compiled, None
    return settled, None


COMPILE_MIN_COSINE = 0.995  # int8 compiled vs eager: fused quantization rounds a few activations the other way


def worst_cosine(reference: list[Any], output: list[Any]) -> float:
    a = torch.stack([r.float().flatten() for r in reference])
    b = torch.stack([o.float().flatten() for o in output])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


class _Graphs:
    """The inductor backend (exactly what ``backend="inductor"`` runs), keeping a hand on each compiled graph.

    While ``observed`` is a list, every graph call is appended to it with its arguments and outputs: that is
    how :class:`Settled` learns which graph an input runs and what dynamo passes it.
    """

    def __init__(self) -> None:
        self.compiles = 0
        self.observed: list[tuple[Any, tuple[Any, ...], Any]] | None = None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        passes = {"post_grad_custom_pre_pass": _merge_pass()} if switches.enabled("merge_pass") else {}
        with inductor_config.patch(**passes):
            compiled = compile_fx(gm, example_inputs)
        self.compiles += 1

        def graph(*args: Any) -> Any:
            out = compiled(*args)
            if self.observed is not None:
                self.observed.append((compiled, args, out))
            return out

        return graph


def _merge_repeated(graph: torch.fx.Graph) -> int:
    """Compute each repeated pure computation once (common-subexpression elimination); how many were merged.

    Layers that share an input GEMM (:func:`quantization.layers.share_input_gemms`) each trace the same
    quantization of their input and the same ``torch._int_mm``; this leaves one of each. A node is merged
    only if it is a pure, non-random call on at least one graph value and nothing mutates its result.
    """
    seen: dict[Any, torch.fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if (node.op != "call_function" or node.is_impure(impure_random=True) or not node.all_input_nodes
                or any(user.is_impure() for user in node.users)
                or (isinstance(node.target, torch._ops.OpOverload)
                    and torch.Tag.nondeterministic_seeded in node.target.tags)):
            continue
        try:
            key = (node.target, _frozen(node.args), _frozen(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return (slice, value.start, value.stop, value.step)
    return value


def _merge_pass() -> Any:
    """:func:`_merge_repeated` as an inductor pass (on the graph after decomposition, before its own passes).

    Imported here, at compile time: importing ``torch._inductor`` sets ``TORCHINDUCTOR_CACHE_DIR`` to its
    default, after which :func:`use_cache_dir` would leave the kernels there instead of next to the artifacts.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class MergeRepeated(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            _merge_repeated(graph)

        def uuid(self) -> bytes:  # part of the compiled-kernel cache key: a change to this file recompiles
            return get_hash_for_files((__file__,))

    return MergeRepeated()


class Settled(nn.Module):
    """A compiled module after :func:`warm_up`, whose graphs are called directly, without dynamo in between.

    Entering a compiled module through dynamo costs about 0.4 ms a call for MiniLM (measured in one process:
    1.75 -> 1.33 ms a batch-1 forward): evaluating about a thousand guards (the type, shape and
    dynamic-dimension marks of every parameter, module attributes, config values), then bytecode that gathers
    the ~220 graph inputs (every parameter and buffer, the inputs, their sizes) from the module, one attribute
    lookup at a time. Neither changes between calls that look alike: the first call with a new signature (the
    shapes, strides, dtypes and inference-mode flags of its tensors, the values of its other arguments, grad
    and inference mode) runs through dynamo with every guard, which picks (or compiles) the graph; that call
    is recorded, and later calls with the same signature pass the same parameters, their own tensors in the
    same places and the same sizes straight to that graph.

    A signature is called directly only where that is provably what dynamo did: exactly one graph ran, its
    single output is what the module returned, and every graph input was either one of the call's tensors,
    one of the module's parameters or buffers, or a number (sizes: fixed by the signature). Anything else
    (a graph break, outputs rebuilt after the graph) keeps going through dynamo. A graph compiled after warm-up
    is counted in ``late_compiles`` and logged.

    What the signature does not cover is assumed fixed while serving, as dynamo's own guards would check it:
    the module's attributes and parameter objects (values may change in place), and torch's global settings
    other than grad and inference mode. Serve from one thread (the service's model lane).
    """

    MAX_SIGNATURES = 4096  # beyond this (an unbounded variety of shapes) the table starts over

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled
        self.late_compiles = 0
        self._graphs: _Graphs | None = getattr(compiled, "_quantserve_graphs", None)
        self._warm_compiles = self._graphs.compiles if self._graphs else 0
        module = original(compiled)
        self._own = {id(t) for t in (*module.parameters(), *module.buffers())}
        # (args, kwargs names) signature -> (graph, its arguments with None where a call's tensor goes,
        # [(argument position, call input position)]); None where the signature must go through dynamo
        self._direct: dict[tuple, tuple[Callable[..., Any], list[Any], list[tuple[int, int]]] | None] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = (*args, *kwargs.values())
        key = (len(args), tuple(kwargs), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               *[_signature(x) for x in inputs])
        plan = self._direct.get(key, _UNSEEN)
        if plan is _UNSEEN:
            return self._first_call(key, inputs, args, kwargs)
        if plan is None:
            return self.compiled(*args, **kwargs)
        graph, arguments, slots = plan
        arguments = arguments.copy()
        for at, i in slots:
            arguments[at] = inputs[i]
        return graph(*arguments)[0]

    def _first_call(self, key: tuple, inputs: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        graphs = self._graphs
        if graphs is None:
            return self.compiled(*args, **kwargs)
        graphs.observed = []
        try:
            out = self.compiled(*args, **kwargs)
            observed = graphs.observed
        finally:
            graphs.observed = None
        if graphs.compiles > self._warm_compiles + self.late_compiles:
            self.late_compiles = graphs.compiles - self._warm_compiles
            log.warning("a warmed compiled module met an input no compiled graph fits and compiled one "
                        "(late compile %d)", self.late_compiles)
        if len(self._direct) >= self.MAX_SIGNATURES:
            self._direct.clear()
        self._direct[key] = self._plan(observed, out, inputs)
        return out

    def _plan(self, observed: list[tuple[Any, tuple[Any, ...], Any]], out: Any,
              inputs: tuple[Any, ...]) -> tuple[Callable[..., Any], list[Any], list[tuple[int, int]]] | None:
        if len(observed) != 1:
            return None
        graph, graph_args, graph_out = observed[0]
        if not (isinstance(graph_out, (list, tuple)) and len(graph_out) == 1 and graph_out[0] is out):
            return None
        by_id = {id(x): i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
        arguments: list[Any] = []
        slots: list[tuple[int, int]] = []
        for at, a in enumerate(graph_args):
            if isinstance(a, torch.Tensor):
                if id(a) in by_id:
                    slots.append((at, by_id[id(a)]))
                    a = None
                elif id(a) not in self._own:
                    return None  # a tensor made by dynamo's own bytecode: not safe to reuse
            elif not (a is None or type(a) in (int, float, bool)):
                return None
            arguments.append(a)
        return graph, arguments, slots


_UNSEEN = object()


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.device, x.is_inference(), x.requires_grad)
    return x if x is None or type(x) in (int, float, bool, str) else (type(x), id(x))


def original(module: Any) -> Any:
    """The module a compiled one wraps (or ``module`` itself)."""
    if isinstance(module, Settled):
        module = module.compiled
    return getattr(module, "_orig_mod", module)


def is_compiled(module: Any) -> bool:
    """Compiled here (torch.compile) or ahead of time (an AOTInductor package, :mod:`aoti`)."""
    return original(module) is not module or getattr(module, "ahead_of_time", False)


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
