"""The one door to torch's internals: every speed-up that relies on them, each with a switch and a self-check.

Only this package imports ``torch._dynamo`` or ``torch._inductor``, calls ``torch.ops.quantized`` or
builds a quantized tensor; ``tests/test_architecture.py`` holds everything else to that. A torch upgrade
that breaks one of them breaks it here, and its switch turns it off alone:

==============  ===========================================================  ==============================
speed-up        what it does                                                 self-check (at first use)
==============  ===========================================================  ==============================
``compile``     :func:`compiled.compile_module`: TorchInductor fuses an      compiled outputs on the probe
                int8 layer's quantize/dequantize passes with its neighbours  match eager (cosine >= 0.995)
``settled``     :class:`compiled.Settled`: a warmed module's graphs are      equal outputs to dynamo's on
                called without dynamo's per-call guards (~0.4 ms a call)     the probe, bit for bit
``merge_pass``  int8 layers that read one input share one GEMM in a          part of the compile check
                compiled graph (a custom inductor pass merges them)
``aoti``        :mod:`aoti`: a variant exported and compiled ahead of time   the service checks a loaded
                into an AOTInductor package by a child process, loaded in   package's outputs against
                ~0.1 s (the service's background optimisation)             eager (cosine >= 0.995)
``fbgemm``      :mod:`fbgemm`: FBGEMM's int8 kernels through the deprecated  a 7-bit product equals int64
                quantized-tensor API (exact without VNNI at 7 bits)          arithmetic
==============  ===========================================================  ==============================

A failed check logs one line (``event=speedup_off`` or, per variant, ``event=compile_fallback``) and the
work runs the plain way: eager modules, dynamo's own entry, oneDNN or the FP32 floor.

Process-wide torch settings are applied in one place, :func:`compiled.process_settings`, the first time
a module is compiled: dynamo's recompile limit is raised to 64 (every compiled variant of one
architecture adds graphs to the same code objects; at torch's default of 8 the fifth would silently run
eager) and float attributes are specialised (one trace per graph instead of a discarded first attempt).
Layer ``forward`` methods never ask whether they are being compiled: :func:`compiled.compile_module` sets
each layer's serving form (``Int8GemmLinear.graph_form``) before compiling.
"""

from __future__ import annotations

from .switches import SPEEDUPS, configure, enabled, state, turned_off

__all__ = ["SPEEDUPS", "configure", "enabled", "state", "turned_off"]
