"""The Helm chart (deploy/helm/mpmri), linted and rendered by the real Helm v4 engine, validated against the
Kubernetes schemas (kubernetes-validate) and checked against our policies. No cluster is needed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    CHART,
    DEPLOY,
    KUBERNETES_VERSIONS,
    REPO_ROOT,
    VARIANTS,
    by_kind,
    containers,
    documents,
    env_of,
    merge,
    one,
    pod_specs,
    render,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
MONITORING_API = ("monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every variant rendered once: variant -> Kubernetes objects."""
    return {name: documents(render(values)) for name, values in VARIANTS.items()}


def triton_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]


def analysis_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "-analysis")["spec"]["template"]["spec"]


def main_container(spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = spec["containers"]
    return container


# --- lint and Kubernetes schemas ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict_passes(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, kube_version="v1.34.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"].startswith(">=1.27"), "native gRPC probes are GA since Kubernetes 1.27"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and chart["appVersion"] == version.group(1), "appVersion must be the mpmri-serve version"


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_are_valid_kubernetes(variant: str, kube_version: str) -> None:
    import kubernetes_validate

    docs = documents(render(VARIANTS[variant], kube_version=f"v{kube_version}"))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} invalid for Kubernetes {kube_version}: {err}")


def test_validator_rejects_a_broken_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The schema check above can fail: a misspelt probe field is caught."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment", "-analysis")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# --- policies on every variant --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_container_has_probes_and_resources(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    for workload, spec in pod_specs(rendered[variant]):
        for role, container in containers(spec):
            where = f"{variant}: {workload}/{container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: cpu and memory requests"
            assert "memory" in resources.get("limits", {}), f"{where}: memory limit"
            if role == "main":
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    assert probe in container, f"{where}: no {probe}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_everything_runs_as_non_root(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    for workload, spec in pod_specs(rendered[variant]):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, workload
        assert spec["automountServiceAccountToken"] is False, workload
        for _, container in containers(spec):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, container["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
            assert not ctx.get("privileged", False) and ctx.get("runAsUser", 1) != 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_image_is_pinned(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    images = [c["image"] for _, spec in pod_specs(rendered[variant]) for _, c in containers(spec)]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag == APP_VERSION, f"{image}: default tags are the chart's appVersion {APP_VERSION}"


def test_latest_tag_is_refused(tmp_path: Path) -> None:
    import shutil

    import helm_python

    latest = {"analysis": {"image": {"repository": "mpmri-service", "tag": "latest"}}}
    with pytest.raises(helm_python.HelmValuesError, match="/analysis/image/tag"):
        render(latest)  # the schema refuses it ...
    # ... and so does the template itself, where the schema is skipped (a copy of the chart without it)
    copy = tmp_path / "mpmri"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmError, match='tag "latest" is not pinned'):
        render(latest, validate=False, chart_dir=copy)


def test_selectors_match_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, docs in rendered.items():
        deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
        pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
        for doc in by_kind(docs, "Service") + by_kind(docs, "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
            assert len(matched) == 1, f"{variant}: {doc['kind']} {doc['metadata']['name']} selects {matched}"
        for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
            assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        for name, deployment in deployments.items():
            assert deployment["spec"]["selector"]["matchLabels"].items() <= pods[name].items()


# --- Triton ---------------------------------------------------------------------------------------------
def _tritonserver_flags() -> set[str]:
    """Flags the real tritonserver 2.51 (nvidia-pytriton's build, same as NGC 24.10) accepts."""
    from serving.triton_env import find_installation, server_environment

    installation = find_installation()
    proc = subprocess.run(
        [str(installation.server_binary), "--help"],
        capture_output=True,
        text=True,
        env=server_environment(installation),
        timeout=60,
    )
    return set(re.findall(r"^\s*(--[a-z0-9-]+)", proc.stdout + proc.stderr, re.M))


def test_triton_deployment_follows_tritons_chart(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = triton_pod(rendered["default"])
    container = main_container(spec)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model-load window of Triton's chart"
    args = container["args"]
    assert container["command"] == ["tritonserver"]
    assert "--model-control-mode=explicit" in args and "--load-model=mpmri_ensemble" in args
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    strategy = one(rendered["default"], "Deployment", "-triton")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxUnavailable": 0, "maxSurge": 1}, "a model upgrade must keep a ready pod"


def test_triton_flags_exist_in_tritonserver(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = _tritonserver_flags()
    assert "--model-repository" in known, "could not read tritonserver --help"
    for variant in ("default", "cpu-only"):
        spec = triton_pod(rendered[variant])
        commands = [main_container(spec)["args"]]
        commands += [
            c["command"][c["command"].index("tritonserver") + 1 :]
            for c in spec.get("initContainers", [])
            if "tritonserver" in c["command"]
        ]
        for args in commands:
            for arg in args:
                assert arg.split("=")[0] in known, f"{variant}: tritonserver has no flag {arg}"


def test_gpu_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = triton_pod(rendered["default"])
    container = main_container(spec)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "--model-config-name=cpu" not in container["args"]
    # model repository from the PersistentVolumeClaim
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "mpmri-model-repository", "readOnly": True}
    # the warm-up init container runs the serving container's exact server on the same GPU and engine cache
    (warmup,) = [c for c in spec["initContainers"] if c["name"] == "tensorrt-warmup"]
    assert warmup["command"][0] == "mpmri-warmup"
    assert warmup["command"][warmup["command"].index("tritonserver") + 1 :] == container["args"]
    assert warmup["resources"] == container["resources"] and warmup["volumeMounts"] == container["volumeMounts"]
    # the engine cache volume sits where config.pbtxt tells onnxruntime-TensorRT to cache engines
    cache_paths = {
        m.group(1)
        for config in (REPO_ROOT / "model_repository").glob("*/config.pbtxt")
        for m in re.finditer(r'key: "trt_engine_cache_path"\s*value: "([^"]+)"', config.read_text())
    }
    assert len(cache_paths) == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["trt-engine-cache"] == cache_paths.pop()


def test_cpu_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cpu-only"]
    spec = triton_pod(docs)
    container = main_container(spec)
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert "--model-config-name=cpu" in container["args"]
    assert container["image"] == f"mpmri-triton-cpu:{APP_VERSION}"
    assert "initContainers" not in spec, "no TensorRT warm-up without a GPU; PVC source has no fetch"
    assert "trt-engine-cache" not in {v["name"] for v in spec["volumes"]}


def test_fetch_init_container(rendered: dict[str, list[dict[str, Any]]]) -> None:
    fetch_values = VARIANTS["fetch-init-container"]["triton"]["modelRepository"]["fetch"]
    spec = triton_pod(rendered["fetch-init-container"])
    (fetch,) = [c for c in spec["initContainers"] if c["name"] == "fetch-model-repository"]
    assert fetch["command"] == [
        "mpmri-fetch-model-repository",
        fetch_values["url"],
        "/models",
        f"--sha256={fetch_values['sha256']}",
    ]
    assert spec["initContainers"][0]["name"] == "fetch-model-repository", "fetch before the warm-up"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["models"] and "persistentVolumeClaim" not in volumes["models"]
    policy = one(rendered["fetch-init-container"], "NetworkPolicy", "-triton")
    assert {"ports": [{"port": 443, "protocol": "TCP"}]} in policy["spec"]["egress"]
    assert len(one(rendered["default"], "NetworkPolicy", "-triton")["spec"]["egress"]) == 1, "PVC: DNS only"


def test_pvc_and_engine_cache_claims(rendered: dict[str, list[dict[str, Any]]]) -> None:
    volumes = {v["name"]: v for v in triton_pod(rendered["headless-pvc-cache"])["volumes"]}
    assert volumes["trt-engine-cache"] == {
        "name": "trt-engine-cache",
        "persistentVolumeClaim": {"claimName": "trt-cache"},
    }


# --- analysis service -----------------------------------------------------------------------------------
def test_analysis_probes_and_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = main_container(analysis_pod(rendered["default"]))
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "mpmri.v1.AnalysisService"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}, "liveness must not depend on Triton"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 8090}
    env = env_of(container)
    assert env["MPMRI_HOST"] == "0.0.0.0"
    assert env["MPMRI_TRITON_URL"] == "demo-mpmri-triton:8001"
    assert env["MPMRI_SERIES_RULES"].startswith("/etc/mpmri/rules/")
    assert "MPMRI_TLS_CERT" not in env and "MPMRI_AUTH_TOKEN_FILE" not in env
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_analysis_env_names_are_service_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every MPMRI_* variable the chart sets is a setting of the service (preprocess_service.settings)."""
    settings = pytest.importorskip("preprocess_service.settings")
    import dataclasses

    known = {"MPMRI_" + f.name.upper() for f in dataclasses.fields(settings.ServiceSettings)}
    known |= {"MPMRI_HEALTHCHECK_SERVER_NAME"}  # read by deploy/docker/healthcheck.py (exec probes)
    for variant in ("default", "tls-on"):
        env = env_of(main_container(analysis_pod(rendered[variant])))
        assert set(env) - known == set(), variant
    env = env_of(main_container(analysis_pod(rendered["default"])))
    parsed = settings.settings_from(environ={k: v for k, v in env.items() if k != "MPMRI_SERIES_RULES"})
    assert parsed.port == 50051 and parsed.max_concurrent == 4 and parsed.grace_s == 55


def test_tls_and_token_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = analysis_pod(rendered["tls-on"])
    container = main_container(spec)
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "mpmri-tls", "optional": False}
    assert env["MPMRI_TLS_CERT"] == f"{mounts['tls']}/tls.crt" and env["MPMRI_TLS_KEY"] == f"{mounts['tls']}/tls.key"
    assert env["MPMRI_TLS_CLIENT_CA"] == f"{mounts['client-ca']}/ca.crt"
    assert volumes["auth"]["secret"]["secretName"] == "mpmri-token" and not volumes["auth"]["secret"]["optional"]
    assert env["MPMRI_AUTH_TOKEN_FILE"] == f"{mounts['auth']}/token"
    # kubelet's gRPC probes are plaintext: with TLS the image's health client probes instead
    assert container["readinessProbe"]["exec"]["command"] == ["mpmri-healthcheck"]
    assert "Secret" not in {d["kind"] for d in rendered["tls-on"]}, "existing secrets are referenced, not created"


def test_token_secret_created_from_value() -> None:
    docs = documents(render({"analysis": {"auth": {"enabled": True, "token": "s3cret"}}}))
    secret = one(docs, "Secret", "-analysis-auth")
    assert secret["data"] == {"token": "czNjcmV0"}
    annotations = one(docs, "Deployment", "-analysis")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/auth" in annotations


def test_auth_without_secret_fails_clearly() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError, match="existingSecret"):
        render({"analysis": {"auth": {"enabled": True}}})


def test_series_rules_configmap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    packaged = REPO_ROOT / "preprocessing" / "series_rules.json"
    assert (CHART / "files" / "series_rules.json").read_bytes() == packaged.read_bytes(), (
        "deploy/helm/mpmri/files/series_rules.json must be a copy of preprocessing/series_rules.json"
    )
    configmap = one(rendered["default"], "ConfigMap", "-series-rules")
    assert json.loads(configmap["data"]["series_rules.json"]) == json.loads(packaged.read_text())
    # custom rules replace the packaged ones and roll the pods (checksum annotation)
    custom = json.loads(packaged.read_text())
    custom["comment"] = "site rules"
    docs = documents(render({"analysis": {"seriesRules": custom}}))
    assert json.loads(one(docs, "ConfigMap", "-series-rules")["data"]["series_rules.json"]) == custom

    def checksum(d: list[dict[str, Any]]) -> str:
        return str(one(d, "Deployment", "-analysis")["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(docs) != checksum(rendered["default"])


# --- Services, autoscaling, disruption budgets, network policy, monitoring ------------------------------
def test_services_and_headless_option(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, headless in (("default", False), ("headless-pvc-cache", True)):
        for name in ("-triton", "-analysis"):
            service = one(rendered[variant], "Service", name)
            assert (service["spec"].get("clusterIP") == "None") is headless
            grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc and grpc[0]["appProtocol"] == "grpc"


def _adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return dict(rule)


def test_hpas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    triton = one(rendered["default"], "HorizontalPodAutoscaler", "-triton")
    assert triton["apiVersion"] == "autoscaling/v2"
    (metric,) = triton["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = _adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"], "HPA metric = prometheus-adapter rule name"
    assert "delta(nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "(1+delta(nv_inference_request_success" in rule["metricsQuery"].replace(" ", "")
    analysis = one(rendered["default"], "HorizontalPodAutoscaler", "-analysis")
    (cpu,) = analysis["spec"]["metrics"]
    assert cpu == {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
    }
    # with autoscaling on, the Deployment leaves replicas to the HPA; off, it sets them
    assert "replicas" not in one(rendered["default"], "Deployment", "-triton")["spec"]
    off = rendered["autoscaling-off"]
    assert by_kind(off, "HorizontalPodAutoscaler") == []
    assert one(off, "Deployment", "-triton")["spec"]["replicas"] == 2
    assert one(off, "Deployment", "-analysis")["spec"]["replicas"] == 3


@pytest.mark.triton
def test_hpa_metrics_are_exported_by_triton(triton_server: Any) -> None:
    """The series the adapter rule reads exist on a real Triton's metrics endpoint (2.51, the NGC 24.10 server)."""
    import urllib.request

    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        exported = set(re.findall(r"^([a-z_:]+)\{", response.read().decode(), re.M))
    rule = _adapter_rule()
    used = set(re.findall(r"\b(nv_[a-z_]+)\b", rule["seriesQuery"] + rule["metricsQuery"]))
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert used <= exported, f"not exported by Triton: {used - exported}"


def test_pod_disruption_budgets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert one(rendered["default"], "PodDisruptionBudget", "-triton")["spec"]["maxUnavailable"] == 1
    assert one(rendered["default"], "PodDisruptionBudget", "-analysis")["spec"]["minAvailable"] == 1


def test_network_policy_routers_service_triton_only(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    analysis_labels = one(docs, "Deployment", "-analysis")["spec"]["template"]["metadata"]["labels"]
    triton_labels = one(docs, "Deployment", "-triton")["spec"]["template"]["metadata"]["labels"]
    analysis = one(docs, "NetworkPolicy", "-analysis")["spec"]
    assert analysis["podSelector"]["matchLabels"].items() <= analysis_labels.items()
    assert set(analysis["policyTypes"]) == {"Ingress", "Egress"}
    grpc_in, metrics_in = analysis["ingress"]
    assert grpc_in["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "router"}}}]
    assert grpc_in["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert metrics_in["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    to_triton, dns = analysis["egress"]
    assert to_triton["to"][0]["podSelector"]["matchLabels"].items() <= triton_labels.items()
    assert to_triton["ports"] == [{"port": 8001, "protocol": "TCP"}]
    assert {p["port"] for p in dns["ports"]} == {53}
    triton = one(docs, "NetworkPolicy", "-triton")["spec"]
    assert triton["podSelector"]["matchLabels"].items() <= triton_labels.items()
    inference_in = triton["ingress"][0]
    assert inference_in["from"][0]["podSelector"]["matchLabels"].items() <= analysis_labels.items()
    assert len(inference_in["from"]) == 1
    assert by_kind(documents(render({"networkPolicy": {"enabled": False}})), "NetworkPolicy") == []
    # AnalyzeReference: the service may also reach the PACS's DICOMweb, when the operator says so
    pacs = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pacs"}}}],
        "ports": [{"port": 8042, "protocol": "TCP"}],
    }
    docs = documents(render({"networkPolicy": {"analysisEgress": [pacs]}}))
    assert one(docs, "NetworkPolicy", "-analysis")["spec"]["egress"][2] == pacs


def test_service_monitors_only_with_the_operator_api(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert by_kind(rendered["default"], "ServiceMonitor") == []
    docs = documents(render(api_versions=MONITORING_API))
    monitors = by_kind(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"demo-mpmri-triton", "demo-mpmri-analysis"}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        service = one(docs, "Service", monitor["metadata"]["name"][len("demo-mpmri") :])
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (
        by_kind(
            documents(render({"metrics": {"serviceMonitor": {"enabled": False}}}, api_versions=MONITORING_API)),
            "ServiceMonitor",
        )
        == []
    )


def test_notes_render() -> None:
    notes = render()["mpmri/templates/NOTES.txt"]
    assert "kubectl -n mpmri rollout status deployment/demo-mpmri-triton" in notes
    assert "mpmri analyze DICOM_DIR --server 127.0.0.1:50051" in notes
    assert "prometheus-adapter" in notes


# --- values.schema.json ---------------------------------------------------------------------------------
def test_schema_is_draft07_and_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.get("properties", {}).items():
                assert "description" in child, f"{path}.{key} has no description"
                walk(child, f"{path}.{key}")
            for key, child in node.get("definitions", {}).items():
                walk(child, f"definitions.{key}")

    walk(schema, "")
    # every key of values.yaml is described by the schema (additionalProperties false catches typos)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"triton": {"variant": "tpu"}}, "/triton/variant"),
        ({"triton": {"gpuCount": 0}}, "/triton/gpuCount"),
        ({"triton": {"modelRepository": {"source": "s3"}}}, "/triton/modelRepository/source"),
        ({"triton": {"modelRepository": {"pvc": {"claimName": ""}}}}, "claimName"),
        ({"triton": {"modelRepository": {"source": "fetch"}}}, "url"),
        (
            {"triton": {"modelRepository": {"source": "fetch", "fetch": {"url": "https://x/y.tgz", "sha256": "abc"}}}},
            "sha256",
        ),
        ({"triton": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
        ({"analysis": {"image": {"repository": "mpmri-service", "tag": "latest"}}}, "/analysis/image/tag"),
        ({"analysis": {"port": 70000}}, "/analysis/port"),
        ({"analysis": {"tritonSharedMemory": "cuda"}}, "tritonSharedMemory"),
        ({"analysis": {"tls": {"enabled": True}}}, "secretName"),
        ({"analysis": {"podSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
        ({"analysis": {"replica": 3}}, "replica"),
        ({"analysis": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}}}, "targetCPU"),
        ({"triton": {"extraServerArgs": ["model-repository=/x"]}}, "extraServerArgs"),
    ],
)
def test_schema_rejects_wrong_values(values: dict[str, Any], message: str) -> None:
    import helm_python

    full = merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmValuesError) as err:
        chart.validate_schema(full)
    assert message in str(err.value), str(err.value)


def test_values_yaml_is_what_the_chart_ships() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        assert chart.values == values
        assert chart.name == "mpmri"


def test_model_repository_artifact_script_is_referenced() -> None:
    """The chart's fetch URL format and the script that makes the artifact agree (tar.gz + sha256)."""
    script = (DEPLOY / "docker" / "build-model-repository.sh").read_text()
    assert "sha256sum" in script and ".tar.gz" in script
    assert Path(DEPLOY / "docker" / "fetch-model-repository.py").is_file()
