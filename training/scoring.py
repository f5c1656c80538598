"""The evaluation protocol's figures, as pure functions of per-case results (numpy + scikit-learn only).

Definitions (docs/networks.md, "Evaluation"):

* **located**: a significant (csPCa) truth lesion is located when a lesion candidate's centre lies within
  :data:`CENTRE_TOLERANCE_MM` of the lesion's centre (``ground_truth.json`` ``center_lps_mm``). The fraction is
  over **all** significant lesions, so missed lesions count against it.
* **candidate matching** (:func:`match_candidates`): candidates in order of decreasing likelihood; each takes
  the nearest not yet matched significant lesion whose centre is within the tolerance (a true positive);
  every other candidate is a false positive (a second candidate on an already matched lesion included).
* **FROC sensitivity at F false positives per study** (:func:`froc_sensitivity`): the highest lesion
  sensitivity over likelihood thresholds at which at most ``F x studies`` candidates are false positives.
* **incoherent study**: a candidate with likelihood >= 0.9 and a study csPCa probability < 0.5, or no
  candidate >= 0.1 and a probability > 0.5.
* **ECE**: 10 equal-width probability bins, ``sum_b n_b / n * |mean(p_b) - mean(y_b)|``.
* **intervals** (:func:`bootstrap_intervals`): case-level bootstrap (studies resampled with replacement,
  seeded), 2.5th and 97.5th percentiles of each figure over the resamples where it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

#: a candidate centre within this distance (mm) of a significant lesion's centre locates it
CENTRE_TOLERANCE_MM: float = 5.0
#: FROC operating points, false positives per study
FROC_FP_PER_STUDY: tuple[float, ...] = (0.5, 1.0)
#: coherence rules: (candidate likelihood, study probability) thresholds
COHERENCE_HIGH_CANDIDATE: float = 0.9
COHERENCE_LOW_CANDIDATE: float = 0.1
COHERENCE_PROBABILITY: float = 0.5
ECE_BINS: int = 10
BOOTSTRAP_RESAMPLES: int = 1000
BOOTSTRAP_SEED: int = 0
#: lesion size bins by ``diameter_mm`` (15 mm = the synthetic PI-RADS 5 threshold)
SIZE_BINS_MM: tuple[tuple[str, float, float], ...] = (
    ("<10 mm", 0.0, 10.0),
    ("10-15 mm", 10.0, 15.0),
    (">=15 mm", 15.0, math.inf),
)


@dataclass(frozen=True)
class Match:
    """Outcome of matching one study's candidates with its significant lesions.

    Attributes:
        candidate_lesion: per candidate, the index (into the significant lesions given) it located, or -1
            (false positive).
        candidate_distance_mm: per candidate, the distance to the nearest significant lesion centre
            (``inf`` without significant lesions).
        lesion_likelihood: per significant lesion, the likelihood of the candidate that located it (``nan``: missed).
        lesion_nearest_mm: per significant lesion, the distance to the nearest candidate centre (``inf``: no candidate).
    """

    candidate_lesion: np.ndarray
    candidate_distance_mm: np.ndarray
    lesion_likelihood: np.ndarray
    lesion_nearest_mm: np.ndarray


def match_candidates(
    candidate_centres_mm: np.ndarray,
    candidate_likelihoods: np.ndarray,
    lesion_centres_mm: np.ndarray,
    tolerance_mm: float = CENTRE_TOLERANCE_MM,
) -> Match:
    """Match candidates (``[C, 3]`` LPS mm, ``[C]``) with significant lesions (``[L, 3]`` LPS mm), by likelihood."""
    cand = np.asarray(candidate_centres_mm, dtype=np.float64).reshape(-1, 3)
    lik = np.asarray(candidate_likelihoods, dtype=np.float64).reshape(-1)
    les = np.asarray(lesion_centres_mm, dtype=np.float64).reshape(-1, 3)
    dist = np.linalg.norm(cand[:, None, :] - les[None, :, :], axis=-1)  # [C, L]
    candidate_lesion = np.full(len(cand), -1, dtype=np.int64)
    lesion_likelihood = np.full(len(les), np.nan)
    for c in np.argsort(-lik, kind="stable"):
        free = np.where((dist[c] <= tolerance_mm) & np.isnan(lesion_likelihood))[0]
        if free.size:
            best = int(free[np.argmin(dist[c, free])])
            candidate_lesion[c] = best
            lesion_likelihood[best] = lik[c]
    return Match(
        candidate_lesion=candidate_lesion,
        candidate_distance_mm=dist.min(axis=1) if les.size else np.full(len(cand), np.inf),
        lesion_likelihood=lesion_likelihood,
        lesion_nearest_mm=dist.min(axis=0) if cand.size else np.full(len(les), np.inf),
    )


def froc_threshold(false_positive_likelihoods: np.ndarray, num_studies: int, fp_per_study: float) -> float:
    """The lowest exclusive likelihood threshold with at most ``fp_per_study * num_studies`` false positives.

    Candidates with likelihood strictly above the returned value are kept (``-inf``: all are kept).
    """
    allowed = int(math.floor(fp_per_study * num_studies + 1e-9))
    fps = np.sort(np.asarray(false_positive_likelihoods, dtype=np.float64))[::-1]
    return float(fps[allowed]) if fps.size > allowed else -math.inf


def froc_sensitivity(
    false_positive_likelihoods: np.ndarray, lesion_likelihoods: np.ndarray, num_studies: int, fp_per_study: float
) -> float | None:
    """Lesion sensitivity at ``fp_per_study`` false positives per study (``None`` without significant lesions).

    Args:
        false_positive_likelihoods: likelihoods of every false-positive candidate of the studies.
        lesion_likelihoods: per significant lesion, the likelihood of its locating candidate (``nan``: missed).
        num_studies: studies the candidates come from.
        fp_per_study: the operating point.
    """
    lesions = np.asarray(lesion_likelihoods, dtype=np.float64)
    if lesions.size == 0:
        return None
    threshold = froc_threshold(false_positive_likelihoods, num_studies, fp_per_study)
    return float(np.sum(np.nan_to_num(lesions, nan=-np.inf) > threshold) / lesions.size)


def froc_curve(
    false_positive_likelihoods: np.ndarray, lesion_likelihoods: np.ndarray, num_studies: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(false positives per study, sensitivity)`` over every candidate likelihood as threshold (inclusive)."""
    fps = np.asarray(false_positive_likelihoods, dtype=np.float64)
    lesions = np.nan_to_num(np.asarray(lesion_likelihoods, dtype=np.float64), nan=-np.inf)
    thresholds = np.unique(np.concatenate([fps, lesions[np.isfinite(lesions)]]))[::-1]
    fp_rate = np.array([np.sum(fps >= t) / max(1, num_studies) for t in thresholds])
    sens = np.array([np.sum(lesions >= t) / max(1, lesions.size) for t in thresholds])
    return fp_rate, sens


def incoherent(top_candidate_likelihood: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """Per study: the study probability contradicts the lesion evidence (module docstring)."""
    top = np.asarray(top_candidate_likelihood, dtype=np.float64)
    p = np.asarray(probability, dtype=np.float64)
    strong_lesion_low_p = (top >= COHERENCE_HIGH_CANDIDATE) & (p < COHERENCE_PROBABILITY)
    no_lesion_high_p = (top < COHERENCE_LOW_CANDIDATE) & (p > COHERENCE_PROBABILITY)
    return strong_lesion_low_p | no_lesion_high_p


def brier_score(labels: np.ndarray, probability: np.ndarray) -> float:
    return float(np.mean((np.asarray(probability, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def expected_calibration_error(labels: np.ndarray, probability: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width bins on [0, 1] (the last bin includes 1)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probability, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() / len(p) * abs(float(p[inside].mean()) - float(y[inside].mean()))
    return float(total)


def auroc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC, ``None`` when only one class is present."""
    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, scores))


def quadratic_kappa_or_none(truth: Sequence[int], predicted: Sequence[int]) -> float | None:
    """Quadratic-weighted Cohen's kappa, ``None`` when it is undefined (one category in truth and prediction)."""
    if len(set(truth) | set(predicted)) < 2:
        return None
    value = float(cohen_kappa_score(list(truth), list(predicted), weights="quadratic"))
    return value if math.isfinite(value) else None


Figure = Callable[[np.ndarray], float | None]


def bootstrap_intervals(
    figures: dict[str, Figure],
    num_cases: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, list[float] | None]:
    """95 % percentile intervals of each figure under case-level resampling.

    Args:
        figures: name -> function of an index array (case indices, with repeats) returning the figure or ``None``.
        num_cases: studies available.
        resamples: bootstrap resamples (the same resampled index sets for every figure).
        seed: numpy seed of the resampling.

    Returns:
        name -> ``[low, high]`` (rounded to 4 decimals), or ``None`` when the figure is undefined in
        more than half of the resamples.
    """
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, num_cases, size=(resamples, num_cases))
    values: dict[str, list[float]] = {name: [] for name in figures}
    for idx in samples:
        for name, figure in figures.items():
            v = figure(idx)
            if v is not None and math.isfinite(v):
                values[name].append(float(v))
    out: dict[str, list[float] | None] = {}
    for name, vs in values.items():
        if len(vs) * 2 < resamples:
            out[name] = None
        else:
            lo, hi = np.percentile(vs, [2.5, 97.5])
            out[name] = [round(float(lo), 4), round(float(hi), 4)]
    return out


def size_bin(diameter_mm: float) -> str:
    """The :data:`SIZE_BINS_MM` label of a lesion diameter."""
    for label, lo, hi in SIZE_BINS_MM:
        if lo <= diameter_mm < hi:
            return label
    return SIZE_BINS_MM[-1][0]
