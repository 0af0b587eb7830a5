"""Tasks are library plug-ins: one module each under quantization/tasks/, found by the registry, and the only
code that tests a task's name."""

from __future__ import annotations

import pytest
import torch

from quantization.errors import UnknownTaskError
from quantization.fidelity import fidelity
from quantization.tasks import TASKS, Task, get_task, register, task_names
from sourcecheck import ROOT, literal_comparisons, project_files


def test_every_task_module_registers_itself_and_older_names_still_resolve():
    assert task_names() == ["classify", "embed", "translate"]  # by module name, found without a hand-kept list
    assert get_task("seq2seq") is get_task("translate")  # artifacts and configs written before the rename
    with pytest.raises(UnknownTaskError, match="unknown task 'rerank'; choose one of: classify, embed, translate"):
        get_task("rerank")


def test_a_new_task_is_one_class_and_the_library_measures_with_it():
    @register
    class Norm(Task):  # a toy task: the size of the output vector
        name = "norm"
        bound_metrics = primary_metric = agreement_metric = "ratio"

        @classmethod
        def compare(cls, reference, output):
            return {"ratio": float(output.norm() / reference.norm())}

    try:
        assert get_task("norm") is Norm and "norm" in task_names()
        assert fidelity("norm", torch.ones(4), 2 * torch.ones(4)) == {"ratio": 2.0}
    finally:
        TASKS.pop("norm")


def test_no_code_outside_the_tasks_package_compares_a_task_name():
    names = {n for cls in TASKS.values() for n in (cls.name, *cls.aliases)}
    assert {"embed", "classify", "translate", "seq2seq"} <= names
    files = project_files(outside=ROOT / "quantization" / "tasks")
    assert len(files) > 40
    assert [hit for p in files for hit in literal_comparisons(p, names)] == []


def test_task_name_check_finds_the_forms_it_forbids(tmp_path):
    code = tmp_path / "m.py"
    code.write_text('a = t == "embed"\nb = "seq2seq" != t\nc = t in ("classify", "x")\nd = t == "fine"\n')
    assert literal_comparisons(code, {"embed", "seq2seq", "classify"}, root=tmp_path) == ["m.py:1", "m.py:2", "m.py:3"]
