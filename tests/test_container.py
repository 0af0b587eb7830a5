"""The container image: linted, built with podman from docker/Dockerfile, run, asked, stopped.

No registry can be reached here, so the image is built FROM a local Debian base made by
docker/local-base-image.sh, with the machine's pip find-links folder (the CPU torch wheel) and
CA bundle mounted into the build, as a user behind a proxy or without network would do.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid

import httpx
import pytest
import torch
import torch.nn.functional as F
import yaml

from bench.live import poll_until_ok
from live_service import ROOT, free_port, require_tool
from quantization.models import load_task_model

IMAGE = "localhost/quantserve:test"
BASE_IMAGE = "localhost/quantserve-base:bookworm"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GRACE_S = 45  # the Deployment's terminationGracePeriodSeconds


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "containers.conf")}
    out = subprocess.run([require_tool("podman"), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        pytest.fail(f"podman {' '.join(args[:2])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def pip_find_links() -> str | None:
    """The local wheel folder pip is configured with (where the CPU torch wheel lies), if any."""
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pip", "config", "list"],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"find-links='([^']+)'", out.stdout)
    return match.group(1) if match and os.path.isdir(match.group(1)) else None


def deployment_memory_limit() -> str:
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "app" / "deployment.yaml").read_text())
    limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    return limit.replace("Mi", "m").replace("Gi", "g")


def test_dockerfile_passes_hadolint_at_error_level():
    out = subprocess.run([require_tool("hadolint"), "--failure-threshold", "error", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


def test_prebuild_refuses_a_bad_config_with_one_sentence(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - {name: m, task: embed, source: minilm, variants: [{name: x, strategy: int3}]}\n")
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "service.prebuild", "--config", str(bad),
                          "--artifacts-dir", str(tmp_path / "artifacts")], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 1 and "unknown strategy 'int3'" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "artifacts").exists()


@pytest.fixture(scope="module")
def image() -> str:
    require_tool("debootstrap")
    base = subprocess.run([str(ROOT / "docker" / "local-base-image.sh"), BASE_IMAGE], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "containers.conf")})
    assert base.returncode == 0, base.stderr[-3000:]
    args = ["build", "--pull=never", "--format", "docker", "-f", str(DOCKERFILE), "-t", IMAGE,
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    wheels = pip_find_links()
    if wheels:  # the local torch wheel instead of PyTorch's CPU index
        args += ["--build-arg", "TORCH_INDEX_URL=", "--build-arg", f"PIP_FIND_LINKS={wheels}",
                 "-v", f"{wheels}:{wheels}:ro"]
    if os.path.isfile(CA_BUNDLE):
        args += ["--build-arg", f"PIP_CERT={CA_BUNDLE}", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    started = int(time.time())
    podman(*args, str(ROOT), timeout=1800)
    # earlier builds of the image and their build stages, untagged by this one, would pile up (GBs each);
    # this build's own stages stay as the layer cache of the next
    podman("image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=quantserve",
           "--filter", f"until={started}", check=False)
    return IMAGE


@pytest.mark.slow
def test_image_runs_as_non_root_with_a_readiness_healthcheck_and_built_artifacts(image):
    info = yaml.safe_load(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] not in ("", "root", "0")
    assert "/readyz" in " ".join(info["Healthcheck"]["Test"])  # podman reports it beside Config
    assert config["StopSignal"] == "SIGTERM"
    assert config["Cmd"] == ["python", "-m", "service"]
    listing = podman("run", "--rm", "--pull=never", "--network", "none", image,
                     "python", "-c", "import pathlib; print(sorted(str(p) for p in "
                     "pathlib.Path('/opt/quantserve/artifacts').glob('*/*/manifest.json')))").stdout
    assert "minilm/int8/manifest.json" in listing and "intent/int8/manifest.json" in listing
    assert "fp32" not in listing  # the FP32 variant is the source model itself: nothing to save


@pytest.mark.slow
def test_container_answers_readyz_and_embed_then_stops_cleanly_within_its_grace_period(image):
    port, name = free_port(), f"quantserve-test-{uuid.uuid4().hex[:8]}"
    limit = deployment_memory_limit()
    # as the Deployment runs it: its memory and CPU limits, a read-only root with only /tmp
    # writable, every capability dropped, no privilege escalation
    podman("run", "-d", "--pull=never", "--init", "--network", "host", "--name", name, "--memory", limit,
           "--cpus", "2", "--read-only", "--tmpfs", "/tmp:rw,size=256m", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "-e", "QUANTSERVE_HOST=127.0.0.1", "-e", f"QUANTSERVE_PORT={port}",
           image)
    base = f"http://127.0.0.1:{port}"
    try:
        def exited() -> str | None:
            state = yaml.safe_load(podman("inspect", name).stdout)[0]["State"]
            return None if state["Running"] else "the container exited"

        poll_until_ok(f"{base}/readyz", 300, alive=exited, interval=1,
                      tail=lambda: podman("logs", name, check=False).stderr[-3000:])
        assert podman("healthcheck", "run", name, check=False).returncode == 0

        texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar."]
        r = httpx.post(f"{base}/v1/embed", json={"inputs": texts, "variant": "fp32"}, timeout=60)
        assert r.status_code == 200 and r.headers["X-Variant"] == "fp32"
        got = torch.tensor([res["embedding"] for res in r.json()["results"]])
        want = F.normalize(load_task_model("minilm").run(None, texts), dim=-1)  # the same model on the host
        assert got.shape == (2, 384) and float(F.cosine_similarity(got, want).min()) > 0.9999
        variants = {(m["name"], v["name"]): v for m in httpx.get(f"{base}/v1/models").json()["models"]
                    for v in m["variants"]}
        assert variants[("minilm", "int8")]["loaded_from_artifact"] is True  # built into the image
        # the image ships the package the prebuild compiled for this CPU: swapped in moments after ready
        deadline = time.monotonic() + 120
        while variants[("minilm", "int8")]["state"] in ("serving-eager", "optimizing") and time.monotonic() < deadline:
            time.sleep(0.5)
            variants = {(m["name"], v["name"]): v for m in httpx.get(f"{base}/v1/models").json()["models"]
                        for v in m["variants"]}
        int8 = variants[("minilm", "int8")]
        assert int8["compile"]["compiled"] is True and int8["runtime"].endswith("+aoti"), int8
        assert int8["optimization"]["from_cache"] is True, int8["optimization"]
        # the page and its vendored chart library are package data: they must be in the installed package
        assert "compare-form" in httpx.get(f"{base}/dashboard").text
        assert httpx.get(f"{base}/dashboard/static/vendor/uplot/uPlot.iife.min.js").status_code == 200

        start = time.monotonic()
        podman("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30)
        took = time.monotonic() - start
        state = yaml.safe_load(podman("inspect", name).stdout)[0]["State"]
        logs = podman("logs", name).stderr
        assert took < GRACE_S / 2, f"stopping took {took:.1f} s"
        # SIGTERM reached the service, which drained and exited 0; 137 would mean the grace period ran
        # out and the process was killed
        assert "event=draining" in logs and "event=drained inflight=0" in logs, logs[-2000:]
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    finally:
        podman("rm", "-f", name, check=False)
