"""Prometheus rules and the Grafana dashboard: checked by promtool, then run for real.

A real Prometheus scrapes the real service; after some traffic, every recording rule and every
dashboard panel's query must return data for both the fp32 and the int8 variant of each model.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench.live import poll_until_ok
from live_service import ROOT, free_port, require_tool, running_service
from service.config import default_config_text

PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROM / "quantserve.rules.yml", PROM / "quantserve.alerts.yml"]
DASHBOARD = ROOT / "deploy" / "grafana" / "quantserve-ab.json"
MODELS, VARIANTS = {"minilm", "intent"}, {"fp32", "int8"}


def recording_rules() -> list[str]:
    groups = yaml.safe_load((PROM / "quantserve.rules.yml").read_text())["groups"]
    return [rule["record"] for g in groups for rule in g["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def concrete(expr: str) -> str:
    """A panel query as Grafana sends it with every model and variant selected (allValue .*)."""
    return expr.replace("$model", ".*").replace("$variant", ".*").replace("$__rate_interval", "1m")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=PROM)


def test_promtool_accepts_the_scrape_config_and_every_rule():
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("check", "rules", *(f.name for f in RULE_FILES))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_each_alert_fires_on_its_condition_and_not_on_a_healthy_variant():
    out = promtool("test", "rules", "tests/alerts_test.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_dashboard_is_importable_json_with_model_and_variant_variables(tmp_path):
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "variant"):
        assert variables[name]["type"] == "query" and variables[name]["multi"] and variables[name]["includeAll"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels())
    for topic in ("latency", "speedup", "throughput", "memory", "agreement", "error"):
        assert topic in titles
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]) >= 1
        for t in p["targets"]:
            assert "$model" in t["expr"] and "$variant" in t["expr"], p["title"]
    # every panel query is valid PromQL: promtool checks each one as a recording rule
    rules = {"groups": [{"name": "panels", "rules": [{"record": f"panel:{p['id']}:{t['refId']}",
                                                      "expr": concrete(t["expr"])}
                                                     for p in panels() for t in p["targets"]]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    out = subprocess.run([require_tool("promtool"), "check", "rules", str(tmp_path / "panels.yml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the shipped config, scraping every second, its static job pointed at the test's service
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
        assert sorted(config["rule_files"]) == sorted(str(f) for f in RULE_FILES)
        (job,) = [j for j in config["scrape_configs"] if "static_configs" in j]
        job["static_configs"] = [{"targets": [target]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen([require_tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        poll_until_ok(f"{self.url}/-/ready", 60, interval=0.3, alive=lambda: None if self.proc.poll() is None else
                      "prometheus exited; see prometheus.log in the test's tmp folder")

    def query(self, expr: str) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def both_variants(series: list[dict]) -> bool:
    """Data for fp32 and int8 of every model, and no NaN standing in for a value."""
    seen = {(s["metric"].get("model"), s["metric"].get("variant")) for s in series if s["value"][1] != "NaN"}
    return {(m, v) for m in MODELS for v in VARIANTS} <= seen


@pytest.mark.slow
def test_live_prometheus_has_every_rule_and_panel_for_both_variants(tmp_path):
    config = yaml.safe_load(default_config_text())
    config["models"] = [m for m in config["models"] if m["name"] in MODELS]  # the A/B pairs this test drives
    for model in config["models"]:
        model["routing"]["shadow"] = 0.5  # enough shadow comparisons within a short test
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(config))
    with running_service(tmp_path / "models.yaml", probe_texts=16) as (base, _app):
        prom = Prometheus(tmp_path, base.removeprefix("http://"))
        stop = threading.Event()

        def traffic() -> None:  # bounded in count and time; pinned and unpinned (shadowed) requests
            with httpx.Client(base_url=base, timeout=30) as client:
                for i in range(3000):
                    if stop.is_set():
                        return
                    variant = ("fp32", "int8", None)[i % 3]
                    pin = {"variant": variant} if variant else {}
                    client.post("/v1/embed", json={"inputs": [f"sentence number {i}"], **pin}).raise_for_status()
                    client.post("/v1/classify", json={"inputs": ["set a timer for ten minutes"], **pin}).raise_for_status()
                    time.sleep(0.02)

        sender = threading.Thread(target=traffic, daemon=True)
        try:
            prom.wait_ready()
            sender.start()
            queries = {f"rule {r}": r for r in recording_rules()}
            queries |= {f"panel {p['title']!r} {t['refId']}": concrete(t["expr"]) for p in panels() for t in p["targets"]}
            missing = dict(queries)
            deadline = time.monotonic() + 120
            while missing and time.monotonic() < deadline:
                time.sleep(2)
                missing = {name: q for name, q in missing.items() if not both_variants(prom.query(q))}
            assert not missing, f"no data for both variants of both models: {sorted(missing)}"
            shadow = prom.query('quantserve:agreement:min{source="shadow"}')
            assert {(s["metric"]["model"], s["metric"]["variant"]) for s in shadow} == {("minilm", "int8"), ("intent", "int8")}
            assert all(float(s["value"][1]) > 0.9 for s in shadow)
            speedup = prom.query('quantserve:speedup_p50:ratio{variant="fp32"}')
            assert [float(s["value"][1]) for s in speedup] == [1.0, 1.0]
            rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
            alerts = httpx.get(f"{prom.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            # a healthy service raises nothing (latency may run high on a busy 2-core machine)
            assert {a["labels"]["alertname"] for a in alerts} <= {"QuantserveHighLatencyP99"}, alerts
        finally:
            stop.set()
            sender.join(30)
            prom.stop()
