"""Whatever a client sends gets a correct answer or a clear 4xx; the service stays healthy under abuse.

Runs against a real uvicorn server (the ``hostile_server`` fixture: small limits, one variant that
fails to build and is served without) and, for API keys, a second one with keys configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

from bench.live import thread_server
from service.app import create_app
from service.config import ConfigError, load_settings
from service.context import RequestIdFilter
from service.metrics import Metrics
from service.builder import build_catalog
from service.catalog import StartupError

LONG = "the quick brown fox jumps over the lazy dog " * 40  # ~360 tokens: over minilm's 64 here
J = {"Content-Type": "application/json"}


def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


HOSTILE = [
    # (case, path, body bytes, extra headers, status, needle in message or fields)
    ("emoji", "/v1/embed", _raw({"inputs": ["I love it 😍🔥👍🏽 👨‍👩‍👧"]}), {}, 200, None),
    ("right-to-left", "/v1/embed", _raw({"inputs": ["مرحبا بالعالم", "שלום עולם", "mixed עברית and English"]}), {},
     200, None),
    ("NUL and control characters", "/v1/embed", _raw({"inputs": ["a\x00b\x01c\x1b[31m\x7f\u200b\ufeff"]}), {}, 200,
     None),
    ("only whitespace", "/v1/embed", _raw({"inputs": [" \t\n\r\u3000 "]}), {}, 200, None),
    ("empty string", "/v1/classify", _raw({"inputs": [""]}), {}, 200, None),
    ("lone surrogate", "/v1/embed", b'{"inputs": ["ok", "bad \\ud800 text"]}', {}, 422, "inputs.1"),
    ("empty list", "/v1/embed", _raw({"inputs": []}), {}, 422, "inputs"),
    ("too many inputs", "/v1/embed", _raw({"inputs": ["x"] * 65}), {}, 422, "limit of 64"),
    ("too many characters", "/v1/classify", _raw({"inputs": ["ok", "x" * 5001]}), {}, 422, "inputs.1"),
    ("too many tokens, error policy", "/v1/embed", _raw({"inputs": ["ok", LONG], "truncation": "error"}), {}, 422,
     "inputs.1"),
    ("bad truncation policy", "/v1/embed", _raw({"inputs": ["ok"], "truncation": "cut"}), {}, 422, "truncation"),
    ("body over the byte limit", "/v1/embed", _raw({"inputs": ["x" * 4000] * 80}), {}, 413, "300000 bytes"),
    ("deeply nested JSON", "/v1/embed", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, None),
    ("invalid JSON", "/v1/embed", b'{"inputs": ["x"', {}, 400, "not valid JSON"),
    ("no content type", "/v1/embed", _raw({"inputs": ["x"]}), {"Content-Type": ""}, 415, "no Content-Type"),
    ("10,000 inputs, OpenAI shape", "/v1/embeddings", _raw({"input": ["x"] * 10_000, "model": "minilm"}), {}, 422,
     "10000 inputs, more than the limit of 64"),
    ("a text over the hard ceiling", "/v1/embed", _raw({"inputs": ["x" * 100_001]}), {}, 422,
     "100001 characters, more than the limit of 5000"),
    ("JSON that is a list", "/v1/embed", b'["x"]', {}, 422, "body"),
    ("null inputs", "/v1/embed", b'{"inputs": null}', {}, 422, "inputs"),
    ("wrong content type", "/v1/embed", b"inputs=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    ("text/plain", "/v1/classify", _raw({"inputs": ["x"]}), {"Content-Type": "text/plain"}, 415, "application/json"),
    ("huge integer", "/v1/classify", b'{"inputs": ["x"], "top_k": 1' + b"0" * 400 + b"}", {}, 422, "top_k"),
    ("integer past Python's digit limit", "/v1/classify", b'{"inputs": ["x"], "top_k": 1' + b"0" * 5000 + b"}", {},
     400, None),
    ("float where an int goes", "/v1/classify", b'{"inputs": ["x"], "top_k": 1e308}', {}, 422, "top_k"),
    ("a fraction where an int goes", "/v1/classify", b'{"inputs": ["x"], "top_k": 2.5}', {}, 422, "top_k"),
    ("an integral float is an integer, as JSON Schema says", "/v1/classify", b'{"inputs": ["x"], "top_k": 2.0}', {},
     200, None),
    ("a numeric string is not", "/v1/classify", b'{"inputs": ["x"], "top_k": "2"}', {}, 422, "top_k"),
    ("NaN", "/v1/classify", b'{"inputs": ["x"], "top_k": NaN}', {}, 422, "top_k"),
    ("unknown field", "/v1/embed", _raw({"inputs": ["x"], "colour": "red"}), {}, 422, "colour"),
    ("unknown model with NUL", "/v1/embed", _raw({"model": "a\x00b", "inputs": ["x"]}), {}, 404, "available: minilm"),
    ("bad timeout header", "/v1/embed", _raw({"inputs": ["x"]}), {"X-Request-Timeout": "soon"}, 422,
     "X-Request-Timeout"),
    ("unavailable variant", "/v1/embed", _raw({"inputs": ["x"], "variant": "broken"}), {}, 503,
     "working variants: fp32, int8"),
]


@pytest.mark.parametrize("case, path, body, headers, status, needle", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_its_status_and_a_json_error_naming_the_field(hostile_server, case, path, body, headers,
                                                                         status, needle):
    base, _ = hostile_server
    r = httpx.post(f"{base}{path}", content=body, headers={**J, **headers}, timeout=60)
    assert r.status_code == status, (case, r.text[:500])
    assert r.headers["X-Request-ID"]
    if status == 200:
        results = r.json()["results"]
        assert results and all(("embedding" in x and all(map(_finite, x["embedding"]))) or x.get("labels")
                               for x in results)
        return
    err = r.json()["error"]
    assert err["type"] and err["message"] and "\n" not in err["message"]
    assert err["request_id"] == r.headers["X-Request-ID"]
    if needle:
        assert needle in err["message"] or any(needle in f["field"] for f in err.get("fields") or []), err


def _finite(x: float) -> bool:
    return x == x and abs(x) < 1e6


def test_the_service_is_healthy_after_the_hostile_inputs(hostile_server):
    base, _ = hostile_server
    assert httpx.get(f"{base}/readyz").status_code == 200
    r = httpx.post(f"{base}/v1/embed", json={"inputs": ["still fine"]})
    assert r.status_code == 200 and len(r.json()["results"][0]["embedding"]) == 384


def test_routing_misses_get_the_uniform_error_body(hostile_server):
    base, _ = hostile_server
    for r, status in ((httpx.get(f"{base}/v1/embed"), 405), (httpx.post(f"{base}/v2/nothing", json={}), 404),
                      (httpx.get(f"{base}/v1/models/nope"), 404)):
        assert r.status_code == status and r.json()["error"]["request_id"] == r.headers["X-Request-ID"]


def test_long_inputs_are_truncated_by_default_and_reported(hostile_server):
    base, app = hostile_server
    r = httpx.post(f"{base}/v1/embed", json={"inputs": ["short", LONG], "variant": "fp32"})
    assert r.status_code == 200 and r.json()["usage"]["truncated"] == [1]
    served = app.state.catalog.models["minilm"]
    items = served.task.tokenize(["short", LONG])
    assert [len(i) for i in items][1] == 64  # cut to the model's limit, [SEP] kept
    assert items[1][-1] == served.task_model.tokenizer.sep_token_id


def test_limits_are_discoverable_in_v1_models(hostile_server):
    base, _ = hostile_server
    limits = httpx.get(f"{base}/v1/models").json()["limits"]
    assert limits["max_inputs"] == 64 and limits["max_chars"] == 5000 and limits["max_body_bytes"] == 300000
    assert limits["max_queue"] == 64 and limits["max_input_tokens"] == {"minilm": 64, "intent": 256}
    assert limits["truncation"] == "truncate" and limits["request_timeout_s"] == 60
    # the OpenAPI document states the same limits, so a request that keeps to it is never refused for one
    schemas = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]
    for name in ("EmbedRequest", "ClassifyRequest"):
        inputs = schemas[name]["properties"]["inputs"]
        assert (inputs["maxItems"], inputs["items"]["maxLength"]) == (64, 5000), name
    compare = schemas["CompareRequest"]["properties"]["inputs"]
    assert (compare["maxItems"], compare["items"]["maxLength"]) == (32, 5000)
    translate = schemas["TranslateRequest"]["properties"]["inputs"]
    assert (translate["maxItems"], translate["items"]["maxLength"]) == (64, 4000)
    # bounds as JSON Schema keywords (pydantic writes "ge"/"le" where a validator hides them)
    assert '"ge":' not in json.dumps(schemas) and '"le":' not in json.dumps(schemas)
    openai = json.dumps(schemas["OpenAIEmbeddingsRequest"]["properties"]["input"])
    assert '"maxItems": 64' in openai and '"maxLength": 5000' in openai and "2048" not in openai


def test_a_variant_that_failed_to_build_is_reported_and_refused_while_the_rest_serve(hostile_server):
    base, _ = hostile_server
    model = httpx.get(f"{base}/v1/models/minilm").json()
    assert [v["name"] for v in model["variants"]] == ["fp32", "int8"]
    assert model["unavailable"][0]["name"] == "broken" and "manifest" in model["unavailable"][0]["error"]
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and "broken" in ready.json()["unavailable"]["minilm"]
    assert httpx.post(f"{base}/v1/embed", json={"inputs": ["x"]}).headers["X-Variant"] == "int8"
    compare = httpx.post(f"{base}/v1/compare", json={"model": "minilm", "inputs": ["x"]}).json()
    assert [v["variant"] for v in compare["variants"]] == ["fp32", "int8"]


def test_a_variant_that_fails_to_build_stops_start_up_by_default(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(f"models:\n - {{name: m, task: embed, source: minilm, variants: [{{name: fp32, strategy: fp32}}, "
                    f"{{name: int8, strategy: dynamic-int8, artifact: {tmp_path}/nothing-here}}]}}\n")
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "nothing-here" / "manifest.json").write_text("[]")
    with pytest.raises(StartupError) as err:
        build_catalog(load_settings(path, probe_texts=4), Metrics())
    assert "model 'm' variant 'int8'" in str(err.value) and "\n" not in str(err.value)


def test_request_ids_are_echoed_or_made_and_name_every_log_line_about_the_request(hostile_server):
    base, app = hostile_server
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.addFilter(RequestIdFilter())
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    service_logger = logging.getLogger("service")
    level = service_logger.level
    service_logger.setLevel(logging.INFO)
    served = app.state.catalog.models["minilm"]
    batcher = app.state.engine.batcher(served.name, "fp32")
    real = batcher._run_batch
    poison = served.task.tokenize(["poison pill"])[0]

    def fail_on_poison(items):  # a fault inside one batch: the model call raises
        if poison in items:
            raise RuntimeError("injected fault")
        return real(items)

    batcher._run_batch = fail_on_poison
    try:
        ok = httpx.post(f"{base}/v1/embed", json={"inputs": ["x"]}, headers={"X-Request-ID": "client-id-42"})
        made = httpx.post(f"{base}/v1/embed", json={"inputs": ["x"]}, headers={"X-Request-ID": "bad id\twith tab"})
        failed = httpx.post(f"{base}/v1/embed", json={"inputs": ["poison pill"], "variant": "fp32"},
                            headers={"X-Request-ID": "doomed-7"})
        after = httpx.post(f"{base}/v1/embed", json={"inputs": ["poison", "pill"], "variant": "fp32"})
    finally:
        batcher._run_batch = real
        logging.getLogger().removeHandler(handler)
        service_logger.setLevel(level)
    assert ok.headers["X-Request-ID"] == "client-id-42"
    assert len(made.headers["X-Request-ID"]) == 32 and made.headers["X-Request-ID"] != "bad id\twith tab"
    # the fault fails only its own batch, with a 500 naming the request; the worker keeps serving
    assert failed.status_code == 500 and failed.json()["error"]["request_id"] == "doomed-7"
    assert after.status_code == 200
    about_doomed = [r for r in records if r.request_id == "doomed-7"]
    assert any("event=batch_failed" in r.getMessage() for r in about_doomed)
    assert any("event=request" in r.getMessage() and "status=500" in r.getMessage() for r in about_doomed)
    assert any("requests=doomed-7" in r.getMessage() for r in records)  # the batcher's line names it too
    assert any(r.request_id == "client-id-42" and "event=request" in r.getMessage() for r in records)


def _inputs_total(base: str, variant: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        if fam.name == "quantserve_inputs":
            for s in fam.samples:
                if s.name == "quantserve_inputs_total" and s.labels["model"] == "minilm" and \
                        s.labels["variant"] == variant:
                    return s.value
    raise AssertionError("no quantserve_inputs_total sample")


def _busy(base: str, app, n: int = 64) -> threading.Thread:
    """Occupy minilm/fp32's worker: n long inputs, in batches of 16; returns once the rest is queued."""
    batcher = app.state.engine.batcher("minilm", "fp32")

    def run():
        httpx.post(f"{base}/v1/embed", json={"inputs": [f"{i} {LONG}" for i in range(n)], "variant": "fp32"},
                   timeout=120)
    t = threading.Thread(target=run)
    t.start()
    _wait(lambda: batcher.queued_items > 0)
    return t


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_passed_deadline_answers_504_and_its_work_never_runs(hostile_server):
    base, app = hostile_server
    before = _inputs_total(base, "fp32")
    busy = _busy(base, app)
    r = httpx.post(f"{base}/v1/embed", json={"inputs": ["late one", "late two"], "variant": "fp32"},
                   headers={"X-Request-Timeout": "0.2"}, timeout=30)
    busy.join()
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    assert _inputs_total(base, "fp32") - before == 64  # only the busy request's inputs reached the model


def test_a_client_that_disconnects_has_its_queued_work_dropped(hostile_server):
    base, app = hostile_server
    batcher = app.state.engine.batcher("minilm", "fp32")
    before = _inputs_total(base, "fp32")
    busy = _busy(base, app)
    body = _raw({"inputs": ["gone one", "gone two", "gone three"], "variant": "fp32"})
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait(lambda: any(len(r.items) == 3 for r in list(batcher._queue)))  # queued behind the busy one
    busy.join()
    time.sleep(0.3)
    assert _inputs_total(base, "fp32") - before == 64
    families = text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
    gone = [s for f in families if f.name == "quantserve_requests" for s in f.samples
            if s.labels.get("status") == "499" and s.labels["variant"] == "fp32"]
    assert gone and gone[0].value >= 1


def test_overload_gets_429_with_retry_after_never_a_timeout_and_answers_stay_correct(hostile_server):
    base, app = hostile_server
    served = app.state.catalog.models["minilm"]
    texts = [f"request number {i} asks about topic {i % 7}" for i in range(120)]
    ref = torch.stack(served.task.run(served.variants["fp32"].module, served.task.tokenize(texts)))

    async def one(client, i):
        return i, await client.post("/v1/embed", json={"inputs": [texts[i]] * 8, "variant": "fp32"})

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(texts))))

    results = asyncio.run(burst())
    statuses = [r.status_code for _, r in results]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    for i, r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "overloaded"
        else:
            got = torch.tensor([x["embedding"] for x in r.json()["results"]])
            assert F.cosine_similarity(got, F.normalize(ref[i], dim=-1).expand_as(got)).min() > 0.9999
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.post(f"{base}/v1/embed", json={"inputs": ["after the storm"]}).status_code == 200


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    (root / "keys").write_text("# one key a line\nfile-key-ABC\n")
    (root / "m.yaml").write_text(
        f"auth: {{api_keys_file: {root / 'keys'}}}\ncors: {{allow_origins: ['https://dash.example']}}\n"
        "models:\n - {name: minilm, task: embed, source: minilm, variants: [{name: fp32, strategy: fp32}]}\n")
    import os
    os.environ["QUANTSERVE_AUTH__API_KEYS"] = "env-key-1,env-key-2"
    try:
        settings = load_settings(root / "m.yaml", probe_texts=4)
    finally:
        del os.environ["QUANTSERVE_AUTH__API_KEYS"]
    with thread_server(create_app(settings)) as (base, _):
        yield base, settings


def test_api_keys_no_key_and_wrong_key_get_401_the_right_key_200(keyed_server):
    base, settings = keyed_server
    body = {"inputs": ["hello"]}
    none = httpx.post(f"{base}/v1/embed", json=body)
    wrong = httpx.post(f"{base}/v1/embed", json=body, headers={"Authorization": "Bearer env-key-3"})
    basic = httpx.post(f"{base}/v1/embed", json=body, headers={"Authorization": "Basic env-key-1"})
    assert (none.status_code, wrong.status_code, basic.status_code) == (401, 401, 401)
    assert none.headers["WWW-Authenticate"].startswith("Bearer") and none.json()["error"]["type"] == "unauthorized"
    for key in ("env-key-1", "env-key-2", "file-key-ABC"):
        assert httpx.post(f"{base}/v1/embed", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for public in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{base}{public}").status_code == 200
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert "env-key-1" not in repr(settings) and "env-key-1" not in settings.model_dump_json()


def test_auth_fails_closed_and_states_itself(keyed_server, tmp_path, monkeypatch, caplog):
    base, settings = keyed_server
    # a key setting that yields no usable key stops start-up instead of serving without keys
    for value in (",", " ", "", " , ,"):
        monkeypatch.setenv("QUANTSERVE_AUTH__API_KEYS", value)
        with pytest.raises(ConfigError, match="auth.api_keys: holds no key"):
            load_settings()
    monkeypatch.setenv("QUANTSERVE_AUTH__API_KEYS", "has space")
    with pytest.raises(ConfigError, match="key 1 is not usable") as err:
        load_settings()
    assert "has space" not in str(err.value)
    monkeypatch.delenv("QUANTSERVE_AUTH__API_KEYS")
    (tmp_path / "keys").write_text("# only a comment\n\n")
    (tmp_path / "m.yaml").write_text(f"auth: {{api_keys_file: {tmp_path / 'keys'}}}\nmodels:\n - {{name: m, task: embed, "
                                     "source: minilm, variants: [{name: fp32, strategy: fp32}]}\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_settings(tmp_path / "m.yaml")
    # start-up says whether auth is on and how many keys it has, never the keys
    caplog.set_level("INFO", logger="service")
    create_app(settings)
    create_app(load_settings(probe_texts=4))
    lines = [r.getMessage() for r in caplog.records if "event=auth" in r.getMessage()]
    assert lines == ["event=auth enabled=true keys=3", "event=auth enabled=false keys=0"]
    assert not any("env-key" in r.getMessage() or "file-key" in r.getMessage() for r in caplog.records)


def test_with_keys_on_docs_can_authorize_and_two_authorization_headers_are_refused(keyed_server):
    base, _ = keyed_server
    assert httpx.get(f"{base}/docs").status_code == 200
    doc = httpx.get(f"{base}/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/livez"]["get"]["security"] == [] and "security" not in doc["paths"]["/v1/embed"]["post"]
    two = httpx.post(f"{base}/v1/embed", json={"inputs": ["x"]},
                     headers=[("Authorization", "Bearer env-key-1"), ("Authorization", "Bearer wrong")])
    assert two.status_code == 400 and "2 Authorization headers" in two.json()["error"]["message"]
    assert httpx.post(f"{base}/v1/embed", json={"inputs": ["x"]},
                      headers={"Authorization": "Bearer env-key-1"}).status_code == 200


def test_cors_is_off_by_default_and_answers_configured_origins(keyed_server, hostile_server):
    base, _ = keyed_server
    pre = httpx.options(f"{base}/v1/embed", headers={"Origin": "https://dash.example",
                                                    "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://dash.example"
    other = httpx.get(f"{base}/livez", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{hostile_server[0]}/livez", headers={"Origin": "https://dash.example"})
    assert "access-control-allow-origin" not in default.headers


def test_an_unreadable_key_file_stops_start_up_with_one_sentence(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(f"auth: {{api_keys_file: {tmp_path}/missing}}\nmodels:\n - {{name: m, task: embed, "
                    "source: minilm, variants: [{name: fp32, strategy: fp32}]}\n")
    with pytest.raises(ConfigError, match="api_keys_file .* cannot be read"):
        load_settings(path)


def test_json_logs_carry_the_request_id_and_keep_one_event_a_line():
    import io

    from service.context import RequestContext, activate, deactivate
    from service.logs import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure_logging("info", "json", stream=stream)
        token = activate(RequestContext("req-9", time.monotonic() + 1))
        try:
            logging.getLogger("service.test").warning("event=thing detail=%s", "multi\nline")
        finally:
            deactivate(token)
        logging.getLogger("service.test").warning("event=outside")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().strip().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert len(lines) == 2 and first["request_id"] == "req-9" and first["message"] == "event=thing detail=multi\nline"
    assert second["request_id"] == "-" and first["level"] == "WARNING" and first["logger"] == "service.test"


def _raw_request(base: str, head: bytes, body: bytes = b"") -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        return data


def test_client_controlled_values_cannot_forge_a_log_line_in_either_format(hostile_server):
    """CR, LF and terminal escapes in the path, the headers and the body stay inside one event's line."""
    import io

    from service.logs import JsonFormatter, TextFormatter

    base, _ = hostile_server
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = []
    for fmt, stream in streams.items():
        h = logging.StreamHandler(stream)
        h.addFilter(RequestIdFilter())
        h.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
        handlers.append(h)
        logging.getLogger().addHandler(h)
    http_logger = logging.getLogger("service.http")
    level = http_logger.level
    http_logger.setLevel(logging.INFO)
    forged = "request_id=admin event=request method=POST path=/v1/admin status=200"
    body = _raw({"inputs": ["a\r\nb\x1b[2J"], "model": "x\r\n" + forged})
    try:
        # the forged line after an encoded LF, and an encoded CR and ANSI erase-screen in the path
        line = f"2026-12-07 12:00:00,000 level=INFO logger=service.http {forged}"
        path = b"/v1/embed%0a" + line.replace(" ", "%20").encode()
        _raw_request(base, b"GET " + path + b"%0d%1b%5B2J HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # raw control characters in header values: the HTTP parser refuses the request
        _raw_request(base, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\x1b[31mb\r\n"
                           b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        # what the parser lets through: a forged id and variant in headers, control characters in the body
        _raw_request(base, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"X-Request-ID: admin event=request\r\nX-Variant: fp32 status=200\r\n"
                           b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n", body)
        assert httpx.get(f"{base}/livez").status_code == 200
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
        http_logger.setLevel(level)
    text, js = streams["text"].getvalue(), streams["json"].getvalue()
    assert "\r" not in text + js and "\x1b" not in text + js
    text_lines = text.splitlines()
    assert all(" level=" in line for line in text_lines)  # every line is an event of its own
    json_lines = [json.loads(line) for line in js.splitlines()]  # every line parses
    assert len(json_lines) == len(text_lines)
    forged_lines = [line for line in text_lines if "/v1/admin" in line]
    assert len(forged_lines) == 1 and "event=request method=\"GET\" path=\"/v1/embed\\n" in forged_lines[0]
    assert not any("request_id=admin" in line.split(" level=")[1].split(" event=")[0] for line in text_lines)
