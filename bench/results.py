"""Shared by the benchmarks: the machine's description, and rewriting one section of RESULTS.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Measured results\n\nEvery section below is written by the benchmark it names; rerun that command to "
          "refresh it. Figures are ratios against a baseline measured in the same run.\n")


def machine_summary() -> str:
    """The CPU profile (model, ISA features that decide kernels, threads) and torch: beside every figure."""
    from quantization.cpu import profile

    return f"{profile().summary()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_section(name: str, body: str) -> None:
    """Replace the section between this benchmark's markers (or append it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def publish(name: str, result: dict, table: str) -> None:
    """A full run's record: ``bench/results/<name>.json`` and its section ``name`` of RESULTS.md."""
    import json

    out = RESULTS.parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_section(name, table)
