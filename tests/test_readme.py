"""The README is a newcomer's manual: short, with an architecture section, and worked examples that work."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from quantization.fidelity import fidelity
from quantization.pipeline import quantize_model
from quantization.strategies import STRATEGIES, strategy_names
from quantization.tasks import TASKS, get_task

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _example(heading: str) -> str:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_as_module(code: str, package: str) -> None:
    exec(compile(code, f"README:{package}", "exec"), {"__name__": f"{package}.readme_example", "__package__": package})


def test_the_readme_is_short_and_has_the_sections_a_newcomer_needs():
    assert len(README.splitlines()) <= 400
    for heading in ("## Set-up: two commands", "## The HTTP API", "## Configuration", "## Models",
                    "## Latest results", "## Deployment", "## Architecture", "## Adding a strategy",
                    "## Adding a task"):
        assert heading in README, heading
    assert "bench/RESULTS.md" in README and README.count("curl ") >= 5


def test_the_adding_a_strategy_example_registers_a_working_strategy(minilm, minilm_ref, texts):
    _run_as_module(_example("Adding a strategy"), "quantization.strategies")
    try:
        assert "weight-only-int6" in strategy_names()
        qm = quantize_model(minilm, "weight-only-int6")
        assert fidelity("embed", minilm_ref, minilm.run(qm.module, texts))["mean_cosine"] > 0.99
    finally:
        STRATEGIES.pop("weight-only-int6")


def test_the_adding_a_task_example_registers_a_task_the_library_measures_with():
    _run_as_module(_example("Adding a task"), "quantization.tasks")
    try:
        score = get_task("score")
        ref = torch.tensor([0.5, 1.0, 2.0])
        assert score.compare(ref, ref + 0.01)["within_tol"] == 1.0
        assert abs(fidelity("score", ref, ref + torch.tensor([0.0, 0.2, 0.0]))["within_tol"] - 2 / 3) < 1e-6
    finally:
        TASKS.pop("score")
