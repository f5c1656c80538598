"""Shared helpers of tests/test_deploy_*.py: render the Helm chart with the real Helm v4 engine (helm-python-sdk)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
CHART = DEPLOY / "helm" / "mpmri"
DOCKER = DEPLOY / "docker"
#: Kubernetes versions the rendered manifests are validated against: the chart's floor and a recent release
KUBERNETES_VERSIONS = ("1.27.0", "1.34.0")
RELEASE = "demo"
NAMESPACE = "mpmri"


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two values trees (``override`` wins), like ``helm -f a.yaml -f b.yaml``."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: chart variants the issue asks for; each is a values override on top of values.yaml
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cpu-only": {
        "triton": {
            "variant": "cpu",
            "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        }
    },
    "fetch-init-container": {
        "triton": {
            "modelRepository": {
                "source": "fetch",
                "fetch": {
                    "url": "https://models.example.org/mpmri/model-repository-0123456789ab.tar.gz",
                    "sha256": "0123456789abcdef" * 4,
                },
            }
        }
    },
    "tls-on": {
        "analysis": {
            "tls": {"enabled": True, "secretName": "mpmri-tls", "clientAuth": True},
            "auth": {"enabled": True, "existingSecret": "mpmri-token"},
        }
    },
    "autoscaling-off": {
        "triton": {"autoscaling": {"enabled": False}, "replicas": 2},
        "analysis": {"autoscaling": {"enabled": False}, "replicas": 3},
    },
    "headless-pvc-cache": {
        "triton": {"service": {"headless": True}, "trtEngineCache": {"claimName": "trt-cache"}},
        "analysis": {"service": {"headless": True}},
    },
}


def render(
    values: Mapping[str, Any] | None = None,
    api_versions: tuple[str, ...] = (),
    kube_version: str = "v1.34.0",
    validate: bool = True,
    chart_dir: Path = CHART,
    release: str = RELEASE,
) -> dict[str, str]:
    """Render the chart offline; returns template path -> manifest text.

    ``validate``: also check the values with ``Chart.validate_schema`` first (the render itself checks them
    against values.schema.json too, when the chart has one). ``chart_dir``: another copy of the chart.
    ``api_versions``/``kube_version`` set ``.Capabilities`` (``helm template --api-versions --kube-version``).
    ``Chart.render`` of helm-python-sdk 0.2.2 does not expose them, so the same C ABI call it makes
    (``helm_render``) is made here with those two extra options, which the native library accepts.
    """
    import helm_python as helm
    from helm_python import _native

    opts = {"name": release, "namespace": NAMESPACE, "is_install": True, "kube_version": kube_version}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    with helm.Chart.load(chart_dir) as chart:
        if validate:
            chart.validate_schema(dict(values or {}))
        rendered = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts))
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def documents(manifests: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered manifests (NOTES.txt and empty documents skipped)."""
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    """The single object of ``kind`` whose name ends with ``name_suffix``."""
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) of every workload that has a pod template."""
    for doc in docs:
        template = doc.get("spec", {}).get("template")
        if template is not None:
            yield doc["metadata"]["name"], template["spec"]


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("init"|"main", container) of one pod spec."""
    for container in spec.get("initContainers", []):
        yield "init", container
    for container in spec.get("containers", []):
        yield "main", container


def env_of(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}
