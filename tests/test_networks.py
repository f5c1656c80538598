"""Networks: contract shapes, availability-aware fusion, ONNX export parity, checkpoint round trip, candidates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contract import (
    CLASSIFICATION_MODEL,
    DEFAULT_GRID,
    FUSION_MODEL,
    LOCALIZATION_MODEL,
    MODEL_IO,
    NUM_SEQUENCES,
    PIRADS_SCORE_CUTPOINTS,
    GridGeometry,
    contract_dict,
    pirads_category,
    tensor_specs,
)
from networks import (
    DEFAULT_CHECKPOINT,
    PROFILES,
    CheckpointError,
    MapFusion,
    build_networks,
    example_inputs,
    export_kwargs,
    extract_candidates,
    load_checkpoint,
    save_checkpoint,
)
from networks.models import build_networks_from_profile


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    d, h, w = DEFAULT_GRID.size_dhw
    return torch.rand((batch, NUM_SEQUENCES, d, h, w), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_chain_outputs_match_contract_shapes_and_ranges(profile: str) -> None:
    torch.manual_seed(0)
    nets = build_networks(profile).eval()
    availability = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = nets(_images(2), availability)
    specs = tensor_specs(DEFAULT_GRID)
    for name, tensor in out.items():
        assert tuple(tensor.shape) == (2, *specs[name].shape), name
        assert tensor.dtype == torch.float32
        if name != "score_map":  # the score is a regression in PI-RADS units, not a probability
            assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0, name
    assert torch.allclose(out["pirads_distribution"].sum(dim=1), torch.ones(2), atol=1e-5)


def test_study_outputs_are_derived_from_the_lesion_maps() -> None:
    """Study probability = the highest voxel of the csPCa map; study distribution = the ordinal model at the
    highest score; the csPCa map is the calibrated P(category >= 4) of the score (so lesions and study agree)."""
    torch.manual_seed(1)
    nets = build_networks("cpu").eval()
    with torch.no_grad():
        nets.classification.set_calibration(1.7, -0.4)
        out = nets(_images(2, seed=3), torch.ones(2, NUM_SEQUENCES))
        cls = nets.classification
        score = out["score_map"]
        expected_map = torch.sigmoid(1.7 * cls.cspca_logit(score) - 0.4)
        assert torch.allclose(out["cspca_map"], expected_map, atol=1e-6)
        assert torch.allclose(out["cspca_probability"][:, 0], out["cspca_map"].amax(dim=(1, 2, 3, 4)))
        s_max = score.amax(dim=(1, 2, 3, 4))
        at_least = torch.sigmoid((s_max[:, None] - torch.tensor(PIRADS_SCORE_CUTPOINTS)) / torch.exp(cls.log_tau))
        # P(category = k) = P(>= k) - P(>= k+1): categories 2..4 from consecutive cut points, 5 = P(>= 5)
        assert torch.allclose(out["pirads_distribution"][:, 1:4], at_least[:, :3] - at_least[:, 1:], atol=1e-6)
        assert torch.allclose(out["pirads_distribution"][:, 4], at_least[:, 3], atol=1e-6)
        assert torch.allclose(out["pirads_distribution"][:, 0], 1 - at_least[:, 0], atol=1e-6)


def test_calibration_must_be_monotone() -> None:
    nets = build_networks("cpu")
    with pytest.raises(ValueError, match="positive"):
        nets.classification.set_calibration(-1.0, 0.0)


def test_score_thresholds_land_on_the_cut_points_monotonically() -> None:
    cls = build_networks("cpu").classification
    raw = torch.linspace(-2.0, 9.0, 1101)
    assert torch.allclose(cls.remap_score(raw), raw, atol=1e-6)  # identity until thresholds are fitted
    thresholds = [2.1, 3.5, 3.7, 5.2]
    cls.set_score_thresholds(thresholds)
    assert torch.allclose(cls.remap_score(torch.tensor(thresholds)), torch.tensor(PIRADS_SCORE_CUTPOINTS), atol=1e-6)
    remapped = cls.remap_score(raw)
    assert bool((remapped[1:] > remapped[:-1]).all())  # strictly increasing: the ranking of voxels is kept
    # slope 1 outside the thresholds; the category of a raw score is its place among the thresholds
    assert torch.allclose(remapped[0], raw[0] - 2.1 + 1.5) and torch.allclose(remapped[-1], raw[-1] - 5.2 + 4.5)
    for value in (1.0, 2.2, 3.6, 4.0, 6.0):
        expected = 1 + sum(value > t for t in thresholds)
        assert pirads_category(float(cls.remap_score(torch.tensor(value)))) == expected


@pytest.mark.parametrize("thresholds", [[1.5, 2.5, 3.5], [1.5, 2.5, 2.45, 4.5], [1.5, 1.55, 3.5, 4.5]])
def test_score_thresholds_must_be_four_increasing_values(thresholds: list[float]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        build_networks("cpu").classification.set_score_thresholds(thresholds)


def test_checkpoint_written_before_score_thresholds_loads_as_identity() -> None:
    nets = build_networks("cpu")
    state = nets.classification.state_dict()
    del state["score_thresholds"]
    other = build_networks("cpu").classification
    other.set_score_thresholds([2.0, 3.0, 4.0, 5.0])
    other.load_state_dict(state)
    assert other.score_thresholds.tolist() == list(PIRADS_SCORE_CUTPOINTS)


def test_pirads_category_follows_the_cut_points() -> None:
    assert [pirads_category(v) for v in (0.2, 1.49, 1.51, 2.5, 2.51, 3.7, 4.49, 4.51, 9.0)] == [
        1,
        1,
        2,
        2,
        3,
        4,
        4,
        5,
        5,
    ]


def test_per_sequence_localization_variant_has_same_io() -> None:
    profile = dataclasses.replace(PROFILES["cpu"], localization_weights="per_sequence")
    nets = build_networks_from_profile(profile).eval()
    with torch.no_grad():
        maps = nets.localization(_images(1))
    assert tuple(maps.shape) == (1, *tensor_specs()["sequence_maps"].shape)


def test_fusion_ignores_missing_sequences_and_renormalizes() -> None:
    torch.manual_seed(0)
    fusion = MapFusion()
    with torch.no_grad():
        fusion.sequence_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        for param in fusion.gate.parameters():  # a non-trivial per-voxel gate
            param.normal_(0.0, 0.3)
    maps, images = _images(1, seed=1), _images(1, seed=2)
    t2w_only = torch.tensor([[1.0, 0.0, 0.0]])
    fused = fusion(maps, t2w_only, images)
    assert torch.allclose(fused[:, 0], maps[:, 0], atol=1e-6)  # only T2W present: fused = T2W map
    altered = maps.clone()
    altered[:, 1:] = 0.77  # what the missing channels' maps hold does not leak into the fused map
    assert torch.allclose(fusion(altered, t2w_only, images), fused, atol=1e-6)
    weights = fusion.weights(maps, torch.ones(1, NUM_SEQUENCES), images)
    assert weights.shape == maps.shape
    assert torch.allclose(weights.sum(dim=1), torch.ones(1, *maps.shape[2:]), atol=1e-5)
    assert float(weights.std(dim=(2, 3, 4)).min()) > 0  # weights vary over the voxels (per zone)
    assert not torch.allclose(fusion(maps, torch.ones(1, NUM_SEQUENCES), images), fused)


def test_fusion_starts_as_the_plain_mean_of_the_present_maps() -> None:
    fusion = MapFusion()
    maps, images = _images(1, seed=4), _images(1, seed=5)
    with torch.no_grad():
        assert torch.allclose(fusion(maps, torch.ones(1, NUM_SEQUENCES), images), maps.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("model_name", [LOCALIZATION_MODEL, FUSION_MODEL, CLASSIFICATION_MODEL])
def test_onnx_export_with_dynamic_batch_matches_torch(model_name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    nets = build_networks("cpu").eval()
    nets.classification.set_score_thresholds([1.2, 2.9, 3.1, 5.0])  # the calibration buffers travel in the graph
    nets.classification.set_calibration(1.3, -0.2)
    module = nets.modules()[model_name]
    path = tmp_path / f"{model_name}.onnx"
    torch.onnx.export(module, example_inputs(model_name, batch=1), str(path), **export_kwargs(model_name))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = MODEL_IO[model_name]
    assert [i.name for i in session.get_inputs()] == list(inputs)
    assert [o.name for o in session.get_outputs()] == list(outputs)
    batch = example_inputs(model_name, batch=3)  # a batch size never seen at export
    if model_name == FUSION_MODEL:
        batch = (batch[0], torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), batch[2])
    got = session.run(None, {name: t.numpy() for name, t in zip(inputs, batch, strict=True)})
    with torch.no_grad():
        ref = module(*batch)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, refs, strict=True):
        assert g.shape == tuple(r.shape)
        assert np.abs(g - r.numpy()).max() <= 1e-4


def test_checkpoint_round_trip_keeps_outputs_and_metadata(tmp_path: Path) -> None:
    torch.manual_seed(3)
    nets = build_networks("cpu").eval()
    with torch.no_grad():  # make fusion weights and calibration non-trivial so they must be restored too
        nets.fusion.sequence_logits.copy_(torch.tensor([0.1, 0.7, -0.4]))
        nets.classification.set_calibration(0.8, 0.3)
    images, availability = _images(2, seed=5), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    with torch.no_grad():
        before = nets(images, availability)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, nets, {"training": {"data_seed": 7, "cases": 3}})
    loaded, meta = load_checkpoint(path)
    with torch.no_grad():
        after = loaded(images, availability)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert meta["profile"] == "cpu"
    assert meta["contract"] == contract_dict(DEFAULT_GRID)
    assert meta["training"] == {"data_seed": 7, "cases": 3}
    assert meta["code_version"]["mpmri"]
    assert meta["created_utc"].endswith("Z")


def test_load_checkpoint_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an mpmri checkpoint"):
        load_checkpoint(foreign)


def test_extract_candidates_finds_two_blobs_at_their_lps_centres() -> None:
    d, h, w = DEFAULT_GRID.size_dhw
    geometry = GridGeometry(
        origin_lps_mm=(-47.25, -47.25, -22.5),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        spacing_mm_ijk=(1.5, 1.5, 3.0),
        size_ijk=(w, h, d),
    )
    zz, yy, xx = np.indices((d, h, w), dtype=np.float64)
    centres = [(5.0, 20.0, 22.0, 0.9), (10.0, 44.0, 40.0, 0.6)]
    fused = np.zeros((d, h, w), dtype=np.float32)
    for cz, cy, cx, peak in centres:
        r2 = ((zz - cz) * 3.0) ** 2 + ((yy - cy) * 1.5) ** 2 + ((xx - cx) * 1.5) ** 2
        fused = np.maximum(fused, peak * np.exp(-r2 / (2 * 4.0**2))).astype(np.float32)
    candidates, candidate_map = extract_candidates(fused, geometry)
    # the two peaks come first; anything else is a faint leftover of the Gaussian tails
    assert [round(c.likelihood, 3) for c in candidates[:2]] == [0.9, 0.6]
    assert all(c.likelihood < 0.1 for c in candidates[2:])
    assert candidate_map.shape == (d, h, w)
    assert candidate_map.max() == pytest.approx(0.9)
    for cand, (cz, cy, cx, _) in zip(candidates[:2], centres, strict=True):
        expected = geometry.index_to_lps((cz, cy, cx))
        assert np.linalg.norm(np.asarray(cand.center_lps_mm) - expected) < 0.5
        assert cand.volume_mm3 > 0


def test_extract_candidates_on_empty_map_returns_nothing() -> None:
    d, h, w = DEFAULT_GRID.size_dhw
    geometry = GridGeometry((0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (1.5, 1.5, 3.0), (w, h, d))
    candidates, candidate_map = extract_candidates(np.zeros((d, h, w), np.float32), geometry)
    assert candidates == [] and not candidate_map.any()


def test_shipped_default_checkpoint_matches_contract_and_records_its_provenance() -> None:
    assert DEFAULT_CHECKPOINT.is_file(), "checkpoints/cpu_default.pt is shipped with the repository"
    assert DEFAULT_CHECKPOINT.stat().st_size < 10 * 2**20
    nets, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    assert nets.profile == PROFILES["cpu"]
    assert meta["contract"] == contract_dict(DEFAULT_GRID)
    data = meta["training"]["data"]
    assert data["data_seed"] not in (9001, 9101), "validation seeds are never trained on"
    assert meta["evaluation"]["num_cases"] > 0 and 0.0 <= meta["evaluation"]["auroc"] <= 1.0
    assert meta["calibration"]["slope"] > 0 and meta["calibration"]["cases"] >= 40
    # the category thresholds fitted on the validation split are the ones the network applies
    recorded = meta["calibration"]["score_thresholds"]["thresholds"]
    assert nets.classification.score_thresholds.tolist() == pytest.approx(recorded, abs=1e-4)
    assert recorded != pytest.approx(list(PIRADS_SCORE_CUTPOINTS), abs=1e-3)
    with torch.no_grad():
        out = nets(_images(1), torch.ones(1, NUM_SEQUENCES))
    assert torch.isfinite(out["fused_map"]).all()
