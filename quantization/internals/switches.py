"""Which speed-ups that reach into torch internals are on, and why one was turned off.

Every speed-up is on by default. A caller (the service's ``speedups`` config) turns one off with
:func:`configure`; a speed-up whose self-check fails turns itself off with :func:`turned_off`, which
logs one line saying why.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("quantization.internals")

SPEEDUPS: dict[str, str] = {
    "compile": "variants that ask for it run through torch.compile (TorchInductor)",
    "settled": "a warmed compiled module calls its graphs without dynamo's guards (compiled.Settled)",
    "merge_pass": "int8 layers reading one input share one GEMM in compiled graphs (a custom inductor pass)",
    "aoti": "variants compiled in the background become AOTInductor packages, built by a child process",
    "fbgemm": "FBGEMM's int8 kernels, through torch's deprecated quantized-tensor API",
}
FBGEMM_ENV = "QUANTSERVE_FBGEMM"  # =0: fbgemm off (before any config is read)

_on = {name: True for name in SPEEDUPS}
_why_off: dict[str, str] = {}
if os.environ.get(FBGEMM_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    _on["fbgemm"], _why_off["fbgemm"] = False, f"{FBGEMM_ENV}=0"


def configure(**switches: bool) -> None:
    """Turn speed-ups on or off by name (``configure(settled=False)``); an unknown name is an error."""
    unknown = sorted(set(switches) - set(SPEEDUPS))
    if unknown:
        raise ValueError(f"unknown speed-up {', '.join(unknown)}; the speed-ups are: {', '.join(SPEEDUPS)}")
    for name, on in switches.items():
        _on[name] = bool(on)
        if on:
            _why_off.pop(name, None)
        else:
            _why_off.setdefault(name, "switched off")


def enabled(name: str) -> bool:
    return _on[name]


def turned_off(name: str, reason: str) -> None:
    """A self-check failed: the speed-up is off for the rest of the process."""
    _on[name], _why_off[name] = False, reason
    log.warning("event=speedup_off speedup=%s reason=%r", name, reason)


def state() -> dict[str, str]:
    """Each speed-up: "on", or why it is off."""
    return {name: "on" if _on[name] else _why_off.get(name, "off") for name in SPEEDUPS}
