"""A checkpoint is exported, evaluated and served only under the contract it was trained with.

* A checkpoint whose recorded contract (version, sequences, normalization, fill value, candidate settings...)
  differs from the code's is refused by `mpmri export` and `mpmri evaluate`, naming each difference, and
  nothing is written.
* The grid may differ (a model trained for another grid carries that grid); the recorded grid must be the
  grid its weights were built for.
* The shipped checkpoint (recorded before ``candidates`` was part of the contract) still exports, and the
  exported repository records the full contract, candidate settings included.
* The served path refuses a model repository that records other candidate settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from contract import (
    DEFAULT_CANDIDATES,
    ContractMismatchError,
    GridSpec,
    ServedContract,
    contract_dict,
    recorded_contract_differences,
)
from export.onnx_export import ExportError
from export.pipeline import export_repository
from export.repository import CONTRACT_PARAMETER, parse_config
from mpmri.cli import main
from networks import CheckpointContractError, build_networks, load_checkpoint, save_checkpoint
from networks.checkpoint import DEFAULT_CHECKPOINT, contract_problems
from postprocessing.lesion_scoring import LESION_SCORING_PARAMETER, LesionScorer, scorer_from_metadata

OTHER_GRID = GridSpec(size_dhw=(12, 48, 48), spacing_mm_dhw=(3.5, 2.0, 2.0))

#: (what is changed in the recorded contract, the phrase the refusal must contain)
TAMPERINGS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "percentile",
        lambda c: c["normalization"]["t2w"].update(upper_percentile=99.5),
        "normalization.t2w.upper_percentile: 99.5 -> 99.0",
    ),
    ("sequences", lambda c: c.update(sequences=["t2w", "dwi", "adc"]), "sequences: ['t2w', 'dwi', 'adc'] -> "),
    ("fill", lambda c: c.update(missing_channel_fill_value=-1.0), "missing_channel_fill_value: -1.0 -> 0.0"),
    ("version", lambda c: c.update(contract_version="1"), "contract_version: '1' -> '2'"),
    (
        "cutpoints",
        lambda c: c.update(pirads_score_cutpoints=[1.0, 2.0, 3.0, 4.0]),
        "pirads_score_cutpoints: [1.0, 2.0, 3.0, 4.0] -> [1.5, 2.5, 3.5, 4.5]",
    ),
    (
        "candidate_source",
        lambda c: c.update(candidates={**DEFAULT_CANDIDATES.to_dict(), "source_map": "cspca_map"}),
        "candidates.source_map: 'cspca_map' -> 'fused_map'",
    ),
    (
        "candidates",
        lambda c: c.update(candidates={**DEFAULT_CANDIDATES.to_dict(), "min_voxels_detection": 10}),
        "candidates.min_voxels_detection: 10 -> 0",
    ),
    (
        "candidate_floor_mode",
        lambda c: c.update(candidates={k: v for k, v in DEFAULT_CANDIDATES.to_dict().items() if k != "floor_mode"}),
        "candidates.floor_mode: '<absent>' -> 'peak'",
    ),
    (
        "grid_of_weights",
        lambda c: c.update(grid=OTHER_GRID.to_dict()),
        "grid: recorded contract",
    ),
]


def _checkpoint_with_contract(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A real checkpoint (random CPU-profile weights) whose recorded contract was changed by ``change``."""
    torch.manual_seed(3)
    recorded = contract_dict()
    change(recorded)
    save_checkpoint(path, build_networks("cpu"), {"contract": recorded, "note": "tampered contract, tests"})
    return path


@pytest.mark.parametrize(("name", "change", "phrase"), TAMPERINGS, ids=[t[0] for t in TAMPERINGS])
def test_export_refuses_a_checkpoint_recorded_under_another_contract_naming_the_field(
    name: str, change: Callable[[dict[str, Any]], None], phrase: str, tmp_path: Path
) -> None:
    checkpoint = _checkpoint_with_contract(tmp_path / f"{name}.pt", change)
    repository = tmp_path / "repo"
    with pytest.raises(CheckpointContractError) as info:
        export_repository(checkpoint, repository, progress=lambda m: None)
    assert phrase in str(info.value)
    assert not repository.exists()
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name], "export left files behind"


def test_refusal_names_every_difference_at_once(tmp_path: Path) -> None:
    def two_changes(c: dict[str, Any]) -> None:
        c["normalization"]["dwi"].update(lower_percentile=0.5)
        c["normalization"]["adc"].update(divisor=2500.0)

    checkpoint = _checkpoint_with_contract(tmp_path / "two.pt", two_changes)
    with pytest.raises(CheckpointContractError) as info:
        load_checkpoint(checkpoint)
    message = str(info.value)
    assert "2 difference(s)" in message
    assert "normalization.dwi.lower_percentile: 0.5 -> 1.0" in message
    assert "normalization.adc.divisor: 2500.0 -> 3000.0" in message
    nets, meta = load_checkpoint(checkpoint, check_contract=False)  # inspecting the file stays possible
    assert meta["contract"]["normalization"]["adc"]["divisor"] == 2500.0


def test_cli_export_refuses_a_tampered_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _checkpoint_with_contract(tmp_path / "t.pt", TAMPERINGS[0][1])
    code = main(["export", "--checkpoint", str(checkpoint), "--repository", str(tmp_path / "repo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "normalization.t2w.upper_percentile" in err[0]
    assert not (tmp_path / "repo").exists()


def test_cli_evaluate_refuses_a_tampered_checkpoint_before_reading_data(
    synthetic_dataset: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _checkpoint_with_contract(tmp_path / "t.pt", TAMPERINGS[1][1])
    data = synthetic_dataset[0].parent
    code = main(["evaluate", "--data", str(data), "--out", str(tmp_path / "eval"), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "sequences: ['t2w', 'dwi', 'adc']" in err[0]
    assert not (tmp_path / "eval").exists()


def test_a_checkpoint_for_another_grid_carries_that_grid_and_is_accepted(tmp_path: Path) -> None:
    torch.manual_seed(5)
    path = tmp_path / "other_grid.pt"
    save_checkpoint(path, build_networks("cpu", OTHER_GRID), {"note": "other grid, tests"})
    nets, meta = load_checkpoint(path)
    assert nets.grid == OTHER_GRID
    assert recorded_contract_differences(meta["contract"]) == []
    assert meta["contract"]["candidates"] == DEFAULT_CANDIDATES.to_dict()


def test_a_contract_recorded_without_candidates_is_refused() -> None:
    legacy = contract_dict()
    del legacy["candidates"]
    assert recorded_contract_differences(legacy) == [f"candidates: '<absent>' -> {DEFAULT_CANDIDATES.to_dict()!r}"]
    changed = contract_dict()
    changed["candidates"]["num_lesions_to_extract"] = 3
    assert recorded_contract_differences(changed) == ["candidates.num_lesions_to_extract: 3 -> 5"]


def test_shipped_checkpoint_satisfies_the_contract_and_exports_it_with_candidates_and_scorer(
    shipped_repository: Path,
) -> None:
    nets, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    assert meta["contract"]["candidates"] == DEFAULT_CANDIDATES.to_dict()
    assert meta["calibration"]["slope"] > 0  # calibrated on the validation split, stored with the weights
    assert float(nets.classification.calibration[0]) == pytest.approx(meta["calibration"]["slope"])
    assert contract_problems(meta, nets.grid) == []
    manifest = json.loads((shipped_repository / "manifest.json").read_text())
    assert manifest["contract"] == json.loads(json.dumps(contract_dict(nets.grid)))
    config = parse_config(shipped_repository / "mpmri_ensemble" / "config.pbtxt")
    served = json.loads(config.parameters[CONTRACT_PARAMETER].string_value)
    assert served["candidates"] == DEFAULT_CANDIDATES.to_dict()
    assert ServedContract.from_dict(served).grid == nets.grid
    # the lesion scorer travels with the checkpoint into the ensemble config, unchanged
    scorer = scorer_from_metadata(meta)
    assert scorer is not None
    assert LesionScorer.from_json(config.parameters[LESION_SCORING_PARAMETER].string_value) == scorer
    assert manifest["lesion_scoring"]["trees"] == len(scorer.trees)


def test_export_refuses_a_lesion_scorer_fitted_on_other_features(tmp_path: Path) -> None:
    nets, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    scorer = meta["lesion_scoring"]
    meta["lesion_scoring"] = {**scorer, "feature_names": [*scorer["feature_names"][:-1], "extent_t"]}
    checkpoint = tmp_path / "other_features.pt"
    save_checkpoint(checkpoint, nets, meta)
    with pytest.raises(ExportError, match=r"missing \['secondary'\], unknown \['extent_t'\]"):
        export_repository(checkpoint, tmp_path / "repo", progress=lambda m: None)
    assert not (tmp_path / "repo").exists()


def test_served_contract_refuses_other_candidate_settings_and_cut_points_by_name() -> None:
    recorded = contract_dict()
    recorded["candidates"]["dynamic_threshold_factor"] = 4.0
    with pytest.raises(ContractMismatchError, match=r"candidates\.dynamic_threshold_factor: 4\.0 -> 2\.5"):
        ServedContract.from_dict(recorded)
    legacy = contract_dict()
    del legacy["candidates"]
    with pytest.raises(ContractMismatchError, match="candidates: missing"):
        ServedContract.from_dict(legacy)
    other = contract_dict()
    other["pirads_score_cutpoints"] = [1, 2, 3, 4]
    with pytest.raises(ContractMismatchError, match="pirads_score_cutpoints"):
        ServedContract.from_dict(other)
