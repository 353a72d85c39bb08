"""deploy/ and the Dockerfile, offline: yamllint, Kubernetes schemas (kubernetes-validate), and the manifests'
probes, ports, flags and resources checked against the server's real CLI and routes (a flag renamed in the
CLI, or a probe path that no longer exists, fails here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from servers import server_settings
from yamllint import linter
from yamllint.config import YamlLintConfig

from a8w8_serve.flags import API_KEY_ENV
from a8w8_serve.main import build_parser
from loaders.cache import CACHE_ENV
from server.app import create_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "custom-metrics"
# The Kubernetes versions the manifests are checked against: the newest kubernetes-validate knows, and an
# older one that managed clusters still run.
KUBERNETES_VERSIONS = ("1.33", "1.37")
# Kinds that are custom resources (no schema in kubernetes-validate): checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor"}
PRE_STOP_SECONDS_MAX = 30

sys.path.insert(0, str(DEPLOY / "router"))
import local_cluster  # noqa: E402  (deploy/router is a script directory, not a package)


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml"))


def manifests(directory: Path) -> list[dict]:
    """The resources listed by ``directory``'s kustomization.yaml (files only; no remote bases)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = directory / resource
        if path.is_dir():
            docs += manifests(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return manifests(BASE)


@pytest.fixture(scope="module")
def container(base) -> dict:
    return by_kind(base, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_yamllint_clean():
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}: {p.message}"
        for path in yaml_files()
        for p in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    checked = 0
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or "kind" not in doc or doc["kind"] == "Kustomization" or doc["kind"] in CUSTOM_KINDS:
                continue
            kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown or mistyped field
            checked += 1
    assert checked >= 6


def test_kustomizations_list_every_manifest_and_the_overlay_patches_a_base_resource(base):
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    for patch in overlay["patches"]:
        doc = yaml.safe_load((OVERLAY / patch["path"]).read_text())
        assert any(d["kind"] == doc["kind"] and d["metadata"]["name"] == doc["metadata"]["name"] for d in base)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the rendering check needs it)")
def test_kustomize_renders_valid_manifests():
    for directory in (K8S, OVERLAY):
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
        for doc in docs:
            if doc["kind"] not in CUSTOM_KINDS:
                kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        hpa = by_kind(docs, "HorizontalPodAutoscaler")
        kinds = [m["type"] for m in hpa["spec"]["metrics"]]
        assert kinds == (["Resource"] if directory == K8S else ["Pods"])  # the overlay replaces the metric


def serve_args(container: dict):
    """The container's args parsed by the server's own parser (exits on an unknown flag)."""
    args = container["args"]
    assert args[0] == "serve"
    return build_parser().parse_args(args)


def test_deployment_flags_probes_and_ports_match_the_server(base, container, serve_model):
    args = serve_args(container)
    assert args.host == "0.0.0.0"
    port = container["ports"][0]
    assert port["containerPort"] == args.port and port["name"] == "http"
    routes = set(create_app(server_settings(serve_model)).openapi()["paths"])  # the routes the server documents
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == "http"
    # readiness follows /health (503 while loading, restarting or draining); liveness must hold while the
    # worker restarts by itself, which /live does (tests/integration/test_robustness.py checks it on a killed worker)
    assert probes["readinessProbe"]["path"] == "/health"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # room for a first conversion

    service = by_kind(base, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pod_labels = by_kind(base, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        doc = by_kind(base, kind)
        selector = doc["spec"]["selector"].get("matchLabels", doc["spec"]["selector"])
        assert selector.items() <= pod_labels.items(), kind
    hpa = by_kind(base, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind(base, "Deployment")["metadata"]["name"]
    monitor = by_kind(base, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] in routes


def test_rolling_updates_lose_nothing(base, container):
    args = serve_args(container)
    deployment = by_kind(base, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) <= PRE_STOP_SECONDS_MAX
    # SIGKILL only after the preStop sleep and the whole drain
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + args.shutdown_timeout
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert by_kind(base, "PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    assert by_kind(base, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_resources_security_and_volumes(container):
    args = serve_args(container)
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert int(resources["requests"]["cpu"]) == args.num_threads  # one compute thread per reserved core
    memory = resources["requests"]["memory"]
    assert memory.endswith("Gi") and int(memory[:-2]) << 30 > args.kv_cache_memory  # KV budget + model + processes
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    pod = yaml.safe_load((BASE / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert env[CACHE_ENV]["value"] in mounts and not mounts[env[CACHE_ENV]["value"]].get("readOnly")
    model_mount = next(m for path, m in mounts.items() if args.model.startswith(path + "/"))
    assert model_mount["readOnly"] is True
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_custom_metrics_overlay_reads_a_metric_the_adapter_exposes():
    hpa = yaml.safe_load((OVERLAY / "hpa-waiting-requests.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rule = yaml.safe_load((OVERLAY / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    assert rule["name"]["as"] == metric
    exported = re.search(r"^([a-z_:]+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], exported)
    assert exported == "vllm:num_requests_waiting"  # tests/system/test_router.py finds it in a replica's /metrics


def test_dockerfile_is_production_ready():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "STOPSIGNAL SIGTERM" in instructions
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[.*/health", text, re.M)
    entrypoint = next(line for line in instructions if line.startswith("ENTRYPOINT "))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == ["a8w8-serve"]  # exec form: PID 1 gets SIGTERM
    cmd = json.loads(next(line for line in instructions if line.startswith("CMD ")).removeprefix("CMD "))
    args = build_parser().parse_args(cmd)
    assert args.host == "0.0.0.0" and f"EXPOSE {args.port}" in instructions
    assert re.search(r"apt-get install .*\bgcc\b", text)  # the VNNI kernels are compiled on first use
    assert f"{CACHE_ENV}=" in text


def test_the_image_copies_every_package_the_project_installs():
    """``pip install .`` in the image installs what was copied: every package pyproject.toml names must be."""
    text = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in found["include"]}
    assert packages and packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


def test_router_config_example_is_the_rendered_template():
    rendered = local_cluster.render_config(["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:8000")
    assert (DEPLOY / "router" / "haproxy.cfg").read_text() == rendered
    assert not re.search(r"\{[a-z_]+\}", rendered)  # every placeholder filled
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed: the syntax check needs it (scripts/test.sh installs it)")
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "router" / "haproxy.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
