"""The hardening bars, measured against ``python -m service`` as users run it.

    .venv/bin/python bench/hardening.py [--fuzz-examples 40] [--no-publish]    (~10 min on 2 cores)

1. Fairness and deadlines: a translation that decodes for many seconds (16 inputs of 4,000
   characters, beam 8, 512 new tokens) while one client sends one-sentence embeds back to back.
   With ``X-Request-Timeout: 1``: when the model is free again after the deadline (from the
   service's ``event=batch_abandoned`` line) and the embeds' latency; without the header, the
   embeds' p50/p99 while the translation runs, against the same client with no translation.
2. Connections: 25 idle and 25 half-header connections (time until each is closed), an 8 MB
   header (status, bytes sent before the refusal), and the forged-log request (lines it wrote).
3. Auth: ``QUANTSERVE_AUTH__API_KEYS=","`` (exit status and sentence).
4. Drain: SIGTERM under 16 clients: requests sent before the signal that failed, and resets.
5. Schemathesis on the default config: every operation, positive and negative cases; 5xx other
   than 503/504, and schema-valid requests refused, by reason.

Bars (2-core machine; the CPU is written beside the figures): the model free within 0.5 s after
the deadline and a concurrent embed under 0.5 s; without the header the embed's p99 under 1 s;
50 idle connections closed within the header timeout (default 10 s, bar 15 s); the 8 MB header
refused; one log line; exit on ","; 0 failures before the signal, 0 resets in the drain delay;
0 unexpected 5xx and no schema-valid request refused for a limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from bench.live import ServiceProcess  # noqa: E402
from bench.results import machine_summary, publish  # noqa: E402

SERVE_CONFIG = """
log_level: info
models:
  - name: minilm
    task: embed
    source: minilm
    variants:
      - {name: fp32, strategy: fp32}
      - {name: int8, strategy: auto, compile: true}
    routing: {default: int8}
  - name: en-pt
    task: translate
    source: bergamot-en-pt
    variants:
      - {name: fp32, strategy: fp32}
      - {name: int8, strategy: auto}
    routing: {default: int8}
"""
DRAIN_CONFIG = """
drain_delay_s: 2
models:
  - {name: minilm, task: embed, source: minilm, variants: [{name: fp32, strategy: fp32}]}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def stalling_request() -> dict:
    """16 inputs of 4,000 characters at beam 8 and 512 new tokens: within every limit, seconds of decoding
    (tests/test_translate_service.py sends it too)."""
    from quantization.texts import translation_texts

    text = " ".join(translation_texts("en")[:80])[:4000]
    return {"inputs": [text] * 16, "beam_size": 8, "max_new_tokens": 512, "model": "en-pt"}


class EmbedProber:
    """One client sending one-sentence /v1/embed requests back to back: (sent at, seconds, status)."""

    def __init__(self, url: str) -> None:
        self.url, self.samples, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                sent = time.time()
                r = client.post("/v1/embed", json={"inputs": ["A man is playing a guitar."]})
                self.samples.append((sent, time.time() - sent, r.status_code))

    def __enter__(self) -> "EmbedProber":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def between(self, start: float, end: float) -> list[float]:
        return [s for at, s, _ in self.samples if start <= at <= end]


def log_times(log: str, event: str) -> list[tuple[float, str]]:
    """(wall time, line) of the service's log lines with ``event``."""
    out = []
    for line in log.splitlines():
        if f"event={event}" in line:
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((stamp, line))
    return out


def fairness(service: ServiceProcess) -> dict:
    url = service.url
    out: dict = {}
    with EmbedProber(url) as alone:
        time.sleep(8)
    idle = [s for _, s, _ in alone.samples[5:]]
    out["embed_alone"] = {"n": len(idle), "p50_ms": 1000 * percentile(idle, 0.5), "p99_ms": 1000 * percentile(idle, 0.99)}
    for label, headers in (("with_deadline", {"X-Request-Timeout": "1"}), ("without_deadline", {})):
        with EmbedProber(url) as prober:
            time.sleep(1.0)
            sent = time.time()
            r = httpx.post(f"{url}/v1/translate", json=stalling_request(), headers=headers, timeout=120)
            answered = time.time()
            time.sleep(1.0)
        during = prober.between(sent, answered)
        entry = {"translate_status": r.status_code, "translate_seconds": answered - sent, "embeds": len(during),
                 "embed_p50_ms": 1000 * percentile(during, 0.5), "embed_p99_ms": 1000 * percentile(during, 0.99),
                 "embed_max_ms": 1000 * max(during, default=float("nan")),
                 "embed_errors": sum(1 for at, _, st in prober.samples if sent <= at <= answered and st != 200)}
        abandoned = [t for t, line in log_times(service.output(), "batch_abandoned") if t >= sent]
        if abandoned:
            deadline = sent + (1.0 if headers else 30.0)
            entry["model_free_after_deadline_s"] = abandoned[0] - deadline
        out[label] = entry
    return out


def _closed_within(sockets: list[socket.socket], limit: float) -> list[float]:
    start = time.monotonic()
    closed = []
    for s in sockets:
        s.settimeout(max(0.01, start + limit - time.monotonic()))
        try:
            while s.recv(65536):
                pass
            closed.append(time.monotonic() - start)
        except (socket.timeout, OSError):
            closed.append(float("inf"))
        s.close()
    return closed


def connections(service: ServiceProcess) -> dict:
    host, port = "127.0.0.1", service.port
    idle = [socket.create_connection((host, port)) for _ in range(25)]
    half = [socket.create_connection((host, port)) for _ in range(25)]
    for s in half:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Ty")
    times = _closed_within(idle + half, 30)
    s = socket.create_connection((host, port))
    sent = 0
    try:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
        while sent < 8 * 1024 * 1024:
            s.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    s.settimeout(5)
    try:
        reply = s.recv(65536)
    except OSError:
        reply = b""
    s.close()
    marker = "forged-" + os.urandom(4).hex()
    line = f"2026-12-07 12:00:00,000 level=INFO logger=service.http request_id=admin event=request path=/{marker}"
    with socket.create_connection((host, port)) as f:
        f.sendall(b"GET /v1/embed%0a" + line.replace(" ", "%20").encode() + b" HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        while f.recv(65536):
            pass
    time.sleep(0.5)
    return {"idle_and_half_closed_s": {"max": max(times), "median": statistics.median(times),
                                       "all_closed": all(t != float("inf") for t in times)},
            "big_header": {"status": reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else None,
                           "bytes_sent_before_refusal": sent},
            "forged_log_lines": sum(1 for ln in service.output().splitlines() if marker in ln)}


def empty_keys() -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "service", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "QUANTSERVE_AUTH__API_KEYS": ","}, timeout=120)
    return {"exit_status": proc.returncode, "seconds": time.monotonic() - start,
            "sentence": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""}


def drain(tmp: Path) -> dict:
    config = tmp / "drain.yaml"
    config.write_text(DRAIN_CONFIG)
    service = ServiceProcess("--config", str(config))
    try:
        service.wait_ready(600)
        outcomes: list[tuple[float, float, str]] = []  # (sent, finished, what it got)
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=service.url, timeout=60) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        kind = str(c.post("/v1/embed", json={"inputs": ["hello there"] * 4}).status_code)
                    except httpx.ConnectError:
                        kind = "refused"
                    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                        kind = "reset"
                    with lock:
                        outcomes.append((sent, time.monotonic(), kind))
                    if kind == "refused":
                        return

        threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(3)
        signalled = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        code = service.proc.wait(120)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        service.stop()
    delay = 2.0  # DRAIN_CONFIG's drain_delay_s
    before = [k for at, _, k in outcomes if at < signalled - 0.05]
    after = [k for at, _, k in outcomes if at >= signalled - 0.05]
    return {"exit_status": code, "requests_before_signal": len(before),
            "failed_before_signal": sum(1 for k in before if k != "200"),
            "after_signal": {k: after.count(k) for k in sorted(set(after))},
            "resets_in_delay": sum(1 for _, done, k in outcomes if k == "reset" and done < signalled + delay),
            "resets_after_delay": sum(1 for _, done, k in outcomes if k == "reset" and done >= signalled + delay)}


def fuzz(service: ServiceProcess, examples: int) -> dict:
    """Every operation of the served schema, positive and negative cases, every response checked."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_headers_conformance, response_schema_conformance,
                                                   status_code_conformance)

    refusals = ["400", "401", "404", "413", "415", "422", "429", "503", "504"]
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=schemathesis.config.SchemathesisConfig
                                           .from_dict({"checks": {"negative_data_rejection":
                                                                  {"expected-statuses": refusals}}}))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, negative_data_rejection]
    statuses: dict[str, int] = {}
    refused_valid: dict[str, int] = {}
    failures: list[str] = []
    cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                nonlocal cases
                cases += 1
                response = case.call(base_url=service.url, timeout=60)
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                if mode == GenerationMode.POSITIVE and response.status_code >= 400:
                    try:
                        reason = response.json()["error"]["type"]
                        message = response.json()["error"]["message"]
                        if "limits.max_inputs" in message or "limits.max_chars" in message:
                            reason += " (a stated limit)"
                        elif response.status_code == 422 and reason == "invalid_request":
                            reason += f" ({re.sub(r'[0-9]+', 'N', message.split(';')[0])[:90]})"
                    except Exception:  # noqa: BLE001
                        reason = "unreadable"
                    key = f"{response.status_code} {reason}"
                    refused_valid[key] = refused_valid.get(key, 0) + 1
                try:
                    case.validate_response(response, checks=checks)
                except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                    failures.append(f"{operation.label}: {str(exc).splitlines()[0][:200]}")

            try:
                run()
            except Unsatisfiable:  # an operation with nothing to get wrong (no body, no parameters)
                pass
    unexpected_5xx = sum(n for s, n in statuses.items() if s.startswith("5") and s not in ("503", "504"))
    return {"cases": cases, "statuses": statuses, "unexpected_5xx": unexpected_5xx,
            "schema_valid_refused": refused_valid, "check_failures": len(failures), "first_failures": failures[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fuzz-examples", type=int, default=40, help="examples per operation and mode")
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="hardening-"))
    config = tmp / "serve.yaml"
    config.write_text(SERVE_CONFIG)
    result: dict = {"date": dt.date.today().isoformat(), "machine": machine_summary(),
                    "command": " ".join(["bench/hardening.py", *(argv or sys.argv[1:])])}
    service = ServiceProcess("--config", str(config), env={"QUANTSERVE_PROBE_TEXTS": "32"})
    try:
        result["startup_s"] = service.wait_ready(1200)
        result["fairness"] = fairness(service)
        result["connections"] = connections(service)
    finally:
        service.stop(60)
    result["empty_keys"] = empty_keys()
    result["drain"] = drain(tmp)
    default = ServiceProcess()
    try:
        default.wait_ready(1200)
        result["fuzz"] = fuzz(default, args.fuzz_examples)
    finally:
        default.stop(60)
    print(json.dumps(result, indent=2, default=str))
    if not args.no_publish:
        publish("hardening", result, table(result))
    return 0


def table(r: dict) -> str:
    f, c, d, z = r["fairness"], r["connections"], r["drain"], r["fuzz"]
    w, wo = f["with_deadline"], f["without_deadline"]
    free = w.get("model_free_after_deadline_s")
    rows = [
        ("stalling translate, `X-Request-Timeout: 1`: status; model free after the deadline",
         f"{w['translate_status']} at {w['translate_seconds']:.2f} s; "
         + (f"{free:+.2f} s" if free is not None else "no abandoned batch logged"), "504; <= 0.5 s"),
        ("  one-sentence embeds meanwhile, p50 / p99 / max",
         f"{w['embed_p50_ms']:.0f} / {w['embed_p99_ms']:.0f} / {w['embed_max_ms']:.0f} ms ({w['embeds']} requests)",
         "< 500 ms"),
        ("stalling translate without the header: status, seconds",
         f"{wo['translate_status']}, {wo['translate_seconds']:.1f} s", "-"),
        ("  one-sentence embeds meanwhile, p50 / p99 (alone: p50 / p99)",
         f"{wo['embed_p50_ms']:.0f} / {wo['embed_p99_ms']:.0f} ms ({wo['embeds']} requests; alone "
         f"{f['embed_alone']['p50_ms']:.1f} / {f['embed_alone']['p99_ms']:.1f} ms)", "p99 < 1000 ms"),
        ("25 idle + 25 half-header connections: closed after (median / max)",
         f"{c['idle_and_half_closed_s']['median']:.1f} / {c['idle_and_half_closed_s']['max']:.1f} s", "<= 15 s"),
        ("an 8 MB header", f"{c['big_header']['status']} after {c['big_header']['bytes_sent_before_refusal'] // 1024} "
                          f"KiB sent", "refused"),
        ("the forged-log request: lines written", str(c["forged_log_lines"]), "1"),
        ("`QUANTSERVE_AUTH__API_KEYS=\",\"`", f"exit {r['empty_keys']['exit_status']} in "
                                              f"{r['empty_keys']['seconds']:.1f} s: {r['empty_keys']['sentence']}",
         "stops"),
        ("SIGTERM under 16 clients (drain delay 2 s): failed among those sent before it; resets in the delay",
         f"{d['failed_before_signal']} of {d['requests_before_signal']}; {d['resets_in_delay']} (after the "
         f"signal: {', '.join(f'{k} x{v}' for k, v in d['after_signal'].items())}; resets once the listener "
         f"closed: {d['resets_after_delay']})", "0; 0"),
        ("schemathesis, default config: cases; 5xx other than 503/504; check failures",
         f"{z['cases']}; {z['unexpected_5xx']}; {z['check_failures']}", "-; 0; 0"),
        ("  schema-valid requests refused, by reason",
         ", ".join(f"{k} x{v}" for k, v in sorted(z["schema_valid_refused"].items())) or "none",
         "none for a stated limit"),
    ]
    lines = ["## Hardening: fairness, deadlines, connections, auth, drain, contract", "",
             f"{r['machine']}; {r['date']}; `{r['command']}` (the service as `python -m service`; start-up "
             f"{r['startup_s']:.0f} s).", "", "| measure | result | bar |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
