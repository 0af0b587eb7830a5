"""Choose each dynamic int8 layer's kernel on this machine, by measurement.

:func:`choose_kernels` runs one representative forward (the caller's ``probe``), keeps each layer's
real input, and then, for every distinct layer shape, times every candidate kernel
(:mod:`quantization.kernels`) on one row, on a few rows (a decoding step of a small batch) and on the
whole batch. Each layer then takes, separately for each of these sizes, the fastest candidate that is
*exact*: its integer product equals int64 arithmetic on the layer's real activations and on an adversarial row (:func:`kernels.exactness`), so a
kernel that saturates on this CPU is never served. FP32 (the dequantized weights) is the floor that is
always exact.

What is timed is what will be served: the whole layer forward for eager variants (oneDNN's ~10
elementwise passes included), and only the kernel for compiled ones (the compiler fuses the passes
around it). A lower-precision kernel must be clearly faster (:data:`PRECISION_COST`) to win over a
more precise one. Candidates come from the CPU profile: FBGEMM's 8-bit kernel only where the CPU has an
int8 dot product (without one it saturates by design, whatever the probe shows).

The choice is a small JSON record; :func:`save_choice` / :func:`load_choice` keep it beside a saved
artifact, keyed by :attr:`CpuProfile.key`, so a restart on the same CPU skips the timing and another CPU
measures again.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import kernels
from .artifacts import load_beside, save_beside
from .cpu import CpuProfile, profile as cpu_profile
from .internals import fbgemm
from .layers import DynamicInt8Linear, Int8GemmLinear

log = logging.getLogger(__name__)
# what a kernel's time is weighed by, by activation bits: 8-bit int8 must be 1.2x faster than FP32 to win over it,
# and 7-bit 1.25x faster than 8-bit (one bit less doubles the rounding error; timing noise here is ~10%)
PRECISION_COST = {32: 1.0, 8: 1.2, 7: 1.5}
MAX_ROWS = 1024          # the batch timed per shape is at most this many rows of the real input
GROUP = 4                # layers of one shape timed in turn (enough to leave the cache; more only costs time)
BUDGET_S = 0.1           # per candidate and size: stop repeating a slow kernel
HOPELESS = 8.0           # a candidate whose first call takes this multiple of FP32's is not timed further
REPS = 5


def candidates(prof: CpuProfile | None = None) -> list[str]:
    """The kernels worth measuring on this CPU, most precise first."""
    prof = prof or cpu_profile()
    out = ["onednn"]
    if fbgemm.available():
        if prof.int8_dot and prof.arch == "x86_64":
            out.append("fbgemm-u8")
        if prof.arch == "x86_64":
            out.append("fbgemm-u7")
    out.append("fp32")
    return out


def int8_layers(module: Any) -> dict[str, Int8GemmLinear]:
    """The int8 GEMM layers (dynamic and static) of ``module`` (none in a runtime that is not a torch module:
    ONNX, native)."""
    if not isinstance(module, nn.Module):
        return {}
    return {n: m for n, m in module.named_modules() if isinstance(m, Int8GemmLinear)}


def capture_inputs(module: nn.Module, layers: dict[str, Int8GemmLinear],
                   probe: Callable[[nn.Module], Any]) -> dict[str, torch.Tensor]:
    """Each layer's largest flat, smoothed input during ``probe(module)``."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str, layer: Int8GemmLinear):
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x2 = layer._flat_input(args[0].detach())
            if name not in seen or x2.shape[0] > seen[name].shape[0]:
                seen[name] = x2.clone()
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(n, layer)) for n, layer in layers.items()]
    try:
        with torch.inference_mode():
            probe(module)
    finally:
        for h in handles:
            h.remove()
    return seen


def _time(fn: Callable[[], Any], give_up: float = float("inf")) -> float:
    """Median seconds of ``fn`` (after one warm call); the warm call alone where it took over ``give_up``
    (torch._int_mm without VNNI: ~40x FP32, seconds per shape at start-up for nothing)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > give_up:
        return first
    times: list[float] = []
    spent = 0.0
    while len(times) < REPS and spent < BUDGET_S:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def _timer(kernel: str, layers: list[Int8GemmLinear], x2: torch.Tensor, compiled: bool) -> Callable[[], Any]:
    """One call of ``kernel`` on each of ``layers`` (all of one shape) in turn: each call meets weights that are not
    the ones it just read, as in a real forward (timing one layer over and over would keep its weights in cache and
    flatter the kernels that read the most bytes)."""
    if not compiled or not isinstance(layers[0], DynamicInt8Linear):
        calls = [lambda layer=layer: layer.run_kernel(kernel, x2) for layer in layers]
    elif kernel == "onednn":  # the GEMM alone: the compiled forward fuses quantization and epilogue around it
        q, _, _ = layers[0]._quantize_input(x2)
        calls = [lambda wt=layer.weight_int8.t(): torch._int_mm(q, wt) for layer in layers]
    elif kernel == "fp32":
        calls = [lambda w=layer.float_weight(): torch.nn.functional.linear(x2, w) for layer in layers]
    else:
        xn = x2 if x2.shape[0] == 1 else kernels.normalize_rows(x2)[0]
        seven = kernels.reduce_range(kernel)
        calls = [lambda layer=layer: fbgemm.eager_linear(xn, layer.weight_int8, layer.weight_scale, seven)
                 for layer in layers]

    def run() -> None:
        for call in calls:
            call()

    return run


def _rank(times: dict[str, float]) -> list[str]:
    """Candidates from best to worst: by time weighed by precision (:data:`PRECISION_COST`)."""
    return sorted(times, key=lambda k: times[k] * PRECISION_COST[kernels.PRECISION[k]])


def sizes(x2: torch.Tensor, compiled: bool) -> list[tuple[str, torch.Tensor]]:
    """The input sizes a layer gets its own kernel for, each with the rows it is timed on. A compiled forward has
    one kernel for every input of more than one row (one graph; the GEMM alone is timed)."""
    out = [("row", x2[:1])]
    if not compiled:
        out.append(("few", x2[:kernels.FEW_TIMED]))
    return out + [("batch", x2)]


def choose_kernels(module: nn.Module, probe: Callable[[nn.Module], Any], *, compiled: bool = False,
                   prof: CpuProfile | None = None) -> dict[str, Any] | None:
    """Measure, check and set every int8 GEMM layer's kernels (dynamic or static); the record of what was chosen
    and why.

    None when the module has no such layer. Call it before compiling the module.
    """
    layers = int8_layers(module)
    if not layers:
        return None
    prof = prof or cpu_profile()
    start = time.perf_counter()
    inputs = capture_inputs(module, layers, probe)
    names = [n for n in layers if n in inputs]
    pool = candidates(prof)
    if compiled and not all(isinstance(layer, DynamicInt8Linear) for layer in layers.values()):
        pool = [k for k in pool if not k.startswith("fbgemm")]  # compiled static layers reach FBGEMM through no op
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in names:
        by_shape.setdefault((layers[name].in_features, layers[name].out_features), []).append(name)
    shapes: dict[tuple[int, int], dict[str, Any]] = {}
    with torch.inference_mode():
        for shape, group in by_shape.items():
            members = [layers[n] for n in group[:GROUP]]
            x2 = inputs[group[0]][:MAX_ROWS]
            timing: dict[str, Any] = {"layers": len(group), "rows": int(x2.shape[0])}
            for size, x in sizes(x2, compiled):
                timing[f"{size}_us"] = {}
                floor = _time(_timer("fp32", members, x, compiled))  # first: the bar the others are held to
                for kernel in pool:  # per layer call
                    t = floor if kernel == "fp32" else _time(_timer(kernel, members, x, compiled), HOPELESS * floor)
                    timing[f"{size}_us"][kernel] = round(1e6 * t / len(members), 1)
            shapes[shape] = timing
        exact: dict[tuple[str, str], float] = {}

        def is_exact(name: str, kernel: str) -> bool:
            if (name, kernel) not in exact:
                exact[(name, kernel)] = kernels.exactness(kernel, layers[name], inputs[name][:MAX_ROWS])
            return exact[(name, kernel)] <= kernels.EXACT_TOLERANCE

        chosen: dict[str, dict[str, str]] = {}
        for name in names:
            timing = shapes[(layers[name].in_features, layers[name].out_features)]
            pick = {size: next(k for k in _rank(timing[f"{size}_us"]) if is_exact(name, k))
                    for size, _ in sizes(inputs[name], compiled)}
            chosen[name] = pick
    rejected = sorted({k for (n, k), err in exact.items() if err > kernels.EXACT_TOLERANCE})
    record = {
        "profile_key": prof.key, "cpu": prof.summary(), "compiled": compiled, "candidates": pool,
        "layers": chosen,
        "shapes": [{"in_features": s[0], "out_features": s[1], **t} for s, t in shapes.items()],
        "inexact": {k: round(max(err for (n, kk), err in exact.items() if kk == k), 8) for k in rejected},
        "seconds": round(time.perf_counter() - start, 3),
    }
    apply_choice(module, record)
    return record


def apply_choice(module: nn.Module, record: dict[str, Any]) -> None:
    layers = int8_layers(module)
    for name, pick in record["layers"].items():
        if name in layers:
            layers[name].set_kernels(pick["row"], pick["batch"], pick.get("few"))


def summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What /v1/models shows: which kernels the layers run, the times that chose them, what was refused."""
    if record is None:
        return None
    counts: dict[str, dict[str, int]] = {}
    for pick in record["layers"].values():
        for size, kernel in pick.items():
            counts.setdefault(size, {})
            counts[size][kernel] = counts[size].get(kernel, 0) + 1
    main = {size: max(c, key=c.get) for size, c in counts.items() if c}
    return {"kernel": main, "layers": counts, "candidates": record["candidates"],
            "inexact": record.get("inexact", {}), "shapes": record["shapes"], "compiled": record["compiled"],
            "profile_key": record["profile_key"], "seconds": record["seconds"],
            "from_cache": record.get("from_cache", False)}


def choice_name(profile_key: str) -> str:
    """The file, beside a variant's artifact, that holds its kernel choice for one CPU profile."""
    return f"kernels-{profile_key}.json"


def save_choice(directory: str | Path, record: dict[str, Any]) -> None:
    save_beside(directory, choice_name(record["profile_key"]), record)


def load_choice(directory: str | Path, module: nn.Module, *, compiled: bool,
                prof: CpuProfile | None = None) -> dict[str, Any] | None:
    """A saved choice for this CPU profile that fits the module (None if there is none)."""
    record = load_beside(directory, choice_name((prof or cpu_profile()).key))
    if record is None:
        return None
    layers = int8_layers(module)
    if (record.get("compiled") != compiled or set(record.get("layers", {})) - set(layers)
            or not set(record.get("layers", {})) or any(
                k not in kernels.KERNELS for p in record["layers"].values() for k in p.values())):
        return None
    if any(k.startswith("fbgemm") for p in record["layers"].values() for k in p.values()) \
            and not fbgemm.available():
        return None
    record["from_cache"] = True
    apply_choice(module, record)
    return record


__all__ = ["choose_kernels", "apply_choice", "candidates", "summary", "save_choice", "load_choice", "choice_name"]
