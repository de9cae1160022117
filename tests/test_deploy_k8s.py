"""deploy/k8s: the kustomization's manifests validate offline against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields rejected), and hang together: probes on /health, one
GPU per pod, the Service and HPA point at the Deployment, scrape annotations match the port."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
# oldest and newest minor versions we claim (kubernetes-validate bundles 1.25 .. 1.37 schemas)
VERSIONS = ["1.29.0", "1.33.0"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _resources() -> dict[str, dict]:
    out = {}
    for name in _kustomization()["resources"]:
        for doc in _docs(K8S / name):
            out[doc["kind"]] = doc
    return out


def test_kustomization_lists_existing_files():
    kust = _kustomization()
    assert kust["kind"] == "Kustomization"
    for name in kust["resources"]:
        assert (K8S / name).is_file(), name
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(_resources())


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_kubernetes_validate(version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    for name in _kustomization()["resources"]:
        for doc in _docs(K8S / name):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{name} ({doc['kind']}) against Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_deployment_gpu_probes_and_scraping():
    res = _resources()
    dep = res["Deployment"]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DIFFUSION_SERVER_PORT"] == "8000"
    # the API key is required: a missing secret stops the pod rather than serving without authentication
    key = next(e for e in container["env"] if e["name"] == "DIFFUSION_SERVER_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key["optional"] is False and key["key"] == "api-key"
    config = env["DIFFUSION_SERVER_CONFIG"]
    assert config.startswith("/etc/diffusion-server/")
    assert (K8S.parent.parent / "configs" / Path(config).name).is_file(), "presets are baked into the image from configs/"
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", 8000), probe
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == 8000
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000  # the image's USER 1000:1000
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()

    assert "replicas" not in dep["spec"]  # the autoscaler's: an apply must not reset it
    svc = res["Service"]
    assert "prometheus.io/scrape" not in svc["metadata"].get("annotations", {})  # the pods are scraped once
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8000)

    hpa = res["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "diffusion_server_num_requests_waiting"


def test_hpa_metric_is_what_the_adapter_serves():
    """prometheus-adapter renames diffusion_server:num_requests_waiting to the HPA's metric name."""
    import re

    values = yaml.safe_load((K8S / "helm" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"].strip("'")).group(1)
    assert series == "diffusion_server:num_requests_waiting"
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    hpa = _resources()["HorizontalPodAutoscaler"]
    assert renamed == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]


def test_podmonitor_selects_the_pods():
    (pm,) = _docs(K8S / "podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    labels = _resources()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint == {**endpoint, "port": "http", "path": "/metrics"}
