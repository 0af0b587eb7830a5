"""The speed-ups behind quantization/internals: each has a switch, checks itself, and falls back to the plain way."""

from __future__ import annotations

import logging

import pytest
import torch

from quantization import internals, tuning
from quantization.internals import fbgemm
from quantization.internals.compiled import Settled, is_compiled, serve_compiled
from quantization.pipeline import quantize_model
from quantization.tasks import get_task


@pytest.fixture
def restore_switches():
    yield
    internals.configure(**{name: True for name in internals.SPEEDUPS})


def test_an_unknown_speedup_is_refused_with_the_names():
    with pytest.raises(ValueError, match="unknown speed-up warp; the speed-ups are: compile, settled, merge_pass"):
        internals.configure(warp=False)


def test_fbgemm_checks_itself_and_its_switch_takes_every_fbgemm_kernel_away(restore_switches):
    assert fbgemm.available() and fbgemm._CHECKED is None  # the exact-product self-check passed on this CPU
    assert any(k.startswith("fbgemm") for k in tuning.candidates())
    internals.configure(fbgemm=False)
    assert not fbgemm.available() and not any(k.startswith("fbgemm") for k in tuning.candidates())
    assert internals.state()["fbgemm"] == "switched off"


def test_compiled_serving_keeps_each_step_only_where_it_checks_out(minilm, texts, restore_switches, caplog):
    task = get_task("embed")(minilm, 64)
    items = task.tokenize(texts[:8])
    build = lambda: quantize_model(minilm, "dynamic-int8").module  # noqa: E731

    internals.configure(compile=False)
    module = build()
    served, why = serve_compiled(module, task.run, items)
    assert served is module and why == "the compile speed-up is switched off"

    internals.configure(compile=True, settled=False)
    served, why = serve_compiled(build(), task.run, items)
    assert why is None and is_compiled(served) and not isinstance(served, Settled)

    internals.configure(settled=True)

    def broken(m, batch):  # a compiler that miscompiles: its outputs point elsewhere
        out = task.run(m, batch)
        return [o.roll(1) for o in out] if is_compiled(m) else out

    module = build()
    with caplog.at_level(logging.WARNING):
        served, why = serve_compiled(module, broken, items)
    assert served is module and why.startswith("compiled outputs differ from eager ones on the probe")
    assert "event=compile_fallback" in caplog.text
    # the eager fallback runs its eager form again, with the eager model's numbers
    assert all(torch.equal(a, b) for a, b in zip(task.run(module, items), task.run(build(), items)))

    def refused(m, batch):  # a torch whose compiler raises (another version's internals)
        if is_compiled(m):
            raise RuntimeError("inductor says no")
        return task.run(m, batch)

    module = build()
    served, why = serve_compiled(module, refused, items)
    assert served is module and why.startswith("compiling failed with this torch") and "inductor says no" in why
