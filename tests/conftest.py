"""Shared fixtures. Studies are synthetic (mpmri synth): no patient data reaches these tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four synthetic studies (seed 1234) written as DICOM folders; returns the case directories."""
    from synth.generator import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    return generate_dataset(out, cases=4, seed=1234)


@pytest.fixture(scope="session")
def synthetic_case(synthetic_dataset: list[Path]) -> Path:
    """One synthetic case directory: ``<case>/dicom/<series>/*.dcm`` and ``<case>/ground_truth.json``."""
    return synthetic_dataset[0]


# --- Triton serving (task D): one random-init checkpoint, one exported repository, one server per session ---
@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init CPU-profile checkpoint (seeded); stands in for the trained one in serving tests."""
    import torch

    from networks import build_networks, save_checkpoint

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("checkpoint") / "random.pt"
    save_checkpoint(path, build_networks("cpu"), {"note": "random init for tests"})
    return path


@pytest.fixture(scope="session")
def exported_repository(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mpmri export`` of :func:`random_checkpoint` into a temporary model repository."""
    from export.pipeline import export_repository

    repository = tmp_path_factory.mktemp("export") / "model_repository"
    export_repository(random_checkpoint, repository, progress=lambda message: None)
    return repository


@pytest.fixture(scope="session")
def triton_server(exported_repository: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real embedded Triton (CPU) serving :func:`exported_repository` on free ports, started once."""
    from serving.embedded import EmbeddedTriton, free_ports

    http_port, grpc_port, metrics_port = free_ports(3)
    server = EmbeddedTriton(
        exported_repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_level="warning",
        build_dir=tmp_path_factory.mktemp("triton_build"),
    )
    with server:
        yield server


# --- the analysis service: the shipped checkpoint exported once, `mpmri serve` started once per session ---
@pytest.fixture(scope="session")
def shipped_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mpmri export`` of the shipped CPU checkpoint (the trained one: findings can be checked)."""
    from export.pipeline import export_repository
    from networks.checkpoint import DEFAULT_CHECKPOINT

    repository = tmp_path_factory.mktemp("shipped") / "model_repository"
    export_repository(DEFAULT_CHECKPOINT, repository, progress=lambda message: None)
    return repository


@pytest.fixture(scope="session")
def serve_stack(shipped_repository: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real embedded default (`mpmri serve`: Triton + service) on free 127.0.0.1 ports."""
    from service_harness import start_serve

    stack = start_serve(shipped_repository, tmp_path_factory.mktemp("serve_logs"))
    try:
        yield stack
    finally:
        stack.process.stop()


@pytest.fixture(scope="session")
def service_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic studies for service tests: ``cancer`` (seed 7 case 0: one significant lesion), ``benign``."""
    from synth.generator import synthesize_study, write_study

    out = tmp_path_factory.mktemp("service_studies")
    return {
        "cancer": write_study(synthesize_study(7, 0), out / "cancer"),
        "benign": write_study(synthesize_study(7, 1), out / "benign"),
    }
