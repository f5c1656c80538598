"""The served model defines the contract: the service reads grid, sequences and normalization from Triton.

* A second model with another grid is served without a code change (tensors, map and lesions on its grid).
* A model whose contract the service cannot produce makes it refuse to start, naming the difference.
* Health follows Triton: NOT_SERVING (and UNAVAILABLE) while it is down, SERVING once it is up.
* `mpmri serve` stops cleanly on SIGTERM (service and Triton).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from service_harness import BIN, health_status, start_serve, start_service, wait_for
from tritonclient.grpc import model_config_pb2 as mc

from contract import (
    ContractMismatchError,
    GridSpec,
    ServedContract,
    contract_dict,
    contract_differences,
)
from export.repository import CONTRACT_PARAMETER
from mpmri_client import AnalysisClient, ChannelOptions, read_instances
from mpmri_client.results import grid_volume_array
from serving.embedded import EmbeddedTriton, free_ports

SECOND_GRID = GridSpec(size_dhw=(12, 48, 48), spacing_mm_dhw=(3.5, 2.0, 2.0))


# -- unit: parsing and checking a recorded contract --------------------------------------------------
def test_served_contract_round_trips_the_code_contract() -> None:
    served = ServedContract.from_dict(contract_dict(SECOND_GRID))
    assert served.grid == SECOND_GRID
    assert served.normalization["adc"].kind == "fixed_scale"


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda d: d.update(sequences=["t2w", "adc", "dwi", "dce"]), "sequences ['t2w', 'adc', 'dwi', 'dce'] differ"),
        (lambda d: d.update(contract_version="99"), "contract_version '99' is not supported"),
        (lambda d: d["normalization"]["t2w"].update(kind="zscore"), "normalization of t2w: unknown kind 'zscore'"),
        (lambda d: d["grid"].update(size_dhw=[16, 64]), "grid size_dhw [16, 64]"),
        (lambda d: d.pop("grid"), "grid: missing"),
    ],
)
def test_served_contract_refuses_what_the_code_cannot_produce_by_name(change: Any, phrase: str) -> None:
    recorded = contract_dict()
    change(recorded)
    with pytest.raises(ContractMismatchError, match=None) as info:
        ServedContract.from_dict(recorded)
    assert phrase in str(info.value)


def test_contract_differences_names_each_changed_field() -> None:
    a, b = contract_dict(), contract_dict(SECOND_GRID)
    diffs = contract_differences(a, b)
    assert "grid.size_dhw: [16, 64, 64] -> [12, 48, 48]" in diffs
    assert len(diffs) == 2


# -- the real service against real Triton servers ------------------------------------------------------
@pytest.fixture(scope="module")
def second_grid_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model version trained for another grid (random weights: only shapes and geometry are checked)."""
    import torch

    from export.pipeline import export_repository
    from networks import build_networks, save_checkpoint

    torch.manual_seed(11)
    root = tmp_path_factory.mktemp("second_grid")
    save_checkpoint(root / "grid2.pt", build_networks("cpu", SECOND_GRID), {"note": "second grid, tests"})
    export_repository(root / "grid2.pt", root / "model_repository", progress=lambda message: None)
    return root / "model_repository"


@pytest.mark.triton
@pytest.mark.service
def test_a_model_with_another_grid_is_served_without_code_change_and_sigterm_stops_all(
    second_grid_repository: Path, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    stack = start_serve(second_grid_repository, tmp_path)
    try:
        with AnalysisClient(stack.target, ChannelOptions(retries=0)) as client:
            r = client.analyze(
                read_instances(service_studies["cancer"] / "dicom"),
                timeout_s=120,
                include_fused_map=True,
                include_t2w_preview=True,
            )
        assert grid_volume_array(r.fused_map).shape == SECOND_GRID.size_dhw
        assert list(r.fused_map.spacing_mm_ijk) == pytest.approx(SECOND_GRID.spacing_mm_dhw[::-1])
        assert grid_volume_array(r.t2w_preview).std() > 0.05
        triton_pids = stack.triton_pids()
        assert triton_pids
    finally:
        code = stack.process.stop(timeout_s=60)
    assert code == 0, stack.process.log()[-2000:]
    assert not stack.triton_pids(), "tritonserver outlived `mpmri serve`"
    assert "stopped" in stack.process.log()


def _repository_with_parameter(source: Path, dest: Path, parameter: str, change: Any) -> Path:
    """A copy of ``source`` whose ensemble config parameter ``parameter`` (JSON) was changed by ``change(dict)``."""
    shutil.copytree(source, dest)
    path = dest / "mpmri_ensemble" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    recorded = json.loads(config.parameters[parameter].string_value)
    change(recorded)
    config.parameters[parameter].string_value = json.dumps(recorded)
    path.write_text(text_format.MessageToString(config))
    return dest


def _refusal(repository: Path, tmp_path: Path) -> str:
    """Start ``mpmri-service`` against a real Triton serving ``repository``; it must refuse: its last stderr line."""
    http_port, grpc_port, metrics_port = free_ports(3)
    with EmbeddedTriton(
        repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, build_dir=tmp_path / "b"
    ) as triton:
        run = subprocess.run(
            [str(BIN / "mpmri-service"), "--triton-url", triton.grpc_url, "--port", "0", "--metrics-port", "-1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2, run.stderr
    return run.stderr.strip().splitlines()[-1]


@pytest.mark.triton
@pytest.mark.service
def test_service_refuses_to_start_on_a_contract_it_cannot_produce(shipped_repository: Path, tmp_path: Path) -> None:
    repository = _repository_with_parameter(
        shipped_repository,
        tmp_path / "repo",
        CONTRACT_PARAMETER,
        lambda d: d.update(sequences=["t2w", "adc", "dwi", "dce"]),
    )
    last = _refusal(repository, tmp_path)
    assert last.startswith("error: refusing to start: model mpmri_ensemble: sequences"), last
    assert "dce" in last


@pytest.mark.triton
@pytest.mark.service
def test_service_refuses_to_start_on_a_lesion_scorer_fitted_on_other_features(
    shipped_repository: Path, tmp_path: Path
) -> None:
    from postprocessing.lesion_scoring import LESION_SCORING_PARAMETER

    def rename(scorer: dict[str, Any]) -> None:
        scorer["feature_names"] = ["t2w_texture" if n == "t2w_std" else n for n in scorer["feature_names"]]

    repository = _repository_with_parameter(shipped_repository, tmp_path / "repo", LESION_SCORING_PARAMETER, rename)
    last = _refusal(repository, tmp_path)
    assert last.startswith("error: refusing to start: model mpmri_ensemble: the lesion scorer"), last
    assert "missing ['t2w_std'], unknown ['t2w_texture']" in last


@pytest.mark.triton
@pytest.mark.service
def test_health_follows_triton_not_serving_while_down_serving_once_up(
    shipped_repository: Path, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    http_port, grpc_port, metrics_port = free_ports(3)
    service = start_service(f"127.0.0.1:{grpc_port}", tmp_path, wait_serving=False)
    try:
        wait_for(lambda: health_status(service.target) == "NOT_SERVING", 60, "NOT_SERVING without Triton")
        with AnalysisClient(service.target, ChannelOptions(retries=0)) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.analyze(read_instances(service_studies["benign"] / "dicom"), timeout_s=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            with EmbeddedTriton(
                shipped_repository,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                build_dir=tmp_path / "b",
            ):
                wait_for(lambda: health_status(service.target) == "SERVING", 60, "SERVING once Triton is up")
                r = client.analyze(read_instances(service_studies["benign"] / "dicom"), timeout_s=120)
                assert 0.0 <= r.cspca_probability <= 1.0
            wait_for(lambda: health_status(service.target) == "NOT_SERVING", 60, "NOT_SERVING after Triton stops")
        assert service.process.poll() is None, "the service must keep running while Triton is away"
    finally:
        assert service.process.stop() == 0
