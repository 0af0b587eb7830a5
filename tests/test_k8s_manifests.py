"""The Kubernetes manifests: every kustomize overlay renders, passes strict schema validation,
and points its probes, config and resources at what the service really does."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from fastapi.testclient import TestClient
from starlette.routing import Match

from live_service import ROOT, require_tool
from service.app import create_app
from service.config import load_settings

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"base": K8S / "base", "int8-only": K8S / "overlays" / "int8-only", "ab": K8S / "overlays" / "ab"}
# the oldest Kubernetes still widely run, and the newest whose schemas kubernetes-validate bundles
K8S_VERSIONS = ["1.30.0", "1.37.0"]
MEMORY = ROOT / "bench" / "results" / "memory.json"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}


def render(overlay: str) -> list[dict]:
    out = subprocess.run([require_tool("kubectl"), "kustomize", str(OVERLAYS[overlay])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in OVERLAYS}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_config(docs: list[dict], deployment: dict) -> str:
    """The models.yaml of the ConfigMap that the Deployment mounts."""
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"])
    return cm["data"]["models.yaml"]


def routed(app, path: str, method: str = "GET") -> bool:
    """Whether one of the app's routes fully matches the request (how the app itself dispatches it)."""
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def quantity_bytes(q: str) -> int:
    number = q.rstrip("KMGi")
    return int(float(number) * UNITS[q[len(number):]])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_overlay_renders_and_passes_strict_validation_without_warnings(overlay, version, rendered, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(rendered[overlay]))
    out = subprocess.run([require_tool("kubernetes-validate"), "--strict", "-k", version, str(path)],
                         capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0 and not [l for l in lines if not l.startswith("INFO")], "\n".join(lines)
    assert sum("passed" in l for l in lines) == len(rendered[overlay])


def test_the_expected_objects_exist_in_each_overlay(rendered):
    for overlay, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        deployments = 2 if overlay == "ab" else 1
        assert kinds.count("Deployment") == deployments and kinds.count("HorizontalPodAutoscaler") == deployments
        assert kinds.count("PodDisruptionBudget") == deployments and kinds.count("ConfigMap") == deployments
        assert kinds.count("Service") == 2 and kinds.count("Namespace") == 1, overlay
        names = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
        for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
            assert hpa["spec"]["scaleTargetRef"]["name"] in names
            assert hpa["spec"]["minReplicas"] >= 2  # with the PDB's minAvailable 1, a drain never empties it
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"quantserve"}


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_probes_are_routes_the_app_serves_and_behave_as_probes_need(overlay, rendered, tmp_path):
    docs = rendered[overlay]
    for deployment in of_kind(docs, "Deployment"):
        config = tmp_path / "models.yaml"
        config.write_text(pod_config(docs, deployment))
        app = create_app(load_settings(config))
        client = TestClient(app)  # no lifespan: the models are not built, as in a pod that just started
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == int(env(container)["QUANTSERVE_PORT"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert routed(app, get["path"]), f"{probe} {get['path']} is not a route of the app"
            assert get["port"] in ports
        # liveness answers while models load (no restart loop); startup/readiness wait for them
        assert client.get(container["livenessProbe"]["httpGet"]["path"]).status_code == 200
        for probe in ("startupProbe", "readinessProbe"):
            assert client.get(container[probe]["httpGet"]["path"]).status_code == 503


def test_route_matching_tells_served_paths_from_others():
    app = create_app(load_settings())
    assert routed(app, "/readyz") and routed(app, "/livez") and routed(app, "/metrics")
    assert not routed(app, "/healthz") and not routed(app, "/readyz", "POST")


def test_config_maps_hold_configs_the_service_accepts_with_the_right_variants(rendered, tmp_path):
    def strategies(overlay: str, deployment: dict) -> dict[str, list[str]]:
        path = tmp_path / "models.yaml"
        path.write_text(pod_config(rendered[overlay], deployment))
        settings = load_settings(path)  # raises ConfigError on anything the service would refuse
        return {m.name: [v.strategy + ("+compile" if v.compile else "") for v in m.variants] for m in settings.models}

    (base,) = of_kind(rendered["base"], "Deployment")
    default = load_settings()  # the base serves the built-in embed and classify models (translation is opt-in)
    assert strategies("base", base) == {m.name: [v.strategy + ("+compile" if v.compile else "") for v in m.variants]
                                        for m in default.models if m.task in ("embed", "classify")}
    # the int8 routes run compiled, as in the default config (the image ships their kernels)
    int8 = {"minilm": ["auto+compile"], "intent": ["auto+compile"]}
    (lean,) = of_kind(rendered["int8-only"], "Deployment")
    assert strategies("int8-only", lean) == int8
    by_variant = {d["spec"]["template"]["metadata"]["labels"]["quantserve.io/variant"]: d
                  for d in of_kind(rendered["ab"], "Deployment")}
    assert strategies("ab", by_variant["fp32"]) == {"minilm": ["fp32"], "intent": ["fp32"]}
    assert strategies("ab", by_variant["int8"]) == int8


def test_ab_puts_two_variant_deployments_behind_one_service(rendered):
    docs = rendered["ab"]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")}
    assert sorted(labels["quantserve.io/variant"] for labels in pods.values()) == ["fp32", "int8"]
    for service in of_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        assert all(selector.items() <= labels.items() for labels in pods.values()), service["metadata"]["name"]
    for pdb in of_kind(docs, "PodDisruptionBudget"):  # each budget guards its own variant only
        matched = [n for n, labels in pods.items() if pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert matched == [pdb["metadata"]["name"]]
    for d in of_kind(docs, "Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= pods[d["metadata"]["name"]].items()


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_pods_run_non_root_read_only_with_resources_sized_from_measured_memory(overlay, rendered):
    measured = {(ROOT / row["file"]).read_text(): row for row in json.loads(MEMORY.read_text())["rows"]}
    docs = rendered[overlay]
    for deployment in of_kind(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        (container,) = spec["containers"]
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # the only writable place
        res = container["resources"]
        request, limit = quantity_bytes(res["requests"]["memory"]), quantity_bytes(res["limits"]["memory"])
        row = measured[pod_config(docs, deployment)]  # bench/memory.py measured this very config
        assert request >= row["loaded_rss_bytes"], f"{overlay}: request below the measured RSS under load"
        assert row["peak_rss_bytes"] * 1.15 <= limit <= row["peak_rss_bytes"] * 1.6, \
            f"{overlay}: limit {limit / 2**20:.0f} MiB not 15-60% above the measured peak {row['peak_rss_bytes'] / 2**20:.0f} MiB"
        assert float(res["requests"]["cpu"]) <= float(res["limits"]["cpu"]) == float(env(container)["QUANTSERVE_THREADS"])


EXIT_MARGIN_S = 5  # from the end of the grace period to the process's exit (closing sockets, stopping batchers)


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_pod_grace_period_holds_pre_stop_drain_delay_and_grace(overlay, rendered, tmp_path):
    """SIGKILL must never cut a drain short: preStop + drain_delay_s + grace_period_s + exit <= the pod's grace."""
    for deployment in of_kind(rendered[overlay], "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        path = tmp_path / "models.yaml"
        path.write_text(pod_config(rendered[overlay], deployment))
        settings = load_settings(path)
        needed = float(command[1]) + settings.drain_delay_s + settings.grace_period_s + EXIT_MARGIN_S
        assert needed <= pod["terminationGracePeriodSeconds"], (overlay, needed)
        # and the drain delay outlasts the readiness probe's notice: failureThreshold x periodSeconds after preStop
        probe = container["readinessProbe"]
        assert float(command[1]) + settings.drain_delay_s >= probe["periodSeconds"] * probe["failureThreshold"]
