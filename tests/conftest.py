"""Shared fixtures: the real embedded models, loaded once per test session."""

from __future__ import annotations

import pytest

from quantization.models import TaskModel, load_task_model
from quantization.pipeline import calibration_texts, eval_texts


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
