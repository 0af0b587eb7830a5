"""/v1/translate over HTTP on a real uvicorn server serving the default config's translation models."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.hardening import stalling_request
from bench.live import thread_server
from quantization.tasks.translate import sentence_chrf
from quantization.texts import translation_texts
from service.app import create_app
from service.config import load_settings



@pytest.fixture(scope="module")
def server():
    settings = load_settings(probe_texts=16)
    settings.models = [m for m in settings.models if m.task == "translate"]  # the default config's, unchanged
    app = create_app(settings)
    with thread_server(app) as (base, _):
        yield base, app


def post(base: str, body: dict, headers: dict | None = None, **kw) -> httpx.Response:
    # json.dumps escapes to ASCII, so a lone surrogate reaches the server as JSON allows ("\ud800")
    return httpx.post(f"{base}/v1/translate", content=json.dumps(body).encode(), timeout=120,
                      headers={"Content-Type": "application/json", **(headers or {})}, **kw)


@pytest.mark.parametrize("variant", ["fp32", "int8", "native"])
def test_every_variant_translates_english_into_portuguese(server, variant):
    base, _ = server
    r = post(base, {"inputs": ["How are you today?", "Where is the nearest train station?"], "variant": variant})
    assert r.status_code == 200 and r.headers["X-Variant"] == variant
    body = r.json()
    assert body["model"] == "en-pt" and body["source_lang"] == "en" and body["target_lang"] == "pt"
    assert [x["translation"] for x in body["results"]] == ["Como você está hoje?",
                                                          "Onde está a estação de trem mais próxima?"]
    assert body["results"][0]["generated_tokens"] > 0 and body["usage"]["generated_tokens"] > 0


def test_the_language_pair_picks_the_model(server):
    base, _ = server
    body = post(base, {"inputs": ["Onde fica a praia?"], "source_lang": "pt", "target_lang": "en"}).json()
    assert body["model"] == "pt-en" and body["results"][0]["translation"] == "Where is the beach?"
    assert post(base, {"inputs": ["Hello"], "target_lang": "pt"}).json()["model"] == "en-pt"


def test_beam_search_and_max_new_tokens_are_honoured(server):
    base, _ = server
    text = "The museum has an impressive collection of modern art."
    beam = post(base, {"inputs": [text], "beam_size": 4, "variant": "fp32"}).json()["results"][0]
    assert beam["translation"].startswith("O museu")
    short = post(base, {"inputs": [text], "max_new_tokens": 2}).json()["results"][0]
    assert short["generated_tokens"] <= 2 and len(short["translation"]) < len(beam["translation"])


def test_an_input_over_the_token_limit_is_truncated_and_output_stays_bounded(server):
    base, _ = server
    long_text = " ".join(translation_texts("en")[:60])[:3900]  # ~800 tokens, over max_input_tokens (256)
    r = post(base, {"inputs": [long_text], "max_new_tokens": 24})
    res = r.json()["results"][0]
    assert r.status_code == 200 and res["truncated"] is True and res["generated_tokens"] <= 24
    assert r.json()["usage"]["input_tokens"] == 256


def test_compare_shows_fp32_int8_and_native_with_identical_share_and_chrf(server):
    base, _ = server
    texts = translation_texts("en")[:16]
    body = httpx.post(f"{base}/v1/compare", json={"model": "en-pt", "inputs": texts}, timeout=120).json()
    by = {v["variant"]: v for v in body["variants"]}
    assert body["task"] == "translate" and body["baseline"] == "fp32" and set(by) == {"fp32", "int8", "native"}
    assert by["native"]["agreement"]["identical"] >= 0.9 and by["native"]["agreement"]["chrf"] >= 95
    assert by["int8"]["agreement"]["chrf"] >= 90 and len(by["int8"]["per_input_agreement"]) == 16
    assert by["int8"]["results"][0]["translation"]


def test_concurrent_requests_each_get_their_own_translation(server):
    base, app = server
    texts = translation_texts("pt")[:16]
    served = app.state.catalog.models["pt-en"]
    alone = [served.task.run(served.variants["fp32"].module, served.task.tokenize([t]))[0].text for t in texts]

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/translate", json={"inputs": [t], "source_lang": "pt",
                                                                       "variant": "fp32"})
                                          for t in texts))

    responses = asyncio.run(go())
    got = [r.json()["results"][0]["translation"] for r in responses]
    # batched float GEMMs may sum in another order than a batch of one: a near-tie can flip a word
    assert sum(g == a for g, a in zip(got, alone)) >= 15
    assert all(sentence_chrf(a, g) >= 0.6 for g, a in zip(got, alone))  # each got its own input's translation
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    served_ok = [s for s in families["quantserve_requests"].samples
                 if s.labels.get("endpoint") == "translate" and s.labels["model"] == "pt-en" and s.value > 0]
    assert served_ok


@pytest.mark.parametrize("body, status, needle", [
    ({"inputs": ["Hello"], "target_lang": "fr"}, 422, "supported pairs: en-pt, pt-en"),
    ({"inputs": ["Hello"], "source_lang": "de", "target_lang": "pt"}, 422, "supported pairs: en-pt, pt-en"),
    ({"inputs": ["Hello"], "model": "en-pt", "source_lang": "pt"}, 422, "translates en-pt"),
    ({"inputs": ["Hello"], "model": "fr-en"}, 404, "available: en-pt, pt-en"),
    ({"inputs": ["Hello"], "variant": "int4"}, 404, "fp32, int8, native"),
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": [""]}, 422, "inputs.0"),
    ({"inputs": ["  \n "]}, 422, "inputs.0"),
    ({"inputs": ["x" * 4001]}, 422, "4000"),
    ({"inputs": ["hi"] * 65}, 422, "64"),
    ({"inputs": ["hi"], "beam_size": 0}, 422, "beam_size"),
    ({"inputs": ["hi"], "beam_size": 9}, 422, "beam_size"),
    ({"inputs": ["hi"], "max_new_tokens": 513}, 422, "max_new_tokens"),
    ({"inputs": ["hi"], "variant": "native", "beam_size": 4}, 422, "beam_size"),
    ({"inputs": ["hi"], "source_lang": "English"}, 422, "source_lang"),
    ({"inputs": ["hi"], "temperature": 0.7}, 422, "temperature"),
    ({"inputs": ["ok", "bad \ud800 text"]}, 422, "inputs.1"),
    ({"inputs": ["hi"] * 17, "beam_size": 8, "max_new_tokens": 512}, 422, "limits.max_decode_work"),
])
def test_bad_input_gets_a_clear_json_error(server, body, status, needle):
    base, _ = server
    r = post(base, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or any(needle in f["field"] for f in err.get("fields", [])), err


def test_the_service_still_answers_after_bad_input(server):
    base, _ = server
    assert post(base, {"inputs": ["How are you today?"]}).json()["results"][0]["translation"] == "Como você está hoje?"


def test_a_long_translation_neither_stalls_other_models_nor_outlives_its_deadline(server, caplog):
    """The long batch lets the other model run between its decoder steps, and stops once its deadline passed."""
    base, app = server
    caplog.set_level("INFO", logger="service.batching")

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            long = asyncio.ensure_future(client.post("/v1/translate", json={**stalling_request(), "variant": "fp32"},
                                                     headers={"X-Request-Timeout": "3"}))
            await asyncio.sleep(0.8)  # the long batch is decoding
            shorts = []
            for _ in range(3):
                r = await client.post("/v1/translate", json={"inputs": ["Onde fica a praia?"], "model": "pt-en"})
                shorts.append((r.status_code, r.json()["results"][0]["translation"], long.done()))
            got = await long
            # the model is free again: an en-pt request right after the 504 does not queue behind the long batch
            after = await client.post("/v1/translate", json={"inputs": ["Hello"], "model": "en-pt", "variant": "fp32"})
            return shorts, got, after

    shorts, got, after = asyncio.run(go())
    assert all(s == (200, "Where is the beach?", False) for s in shorts), shorts  # answered while it decoded
    assert got.status_code == 504, got.text
    assert after.status_code == 200
    # the long batch stopped at a decoder step once its client's deadline passed, before the next request ended
    assert any("event=batch_abandoned batcher=en-pt/fp32" in r.getMessage() for r in caplog.records)


def test_compare_applies_the_translation_models_own_limits(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/compare", json={"model": "en-pt", "inputs": ["x" * 4001]}, timeout=60)
    assert r.status_code == 422 and "4000" in r.json()["error"]["message"], r.text
