"""The images built and run for real, and the chart's pods started, with podman (no Docker engine, no cluster).

* Build the service and CPU Triton images from deploy/docker with podman, on a Debian base image made here
  with debootstrap (scripts/setup_containers.sh; registries are unreachable), from offline wheelhouses.
* Run them on the host network (127.0.0.1 only) and analyze a synthetic study with ``mpmri analyze``.
* Render the chart's CPU variant, start its Deployments, ConfigMaps and Secrets with ``podman kube play``,
  wait for Triton's readiness and the service's gRPC health, analyze a study, ``podman kube down``.

Needs root (podman as root with runc) and the network to Debian's archive and PyPI on the first run. The
base image, wheelhouses and podman's layer cache persist between runs, so a rerun rebuilds little.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DOCKER, REPO_ROOT, VARIANTS, documents, merge, render

pytestmark = [pytest.mark.podman, pytest.mark.slow]

SERVICE_IMAGE = "localhost/mpmri-service:0.1.0"
TRITON_IMAGE = "localhost/mpmri-triton-cpu:0.1.0"
HAVE_SERVICE = (REPO_ROOT / "preprocess_service" / "server.py").is_file()
needs_service = pytest.mark.skipif(not HAVE_SERVICE, reason="preprocess_service/server.py is not in this checkout")
#: seconds each step took, printed at the end of the module (CI time budget)
TIMINGS: dict[str, float] = {}


def run(cmd: list[str], timeout: float = 900, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    TIMINGS[step] = round(time.monotonic() - start, 1)


def free_ports(count: int) -> list[int]:
    from serving.embedded import free_ports as _free_ports

    return _free_ports(count)


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(check: Any, timeout_s: float, what: str, logs: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(1.0)
    detail = logs() if logs else ""
    raise AssertionError(f"{what} not within {timeout_s:.0f} s\n{detail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return bool(response.status == 200)


def grpc_serving(address: str, service: str = "mpmri.v1.AnalysisService") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def container_logs(name: str) -> str:
    proc = run(["podman", "logs", "--tail", "40", name], check=False)
    return f"--- {name}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"


# --- fixtures: base image, wheelhouses, model repository, images (built once per session) ----------------
@pytest.fixture(scope="session")
def base_image() -> str:
    if os.geteuid() != 0:
        pytest.skip("podman tests run as root (rootful podman with runc)")
    with timed("setup_containers.sh (podman, containers.conf, debootstrap base image)"):
        proc = run(["bash", str(REPO_ROOT / "scripts" / "setup_containers.sh")], timeout=1200)
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """build-model-repository.sh output: the folder, the tarball and its SHA-256."""
    out = tmp_path_factory.mktemp("model-repository")
    with timed("build-model-repository.sh (mpmri export + tarball)"):
        proc = run(["bash", str(DOCKER / "build-model-repository.sh"), str(out)], timeout=600)
    tarball = Path(proc.stdout.strip().splitlines()[-1])
    sha = Path(f"{tarball}.sha256").read_text().split()[0]
    assert tarball.name == f"model-repository-{sha[:12]}.tar.gz"
    return {"folder": out / "model_repository", "tarball": tarball, "sha256": sha}


@pytest.fixture(scope="session")
def images(base_image: str) -> dict[str, str]:
    """Both CPU images built with podman from deploy/docker (layer cache reused across runs)."""
    with timed("build-wheelhouse.sh"):
        run(["bash", str(DOCKER / "build-wheelhouse.sh"), "all"], timeout=900)
    built = {}
    for name, dockerfile, tag in (
        ("triton", "Dockerfile.triton-cpu", TRITON_IMAGE),
        ("service", "Dockerfile.service", SERVICE_IMAGE),
    ):
        with timed(f"podman build {dockerfile}"):
            run(
                [
                    "podman",
                    "build",
                    "--format",
                    "docker",
                    "--network",
                    "host",
                    "--layers",
                    "--build-arg",
                    f"BASE_IMAGE={base_image}",
                    "-f",
                    str(DOCKER / dockerfile),
                    "-t",
                    tag,
                    ".",
                ],
                cwd=REPO_ROOT,
                timeout=1800,
            )
        built[name] = tag
        # the image this tag pointed to before a rebuild is dangling now: drop it (the build cache stays)
        title = tag.rsplit("/", 1)[-1].split(":")[0]
        run(["podman", "image", "prune", "-f", "--filter", f"label=org.opencontainers.image.title={title}"])
    return built


@pytest.fixture(scope="session")
def synthetic_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mpmri synth --cases 1 --seed 3``: one synthetic study (DICOM folder + ground truth)."""
    out = tmp_path_factory.mktemp("synth-podman")
    run([MPMRI, "synth", "--out", str(out), "--cases", "1", "--seed", "3"], timeout=300)
    (case,) = sorted(p for p in out.iterdir() if p.is_dir())
    return case


@pytest.fixture(scope="session", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    if TIMINGS:
        print("\npodman test timings (s): " + json.dumps(TIMINGS, indent=1))


MPMRI = str(Path(sys.executable).parent / "mpmri")


def analyze(case: Path, server: str, out: Path, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MPMRI_CLIENT_TOKEN", None)
    if token is not None:
        env["MPMRI_CLIENT_TOKEN"] = token
    return run(
        [
            MPMRI,
            "analyze",
            str(case / "dicom"),
            "--server",
            server,
            "--out",
            str(out),
            "--retries",
            "1",
            "--deadline-s",
            "120",
        ],
        check=False,
        env=env,
        timeout=180,
    )


def check_result(case: Path, out: Path) -> None:
    """The analysis of the synthetic study is complete and agrees with its ground truth."""
    import pydicom

    truth = json.loads((case / "ground_truth.json").read_text())
    result = json.loads((out / "result.json").read_text())
    assert result["study_instance_uid"] == truth["study_instance_uid"]
    assert result["availability"] == {"t2w": True, "adc": True, "dwi": True}
    assert 0.0 <= result["cspca_probability"] <= 1.0
    assert abs(sum(result["pirads_distribution"]) - 1.0) < 1e-3
    # seed 3 / case 0 is a benign study (max PI-RADS 1): the shipped checkpoint calls it so (one category of
    # slack, so that a retrained checkpoint does not break a test of the deployment)
    assert (result["cspca_probability"] >= 0.5) is truth["significant"]
    assert abs(result["pirads_score"] - truth["max_pirads"]) <= 1
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.StudyInstanceUID == truth["study_instance_uid"] and sr.Modality == "SR"


# --- images ---------------------------------------------------------------------------------------------
def test_images_are_non_root_with_healthchecks(images: dict[str, str]) -> None:
    for tag, user in ((images["service"], "10001:10001"), (images["triton"], "1000:1000")):
        (info,) = json.loads(run(["podman", "image", "inspect", tag]).stdout)
        config = info["Config"]
        assert config["User"] == user, tag
        health = info.get("Healthcheck") or config.get("Healthcheck")
        assert health and health["Test"][0] == "CMD", f"{tag}: no HEALTHCHECK"
    env = dict(
        e.split("=", 1)
        for e in json.loads(run(["podman", "image", "inspect", images["service"]]).stdout)[0]["Config"]["Env"]
    )
    assert env["MPMRI_HOST"] == "0.0.0.0" and env["MPMRI_SERIES_RULES"] == "/etc/mpmri/series_rules.json"
    # the series rules ride in the image; torch does not
    probe = run(
        [
            "podman",
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/opt/venv/bin/python3",
            images["service"],
            "-c",
            "import importlib.util as u, os; print(u.find_spec('torch') is None, "
            "open(os.environ['MPMRI_SERIES_RULES']).read() == open("
            "__import__('preprocessing').__path__[0] + '/series_rules.json').read())",
        ]
    )
    assert probe.stdout.split() == ["True", "True"], probe.stdout


def test_gpu_dockerfile_builds_on_a_stand_in_base(images: dict[str, str]) -> None:
    """NGC's tritonserver image cannot be pulled here (no registry), and there is no GPU: Dockerfile.triton-gpu's
    own steps are built on the CPU Triton image instead, which has python3, tritonserver and uid 1000 as NGC's
    has. The helpers the GPU chart's init containers run must be there and runnable."""
    tag = f"localhost/mpmri-triton-gpu-standin:{uuid.uuid4().hex[:8]}"
    with timed("podman build Dockerfile.triton-gpu (stand-in base)"):
        run(["podman", "build", "--format", "docker", "--network", "host", "--build-arg",
             f"BASE_IMAGE={images['triton']}", "-f", str(DOCKER / "Dockerfile.triton-gpu"), "-t", tag, "."],
            cwd=REPO_ROOT)  # fmt: skip
    try:
        out = run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", tag, "-c",
                   "id -u && mpmri-warmup --help && mpmri-fetch-model-repository --help"])  # fmt: skip
        lines = out.stdout.splitlines()
        assert lines[0] == "1000"
        assert any(line.startswith("usage: mpmri-warmup") for line in lines), out.stdout
        assert "--sha256" in out.stdout
        (info,) = json.loads(run(["podman", "image", "inspect", tag]).stdout)
        assert info["Config"]["Cmd"][:4] == [
            "tritonserver",
            "--model-repository=/models",
            "--model-control-mode=explicit",
            "--load-model=mpmri_ensemble",
        ]
        assert "TRITON_HTTP_PORT" in " ".join(info["Healthcheck"]["Test"])
    finally:
        run(["podman", "rmi", "-f", tag], check=False)


@pytest.fixture(scope="module")
def triton_container(images: dict[str, str], model_repository: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The CPU Triton image running with the model repository mounted read-only, on 127.0.0.1 only."""
    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
    name = f"mpmri-test-triton-{uuid.uuid4().hex[:8]}"
    cmd = [
        "podman",
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--shm-size",
        "256m",
        "-e",
        f"TRITON_HTTP_PORT={ports['http']}",
        "-v",
        f"{model_repository['folder']}:/models:ro",
        images["triton"],
        "tritonserver",
        "--model-repository=/models",
        "--model-config-name=cpu",
        "--model-control-mode=explicit",
        "--load-model=mpmri_ensemble",
        "--allow-gpu-metrics=false",
        "--backend-config=python,shm-default-byte-size=16777216",
        *[f"--{kind}-address=127.0.0.1" for kind in ("http", "grpc", "metrics")],
        *[f"--{kind}-port={port}" for kind, port in ports.items()],
    ]
    try:
        with timed("Triton container ready"):
            run(cmd)
            wait_for(
                lambda: http_ok(f"http://127.0.0.1:{ports['http']}/v2/health/ready"),
                180,
                "Triton ready",
                functools.partial(container_logs, name),
            )
        yield {"name": name, **ports}
    finally:
        run(["podman", "rm", "-f", "-t", "5", name], check=False)


def test_triton_cpu_image_serves_and_exports_hpa_metrics(triton_container: dict[str, Any]) -> None:
    name = triton_container["name"]
    repository = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{triton_container['http']}/v2/repository/index", method="POST"),
            timeout=10,
        ).read()
    )
    assert {(m["name"], m["state"]) for m in repository} == {
        ("mpmri_ensemble", "READY"),
        ("localization", "READY"),
        ("map_fusion", "READY"),
        ("classification", "READY"),
    }
    # the warm-up the GPU chart runs as an init container, against this server: one request per batch size
    warm = run(
        [
            "podman",
            "exec",
            name,
            "mpmri-warmup",
            f"--url=http://127.0.0.1:{triton_container['http']}",
            "--batch-sizes=1,8",
            "--timeout-s=120",
        ]
    )
    assert "batch 1:" in warm.stdout and "batch 8:" in warm.stdout
    # the HPA's prometheus-adapter rule reads these two counters; after the warm-up they count requests
    with urllib.request.urlopen(f"http://127.0.0.1:{triton_container['metrics']}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'nv_inference_request_success{model="mpmri_ensemble",version="1"} 4' in metrics
    assert 'nv_inference_queue_duration_us{model="localization",version="1"}' in metrics
    # the image's HEALTHCHECK (TRITON_HTTP_PORT: the port it probes); retried, the machine may be busy
    wait_for(
        lambda: run(["podman", "healthcheck", "run", name], check=False).returncode == 0,
        60,
        "Triton HEALTHCHECK healthy",
        functools.partial(container_logs, name),
    )


@needs_service
def test_service_image_analyzes_through_triton_image(
    images: dict[str, str], triton_container: dict[str, Any], synthetic_study: Path, tmp_path: Path
) -> None:
    port, metrics_port = free_ports(2)
    name = f"mpmri-test-service-{uuid.uuid4().hex[:8]}"
    token = uuid.uuid4().hex
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text(token + "\n")
    os.chmod(secrets / "token", 0o644)
    try:
        with timed("service container healthy"):
            run(
                [
                    "podman",
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    "host",
                    "--read-only",
                    "--tmpfs",
                    "/tmp",
                    "-v",
                    f"{secrets}:/run/secrets/mpmri:ro",
                    "-e",
                    "MPMRI_HOST=127.0.0.1",
                    "-e",
                    f"MPMRI_PORT={port}",
                    "-e",
                    f"MPMRI_METRICS_PORT={metrics_port}",
                    "-e",
                    f"MPMRI_TRITON_URL=127.0.0.1:{triton_container['grpc']}",
                    "-e",
                    "MPMRI_AUTH_TOKEN_FILE=/run/secrets/mpmri/token",
                    images["service"],
                ]
            )
            # the image's own HEALTHCHECK (grpc.health.v1 inside the container) turns healthy once Triton is ready
            wait_for(
                lambda: run(["podman", "healthcheck", "run", name], check=False).returncode == 0,
                120,
                "service HEALTHCHECK",
                functools.partial(container_logs, name),
            )
        refused = analyze(synthetic_study, f"127.0.0.1:{port}", tmp_path / "refused")
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
        with timed("mpmri analyze through the images"):
            done = analyze(synthetic_study, f"127.0.0.1:{port}", tmp_path / "out", token=token)
        assert done.returncode == 0, done.stderr + container_logs(name)
        check_result(synthetic_study, tmp_path / "out")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        # one study analyzed, once: the service's own Prometheus counters say so
        assert re.search(r'^mpmri_requests_total\{code="OK",method="Analyze"\} 1\.0$', metrics, re.M), metrics[:2000]
        assert "mpmri_stage_duration_seconds_bucket" in metrics
    finally:
        run(["podman", "rm", "-f", "-t", "5", name], check=False)


def _pki(d: Path, server_names: list[str]) -> None:
    """A throw-away CA and a server certificate (serverAuth + clientAuth) as a kubernetes.io/tls Secret lays it
    out (tls.crt, tls.key, ca.crt), plus a client certificate for the host."""

    def openssl(*args: str) -> None:
        run(["openssl", *args], timeout=60)

    d.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mpmri test CA",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
    san = ",".join(f"DNS:{n}" for n in server_names) + ",IP:127.0.0.1"
    for name, ext in (("tls", f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                "-out", str(d / f"{name}.csr"))  # fmt: skip
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))  # fmt: skip
    for path in d.iterdir():
        path.chmod(0o644)  # the service runs as uid 10001


@needs_service
def test_tls_exec_probe_as_the_chart_runs_it(
    images: dict[str, str], triton_container: dict[str, Any], synthetic_study: Path, tmp_path: Path
) -> None:
    """The TLS variant's readiness probe (``mpmri-healthcheck`` in the image, kubelet's gRPC probes are plaintext)
    with the chart's own environment and Secret layout, against the service image serving mutual TLS."""
    from deploy_helpers import env_of

    docs = documents(render(merge(VARIANTS["tls-on"], {"analysis": {"auth": {"enabled": False}}})))
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-analysis"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["exec"]["command"] == ["mpmri-healthcheck"]
    env = env_of(container)
    server_name = env["MPMRI_HEALTHCHECK_SERVER_NAME"]
    tls_dir = Path(env["MPMRI_TLS_CERT"]).parent  # /etc/mpmri/tls, the Secret's mount
    pki = tmp_path / "tls"
    _pki(pki, [server_name, "localhost"])
    port = free_port()
    name = f"mpmri-test-tls-{uuid.uuid4().hex[:8]}"
    chart_env = {k: v for k, v in env.items() if k.startswith(("MPMRI_TLS_", "MPMRI_HEALTHCHECK_"))}
    chart_env["MPMRI_TLS_CLIENT_CA"] = str(tls_dir / "ca.crt")  # the chart's client-ca mount holds the same CA
    flags = [x for k, v in {**chart_env, "MPMRI_HOST": "127.0.0.1", "MPMRI_PORT": str(port),
                            "MPMRI_METRICS_PORT": str(free_port()),
                            "MPMRI_TRITON_URL": f"127.0.0.1:{triton_container['grpc']}"}.items()
             for x in ("-e", f"{k}={v}")]  # fmt: skip
    try:
        run(["podman", "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
             "-v", f"{pki}:{tls_dir}:ro", *flags, images["service"]])  # fmt: skip
        probe = ["podman", "exec", name, *container["readinessProbe"]["exec"]["command"]]
        wait_for(lambda: run(probe, check=False).returncode == 0, 120, "TLS exec probe SERVING",
                 functools.partial(container_logs, name))  # fmt: skip
        assert "SERVING" in run(probe).stdout
        # the probe really verifies the certificate: a name the certificate does not carry fails
        wrong = run(["podman", "exec", "-e", "MPMRI_HEALTHCHECK_SERVER_NAME=elsewhere.example", name,
                     "mpmri-healthcheck"], check=False)  # fmt: skip
        assert wrong.returncode != 0
        # and the service serves mutual TLS to a router with a client certificate
        env_client = {k: v for k, v in os.environ.items() if not k.startswith("MPMRI_CLIENT")}
        done = run([MPMRI, "analyze", str(synthetic_study / "dicom"), "--server", f"127.0.0.1:{port}",
                    "--out", str(tmp_path / "out"), "--ca", str(pki / "ca.crt"), "--cert", str(pki / "client.crt"),
                    "--key", str(pki / "client.key"), "--server-name", server_name, "--retries", "1"],
                   check=False, env=env_client, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr + container_logs(name)
        check_result(synthetic_study, tmp_path / "out")
    finally:
        run(["podman", "rm", "-f", "-t", "5", name], check=False)


# --- the chart's CPU variant under podman kube play -----------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def object_store(folder: Path) -> Iterator[str]:
    """A stand-in for object storage: ``folder`` over HTTP on 127.0.0.1 (yields the base URL)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def kube_play_values(ports: dict[str, int], claim: str, token: str) -> dict[str, Any]:
    """The chart's CPU variant, bound to 127.0.0.1 on free ports, local images, one pod each."""
    small = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "4Gi"}}
    return merge(
        VARIANTS["cpu-only"],
        {
            "imageRegistry": "localhost",
            "triton": {
                "bindAddress": "127.0.0.1",
                "replicas": 1,
                "autoscaling": {"enabled": False},
                "ports": {"http": ports["http"], "grpc": ports["grpc"], "metrics": ports["metrics"]},
                # podman's own /dev/shm is 64 MB: three Python-backend stubs x 4 MiB fit
                "pythonShmByteSize": 4194304,
                "resources": small,
                "modelRepository": {"source": "pvc", "pvc": {"claimName": claim}},
            },
            "analysis": {
                "bindAddress": "127.0.0.1",
                "port": ports["analysis"],
                "metricsPort": ports["analysis_metrics"],
                "tritonUrl": f"127.0.0.1:{ports['grpc']}",
                "replicas": 1,
                "autoscaling": {"enabled": False},
                "resources": small,
                "auth": {"enabled": True, "token": token},
            },
        },
    )


def for_podman(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects ``podman kube play`` starts, adapted only where podman 4.3 (Debian 12) differs from a kubelet.

    * Deployments, ConfigMaps and Secrets only (podman ignores Services, HPAs, PDBs, policies); Secrets and
      ConfigMaps first, so the pods find them.
    * ``containerPort`` declarations dropped: with ``--network host`` the processes listen on the host already,
      and podman 4.3 refuses port mappings on the host network.
    * The ``/dev/shm`` emptyDir dropped: podman 4.3 mounts an emptyDir as a root-owned directory, not as tmpfs;
      the pod's own ``/dev/shm`` is tmpfs.
    """
    order = {"Secret": 0, "ConfigMap": 1, "Deployment": 2}
    kept = sorted((d for d in docs if d["kind"] in order), key=lambda d: order[d["kind"]])
    for doc in kept:
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "dshm"]
        for container in spec["containers"]:
            container.pop("ports", None)
            container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "dshm"]
    return kept


@needs_service
def test_chart_cpu_variant_pods_start_and_analyze(
    images: dict[str, str], model_repository: dict[str, Any], synthetic_study: Path, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    release = f"t{suffix}"  # unique pod, container, secret names: other runs may share this podman
    names = ("http", "grpc", "metrics", "analysis", "analysis_metrics")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    claim = f"mpmri-test-models-{suffix}"
    values = kube_play_values(ports, claim, token=f"token-{suffix}")
    manifest = tmp_path / "kube.yaml"
    try:
        # 1. the model repository, pulled from "object storage" by the chart's own init-container command
        #    (rendered from the fetch variant) into the PersistentVolumeClaim's volume. podman 4.3 cannot run
        #    the init container inside kube play ("failed to remove once init container"), so podman run does.
        with object_store(model_repository["tarball"].parent) as base_url:
            fetch_values = merge(
                values,
                {
                    "triton": {
                        "modelRepository": {
                            "source": "fetch",
                            "fetch": {
                                "url": f"{base_url}/{model_repository['tarball'].name}",
                                "sha256": model_repository["sha256"],
                            },
                        }
                    }
                },
            )
            fetch_pod = next(
                d
                for d in documents(render(fetch_values, release=release))
                if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-triton")
            )["spec"]["template"]["spec"]
            (fetch,) = fetch_pod["initContainers"]
            run(["podman", "volume", "create", claim])
            with timed("fetch init container (podman run)"):
                fetched = run(
                    [
                        "podman",
                        "run",
                        "--rm",
                        "--network",
                        "host",
                        "--user",
                        "1000:1000",
                        "-v",
                        f"{claim}:{fetch['volumeMounts'][0]['mountPath']}",
                        fetch["image"],
                        *fetch["command"],
                    ]
                )
        assert "mpmri_ensemble" in fetched.stdout and model_repository["sha256"][:12] in fetched.stdout

        # 2. the chart's Deployments, ConfigMap and Secret under podman kube play
        docs = for_podman(documents(render(values, release=release)))
        assert {d["kind"] for d in docs} == {"Deployment", "ConfigMap", "Secret"}
        manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        with timed("podman kube play + Triton ready + service SERVING"):
            run(["podman", "kube", "play", "--network", "host", str(manifest)], timeout=300)
            triton_ctr = running_container("-tritonserver")
            wait_for(
                lambda: http_ok(f"http://127.0.0.1:{ports['http']}/v2/health/ready"),
                180,
                "Triton (kube play) ready",
                functools.partial(container_logs, triton_ctr),
            )
            analysis_ctr = running_container("-analysis")
            wait_for(
                lambda: grpc_serving(f"127.0.0.1:{ports['analysis']}"),
                120,
                "service SERVING",
                functools.partial(container_logs, analysis_ctr),
            )
        # the pods run as the chart says: non-root users, read-only root filesystem for the service
        for ctr, uid in ((triton_ctr, "1000"), (analysis_ctr, "10001")):
            assert run(["podman", "exec", ctr, "id", "-u"]).stdout.strip() == uid
        assert run(["podman", "exec", analysis_ctr, "touch", "/opt/venv/x"], check=False).returncode != 0
        # the series rules come from the chart's ConfigMap
        rules = run(["podman", "exec", analysis_ctr, "cat", "/etc/mpmri/rules/series_rules.json"]).stdout
        assert json.loads(rules) == json.loads((REPO_ROOT / "preprocessing" / "series_rules.json").read_text())
        # the bearer token comes from the chart's Secret. podman 4.3 mounts Secret data still base64-encoded
        # (a kubelet decodes it), so the client sends what the service reads from the mounted file.
        mounted = run(["podman", "exec", analysis_ctr, "cat", "/etc/mpmri/auth/token"]).stdout.strip()
        token = values["analysis"]["auth"]["token"]
        assert mounted in (token, base64.b64encode(token.encode()).decode())
        assert analyze(synthetic_study, f"127.0.0.1:{ports['analysis']}", tmp_path / "refused").returncode != 0
        with timed("mpmri analyze through the chart's pods"):
            done = analyze(synthetic_study, f"127.0.0.1:{ports['analysis']}", tmp_path / "out", token=mounted)
        assert done.returncode == 0, done.stderr + container_logs(analysis_ctr)
        check_result(synthetic_study, tmp_path / "out")
    finally:
        if manifest.exists():
            run(["podman", "kube", "down", str(manifest)], check=False)
        run(["podman", "volume", "rm", "-f", claim], check=False)
        for doc in yaml.safe_load_all(manifest.read_text()) if manifest.exists() else []:
            if doc["kind"] == "Secret":
                run(["podman", "secret", "rm", doc["metadata"]["name"]], check=False)
            if doc["kind"] in ("Secret", "ConfigMap"):  # podman 4.3 keeps their volumes after kube down
                run(["podman", "volume", "rm", "-f", doc["metadata"]["name"]], check=False)
    left = run(["podman", "pod", "ps", "--format", "{{.Name}}"]).stdout.split()
    left += run(["podman", "volume", "ls", "--format", "{{.Name}}"]).stdout.split()
    assert not [p for p in left if p.startswith(release)], f"pods or volumes left after kube down: {left}"


def test_podman_is_configured_for_runc(base_image: str) -> None:
    """The set-up script's containers.conf is what makes rootful podman work here (crun fails)."""
    assert shutil.which("podman") and base_image
    conf = Path("/etc/containers/containers.conf").read_text()
    for line in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"', '"nofile=1024:1024"'):
        assert line in conf


def running_container(suffix: str) -> str:
    """Name of the running podman container whose name ends with ``suffix``."""
    return next(n for n in run(["podman", "ps", "--format", "{{.Names}}"]).stdout.split() if n.endswith(suffix))
