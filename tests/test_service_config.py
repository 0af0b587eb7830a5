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
    runs, progress, measured = [], [], []
    entry = tmp_path / "artifacts" / "intent" / "int8"
    for i in range(4):
        if i == 2:  # a corrupt cache entry (a disk error, an interrupted copy) is rebuilt, never served
            weights = entry / "weights.safetensors"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
        registry = build_catalog(load_settings(path, artifacts_dir=str(tmp_path / "artifacts"), probe_texts=16), Metrics())
        served = registry.models["intent"]
        v = served.variants["int8"]
        runs.append((v.loaded_from_artifact, v.quantization_seconds, v.fidelity,
                     served.task.run(v.module, served.task.tokenize(texts))))
        measured.append((v.measured_at, v.speed))
        progress.append([line for line in registry.progress if "artifact" in line and "event=variant_ready" not in line])
    (first_loaded, first_s, first_fid, first_out), (second_loaded, second_s, second_fid, second_out) = runs[:2]
    assert not first_loaded and second_loaded
    assert (entry / "manifest.json").is_file() and not list(entry.glob(".saving-*"))
    assert all(torch.equal(a, b) for a, b in zip(first_out, second_out)) and first_fid == second_fid
    assert second_s < first_s  # calibration and SmoothQuant are skipped on the second start
    assert progress[:2] == [[], []]
    # the restart loaded the same module on the same CPU: its fidelity and speed come from the first start's record
    assert measured[0][0] is None and measured[1][0] is not None and measured[1][1] == measured[0][1]
    assert list(entry.glob("measured-*.json"))
    (rebuilt_loaded, _, rebuilt_fid, rebuilt_out), (fourth_loaded, *_rest) = runs[2:]
    assert not rebuilt_loaded and len(progress[2]) == 1 and "event=artifact_rebuild model=intent variant=int8" in \
        progress[2][0] and "sha256" in progress[2][0]
    assert rebuilt_fid == first_fid and all(torch.equal(a, b) for a, b in zip(first_out, rebuilt_out))
    assert fourth_loaded and progress[3] == []  # the rebuilt entry was saved again


def test_variants_are_cached_in_the_user_cache_by_default_and_an_unwritable_cache_only_costs_a_log_line(
        tmp_path, monkeypatch):
    from service.builder import build_catalog
    from service.metrics import Metrics

    monkeypatch.delenv("QUANTSERVE_ARTIFACTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = _write(tmp_path, "models:\n - {name: intent, task: classify, source: intent, variants: "
                            "[{name: fp32, strategy: fp32}, {name: int8, strategy: dynamic-int8}]}\n")
    assert load_settings(path).artifacts_dir == tmp_path / "cache" / "quantserve"
    for off in ("", "off"):
        monkeypatch.setenv("QUANTSERVE_ARTIFACTS_DIR", off)
        assert load_settings(path).artifacts_dir is None
    switched_off = tmp_path / "off.yaml"
    switched_off.write_text("artifacts_dir: off\n" + path.read_text())
    assert load_settings(switched_off).artifacts_dir is None
    monkeypatch.delenv("QUANTSERVE_ARTIFACTS_DIR")
    first = build_catalog(load_settings(path, probe_texts=16), Metrics())
    assert (tmp_path / "cache" / "quantserve" / "intent" / "int8" / "manifest.json").is_file()
    again = build_catalog(load_settings(path, probe_texts=16), Metrics())
    assert not first.models["intent"].variants["int8"].loaded_from_artifact
    assert again.models["intent"].variants["int8"].loaded_from_artifact
    # a cache that cannot be written (a read-only file system: here, a path under a plain file) serves all the same
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    built = build_catalog(load_settings(path, probe_texts=16, artifacts_dir=str(blocker / "cache")), Metrics())
    assert set(built.models["intent"].variants) == {"fp32", "int8"}
    said = [line for line in built.progress if "event=artifact_not_saved" in line]
    assert len(said) == 1 and "model=intent variant=int8" in said[0]
