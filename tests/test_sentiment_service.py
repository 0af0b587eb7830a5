"""A (briefly) trained sentiment model: the default config serves it with fp32, static-int8 and the
QAT variant saved with it, over real HTTP; without its QAT variant, start-up says how to make it."""

from __future__ import annotations

import shutil

import httpx
import pytest

from bench.live import thread_server
from quantization.datasets import movie_reviews
from quantization.finetune import TrainConfig, finetune_sentiment, qat_sentiment
from quantization.models import load_task_model
from service.app import create_app
from service.config import load_settings
from service.metrics import Metrics
from service.builder import build_catalog
from service.catalog import StartupError

pytestmark = pytest.mark.slow
TINY = TrainConfig(epochs=1, batch_size=16, max_train=48, evals_per_epoch=1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    dev = movie_reviews("dev")[:32]
    finetune_sentiment(root / "sentiment", TINY, dev=dev)
    qat_sentiment(root / "sentiment", TrainConfig(epochs=1, batch_size=16, max_train=32, lr=1e-5, head_lr=1e-4,
                                                  evals_per_epoch=1), calibration_batches=2, dev=dev)
    return root


def test_the_trained_directory_loads_as_the_builtin_sentiment_source(models_dir, monkeypatch):
    monkeypatch.setenv("QUANTIZATION_MODELS_DIR", str(models_dir))
    tm = load_task_model("sentiment")
    assert tm.task == "classify" and tm.labels == ["negative", "positive"]
    assert set(tm.artifacts) == {"qat-int8"} and len(tm.calibration) == 128


def test_the_default_config_serves_sentiment_with_the_qat_variant_from_its_directory(models_dir, monkeypatch):
    monkeypatch.setenv("QUANTIZATION_MODELS_DIR", str(models_dir))
    settings = load_settings(probe_texts=16)
    sentiment = next(m for m in settings.models if m.name == "sentiment")
    assert [(v.name, v.strategy) for v in sentiment.variants] == [
        ("fp32", "fp32"), ("static-int8", "static-int8"), ("qat-int8", "qat-int8")]
    only = settings.model_copy(update={"models": [sentiment]})
    app = create_app(only)
    with thread_server(app) as (base, _):
        served = app.state.catalog.models["sentiment"]
        assert served.variants["qat-int8"].loaded_from_artifact
        assert not served.variants["static-int8"].loaded_from_artifact
        texts = ["A moving, beautifully acted film.", "Dull, lifeless and far too long."]
        for variant in ("fp32", "static-int8", "qat-int8"):
            r = httpx.post(f"{base}/v1/classify", json={"model": "sentiment", "inputs": texts},
                           headers={"X-Variant": variant}, timeout=60)
            assert r.status_code == 200 and r.headers["X-Variant"] == variant
            labels = [res["labels"][0]["label"] for res in r.json()["results"]]
            assert set(labels) <= {"positive", "negative"}


def test_without_its_qat_variant_start_up_says_to_run_finetune_qat(models_dir, tmp_path, monkeypatch):
    shutil.copytree(models_dir / "sentiment", tmp_path / "sentiment", ignore=shutil.ignore_patterns("variants"))
    monkeypatch.setenv("QUANTIZATION_MODELS_DIR", str(tmp_path))
    settings = load_settings(probe_texts=8)
    sentiment = next(m for m in settings.models if m.name == "sentiment")
    with pytest.raises(StartupError, match=r"python -m quantization finetune --qat"):
        build_catalog(settings.model_copy(update={"models": [sentiment]}), Metrics())
