"""The /dashboard page: served from the package, then loaded for real in headless Chromium."""

from __future__ import annotations

import re
import threading
from urllib.parse import urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from live_service import require_tool, running_service
from service.app import create_app
from service.config import load_settings

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUMBER = re.compile(r"\d+(\.\d+)?")


def test_the_page_loads_every_script_and_style_from_the_service_itself():
    client = TestClient(create_app(load_settings()))  # no lifespan: the page needs no model
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
    assert len(assets) == 4 and all(a.startswith("/dashboard/static/") for a in assets)
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 500, asset
        assert r.headers["content-type"].split(";")[0] == ("text/css" if asset.endswith(".css") else "text/javascript")
    assert "uPlot" in client.get("/dashboard/static/vendor/uplot/uPlot.iife.min.js").text
    assert "MIT License" in client.get("/dashboard/static/vendor/uplot/LICENSE").text


@pytest.mark.parametrize("path", ["nope.js", "../app.py", "..%2Fapp.py", "vendor/../../config.py"])
def test_unknown_or_escaping_static_paths_are_a_404_and_never_read_a_file(path):
    client = TestClient(create_app(load_settings()))
    r = client.get(f"/dashboard/static/{path}")
    assert r.status_code == 404 and "import" not in r.text
    if "nope" in path:
        err = r.json()["error"]
        assert (err["type"], err["message"]) == ("not_found", "no dashboard file 'nope.js'")
        assert err["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.slow
def test_chromium_shows_both_variants_live_and_compares_them_on_a_text(tmp_path):
    chromium = require_tool("chromium")
    from playwright.sync_api import expect, sync_playwright

    with running_service(probe_texts=16) as (base, _app):
        for variant in ("fp32", "int8"):  # traffic, so each variant has latency figures
            for _ in range(5):
                assert httpx.post(f"{base}/v1/embed", json={"inputs": ["hello there"], "variant": variant}).is_success
                assert httpx.post(f"{base}/v1/classify", json={"inputs": ["set a timer"], "variant": variant}).is_success
        stop = threading.Event()

        def traffic() -> None:  # bounded: at most 400 requests, until the page has seen it
            with httpx.Client(base_url=base) as client:
                for i in range(400):
                    if stop.is_set():
                        return
                    client.post("/v1/embed", json={"inputs": ["live traffic"], "variant": ("fp32", "int8")[i % 2]})

        sender = threading.Thread(target=traffic, daemon=True)
        foreign, errors = [], []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda req: foreign.append(req.url)
                    if urlparse(req.url).netloc != urlparse(base).netloc else None)
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/dashboard")
            sender.start()
            for model in ("minilm", "intent"):
                for variant in ("fp32", "int8"):
                    card = page.locator(f'.card.variant[data-model="{model}"][data-variant="{variant}"]')
                    expect(card.locator(".p50")).to_have_text(re.compile(r"^\d+\.\d ms$"), timeout=20_000)
                    expect(card.locator(".throughput")).to_have_text(re.compile(r"^\d+\.\d /s$"), timeout=20_000)
                    expect(card.locator(".weights")).to_have_text(re.compile(r"^\d+\.\d MB$"))
                    assert NUMBER.search(card.locator(".fidelity").inner_text())
                    assert int(card.locator(".requests").inner_text()) >= 5
            for variant in ("fp32", "int8"):  # the live traffic shows up as throughput on the next refreshes
                card = page.locator(f'.card.variant[data-model="minilm"][data-variant="{variant}"]')
                expect(card.locator(".throughput")).not_to_have_text("0.0 /s", timeout=20_000)
            stop.set()
            sender.join(30)
            expect(page.locator("#process-memory")).to_have_text(re.compile(r"^process memory \d+\.\d MB · $"))
            # the CPU the kernels were chosen on, and each variant's state and kernel
            expect(page.locator("#cpu")).to_have_text(re.compile(r"^CPU: .+ · (avx|amx|neon|baseline)\S* · .+ threads"))
            int8 = page.locator('.card.variant[data-model="minilm"][data-variant="int8"]')
            expect(int8.locator(".state")).to_have_text(re.compile(r"^((serving|optimized|serving-eager|optimizing)( \(degraded: .+\))?|degraded: .+)$"))
            served = {v["name"]: v for v in httpx.get(f"{base}/v1/models/minilm").json()["variants"]}["int8"]
            kernels = served["kernels"]  # None where the chosen strategy has no dynamic int8 layer to tune
            expect(int8.locator(".kernel")).to_have_text(
                "–" if kernels is None else re.compile("^" + re.escape(kernels["kernel"]["batch"])))
            assert page.locator(".uplot canvas").count() >= 4  # latency and throughput charts per model

            page.select_option("#compare-model", "intent")
            page.fill("#compare-text", "I want to talk to a real person")
            page.click("#compare-send")
            results = page.locator("#compare-results .card.result")
            expect(results).to_have_count(2, timeout=20_000)
            for variant in ("fp32", "int8"):
                result = page.locator(f'#compare-results .card.result[data-variant="{variant}"]')
                expect(result.locator(".latency")).to_have_text(re.compile(r"^\d+\.\d ms$"))
                assert result.locator(".outputs li").count() == 3
            expect(page.locator('#compare-results [data-variant="fp32"] .outputs li').first).to_contain_text(
                "connect_to_human")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            page.select_option("#compare-model", "minilm")
            page.fill("#compare-text", "A man is playing a guitar.")
            page.click("#compare-send")
            expect(page.locator('#compare-results [data-variant="int8"] .agreement')).to_have_text(
                re.compile(r"^cosine 0\.99\d\d$"), timeout=20_000)
            for variant in ("fp32", "int8"):
                expect(page.locator(f'#compare-results [data-variant="{variant}"] .outputs')).to_contain_text(
                    "384 dimensions, norm 1.000")
            browser.close()
        assert not foreign, f"the page reached outside the service: {foreign}"
        assert not errors, f"the page logged errors: {errors}"
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000


def test_with_api_keys_on_the_page_asks_for_a_key_and_keeps_it_in_session_storage_only(tmp_path, monkeypatch):
    chromium = require_tool("chromium")
    from playwright.sync_api import expect, sync_playwright

    config = tmp_path / "m.yaml"
    config.write_text("models:\n - {name: minilm, task: embed, source: minilm, variants: [{name: fp32, strategy: fp32}]}\n")
    monkeypatch.setenv("QUANTSERVE_AUTH__API_KEYS", "dash-key-1")
    with running_service(config, probe_texts=4) as (base, _app):
        assert httpx.get(f"{base}/v1/models").status_code == 401
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/dashboard")
            expect(page.locator("#key-form")).to_be_visible(timeout=20_000)
            expect(page.locator("#status")).to_have_text("waiting for an API key")
            page.fill("#key-input", "wrong-key")
            page.click("#key-send")
            expect(page.locator("#key-message")).to_have_text("that key was refused; enter another", timeout=20_000)
            page.fill("#key-input", "dash-key-1")
            page.click("#key-send")
            card = page.locator('.card.variant[data-model="minilm"][data-variant="fp32"]')
            expect(card).to_be_visible(timeout=20_000)
            expect(page.locator("#key-form")).to_be_hidden()
            page.fill("#compare-text", "A man is playing a guitar.")
            page.click("#compare-send")
            expect(page.locator('#compare-results [data-variant="fp32"] .outputs')).to_contain_text("384 dimensions",
                                                                                                  timeout=20_000)
            stored = page.evaluate("() => [sessionStorage.getItem('quantserve.api_key'), localStorage.length, "
                                   "document.cookie, location.href]")
            assert stored == ["dash-key-1", 0, "", f"{base}/dashboard"]
            browser.close()
        assert not errors, errors
