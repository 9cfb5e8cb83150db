"""The Helm chart (deploy/helm/swarmserve), rendered by Helm's own library (helm-python-sdk: the
Go SDK through its C ABI; no cluster) for the default values and each realistic values file in
its ci/ folder, every manifest validated against Kubernetes' schemas (kubernetes-validate, a
pinned version, strict: an unknown field is an error), and the chart's invariants asserted:
every container non-root with a read-only root filesystem, gRPC probes on every container
(startup probes sized for model loading on inference nodes), pinned image tags, every Service
port named and pointing at a named port of the pods it selects, identity keys only through
Secrets. The values schema refuses bad values, each named below.

No Kubernetes cluster runs on the project's machines: rendering and validation are what is
checked here; tests/test_containers.py runs the same topology for real with Docker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "swarmserve"
KUBERNETES = "1.31.0"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
# Custom resources: no schema in kubernetes-validate (the Prometheus Operator defines them).
CUSTOM_KINDS = {"ServiceMonitor"}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    manifests = chart.render(values, name="swarm", namespace="swarm")
    documents = []
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        documents.extend(d for d in yaml.safe_load_all(text) if d)
    return documents


CASES = {"defaults": None, **{path.stem: yaml.safe_load(path.read_text()) for path in VALUES_FILES}}


@pytest.fixture(scope="module", params=list(CASES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(CASES[request.param])


def pods(documents: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, its pod template) of every Deployment and StatefulSet."""
    return [(d, d["spec"]["template"]) for d in documents if d["kind"] in ("Deployment", "StatefulSet")]


def test_every_manifest_is_valid_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = rendered
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= {d["kind"] for d in documents}
    for document in documents:
        if document["kind"] in CUSTOM_KINDS:
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_chart_lints_clean() -> None:
    for values in CASES.values():
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES}")
        assert not report["errors"], report
        assert all(message["severity"] < 2 for message in report["messages"]), report["messages"]


def test_every_container_runs_unprivileged_and_is_probed_over_grpc(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = rendered
    for workload, template in pods(documents):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] != 0
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == grpc_port, (workload["metadata"]["name"], probe)
            if workload["kind"] == "StatefulSet":  # inference nodes load a model first
                startup = container["startupProbe"]
                assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/data", "/tmp"} <= mounts, "the only writable paths"


def test_images_are_pinned(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = rendered
    for _, template in pods(documents):
        for container in template["spec"]["containers"]:
            repository, _, tag = container["image"].rpartition(":")
            assert repository and tag and tag != "latest", container["image"]


def test_every_service_port_is_named_and_reaches_a_named_pod_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = rendered
    workloads = pods(documents)
    for service in (d for d in documents if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        selected = [t for _, t in workloads if selector.items() <= t["metadata"]["labels"].items()]
        assert selected, f"{service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            assert port.get("name"), f"{service['metadata']['name']} has an unnamed port"
            for template in selected:
                named = {p["name"]: p for c in template["spec"]["containers"] for p in c["ports"]}
                assert port["targetPort"] in named, (service["metadata"]["name"], port)


def test_keys_come_only_from_secrets_and_workloads_have_budgets(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = rendered
    budgets = {d["metadata"]["name"] for d in documents if d["kind"] == "PodDisruptionBudget"}
    for workload, template in pods(documents):
        assert workload["metadata"]["name"] in budgets or workload["metadata"]["name"].endswith("-verifier")
        for container in template["spec"]["containers"]:
            for variable in container.get("env", []):
                if variable["name"] == "SWARMSERVE_IDENTITY_KEY":
                    assert "value" not in variable and "secretKeyRef" in variable["valueFrom"]
    if name == "keys-from-secrets":
        router = next(t for w, t in pods(documents) if w["metadata"]["name"] == "swarm-swarmserve-router")
        key = next(v for v in router["spec"]["containers"][0]["env"] if v["name"] == "SWARMSERVE_IDENTITY_KEY")
        assert key["valueFrom"]["secretKeyRef"] == {"name": "swarm-router-key", "key": "identity.pem"}
        inference = next(t for w, t in pods(documents) if w["metadata"]["name"] == "swarm-swarmserve-inference")
        volumes = {v["name"]: v for v in inference["spec"]["volumes"]}
        assert volumes["keys"]["secret"]["secretName"] == "swarm-inference-keys"
    if name == "gpu-inference":
        inference = next(t for w, t in pods(documents) if w["metadata"]["name"] == "swarm-swarmserve-inference")
        assert inference["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        config = next(
            d for d in documents if d["metadata"]["name"] == "swarm-swarmserve-inference" and d["kind"] == "ConfigMap"
        )
        assert yaml.safe_load(config["data"]["config.yaml"])["models"][0]["engine"] == "tensorrt-llm"


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"image": {"repository": "swarmserve", "tag": "latest"}}, "an unpinned image"),
        ({"podSecurityContext": {"runAsNonRoot": True, "runAsUser": 0}}, "root"),
        ({"securityContext": {"allowPrivilegeEscalation": True, "readOnlyRootFilesystem": True}}, "escalation"),
        (
            {"router": {"replicas": 2, "grpcPort": 7000, "httpPort": 8080, "identityKeySecret": {"name": "k"}}},
            "one key, two routers",
        ),
        (
            {"inference": {"replicas": 1, "port": 7200, "engine": "tensorrt-llm", "model": {"name": "m"}}},
            "TensorRT-LLM without a GPU or model path",
        ),
        ({"ledger": {"enabled": True}}, "a chain without its genesis"),
        ({"relay": {"replicas": 3, "port": 70000}}, "a port out of range"),
        ({"relay": {"replicas": 0, "port": 7100}}, "no relay"),
        ({"seed": {"external": ["no-port.example.org"]}}, "a seed without a port"),
        ({"inference": {"replicas": 1, "port": 7200, "engine": "vllm", "model": {"name": "m"}}}, "an unknown engine"),
        ({"routers": {"replicas": 1}}, "a misspelt key"),
        ({"router": {"replicas": "two", "grpcPort": 7000, "httpPort": 8080}}, "a string for a number"),
    ],
)
def test_the_schema_refuses_bad_values(values: dict[str, Any], why: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(CHART).validate_schema(values)
