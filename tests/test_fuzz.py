"""Fuzzing from the app's own OpenAPI schema (schemathesis) against a real server: no 5xx, and every
response (status code, content type, headers, body) matches what the schema promises.

Deterministic by default (40 examples per operation); QUANTSERVE_FUZZ_EXAMPLES=2000 fuzzes longer."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from service.app import create_app
from service.config import load_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


# The schema a server of this code publishes at /openapi.json (routes do not depend on the config);
# the cases are sent to the live ``hostile_server``.
# Invalid data must never be accepted (2xx); any of our documented refusals counts as rejecting it.
REFUSALS = ["400", "401", "404", "413", "415", "422", "429", "503", "504"]
schema = schemathesis.openapi.from_dict(create_app(load_settings()).openapi(), config=SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}}))


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=int(os.environ.get("QUANTSERVE_FUZZ_EXAMPLES", 40)), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_response_matches_the_schema(case, hostile_server):
    base, _ = hostile_server
    case.call_and_validate(base_url=base, checks=CHECKS, timeout=60)
