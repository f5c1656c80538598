"""The evaluation protocol's figures (training/scoring.py) on hand-made cases whose answers are known,
and the generated BENCHMARKS section (training/report.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from training.report import BEGIN, END, TRAINING_END, write_benchmarks_section
from training.scoring import (
    bootstrap_intervals,
    brier_score,
    expected_calibration_error,
    froc_sensitivity,
    incoherent,
    match_candidates,
    quadratic_kappa_or_none,
    size_bin,
)


def test_a_lesion_with_no_candidate_within_5_mm_counts_as_missed_even_when_a_candidate_overlaps_it() -> None:
    # lesion A has a candidate 2 mm away; lesion B (large) has one 7 mm away: inside the lesion, but not located
    lesions = np.array([[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    candidates = np.array([[2.0, 0.0, 0.0], [47.0, 0.0, 0.0]])
    m = match_candidates(candidates, np.array([0.8, 0.9]), lesions)
    assert m.candidate_lesion.tolist() == [0, -1]
    assert m.lesion_likelihood[0] == pytest.approx(0.8) and math.isnan(m.lesion_likelihood[1])
    assert m.lesion_nearest_mm.tolist() == pytest.approx([2.0, 7.0])
    located = float(np.mean(~np.isnan(m.lesion_likelihood)))
    assert located == 0.5


def test_second_candidate_on_a_located_lesion_is_a_false_positive_and_the_likelier_one_locates_it() -> None:
    m = match_candidates(np.array([[1.0, 0, 0], [0, 1.0, 0]]), np.array([0.3, 0.7]), np.array([[0.0, 0, 0]]))
    assert m.candidate_lesion.tolist() == [-1, 0]
    assert m.lesion_likelihood.tolist() == [0.7]


def test_study_without_candidates_or_lesions_matches_nothing() -> None:
    m = match_candidates(np.zeros((0, 3)), np.zeros(0), np.array([[0.0, 0, 0]]))
    assert math.isnan(m.lesion_likelihood[0]) and math.isinf(m.lesion_nearest_mm[0])
    m = match_candidates(np.array([[0.0, 0, 0]]), np.array([0.5]), np.zeros((0, 3)))
    assert m.candidate_lesion.tolist() == [-1] and math.isinf(m.candidate_distance_mm[0])


def test_froc_sensitivity_keeps_only_candidates_above_the_allowed_false_positives() -> None:
    # 2 studies: at 0.5 FP/study one FP is allowed (0.9 passes, 0.8 does not), at 1 FP/study two are
    fps = np.array([0.9, 0.8, 0.1])
    lesions = np.array([0.95, 0.85, 0.5, np.nan])
    assert froc_sensitivity(fps, lesions, num_studies=2, fp_per_study=0.5) == pytest.approx(2 / 4)
    assert froc_sensitivity(fps, lesions, num_studies=2, fp_per_study=1.0) == pytest.approx(3 / 4)
    assert froc_sensitivity(fps, lesions, num_studies=10, fp_per_study=1.0) == pytest.approx(3 / 4)  # missed stays
    assert froc_sensitivity(fps, np.zeros(0), num_studies=2, fp_per_study=1.0) is None


def test_incoherent_flags_both_contradictions_and_nothing_else() -> None:
    top = np.array([0.95, 0.05, 0.95, 0.05, 0.5])
    prob = np.array([0.3, 0.7, 0.8, 0.2, 0.9])
    assert incoherent(top, prob).tolist() == [True, True, False, False, False]


def test_brier_and_ece_of_known_predictions() -> None:
    y = np.array([1, 0, 1, 0])
    assert brier_score(y, np.array([1.0, 0.0, 1.0, 0.0])) == 0.0
    assert brier_score(y, np.full(4, 0.5)) == pytest.approx(0.25)
    assert expected_calibration_error(y, np.full(4, 0.5)) == pytest.approx(0.0)  # 0.5 predicted, half positive
    assert expected_calibration_error(y, np.array([0.9, 0.9, 0.1, 0.1])) == pytest.approx(0.4)


def test_quadratic_kappa_undefined_for_one_category() -> None:
    assert quadratic_kappa_or_none([1, 1], [1, 1]) is None
    assert quadratic_kappa_or_none([1, 4, 5], [1, 4, 5]) == pytest.approx(1.0)


def test_bootstrap_intervals_are_seeded_contain_the_figure_and_widen_with_noise() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, size=200)

    def mean(idx: np.ndarray) -> float:
        return float(values[idx].mean())

    a = bootstrap_intervals({"mean": mean}, 200, resamples=300, seed=3)["mean"]
    b = bootstrap_intervals({"mean": mean}, 200, resamples=300, seed=3)["mean"]
    assert a == b and a is not None
    assert a[0] < values.mean() < a[1]
    assert 0.1 < a[1] - a[0] < 0.5  # ~ 2 x 1.96 / sqrt(200) = 0.28
    undefined = bootstrap_intervals({"never": lambda idx: None}, 10, resamples=20)
    assert undefined == {"never": None}


def test_size_bins_split_at_10_and_15_mm() -> None:
    assert [size_bin(d) for d in (5.0, 9.99, 10.0, 14.9, 15.0, 25.0)] == [
        "<10 mm",
        "<10 mm",
        "10-15 mm",
        "10-15 mm",
        ">=15 mm",
        ">=15 mm",
    ]


def test_benchmarks_section_is_replaced_in_place_and_labels_figures_synthetic(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n<!-- training:begin -->\ntrain\n{TRAINING_END}\n\n## Later\nkept\n")
    metrics = {
        "auroc": 0.9,
        "ci95": {"auroc": [0.85, 0.95]},
        "data_seeds": [9101],
        "num_cases": 3,
        "by_zone": {"pz": {"significant_lesions": 2, "located_fraction": 1.0, "located_fraction_ci95": [1.0, 1.0]}},
        "by_size": {},
    }
    write_benchmarks_section(path, metrics, "mpmri evaluate ...")
    write_benchmarks_section(path, {**metrics, "auroc": 0.8}, "mpmri evaluate ...")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert text.index(TRAINING_END) < text.index(BEGIN) < text.index("## Later")
    assert "| 0.800 | [0.850, 0.950] |" in text and "0.900" not in text
    assert "seed 9101" in text and "synthetic studies" in text


def test_a_candidate_checkpoint_gets_its_own_section_and_leaves_the_shipped_figures(tmp_path: Path) -> None:
    """The GPU profile's validation run (``--role candidate``) must not overwrite the shipped checkpoint's."""
    from training.report import CANDIDATE_BEGIN, CANDIDATE_END, TEST_BEGIN, TEST_END

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n{TRAINING_END}\n\n{BEGIN}\nshipped 0.953\n{END}\n\n{TEST_BEGIN}\nt\n{TEST_END}\n")
    metrics = {"auroc": 0.7, "data_seeds": [9101], "num_cases": 3, "checkpoint_profile": "gpu"}
    write_benchmarks_section(path, metrics, "mpmri evaluate ... --role candidate", role="candidate")
    write_benchmarks_section(path, {**metrics, "auroc": 0.75}, "mpmri evaluate ...", role="candidate")
    text = path.read_text()
    assert "shipped 0.953" in text and text.count(CANDIDATE_BEGIN) == 1
    assert text.index(TEST_END) < text.index(CANDIDATE_BEGIN) < text.index(CANDIDATE_END)
    assert "| 0.750 |" in text and "| 0.700 |" not in text and "profile gpu" in text


def test_the_section_header_names_the_scorers_category_models_and_recalibration_and_no_skipped_model() -> None:
    from training.report import _scorer_text

    fitted_on = {
        "data": "seed 1 cases 700-1899",
        "studies": 1200,
        "candidates": 7450,
        "study_passes": 2400,
        "category5": {"candidates": 1166, "positives": 381},
        "lesion": {"candidates": 3, "skipped": "too few"},
        "recalibration": {"data": "seed 1 cases 1900-3499", "slope": 1.10354, "intercept": 0.0944},
    }
    text = _scorer_text(fitted_on)
    assert "fitted on seed 1 cases 700-1899: 1200 studies, 7450 candidates in 2400 passes" in text
    assert "ordinal models (category 5 against 4)" in text and "any lesion" not in text
    assert "recalibrated on seed 1 cases 1900-3499 (study-level Platt, slope 1.104, intercept 0.094)" in text
    assert "recalibrated" not in _scorer_text({k: v for k, v in fitted_on.items() if k != "recalibration"})
