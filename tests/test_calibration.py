"""Post-training calibration: ordinal thresholds recovered by maximum likelihood, applied inside the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contract import DEFAULT_GRID, NUM_SEQUENCES, PIRADS_SCORE_CUTPOINTS, GridGeometry, pirads_category
from networks import build_networks
from training.calibration import (
    MIN_CALIBRATION_CASES,
    calibrate,
    fit_score_thresholds,
    ordinal_nll,
    study_raw_scores,
)
from training.data import CaseRecord


def _ordinal_sample(thresholds: np.ndarray, scale: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.5, 7.0, size=n)
    at_least = 1 / (1 + np.exp(-(scores[:, None] - thresholds) / scale))
    categories = 1 + (rng.random((n, 1)) < at_least).sum(axis=1)  # P(>= k) decreasing in k: a valid draw
    return scores, categories


def test_fit_score_thresholds_recovers_the_generating_thresholds() -> None:
    truth = np.array([2.2, 3.4, 3.9, 5.6])
    scores, categories = _ordinal_sample(truth, 0.3, 4000, seed=0)
    fitted, scale = fit_score_thresholds(scores, categories, scale=0.7)
    assert np.abs(fitted - truth).max() < 0.1
    assert scale == pytest.approx(0.3, abs=0.05)
    cuts = np.asarray(PIRADS_SCORE_CUTPOINTS)
    assert ordinal_nll(fitted, scale, scores, categories) < ordinal_nll(cuts, 0.7, scores, categories)


def test_fit_score_thresholds_keeps_every_category_a_range_when_one_is_absent() -> None:
    scores, categories = _ordinal_sample(np.array([2.0, 3.0, 4.0, 5.0]), 0.3, 300, seed=1)
    categories[categories == 3] = 4  # no category-3 study in the validation split
    fitted, _ = fit_score_thresholds(scores, categories, scale=0.5)
    assert np.all(np.diff(fitted) >= 0.1 - 1e-9)


def _record(i: int, images: np.ndarray, category: int) -> CaseRecord:
    d, h, w = DEFAULT_GRID.size_dhw
    return CaseRecord(
        case_id=f"c{i}",
        images=images,
        availability=np.ones(NUM_SEQUENCES, dtype=np.float32),
        target=np.zeros((d, h, w), dtype=np.uint8),
        lesion_index=np.zeros((d, h, w), dtype=np.uint8),
        significant=int(category >= 4),
        max_pirads=category,
        geometry=GridGeometry((0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (1.5, 1.5, 3.0), (w, h, d)),
    )


def test_calibrate_stores_thresholds_and_platt_in_the_network_and_is_idempotent() -> None:
    """Categories read from the calibrated network's score map follow the fitted thresholds on the raw score,
    and a second calibration on the same cases gives the same buffers (any earlier calibration is reset)."""
    torch.manual_seed(0)
    nets = build_networks("cpu").eval()
    rng = np.random.default_rng(0)
    shape = (NUM_SEQUENCES, *DEFAULT_GRID.size_dhw)
    images = [rng.normal(size=shape).astype(np.float32) * (1 + i / 8) for i in range(24)]
    records0 = [_record(i, x, 1) for i, x in enumerate(images)]
    raw_scores, _, _ = study_raw_scores(nets, records0)
    order = np.argsort(raw_scores)
    categories = np.empty(len(images), dtype=int)
    categories[order] = np.repeat([1, 2, 3, 4, 5], [6, 5, 3, 5, 5])  # higher raw score, higher category
    records = [_record(i, x, int(c)) for i, (x, c) in enumerate(zip(images, categories, strict=True))]
    first = calibrate(nets, records)
    buffers = (nets.classification.score_thresholds.clone(), nets.classification.calibration.clone())
    assert first["cases"] == len(records) and first["slope"] > 0
    thresholds = first["score_thresholds"]["thresholds"]
    with torch.no_grad():
        for x, value in zip(images, raw_scores, strict=True):
            out = nets(torch.from_numpy(x)[None], torch.ones(1, NUM_SEQUENCES))
            assert pirads_category(float(out["score_map"].max())) == 1 + sum(value > t for t in thresholds)
    second = calibrate(nets, records)
    assert second["score_thresholds"] == first["score_thresholds"]
    assert torch.equal(nets.classification.score_thresholds, buffers[0])
    assert torch.equal(nets.classification.calibration, buffers[1])


def test_calibrate_on_too_few_cases_leaves_the_identity_and_says_why() -> None:
    nets = build_networks("cpu")
    nets.classification.set_score_thresholds([2.0, 3.0, 4.0, 5.0])
    result = calibrate(nets, [])
    assert str(MIN_CALIBRATION_CASES) in result["skipped"]
    assert nets.classification.score_thresholds.tolist() == list(PIRADS_SCORE_CUTPOINTS)
    assert nets.classification.calibration.tolist() == [1.0, 0.0]
