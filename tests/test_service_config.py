"""Configuration and routing: bad configs stop start-up with one sentence; A/B splits are sticky."""

from __future__ import annotations

import collections
import random
import subprocess
import sys

import pytest
import torch

from service.config import ConfigError, ModelConfig, load_settings
from service.errors import UnknownVariant
from service.routing import Router


def _write(tmp_path, text: str):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_the_default_config_serves_minilm_and_intent_as_fp32_and_int8_and_translation_with_native_too(tmp_path,
                                                                                                      monkeypatch):
    monkeypatch.setenv("QUANTIZATION_MODELS_DIR", str(tmp_path))  # no trained sentiment model there
    s = load_settings()
    assert {(m.name, m.task) for m in s.models} == {("minilm", "embed"), ("intent", "classify"),
                                                    ("en-pt", "translate"), ("pt-en", "translate")}
    assert s.absent_optional_models == ["sentiment"]
    for m in s.models:
        extra = [("native", "native")] if m.task == "translate" else []
        assert [(v.name, v.strategy) for v in m.variants] == [("fp32", "fp32"), ("int8", "auto"), *extra]
        # the int8 routes of embed and classify run compiled; FP32 stays eager as the baseline
        assert [v.compile for v in m.variants] == ([False, True] if m.task != "translate" else [False] * 3)
    # an identical share over discrete translations is measured on more probe sentences than a cosine
    assert [s.probe_count(t) for t in ("embed", "classify", "translate")] == [64, 64, 200]
    assert load_settings(probe_texts=16).probe_count("translate") == 16


@pytest.mark.parametrize("yaml_text, needle", [
    ("models: []", "models: List should have at least 1 item"),
    ("models:\n - {name: a, task: embed, source: minilm, variants: [{name: x, strategy: int3}]}",
     "models.0.variants.0.strategy: unknown strategy 'int3'; write one of: fp32"),
    ("models:\n - {name: a, task: embed, source: minilm, variants: [{name: x, strategy: fp32}], routing: {default: y}}",
     "routing.default is 'y'; write one of the variants: x"),
    ("models:\n - {name: a, task: speak, source: minilm, variants: [{name: x, strategy: fp32}]}", "models.0.task"),
    ("models:\n - {name: a, task: embed, source: minilm, variants: [{name: x, strategy: fp32}], colour: red}",
     "models.0.colour: unknown field"),
    ("models: [1", "not valid YAML"),
    ("models:\n - {name: a, task: translate, source: bergamot-en-pt, variants: [{name: x, strategy: fp32, compile: true}]}",
     "variant 'x' asks for compile: true, which applies to classify, embed models only"),
    # a request that passes validation must fit in the queue, or it would get 429 for ever on an idle server
    ("batching: {max_queue: 16}\nmodels:\n - {name: a, task: embed, source: minilm, variants: [{name: x, strategy: fp32}]}",
     "batching.max_queue is 16, smaller than the largest request the endpoints admit (256 inputs"),
    ("batching: {max_queue: 63}\nlimits: {max_inputs: 1000}\nmodels:\n - {name: a, task: translate, "
     "source: bergamot-en-pt, variants: [{name: x, strategy: fp32}]}",
     "smaller than the largest request the endpoints admit (64 inputs"),
])
def test_bad_configs_are_refused_with_one_sentence(tmp_path, yaml_text, needle):
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, yaml_text))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_environment_overrides_the_yaml_and_the_cli_overrides_both(tmp_path, monkeypatch):
    path = _write(tmp_path, "port: 7000\nmodels:\n - {name: a, task: embed, source: minilm, "
                            "variants: [{name: x, strategy: fp32}]}\n")
    assert load_settings(path).port == 7000
    monkeypatch.setenv("QUANTSERVE_PORT", "7001")
    assert load_settings(path).port == 7001
    assert load_settings(path, port=7002).port == 7002


def test_python_m_service_exits_with_the_sentence_on_a_bad_config(tmp_path):
    path = _write(tmp_path, "models:\n - {name: a, task: embed, source: minilm, variants: [{name: x, strategy: int3}]}")
    r = subprocess.run([sys.executable, "-m", "service", "--config", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown strategy 'int3'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_model_that_will_not_load_stops_start_up_with_one_sentence(tmp_path):
    path = _write(tmp_path, f"models:\n - {{name: a, task: embed, source: {tmp_path}/missing-model, "
                            "variants: [{name: x, strategy: fp32}]}")
    r = subprocess.run([sys.executable, "-m", "service", "--config", str(path), "--port", "0"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model 'a': could not load") and "local model directory" in last


def _model(**routing) -> ModelConfig:
    return ModelConfig(name="m", task="embed", source="minilm", routing=routing,
                       variants=[{"name": "fp32", "strategy": "fp32"}, {"name": "int8", "strategy": "dynamic-int8"}])


def test_pinned_variant_wins_and_unknown_ones_name_the_choices():
    router = Router(_model(default="int8"))
    assert router.choose() == "int8" and router.choose("fp32") == "fp32"
    with pytest.raises(UnknownVariant, match="available: fp32, int8"):
        router.choose("int4")


def test_weighted_split_follows_weights_and_is_sticky_per_request_key():
    router = Router(_model(split={"fp32": 0.25, "int8": 0.75}), rng=random.Random(0))
    counts = collections.Counter(router.choose() for _ in range(4000))
    assert 0.22 < counts["fp32"] / 4000 < 0.28
    for key in ("user-1", "user-2", "user-3", "ünïcode-🙂"):
        assert len({router.choose(request_key=key) for _ in range(20)}) == 1
    keyed = collections.Counter(router.choose(request_key=f"user-{i}") for i in range(4000))
    assert 0.22 < keyed["fp32"] / 4000 < 0.28


def test_shadow_samples_the_configured_fraction_onto_the_baseline():
    router = Router(_model(shadow=0.3), rng=random.Random(1))
    targets = [router.shadow_target("int8") for _ in range(2000)]
    assert set(targets) == {None, "fp32"} and 0.26 < targets.count("fp32") / 2000 < 0.34
    assert {router.shadow_target("fp32") for _ in range(200)} == {None, "int8"}
    assert Router(_model()).shadow_target("int8") is None


def test_restart_with_artifacts_loads_saved_variants_instead_of_quantizing(tmp_path):
    from service.metrics import Metrics
    from service.builder import build_catalog

    path = _write(tmp_path, "models:\n - {name: intent, task: classify, source: intent, variants: "
                            "[{name: fp32, strategy: fp32}, {name: int8, strategy: static-int8}]}\n")
    texts = ["set a timer for ten minutes", "my card was declined at the store", "what's the weather"]
    runs = []
    for _ in range(2):
        registry = build_catalog(load_settings(path, artifacts_dir=str(tmp_path / "artifacts"), probe_texts=16), Metrics())
        served = registry.models["intent"]
        v = served.variants["int8"]
        runs.append((v.loaded_from_artifact, v.quantization_seconds, v.fidelity,
                     served.task.run(v.module, served.task.tokenize(texts))))
    (first_loaded, first_s, first_fid, first_out), (second_loaded, second_s, second_fid, second_out) = runs
    assert not first_loaded and second_loaded
    assert (tmp_path / "artifacts" / "intent" / "int8" / "manifest.json").is_file()
    assert all(torch.equal(a, b) for a, b in zip(first_out, second_out)) and first_fid == second_fid
    assert second_s < first_s  # calibration and SmoothQuant are skipped on the second start
