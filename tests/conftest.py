"""Shared fixtures: the real embedded models, loaded once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# The default config serves `sentiment` once it has been trained on this machine; tests of the
# default config must not depend on that, so they look for trained models in an empty directory
# (tests of the trained model point this at their own), removed when the session ends.
os.environ["QUANTIZATION_MODELS_DIR"] = tempfile.mkdtemp(prefix="no-trained-models-")
atexit.register(shutil.rmtree, os.environ["QUANTIZATION_MODELS_DIR"], True)
# The service keeps built variants in the user cache by default; tests build afresh unless they name a cache,
# so that no test depends on what an earlier one (or an earlier run) left there.
os.environ["QUANTSERVE_ARTIFACTS_DIR"] = ""
# Likewise variants are compiled before they serve (optimize: inline), so that no background build competes with
# what a test measures; tests of background optimisation set optimize: background themselves.
os.environ["QUANTSERVE_OPTIMIZE"] = "inline"

from quantization.models import load_task_model
from quantization.task_model import TaskModel
from quantization.texts import calibration_texts, eval_texts


@pytest.fixture(scope="session")
def minilm() -> TaskModel:
    return load_task_model("minilm")


@pytest.fixture(scope="session")
def intent() -> TaskModel:
    return load_task_model("intent")


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return eval_texts()


@pytest.fixture(scope="session")
def calib() -> list[str]:
    return calibration_texts()


@pytest.fixture(scope="session")
def minilm_ref(minilm, texts):
    return minilm.run(None, texts)


@pytest.fixture(scope="session")
def intent_ref(intent, texts):
    return intent.run(None, texts)


HOSTILE_CONFIG = """
limits: {max_body_bytes: 300000, max_inputs: 64, max_chars: 5000, request_timeout_s: 60}
batching: {max_batch_size: 16, max_queue: 64}
on_variant_failure: mark_unavailable
gate: {action: serve}   # these tests route to int8 whatever its speed on this CPU; the gate has its own tests
models:
  - name: minilm
    task: embed
    source: minilm
    max_input_tokens: 64
    variants:
      - {name: fp32, strategy: fp32}
      - {name: int8, strategy: dynamic-int8}
      - {name: broken, strategy: dynamic-int8, artifact: ARTIFACT}
    routing: {default: int8}
  - name: intent
    task: classify
    source: intent
    variants:
      - {name: fp32, strategy: fp32}
"""


@pytest.fixture(scope="session")
def hostile_server(tmp_path_factory):
    """A real service with small limits and a variant whose artifact is corrupt (served without it)."""
    from bench.live import thread_server
    from service.app import create_app
    from service.config import load_settings

    root = tmp_path_factory.mktemp("hostile")
    broken = root / "broken-artifact"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    path = root / "models.yaml"
    path.write_text(HOSTILE_CONFIG.replace("ARTIFACT", str(broken)))
    app = create_app(load_settings(path, probe_texts=16))
    with thread_server(app) as (base, _):
        yield base, app
