"""Saving a variant and loading it back: identical outputs, and refusals that say why."""

from __future__ import annotations

import json

import pytest
import torch

from quantization.artifacts import load_artifact, save_artifact, verify_artifact
from quantization.errors import ArtifactError
from quantization.pipeline import quantize_model


@pytest.fixture(scope="module")
def static_artifact(minilm, tmp_path_factory):
    qm = quantize_model(minilm, "static-int8")
    out = tmp_path_factory.mktemp("static")
    save_artifact(minilm, qm, out)
    return qm, out


@pytest.mark.parametrize("strategy", ["dynamic-int8", "bf16", "fp32"])
def test_saved_variants_load_back_with_identical_outputs(minilm, texts, tmp_path, strategy):
    qm = quantize_model(minilm, strategy, {"keep": ["model.encoder.layer.5.output.dense"]}
                        if strategy != "fp32" else None)
    save_artifact(minilm, qm, tmp_path)
    loaded = load_artifact(tmp_path, minilm)
    assert loaded.strategy == strategy and loaded.kept == qm.kept
    assert torch.equal(minilm.run(qm.module, texts[:24]), minilm.run(loaded.module, texts[:24]))


def test_static_artifact_round_trip_and_manifest(minilm, texts, static_artifact):
    qm, out = static_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == minilm.source_hash
    assert set(manifest["versions"]) >= {"quantization", "torch"}
    assert manifest["params"]["smooth_alpha"] == 0.8
    assert len(manifest["layer_configs"]) == len(qm.layers)
    loaded = load_artifact(out, minilm)
    assert torch.equal(minilm.run(qm.module, texts[:24]), minilm.run(loaded.module, texts[:24]))


def test_loading_refuses_an_artifact_of_another_model(intent, static_artifact):
    with pytest.raises(ArtifactError, match="was made from 'minilm'.*quantize this model"):
        load_artifact(static_artifact[1], intent)


def test_loading_refuses_other_versions(minilm, static_artifact, tmp_path):
    _, out = static_artifact
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["versions"]["torch"] = "1.0.0"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="torch 1.0.0 \\(artifact\\) vs"):
        load_artifact(tmp_path, minilm)


def test_loading_refuses_corrupt_weights(minilm, static_artifact, tmp_path):
    _, out = static_artifact
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        verify_artifact(tmp_path)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ('{"format_version": 1}', "lacks source"),
])
def test_broken_manifests_are_refused(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(tmp_path)
