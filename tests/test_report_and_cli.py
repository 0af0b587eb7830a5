"""The report measures what was stored and what was lost; the CLI drives it end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantization.pipeline import quantize_model
from quantization.report import build_report, format_layer_table, format_summary_table, serialized_bytes


def test_report_measures_storage_per_layer_error_time_and_fidelity(minilm, minilm_ref, texts):
    qm = quantize_model(minilm, "dynamic-int8")
    rep = build_report(minilm, qm, texts, reference=minilm_ref)
    storage = rep["storage"]
    assert storage["fp32_bytes"] == serialized_bytes(minilm.module)
    assert storage["variant_bytes"] < storage["fp32_bytes"]
    assert 0.25 <= storage["linear_ratio"] <= 0.30  # 1 byte per weight plus one float scale per row
    assert len(rep["layers"]) == 37
    for row in rep["layers"]:
        assert row["weight_sqnr_db"] > 15 and row["output_sqnr_db"] > 15
    assert rep["fidelity"]["texts"] == 240 and rep["fidelity"]["mean_cosine"] > 0.999
    assert rep["quantization_seconds"] > 0
    json.dumps(rep)  # machine-readable as is
    table = format_summary_table([rep])
    assert "dynamic-int8" in table and "cos mean" in table
    assert format_layer_table(rep, 3).count("\n") == 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantization", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_quantize_inspect_and_report_an_artifact(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("set a timer for ten minutes\nmy card was declined\nwhat is the weather like\nhello there\n")
    out = tmp_path / "art"
    q = _cli("quantize", "--model", "intent", "--strategy", "weight-only-int4", "-p", "group_size=64",
             "--keep", "head", "--out", str(out))
    assert q.returncode == 0, q.stderr
    assert "kept" in q.stdout and (out / "manifest.json").is_file()
    i = _cli("inspect", str(out), "--verify", "intent")
    assert i.returncode == 0, i.stderr
    assert "weight-only-int4" in i.stdout and "verified" in i.stderr and "head" in i.stdout
    r = _cli("report", "--model", "intent", "--artifact", str(out), "--texts", str(texts), "--json", "-")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["strategy"]["strategy"] == "weight-only-int4" and rep["fidelity"]["n"] == 4


@pytest.mark.parametrize("args, message", [
    (["report", "-m", "minilm", "-s", "int3"], "unknown strategy 'int3'; choose one of: fp32, fp16, bf16"),
    (["report", "-m", "minilm", "-s", "weight-sharing", "-p", "bits=12"], "bits"),
    (["report", "-m", "minilm", "-s", "weight-only-int4", "-p", "group_size=100"], "does not divide"),
    (["report", "-m", "minilm", "-s", "dynamic-int8", "-p", "colour=red"], "unknown parameter 'colour' (valid:"),
    (["inspect", "/nonexistent/artifact"], "does not exist"),
])
def test_cli_bad_input_gets_one_clear_sentence(args, message):
    r = _cli(*args, "--no-layers") if args[0] == "report" else _cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_strategies_command_lists_every_strategy_with_parameters():
    r = _cli("strategies")
    assert r.returncode == 0
    for name in ("fp32", "fp16", "bf16", "dynamic-int8", "static-int8", "weight-only-int8", "weight-only-int4",
                 "weight-sharing", "onnx-int8"):
        assert f"\n{name}\n" in "\n" + r.stdout
    assert "-p smooth_alpha=" in r.stdout and "-p group_size=" in r.stdout
