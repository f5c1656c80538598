"""Candidate blobs holding two lesions are cut at the valley of the map's log-odds (``postprocessing.blob_split``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from contract import DEFAULT_CANDIDATES, GridGeometry
from postprocessing.blob_split import dome_markers, flood_from_markers, log_odds, split_at_saddles
from postprocessing.candidates import extract_candidate_labels, extract_study_candidates

GEOMETRY = GridGeometry((-16.0, -16.0, -12.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (2.0, 2.0, 4.0), (16, 16, 6))
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _two_lesions(valley_logit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A map ``[6, 16, 16]`` of two lesions 10 voxels apart along w (log-odds +14 at A, +7 at B) joined by a ridge
    whose lowest log-odds is ``valley_logit``, over a background of -6. In probability the ridge stays above
    ``peak / 2.5`` (the dynamic extraction's cut, log-odds -0.41) for a valley above that, so the two lesions form
    one blob. Returns the map and the index centres of A and B."""
    grid = np.indices((6, 16, 16)).astype(np.float64)
    a, b = np.array([2.0, 8.0, 3.0]), np.array([2.0, 8.0, 13.0])
    dist_a = np.sqrt(((grid - a[:, None, None, None]) ** 2).sum(0))
    dist_b = np.sqrt(((grid - b[:, None, None, None]) ** 2).sum(0))
    logits = np.maximum(14.0 - 3.0 * dist_a, 7.0 - 2.0 * dist_b)  # the slopes meet at -2.2 between them
    # the ridge: along the line between them (d = 2, h = 8) the log-odds never drop below the valley
    ridge = (np.abs(grid[0] - 2) <= 0) & (np.abs(grid[1] - 8) <= 0) & (grid[2] >= 3) & (grid[2] <= 13)
    logits = np.where(ridge, np.maximum(logits, valley_logit), logits)
    logits = np.maximum(logits, -6.0)
    return _sigmoid(logits), a, b


def test_two_lesions_in_one_blob_become_two_candidates_centred_on_each() -> None:
    fused, a, b = _two_lesions(valley_logit=-0.3)  # 0.43 > 1.0 / 2.5: one blob
    whole = extract_candidate_labels(
        fused, GEOMETRY, dataclasses.replace(DEFAULT_CANDIDATES, split_min_depth_logit=None)
    )
    assert len(whole[0]) == 1
    between = np.asarray(whole[0][0].center_index_dhw)
    assert min(np.linalg.norm(between - a), np.linalg.norm(between - b)) > 2.0  # its centre lies between them
    cut = extract_candidate_labels(fused, GEOMETRY, DEFAULT_CANDIDATES)
    assert (DEFAULT_CANDIDATES.split_min_depth_logit, DEFAULT_CANDIDATES.split_ceiling_logit) == (3.0, 5.0)
    centres = [np.asarray(c.center_index_dhw) for c in cut[0]]
    assert len(centres) == 2
    # each centre near its own lesion (a part is cut short by the grid's edge and the seam, not a sphere)
    assert np.linalg.norm(centres[0] - a) < 1.5 and np.linalg.norm(centres[1] - b) < 1.5
    assert cut[0][0].likelihood > cut[0][1].likelihood  # each part its own peak (no likelihood map given)
    # no two candidates touch: the label map stays a valid PI-CAI detection map
    assert ndimage.label(cut[2] > 0, structure=_CONNECTIVITY)[1] == 2
    # the parts stay within the blob, and only a seam between them leaves it
    assert not (cut[2] > 0)[whole[2] == 0].any()
    assert (cut[2] > 0).sum() >= 0.9 * (whole[2] > 0).sum()


def test_a_saddle_above_ceiling_minus_depth_keeps_the_blob_whole() -> None:
    fused, _, _ = _two_lesions(valley_logit=2.5)  # above 5 - 3: not a valley deep enough
    assert len(extract_candidate_labels(fused, GEOMETRY, DEFAULT_CANDIDATES)[0]) == 1
    shallower = dataclasses.replace(DEFAULT_CANDIDATES, split_min_depth_logit=1.5)
    assert len(extract_candidate_labels(fused, GEOMETRY, shallower)[0]) == 2


def test_dips_inside_a_saturated_lesion_do_not_cut_it() -> None:
    """A large lesion whose map undulates at saturated log-odds (16 at two spots, 8 between: probabilities 1.0 and
    0.9997) stays one candidate; without the ceiling it would be cut in two."""
    grid = np.indices((6, 16, 16)).astype(np.float64)
    dist = [np.sqrt(((grid - np.array(c)[:, None, None, None]) ** 2).sum(0)) for c in ([2, 8, 5], [2, 8, 10])]
    inside = np.sqrt(((grid - np.array([2, 8, 7.5])[:, None, None, None]) ** 2).sum(0)) <= 5.5
    logits = np.where(inside, np.maximum(8.0, 16.0 - 3.0 * np.minimum(*dist)), -6.0)
    fused = _sigmoid(logits)
    assert len(extract_candidate_labels(fused, GEOMETRY, DEFAULT_CANDIDATES)[0]) == 1
    no_ceiling = dataclasses.replace(DEFAULT_CANDIDATES, split_ceiling_logit=16.0)
    assert len(extract_candidate_labels(fused, GEOMETRY, no_ceiling)[0]) == 2


def test_dome_markers_are_the_h_maxima() -> None:
    profile = np.array([0.0, 5.0, 3.0, 9.0, 8.5, 10.0, 0.0])
    values = profile[None, None, :]
    mask = np.ones(values.shape, dtype=bool)
    labels, count = dome_markers(values, mask, 1.0)  # 5 descends 2 to its saddle; 9 only 0.5 (joins 10)
    assert count == 2 and labels[0, 0, 1] > 0 and labels[0, 0, 5] > 0 and labels[0, 0, 3] == 0
    assert dome_markers(values, mask, 3.0)[1] == 1  # the highest maximum always has a dome
    with pytest.raises(ValueError, match="min_depth must be positive"):
        dome_markers(values, mask, 0.0)


def test_the_flood_gives_each_voxel_the_marker_it_reaches_along_the_highest_path() -> None:
    values = np.array([9.0, 4.0, 1.0, 3.0, 3.5, 8.0, 7.0])[None, None, :]
    markers = np.zeros(values.shape, dtype=np.int64)
    markers[0, 0, 0], markers[0, 0, 5] = 1, 2
    labels = flood_from_markers(values, markers, np.ones(values.shape, dtype=bool))
    assert labels[0, 0].tolist()[:2] == [1, 1] and labels[0, 0].tolist()[3:] == [2, 2, 2, 2]
    outside = np.ones(values.shape, dtype=bool)
    outside[0, 0, 6] = False
    assert flood_from_markers(values, markers, outside)[0, 0, 6] == 0


def test_log_odds_saturate_instead_of_overflowing() -> None:
    assert log_odds(np.array([0.0, 0.5, 1.0])).tolist() == pytest.approx([-16.0, 0.0, 16.0], abs=0.2)


def test_cut_parts_never_touch_and_stay_inside_the_blob_on_random_maps() -> None:
    rng = np.random.default_rng(20261128)
    grid = np.indices((8, 18, 18)).astype(np.float64)
    cut_any = 0
    for _ in range(60):
        logits = np.full(grid.shape[1:], -8.0)
        for _ in range(rng.integers(2, 5)):
            centre = rng.uniform([1, 2, 2], [7, 16, 16])
            dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
            logits = np.maximum(logits, rng.uniform(2, 16) - rng.uniform(0.5, 3.0) * dist)
        probability = _sigmoid(logits + rng.normal(0, 0.3, logits.shape))
        blob = ndimage.label(probability > 0.4, structure=_CONNECTIVITY)[0] == 1
        if not blob.any():
            continue
        parts = split_at_saddles(probability, blob, 3.0, 6.0)  # saddles up to 3: more cuts to check
        cut_any += len(parts) > 1
        union = np.zeros(blob.shape, dtype=bool)
        for part in parts:
            assert not (part & union).any() and not (part & ~blob).any()
            assert ndimage.label(part, structure=_CONNECTIVITY)[1] == 1
            union |= part
        assert ndimage.label(union, structure=_CONNECTIVITY)[1] == len(parts)
    assert cut_any >= 5  # the maps do exercise the cut


def test_cut_blobs_respect_the_candidate_limit() -> None:
    fused, _, _ = _two_lesions(valley_logit=-0.3)
    one = dataclasses.replace(DEFAULT_CANDIDATES, num_lesions_to_extract=1)
    candidates, _, labels = extract_candidate_labels(fused, GEOMETRY, one)
    assert len(candidates) == 1 and set(np.unique(labels)) == {0, 1}
    assert candidates[0].likelihood == pytest.approx(float(fused.max()))


def test_secondary_candidates_are_cut_too_and_touch_no_primary_one() -> None:
    dwi, _, _ = _two_lesions(valley_logit=-0.3)
    fused = np.zeros_like(dwi)
    fused[4:6, 0:3, 0:3] = 0.9  # a primary blob elsewhere
    maps = np.stack([np.zeros_like(dwi), np.zeros_like(dwi), dwi])
    candidates, labels = extract_study_candidates(fused, maps, GEOMETRY, DEFAULT_CANDIDATES)
    assert sorted(c.source for c in candidates) == ["dwi_map", "dwi_map", "fused_map"]
    assert ndimage.label(labels > 0, structure=_CONNECTIVITY)[1] == 3
