"""The client installs and works alone (no torch, MONAI or Triton), and its committed stubs match the proto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(CLIENT), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(CLIENT / "mpmri_client/v1/analysis.proto")],
        check=True,
    )  # fmt: skip
    for name in ("analysis_pb2.py", "analysis_pb2.pyi", "analysis_pb2_grpc.py"):
        fresh = (tmp_path / "mpmri_client/v1" / name).read_text()
        assert (CLIENT / "mpmri_client/v1" / name).read_text() == fresh, f"{name} is stale: regenerate the stubs"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only `pip install ./client` (and its declared dependencies)."""
    root = tmp_path_factory.mktemp("client_venv")
    env_dir = root / "venv"
    source = root / "client"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv.EnvBuilder(with_pip=True).create(env_dir)
    subprocess.run(
        [str(env_dir / "bin/python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(source)],
        check=True,
        timeout=600,
    )
    return env_dir


@pytest.mark.slow
def test_client_only_install_has_no_torch_monai_or_triton(client_venv: Path) -> None:
    probe = (
        "import importlib.util, json; import mpmri_client;"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('torch', 'monai', 'tritonclient', 'pydicom', 'SimpleITK', 'preprocess_service', 'contract')}))"
    )
    out = subprocess.run(
        [str(client_venv / "bin/python"), "-c", probe], capture_output=True, text=True, check=True, cwd=client_venv
    )
    assert json.loads(out.stdout) == dict.fromkeys(
        ("torch", "monai", "tritonclient", "pydicom", "SimpleITK", "preprocess_service", "contract"), False
    )
    other = subprocess.run([str(client_venv / "bin/mpmri"), "synth"], capture_output=True, text=True)
    assert other.returncode != 0 and "invalid choice" in other.stderr


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.service
def test_client_only_install_analyzes_a_study(
    client_venv: Path, serve_stack: Any, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    run = subprocess.run(
        [str(client_venv / "bin/mpmri"), "analyze", str(service_studies["cancer"] / "dicom"), "--server",
         serve_stack.target, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["lesions"] and len(result["lesions"][0]["center_lps_mm"]) == 3
    assert {p.name for p in tmp_path.iterdir()} >= {"result.json", "seg.dcm", "sr.dcm", "overlay.png"}


@pytest.mark.parametrize("chunk_bytes", [5, 7, 100, 3 << 20])
def test_request_stream_packs_and_splits_instances_and_reassembles_exactly(chunk_bytes: int) -> None:
    import random

    from mpmri_client.api import request_stream

    rng = random.Random(chunk_bytes)
    for _ in range(200):
        instances = [rng.randbytes(rng.randrange(0, 30)) for _ in range(rng.randrange(0, 6))]
        messages = list(request_stream(instances, "r", chunk_bytes=chunk_bytes))
        assert messages[0].header.request_id == "r"
        assert all(not m.HasField("header") for m in messages[1:])
        rebuilt: list[bytes] = []
        current: list[bytes] = []
        for message in messages:
            assert sum(len(c.data) for c in message.chunks) <= chunk_bytes
            for chunk in message.chunks:
                current.append(chunk.data)
                if chunk.end_of_instance:
                    rebuilt.append(b"".join(current))
                    current = []
        assert rebuilt == instances and not current
