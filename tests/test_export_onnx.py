"""mpmri export: ONNX models that pass the checks and match torch, a manifest, and no half repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from contract import CONTRACT_VERSION, ENSEMBLE_MODEL, MODEL_IO
from export.onnx_export import ExportError, ort_chain, ort_session, parity_inputs, sha256_file, torch_chain
from export.pipeline import export_repository, repository_is_current
from export.repository import NETWORK_MODELS
from mpmri.cli import main
from networks import load_checkpoint


def test_exported_repository_has_checked_models_and_manifest(
    exported_repository: Path, random_checkpoint: Path
) -> None:
    manifest = json.loads((exported_repository / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == sha256_file(random_checkpoint)
    assert manifest["contract_version"] == CONTRACT_VERSION
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "contract"}
    for model in NETWORK_MODELS:
        path = exported_repository / model / "1" / "model.onnx"
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert manifest["models"][model]["sha256"] == sha256_file(path)
        assert (exported_repository / model / "configs" / "cpu.pbtxt").is_file()
    assert (exported_repository / ENSEMBLE_MODEL / "config.pbtxt").is_file()


def test_onnx_chain_matches_torch_at_batch_sizes_1_and_5(exported_repository: Path, random_checkpoint: Path) -> None:
    nets, _ = load_checkpoint(random_checkpoint)
    sessions = {m: ort_session(exported_repository / m / "1" / "model.onnx") for m in NETWORK_MODELS}
    for batch in (1, 5):
        inputs = parity_inputs(nets.grid, batch, seed=11)
        inputs["availability"][:, 1:] = 1.0  # all present: every output is held to the tolerance
        expected = torch_chain(nets, inputs)
        got = ort_chain(sessions, inputs)
        for name in MODEL_IO[ENSEMBLE_MODEL][1]:
            assert got[name].shape == expected[name].shape
            if name == "score_map":  # PI-RADS units, not a probability: same significant digits (export/onnx_export)
                np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=1e-4, err_msg=name)
            else:
                np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0, err_msg=name)


def test_failed_parity_leaves_existing_repository_untouched(
    exported_repository: Path, random_checkpoint: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="max abs diff"):
        export_repository(random_checkpoint, repository, tolerance=0.0, progress=lambda m: None)
    assert [p.name for p in repository.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"], "staging folder left behind"


def test_cli_export_reports_missing_checkpoint_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--repository", str(tmp_path / "repo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "nope.pt" in err[0]
    assert not (tmp_path / "repo").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_tensorrt_export_without_gpu_stops_with_clear_message(random_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="needs a CUDA GPU"):
        export_repository(random_checkpoint, tmp_path / "repo", tensorrt=True, progress=lambda m: None)
    assert not (tmp_path / "repo").exists()


def test_repository_is_current_only_for_the_same_checkpoint_models_and_configs(
    exported_repository: Path, random_checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(exported_repository, repo)
    assert repository_is_current(random_checkpoint, repo)

    other = tmp_path / "other.pt"
    other.write_bytes(random_checkpoint.read_bytes() + b"\0")  # any other file content = another checkpoint
    assert not repository_is_current(other, repo)

    model = repo / "localization" / "1" / "model.onnx"
    original = model.read_bytes()
    model.write_bytes(original[:-1])
    assert not repository_is_current(random_checkpoint, repo)
    model.write_bytes(original)

    config = repo / "localization" / "configs" / "cpu.pbtxt"
    config.write_text(config.read_text() + "\n# edited by hand\n")
    assert not repository_is_current(random_checkpoint, repo)

    assert not repository_is_current(random_checkpoint, tmp_path / "missing")
