"""Fuzzing from the app's own OpenAPI schema (schemathesis) against a real server: no 5xx, and every
response (status code, content type, headers, body) matches what the schema promises.

Deterministic by default (40 examples per operation); QUANTSERVE_FUZZ_EXAMPLES=2000 fuzzes longer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from conftest import HOSTILE_CONFIG
from service.app import create_app
from service.config import load_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


# Invalid data must never be accepted (2xx); any of our documented refusals counts as rejecting it.
REFUSALS = ["400", "401", "404", "413", "415", "422", "429", "503", "504"]
# The limits /openapi.json states as the configured ones: a request the schema allows is never refused for them.
STATED_LIMITS = ("limits.max_inputs", "limits.max_chars")


@schemathesis.check
def no_refusal_for_a_stated_limit(ctx, response, case) -> None:
    """A schema-valid request may get 404 (an unknown model or variant), 422 for what no JSON schema can
    state (an unsupported language pair, a token count with truncation "error", the decode budget), or
    429; never a 422 for a limit the schema states."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return
    message = response.json()["error"]["message"]
    if any(s in message for s in STATED_LIMITS):
        raise AssertionError(f"a request within the published schema was refused for a limit: {message}")


def _hostile_openapi() -> dict:
    """The schema the ``hostile_server`` publishes at /openapi.json: its own configured limits (the test
    below checks that it is the one served)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "models.yaml"
        path.write_text(HOSTILE_CONFIG.replace("ARTIFACT", str(Path(tmp) / "unused")))
        return create_app(load_settings(path)).openapi()


HOSTILE_OPENAPI = _hostile_openapi()
schema = schemathesis.openapi.from_dict(HOSTILE_OPENAPI, config=SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}}))


def test_the_fuzzed_schema_is_the_one_the_server_publishes(hostile_server):
    base, _ = hostile_server
    assert httpx.get(f"{base}/openapi.json").json() == HOSTILE_OPENAPI


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=int(os.environ.get("QUANTSERVE_FUZZ_EXAMPLES", 40)), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_response_matches_the_schema(case, hostile_server):
    base, _ = hostile_server
    case.call_and_validate(base_url=base, checks=[*CHECKS, no_refusal_for_a_stated_limit], timeout=60)
