"""A reported lesion region under the smallest reportable lesion is grown along its map (``postprocessing.regions``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from contract import DEFAULT_CANDIDATES, GridGeometry
from postprocessing.regions import grow_region, grow_small_regions, min_region_voxels
from postprocessing.report import build_findings

# voxels of 2 x 2 x 4 mm = 16 mm^3: the contract's 65 mm^3 is 5 voxels
GEOMETRY = GridGeometry((-16.0, -16.0, -12.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (2.0, 2.0, 4.0), (16, 16, 6))
_TOUCH = np.ones((3, 3, 3), dtype=bool)
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "cpu_default.pt"


def test_min_region_voxels_rounds_the_volume_up_to_whole_voxels() -> None:
    assert min_region_voxels(65.0, 16.0) == 5
    assert min_region_voxels(65.0, 3.0 * 1.5 * 1.5) == 10  # the default grid: 6.75 mm^3 per voxel
    assert min_region_voxels(64.0, 16.0) == 4  # exactly 4 voxels, no spurious fifth from rounding
    assert min_region_voxels(None, 16.0) == 0
    with pytest.raises(ValueError, match="voxel_volume_mm3"):
        min_region_voxels(65.0, 0.0)


def test_a_region_grows_along_the_highest_values_to_the_size_asked_and_keeps_its_voxels() -> None:
    values = np.zeros((5, 9, 9), np.float32)
    values[2, 4, 4:9] = [0.9, 0.8, 0.7, 0.6, 0.5]  # a ridge towards +w
    values[2, 4, 0:4] = [0.1, 0.2, 0.3, 0.4]  # a lower one towards -w
    region = np.zeros(values.shape, bool)
    region[2, 4, 4] = True
    grown = grow_region(region, values, np.zeros(values.shape, bool), 4)
    assert grown.sum() == 4 and grown[region].all()
    # the highest neighbour each time: 0.8 (w 5), 0.7 (w 6), then 0.6 (w 7) before 0.4 (w 3)
    assert sorted(int(w) for w in np.nonzero(grown[2, 4])[0]) == [4, 5, 6, 7]


def test_growth_stops_at_forbidden_voxels_and_where_nothing_is_left() -> None:
    values = np.ones((1, 1, 6), np.float32)
    region = np.zeros(values.shape, bool)
    region[0, 0, 0] = True
    forbidden = np.zeros(values.shape, bool)
    forbidden[0, 0, 3] = True
    grown = grow_region(region, values, forbidden, 10)
    assert grown[0, 0].tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="empty"):
        grow_region(np.zeros(values.shape, bool), values, forbidden, 3)


def test_small_regions_grow_without_touching_another_and_large_ones_stay() -> None:
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[1:4, 2:7, 2:7] = 1  # 75 voxels: large enough
    labels[2, 2, 9] = 2  # one voxel, 3 voxels from region 1's side: it must keep a gap while growing
    labels[4, 12, 12] = 3  # one voxel in the open
    rng = np.random.default_rng(0)
    maps = [rng.random(labels.shape).astype(np.float32) for _ in range(3)]
    grown = grow_small_regions(labels, maps, 8)
    counts = np.bincount(grown.ravel(), minlength=4)
    assert counts[1] == 75 and np.array_equal(grown == 1, labels == 1)
    assert counts[3] == 8 and grown[4, 12, 12] == 3
    assert counts[2] == 8 and grown[2, 2, 9] == 2
    for n in (1, 2, 3):  # no two regions touch (26-connected): the label map stays a PI-CAI detection map
        near = ndimage.binary_dilation(grown == n, structure=_TOUCH)
        assert set(np.unique(grown[near])) <= {0, n}
        assert ndimage.label(grown == n, structure=_TOUCH)[1] == 1
    assert np.array_equal(labels[labels > 0], grown[labels > 0])  # every original voxel keeps its label
    assert grow_small_regions(labels, maps, 0) is not labels  # a copy, also when nothing grows


def test_regions_grow_in_label_order_so_the_likelier_lesion_gets_the_contested_voxels() -> None:
    labels = np.zeros((1, 1, 9), np.uint8)
    labels[0, 0, 2], labels[0, 0, 6] = 1, 2
    flat = np.ones(labels.shape, np.float32)
    grown = grow_small_regions(labels, [flat, flat], 4)
    # region 1 takes w 0..3 or 1..4 first; region 2 keeps one voxel of gap
    row = grown[0, 0].tolist()
    assert row.count(1) == 4 and 2 in row
    last_1, first_2 = max(i for i, v in enumerate(row) if v == 1), min(i for i, v in enumerate(row) if v == 2)
    assert first_2 - last_1 >= 2


def _narrow_peak_outputs() -> dict[str, np.ndarray]:
    """A csPCa map with one narrow peak: its blob (down to peak / 2.5) is 2 voxels, 32 mm^3."""
    cspca = np.zeros((6, 16, 16), np.float32)
    cspca[2, 8, 8], cspca[2, 8, 9] = 0.6, 0.5
    cspca[2, 8, 10], cspca[2, 9, 8], cspca[3, 8, 8] = 0.2, 0.15, 0.1  # below 0.6 / 2.5 = 0.24: not in the blob
    sequence_maps = np.zeros((1, 3, *cspca.shape), np.float32)
    return {
        "sequence_maps": sequence_maps,
        "fused_map": cspca[None],
        "cspca_map": cspca[None],
        "score_map": (1.0 + 4.0 * cspca)[None],
        "cspca_probability": np.array([0.6], np.float32),
        "pirads_distribution": np.array([0.05, 0.05, 0.1, 0.3, 0.5], np.float32),
    }


def test_findings_report_a_narrow_peak_with_a_region_of_the_smallest_lesion_and_the_blobs_centre() -> None:
    kept = build_findings(
        _narrow_peak_outputs(), GEOMETRY, settings=dataclasses.replace(DEFAULT_CANDIDATES, min_region_mm3=None)
    )
    grown = build_findings(_narrow_peak_outputs(), GEOMETRY)
    assert DEFAULT_CANDIDATES.min_region_mm3 == 65.0
    assert len(kept.lesions) == len(grown.lesions) == 1
    before, after = kept.lesions[0], grown.lesions[0]
    assert (kept.labels == 1).sum() == 2 and before.volume_ml == pytest.approx(0.032)
    assert (grown.labels == 1).sum() == 5 and after.volume_ml == pytest.approx(0.080)
    assert grown.labels[kept.labels == 1].tolist() == [1, 1]
    # the three voxels it took are the map's highest neighbours: 0.2, 0.15 and 0.1
    taken = _narrow_peak_outputs()["cspca_map"][0][(grown.labels == 1) & (kept.labels == 0)]
    assert sorted(taken.tolist()) == pytest.approx([0.1, 0.15, 0.2])
    assert after.center_lps_mm == before.center_lps_mm
    assert (after.likelihood, after.pirads, after.score) == (before.likelihood, before.pirads, before.score)


class _FeatureSpy:
    """A real lesion scorer that records the features the served path hands it."""

    def __init__(self, scorer: Any) -> None:
        self._scorer = scorer
        self.features: list[np.ndarray] = []

    def probability(self, features: np.ndarray, availability: np.ndarray | None = None) -> np.ndarray:
        self.features.append(np.array(features, copy=True))
        return self._scorer.probability(features, availability)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)


def test_the_scorer_is_fitted_on_the_blobs_it_scores_when_served_not_on_the_grown_regions() -> None:
    """No train/serve skew: ``training.lesion_scoring.candidate_table`` reads the label map of
    :data:`~training.lesion_scoring.SCORED_BLOBS`, which must hold what the served scorer reads."""
    from networks.checkpoint import load_checkpoint
    from postprocessing.lesion_scoring import candidate_features, scorer_from_metadata
    from training.lesion_scoring import SCORED_BLOBS

    assert dataclasses.replace(SCORED_BLOBS, min_region_mm3=DEFAULT_CANDIDATES.min_region_mm3) == DEFAULT_CANDIDATES
    spy = _FeatureSpy(scorer_from_metadata(load_checkpoint(CHECKPOINT)[1]))
    outputs = _narrow_peak_outputs()
    images = np.random.default_rng(1).normal(size=(3, 6, 16, 16)).astype(np.float32)
    build_findings(outputs, GEOMETRY, scorer=spy, images=images)  # type: ignore[arg-type]
    maps = [outputs[name][0] for name in ("cspca_map", "score_map", "fused_map")]

    def table_features(settings: Any) -> np.ndarray:
        labels = build_findings(outputs, GEOMETRY, settings=settings).labels
        return candidate_features(images, labels, [1], *maps, outputs["sequence_maps"][0], [False])

    assert len(spy.features) == 1
    np.testing.assert_array_equal(table_features(SCORED_BLOBS), spy.features[0])
    assert not np.array_equal(table_features(DEFAULT_CANDIDATES), spy.features[0])  # the grown region differs
