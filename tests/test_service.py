"""The real app under uvicorn on 127.0.0.1, called over HTTP: the default config's models."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

from bench.live import thread_server
from quantization.texts import eval_texts
from service.app import create_app
from quantization.tasks import get_task
from service.config import load_settings


@pytest.fixture(scope="module")
def server():
    app = create_app(load_settings(probe_texts=32))
    with thread_server(app) as (base, saw_not_ready):
        yield base, app, saw_not_ready


def direct(app, model: str, variant: str, texts: list[str]) -> torch.Tensor:
    served = app.state.catalog.models[model]
    return torch.stack(served.task.run(served.variants[variant].module, served.task.tokenize(texts)))


def test_health_and_readiness(server):
    base, _, saw_not_ready = server
    assert httpx.get(f"{base}/livez").json() == {"status": "alive"}
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["ready"] is True and set(ready["models"]) == {"minilm", "intent", "en-pt", "pt-en"}
    assert saw_not_ready  # /readyz said 503 while the models were being built


def test_openai_client_gets_fp32_embeddings_unchanged(server):
    from openai import OpenAI

    base, app, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply."]
    for fmt in (None, "float", "base64"):  # None: the client asks for base64 and decodes it itself
        kwargs = {"encoding_format": fmt} if fmt else {}
        resp = client.embeddings.create(model="minilm", input=texts, extra_headers={"X-Variant": "fp32"}, **kwargs)
        vectors = [np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) if fmt == "base64"
                   else d.embedding for d in resp.data]
        got = torch.tensor(np.array(vectors, dtype=np.float32))
        want = F.normalize(direct(app, "minilm", "fp32", texts), dim=-1)
        assert got.shape == (3, 384)
        assert float(F.cosine_similarity(got, want).min()) >= 0.9999
    single = client.embeddings.create(model="minilm", input="hello world")
    assert len(single.data) == 1 and single.usage.prompt_tokens > 0


def test_embed_returns_one_result_per_input_in_order_and_names_the_variant(server):
    base, app, _ = server
    texts = ["first sentence", "a second, longer sentence about guitars", "third"]
    r = httpx.post(f"{base}/v1/embed", json={"inputs": texts, "variant": "int8"})
    assert r.status_code == 200 and r.headers["X-Variant"] == "int8"
    body = r.json()
    assert body["variant"] == "int8" and body["dimension"] == 384 and body["model"] == "minilm"
    assert [res["index"] for res in body["results"]] == [0, 1, 2]
    got = torch.tensor([res["embedding"] for res in body["results"]])
    want = F.normalize(direct(app, "minilm", "int8", texts), dim=-1)
    assert float(F.cosine_similarity(got, want).min()) > 0.9999
    assert body["usage"]["input_tokens"] >= 8 and body["inference_seconds"] > 0


def test_classify_answers_real_intents(server):
    base, _, _ = server
    r = httpx.post(f"{base}/v1/classify", json={"inputs": ["set a timer for ten minutes",
                                                          "my card was declined at the store"], "top_k": 3},
                   headers={"X-Variant": "fp32"})
    assert r.status_code == 200 and r.headers["X-Variant"] == "fp32"
    results = r.json()["results"]
    assert results[0]["labels"][0]["label"] == "timer" and results[0]["labels"][0]["score"] > 0.9
    assert results[1]["labels"][0]["label"] == "card_declined"
    assert len(results[0]["labels"]) == 3


def test_compare_reports_int8_agreement_within_the_library_bounds(server):
    base, _, _ = server
    texts = eval_texts()[:24]
    emb = httpx.post(f"{base}/v1/compare", json={"model": "minilm", "inputs": texts}, timeout=60).json()
    by = {v["variant"]: v for v in emb["variants"]}
    assert emb["baseline"] == "fp32" and set(by) == {"fp32", "int8"}
    assert by["fp32"]["agreement"]["mean_cosine"] > 0.99999
    # the kernels are chosen on this CPU (7-bit activations where they are the fast exact route): the bound is
    # the model's fidelity bound, what the serving gate holds every default variant to
    bound = get_task("embed").default_bound
    assert by["int8"]["agreement"]["mean_cosine"] >= bound["mean_cosine"]
    assert by["int8"]["agreement"]["min_cosine"] >= bound["min_cosine"]
    assert len(by["int8"]["per_input_agreement"]) == 24 and by["int8"]["latency_seconds"] > 0
    cls = httpx.post(f"{base}/v1/compare", json={"model": "intent", "inputs": texts}, timeout=60).json()
    by = {v["variant"]: v for v in cls["variants"]}
    assert by["int8"]["agreement"]["top1_agreement"] >= 0.9
    assert by["int8"]["results"][0]["labels"]


def test_models_endpoint_shows_variants_with_sizes_fidelity_and_live_latency(server):
    base, _, _ = server
    httpx.post(f"{base}/v1/embed", json={"inputs": ["warm"]})
    body = httpx.get(f"{base}/v1/models/minilm").json()
    v = {x["name"]: x for x in body["variants"]}
    # int8 is strategy: auto, so which int8 strategy it is was measured on this CPU
    winner = next(c for c in v["int8"]["auto"]["candidates"] if c.get("chosen"))
    assert v["int8"]["strategy"] == winner["strategy"] and v["fp32"]["strategy"] == "fp32"
    assert winner["strategy"] in ("dynamic-int8", "static-int8", "weight-only-int8")
    assert v["int8"]["weight_bytes"] < v["fp32"]["weight_bytes"]
    assert v["int8"]["startup_fidelity"]["mean_cosine"] > 0.995  # the bound; the probe leads with hard sentences
    assert v["int8"]["requests"] >= 1 and v["int8"]["latency_seconds"]["p50"] > 0
    assert {m["name"] for m in httpx.get(f"{base}/v1/models").json()["models"]} == {"minilm", "intent", "en-pt", "pt-en"}


def test_metrics_parse_and_hold_per_variant_histograms_from_start(server):
    base, _, _ = server
    text = httpx.get(f"{base}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    hist = families["quantserve_request_duration_seconds"]
    series = {(s.labels.get("model"), s.labels.get("variant")) for s in hist.samples if s.name.endswith("_bucket")}
    assert {("minilm", "fp32"), ("minilm", "int8"), ("intent", "fp32"), ("intent", "int8")} <= series
    assert "quantserve_batch_size" in families and "quantserve_inference_duration_seconds" in families
    weights = {s.labels["variant"]: s.value for s in families["quantserve_weight_bytes"].samples
               if s.labels["model"] == "minilm"}
    assert weights["int8"] < weights["fp32"]
    startup = [s for s in families["quantserve_fidelity"].samples if s.labels["source"] == "startup"]
    assert any(s.labels["metric"] == "top1_agreement" for s in startup)
    assert families["process_resident_memory_bytes"].samples[0].value > 1e8


def test_64_concurrent_requests_each_get_their_own_answer_and_batching_changes_nothing(server):
    base, app, _ = server
    texts = eval_texts()[:64]

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/embed", json={"inputs": [t], "variant": "fp32"})
                                          for t in texts))

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    got = torch.tensor([r.json()["results"][0]["embedding"] for r in responses])
    alone = torch.cat([F.normalize(direct(app, "minilm", "fp32", [t]), dim=-1) for t in texts])
    assert float(F.cosine_similarity(got, alone).min()) >= 0.9999
    sizes = [s for s in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
             if s.name == "quantserve_batch_size"][0].samples
    count = {s.labels["variant"]: s.value for s in sizes if s.name.endswith("_count") and s.labels["model"] == "minilm"}
    total = {s.labels["variant"]: s.value for s in sizes if s.name.endswith("_sum") and s.labels["model"] == "minilm"}
    assert total["fp32"] / count["fp32"] > 1.5  # requests were really merged into batches


def test_a_newcomers_curl_to_translate_on_the_default_config_returns_portuguese(server):
    base, _, _ = server
    r = httpx.post(f"{base}/v1/translate", json={"inputs": ["How are you today?"]}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["translation"] == "Como você está hoje?"


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/embed", {"model": "nope", "inputs": ["x"]}, 404, "available: minilm"),
    ("/v1/embed", {"inputs": ["x"], "variant": "int4"}, 404, "available: fp32, int8"),
    ("/v1/classify", {"model": "minilm", "inputs": ["x"]}, 404, "available: intent"),
    ("/v1/embed", {"inputs": []}, 422, "inputs"),
    ("/v1/embed", {"inputs": "not a list"}, 422, "inputs"),
    ("/v1/embed", {"inputs": [1, 2]}, 422, "inputs.0"),
    ("/v1/classify", {"inputs": ["x"], "top_k": 0}, 422, "top_k"),
    ("/v1/embed", {"inputs": ["x"], "colour": "red"}, 422, "colour"),
    ("/v1/embeddings", {"model": "minilm", "input": ["x"], "dimensions": 12}, 422, "384"),
    ("/v1/compare", {"model": "nope", "inputs": ["x"]}, 404, "available"),
])
def test_bad_input_gets_a_json_error_naming_the_field_or_the_choices(server, path, body, status, needle):
    base, _, _ = server
    r = httpx.post(f"{base}{path}", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or any(needle in f["field"] for f in err.get("fields", []))


def test_shadow_traffic_records_agreement_off_the_response_path(server):
    base, app, _ = server
    router = app.state.catalog.models["minilm"].router
    router.shadow = 1.0  # every request shadows for this test
    try:
        for t in eval_texts()[:8]:
            assert httpx.post(f"{base}/v1/embed", json={"inputs": [t]}).status_code == 200
    finally:
        router.shadow = 0.05
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        v = {x["name"]: x for x in httpx.get(f"{base}/v1/models/minilm").json()["variants"]}
        if v["int8"]["shadow_agreement"]["inputs"] >= 8:
            break
        time.sleep(0.2)
    assert v["int8"]["shadow_agreement"]["inputs"] >= 8 and v["int8"]["shadow_agreement"]["mean"] > 0.99
    metric = [s for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
              if f.name == "quantserve_fidelity" for s in f.samples
              if s.labels["source"] == "shadow" and s.labels["model"] == "minilm"]
    assert metric and metric[0].labels["variant"] == "int8" and metric[0].value > 0.99


def test_request_tokenizing_and_embedding_output_match_the_library_paths(minilm, texts):
    """The request path tokenizes with the Rust core and normalises with numpy; same ids, same vectors."""
    adapter = get_task("embed")(minilm, max_tokens=32)
    assert adapter._fast is not None
    inputs = texts[:40] + ["", "ünïcödé  文字 🙂 naïve café", "word " * 100, texts[3] * 4]
    for truncation in ("truncate", "error"):
        want = minilm.tokenizer(inputs, truncation=True, max_length=33)["input_ids"]
        over = [i for i, ids in enumerate(want) if len(ids) > 32]
        assert len(over) >= 2  # the limit is exercised
        if truncation == "error":
            with pytest.raises(Exception, match="longer than the model's limit of 32 tokens"):
                adapter.encode(inputs, truncation)
            continue
        enc = adapter.encode(inputs, truncation)
        cut = minilm.tokenizer([inputs[i] for i in over], truncation=True, max_length=32)["input_ids"]
        for i, ids in zip(over, cut):
            want[i] = ids
        assert enc.items == want and enc.truncated == over
        assert [adapter.encode([text]).items[0] for text in inputs] == want  # one text per call takes another branch
    vector = torch.randn(384) * 3
    for normalize in (True, False):
        got = torch.tensor(adapter.embedding(vector, normalize))
        assert torch.allclose(got, F.normalize(vector, dim=0) if normalize else vector, atol=1e-7)


# (path, headers, body, status): requests the fast path answers itself, then requests it must leave to
# FastAPI, which words their 4xx (the last group).
SAME_ANSWER_CASES = [
    ("/v1/embed", {}, {"inputs": ["the fast path", "and its reference"], "variant": "int8"}, 200),
    ("/v1/embed", {"X-Variant": "fp32"}, {"inputs": ["not normalised"], "normalize": False}, 200),
    ("/v1/embed", {"X-Request-Key": "user-7"}, {"inputs": ["word " * 400], "truncation": "truncate"}, 200),
    ("/v1/embed", {}, {"inputs": ["word " * 400], "truncation": "error"}, 422),
    ("/v1/embed", {}, {"inputs": ["x"], "variant": "int4"}, 404),
    ("/v1/classify", {"X-Variant": "int8"}, {"inputs": ["book me a flight to Lisbon", "hello"], "top_k": 3}, 200),
    ("/v1/embeddings", {"X-Variant": "int8"}, {"model": "minilm", "input": "hi", "encoding_format": "base64",
                                               "user": "u1"}, 200),
    ("/v1/embeddings", {}, {"model": "minilm", "input": ["x"], "dimensions": 12}, 422),
    ("/v1/translate", {"X-Variant": "int8"}, {"inputs": ["The house is small."], "target_lang": "pt"}, 200),
    ("/v1/translate", {}, {"inputs": ["x"], "source_lang": "en", "target_lang": "de"}, 422),
    ("/v1/embed", {}, b'{"inputs": ["x"', "4xx"),
    ("/v1/embed", {}, b"", "4xx"),
    ("/v1/embed", {"Content-Type": None}, b'{"inputs": ["x"]}', "4xx"),
    ("/v1/embed", {}, b"\xff\xfe\x00\xd8", "4xx"),
    ("/v1/embed", {}, b"[" * 3000 + b"]" * 3000, "4xx"),
    ("/v1/embed", {}, [{"inputs": ["x"]}], "4xx"),
    ("/v1/embed", {}, {"inputs": [1]}, "4xx"),
    ("/v1/embed", {}, b'{"inputs": ["\\ud800"]}', "4xx"),
    ("/v1/classify", {}, {"inputs": ["x"], "top_k": 0, "colour": "red"}, "4xx"),
]


def test_the_fast_routes_answer_exactly_as_fastapi_does(server):
    """Same status, headers and body from the fast path (served app) and FastAPI's own handling.

    The reference is a second app without the fast path sharing the served app's models, called
    in-process; timings and request ids differ per request and are left out of the comparison.
    """
    base, app, _ = server
    reference = create_app(app.state.settings, fast_routes=False)
    reference.state.catalog, reference.state.engine = app.state.catalog, app.state.engine
    reference.state.serving = app.state.serving

    def normalised(r: httpx.Response):
        body = r.json()
        for key in ("queue_seconds", "inference_seconds"):
            body.pop(key, None)
        body.get("error", {}).pop("request_id", None)
        headers = {k: v for k, v in r.headers.items() if k in ("content-type", "x-variant", "retry-after")}
        return r.status_code, headers, body

    async def both(path, headers, content):
        kwargs = {"json": content} if not isinstance(content, bytes) else {"content": content}
        headers = {"Content-Type": "application/json", **headers}
        headers = {k: v for k, v in headers.items() if v is not None}
        async with httpx.AsyncClient(base_url=base) as live, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=reference), base_url="http://reference") as ref:
            if "json" in kwargs:  # the same bytes to both
                kwargs = {"content": httpx.Request("POST", "/", json=content).content}
            return (await live.post(path, headers=headers, **kwargs),
                    await ref.post(path, headers=headers, **kwargs))

    for path, headers, content, status in SAME_ANSWER_CASES:
        fast, slow = asyncio.run(both(path, headers, content))
        assert normalised(fast) == normalised(slow), (path, headers, content)
        assert fast.status_code == status if status != "4xx" else 400 <= fast.status_code < 500, fast.text
    assert fast.status_code == 422 and normalised(fast)[2]["error"]["fields"][0]["field"] == "top_k"


def test_every_fast_route_is_a_documented_post_route(server):
    from service.fastroutes import FAST_ROUTES

    base, _, _ = server
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    assert FAST_ROUTES and all("post" in paths.get(p, {}) for p in FAST_ROUTES), sorted(FAST_ROUTES)
