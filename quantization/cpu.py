"""What this CPU can do, recorded once: the facts every kernel choice and every reported figure depends on.

The same int8 model can be 3x faster than FP32 on one x86 CPU and 40x slower on another: torch's
``torch._int_mm`` has a fast oneDNN kernel only where the CPU has AVX-512 VNNI (torch asks cpuinfo, which
no environment variable reaches) and a plain loop elsewhere; FBGEMM without VNNI adds uint8 x int8 pairs
in int16 (``vpmaddubsw``), which saturates with full-range activations; bf16 matmuls are fast only with
AVX-512 BF16 or AMX. :func:`profile` reads the CPU's model and the instruction-set features that matter,
and the threads torch uses.

Emulating a smaller CPU (``QUANTSERVE_CPU_ISA=avx2``, applied by :func:`emulate` before torch is imported)
caps oneDNN, FBGEMM and ATen at that level through their own environment variables, and caps the
profile's features the same way, so every decision that reads the profile (the kernel candidates,
low-precision floats, the serving gate's sentences) takes the smaller CPU's branch. It changes numerics and
kernel choice, not the hardware: speeds measured under it are not that CPU's speeds, and the profile says
so (``emulated``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

ISA_ENV = "QUANTSERVE_CPU_ISA"
# the features that decide kernels, in the names /proc/cpuinfo uses (x86, then aarch64)
X86_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "bf16": "bf16"}
# emulation levels: the features each keeps, and the variables that cap the libraries
EMULATION: dict[str, dict[str, Any]] = {
    "avx2": {"keep": ("avx2", "fma", "f16c"),
             "env": {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                     "ATEN_CPU_CAPABILITY": "avx2"}},
    "avx512": {"keep": ("avx2", "fma", "f16c", "avx512f", "avx512bw"),
               "env": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
                       "ATEN_CPU_CAPABILITY": "avx512"}},
}


class CpuProfileError(ValueError):
    """An emulation level this module does not know."""


def emulate(level: str | None = None) -> dict[str, str]:
    """Cap oneDNN, FBGEMM and ATen at ``level`` (default: ``$QUANTSERVE_CPU_ISA``); the variables set.

    Must run before torch is imported: the libraries read these variables once. Variables already in the
    environment are left as they are.
    """
    level = (level if level is not None else os.environ.get(ISA_ENV, "")).strip().lower()
    if not level or level == "native":
        return {}
    if level not in EMULATION:
        raise CpuProfileError(f"{ISA_ENV}={level!r} is not an emulation level; write one of: native, "
                              f"{', '.join(EMULATION)}")
    os.environ[ISA_ENV] = level
    applied = {}
    for key, value in EMULATION[level]["env"].items():
        applied[key] = os.environ.setdefault(key, value)
    return applied


@dataclass(frozen=True)
class CpuProfile:
    arch: str
    vendor: str
    model: str
    features: tuple[str, ...]          # the ones in X86_FEATURES / ARM_FEATURES this CPU has (after any cap)
    threads: int
    torch_capability: str              # ATen's vectorised kernels (torch.backends.cpu.get_cpu_capability)
    emulated: str | None = None        # the QUANTSERVE_CPU_ISA level, when capped
    caps: dict[str, str] = field(default_factory=dict)  # the library caps in the environment

    def has(self, feature: str) -> bool:
        return feature in self.features

    @property
    def int8_dot(self) -> bool:
        """A native int8 dot product that accumulates in int32 (no int16 saturation)."""
        return self.has("avx512_vnni") or self.has("avx_vnni") or self.has("amx_int8") or self.has("dotprod")

    @property
    def bf16_gemm(self) -> bool:
        return self.has("avx512_bf16") or self.has("amx_bf16") or (self.arch == "aarch64" and self.has("bf16"))

    @property
    def fp16_gemm(self) -> bool:
        return self.has("avx512_fp16") or self.arch == "aarch64"

    @property
    def isa(self) -> str:
        """One word for the widest integer path: amx, avx512-vnni, avx-vnni, avx512, avx2, neon-dotprod, ..."""
        for feature, word in (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"),
                              ("avx512bw", "avx512"), ("avx2", "avx2"), ("i8mm", "neon-i8mm"),
                              ("dotprod", "neon-dotprod"), ("neon", "neon")):
            if self.has(feature):
                return word
        return "baseline"

    @property
    def key(self) -> str:
        """Identifies what kernel choices depend on: the CPU, its (capped) features, threads, torch."""
        import torch

        text = json.dumps([self.arch, self.vendor, self.model, self.features, self.threads,
                           self.torch_capability, self.emulated, torch.__version__])
        return f"{self.isa}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def summary(self) -> str:
        """One line for logs and result tables."""
        line = f"{self.vendor} {self.model} ({self.arch}, {self.isa}; {', '.join(self.features) or 'no listed features'}; " \
               f"{self.threads} threads)"
        return line + (f" emulating {self.emulated}: speeds are not that CPU's" if self.emulated else "")

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(features=list(self.features), isa=self.isa, key=self.key, int8_dot=self.int8_dot,
                   bf16_gemm=self.bf16_gemm, fp16_gemm=self.fp16_gemm)
        return out


def _cpuinfo() -> tuple[str, str, set[str]]:
    """(vendor, model name, feature flags) from /proc/cpuinfo's first processor; "unknown" where it says nothing."""
    vendor, model, flags = None, None, set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("vendor_id", "cpu implementer") and vendor is None:
            vendor = value
        elif key in ("model name", "cpu model") and model is None:
            model = value
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    fallback = platform.processor() or "unknown"
    return vendor or fallback, model or fallback, flags


@lru_cache(maxsize=1)
def profile() -> CpuProfile:
    """This process's CPU profile (read once)."""
    import torch

    arch = platform.machine().lower()
    vendor, model, flags = _cpuinfo()
    if arch in ("aarch64", "arm64"):
        arch = "aarch64"
        features = [name for flag, name in ARM_FEATURES.items() if flag in flags]
        if "neon" not in features:
            features.insert(0, "neon")  # every aarch64 CPU has Advanced SIMD
    else:
        features = [f for f in X86_FEATURES if f in flags]
    level = os.environ.get(ISA_ENV, "").strip().lower() or None
    if level == "native":
        level = None
    if level is not None:
        if level not in EMULATION:
            raise CpuProfileError(f"{ISA_ENV}={level!r} is not an emulation level; write one of: native, "
                                  f"{', '.join(EMULATION)}")
        features = [f for f in features if f in EMULATION[level]["keep"]]
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
            if os.environ.get(k)}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = "unknown"
    return CpuProfile(arch=arch, vendor=vendor, model=model, features=tuple(features),
                      threads=torch.get_num_threads(), torch_capability=capability, emulated=level, caps=caps)


def refresh() -> CpuProfile:
    """Read the profile again (after the thread count changed)."""
    profile.cache_clear()
    return profile()


__all__ = ["CpuProfile", "CpuProfileError", "profile", "refresh", "emulate", "ISA_ENV", "EMULATION"]
