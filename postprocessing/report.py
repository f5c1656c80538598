"""Findings of one study from the ensemble outputs: study scores plus lesions in LPS millimetres.

Torch-free: used by the analysis service, the demo and evaluation alike (one path, so they cannot differ).
Lesion candidates are the blobs of the fused localization map (``fused_map``: where the lesions are), plus those
that the DWI localization map proposes outside them (``CandidateSettings.secondary_sequence``); each
lesion carries its own csPCa likelihood (the served model's second-stage lesion scorer where it has one,
:mod:`postprocessing.lesion_scoring`; otherwise the peak of ``cspca_map``, the calibrated csPCa probability per
voxel, inside the lesion) and its PI-RADS-like category (from the highest ``score_map`` value in the lesion, by the
contract's cut points). :class:`contract.CandidateSettings` names both maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract import (
    CSPCA_MIN_PIRADS,
    DEFAULT_CANDIDATES,
    PIRADS_CATEGORIES,
    SEQUENCES,
    CandidateSettings,
    GridGeometry,
    pirads_category,
)
from postprocessing.candidates import LesionCandidate, extract_study_candidates, secondary_map
from postprocessing.lesion_scoring import (
    LESION_PROBABILITY_THRESHOLD,
    LesionScorer,
    candidate_features,
    coherent_category,
    coherent_distribution,
)
from postprocessing.regions import grow_small_regions, min_region_voxels

MM3_PER_ML = 1000.0


@dataclass(frozen=True)
class Lesion:
    """One lesion candidate.

    Attributes:
        id: 1..N by decreasing likelihood; the segment number in the DICOM SEG.
        center_lps_mm: likelihood-weighted centroid, DICOM patient coordinates (LPS) in mm.
        volume_ml: candidate volume in millilitres.
        likelihood: calibrated csPCa probability of this lesion in [0, 1]: the served model's lesion scorer's
            probability where it has one (:mod:`postprocessing.lesion_scoring`), else the peak of ``cspca_map`` in it.
        pirads: PI-RADS-like category 1-5 of this lesion, ``pirads_category`` of ``score`` (1: the calibrated score
            puts the candidate below the first cut point, clinically significant cancer highly unlikely); with a
            lesion scorer brought into agreement with ``likelihood`` (>= 4 exactly when it is >= 0.5).
        score: the network's continuous PI-RADS-like score of this lesion (the highest ``score_map`` value in it).
        source: the map that proposed it: ``"fused_map"``, or ``"dwi_map"`` for a secondary candidate
            (:func:`~postprocessing.candidates.extract_study_candidates`).
    """

    id: int
    center_lps_mm: tuple[float, float, float]
    volume_ml: float
    likelihood: float
    pirads: int
    score: float
    source: str = DEFAULT_CANDIDATES.source_map

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "center_lps_mm": list(self.center_lps_mm),
            "volume_ml": self.volume_ml,
            "likelihood": self.likelihood,
            "pirads": self.pirads,
            "score": self.score,
            "source": self.source,
        }


@dataclass
class Findings:
    """Study-level result.

    Attributes:
        cspca_probability: calibrated probability of clinically significant cancer in [0, 1] (the highest
            lesion evidence: with a lesion scorer the highest lesion likelihood, or the scorer's probability for a
            study without candidates; without one the maximum of ``cspca_map``).
        pirads_distribution: probabilities of PI-RADS-like categories 1..5 at the study's highest score (with a
            lesion scorer rescaled so that ``P(>= 4)`` is ``cspca_probability``).
        pirads_score: the study category: ``pirads_category`` of the highest score, so never below a lesion's
            category (the highest lesion category, or a mimic's that is no csPCa candidate; 1-2 without a lesion);
            with a lesion scorer the highest lesion category, and at most 2 from the voxels outside the lesions.
        lesions: candidates by decreasing likelihood.
        labels: uint8 ``[D, H, W]`` on the model grid, lesion ``n`` -> ``n`` (0 background).
        fused_map: float32 ``[D, H, W]`` fused localization map on the model grid.
        cspca_map: float32 ``[D, H, W]`` the network's calibrated csPCa probability per voxel.
        geometry: the model grid in patient space.
    """

    cspca_probability: float
    pirads_distribution: list[float]
    pirads_score: int
    lesions: list[Lesion]
    labels: np.ndarray
    fused_map: np.ndarray
    cspca_map: np.ndarray
    geometry: GridGeometry

    def to_dict(self) -> dict[str, Any]:
        return {
            "cspca_probability": self.cspca_probability,
            "pirads_distribution": self.pirads_distribution,
            "pirads_score": self.pirads_score,
            "lesions": [lesion.to_dict() for lesion in self.lesions],
        }


#: the ensemble outputs :func:`build_findings` reads
FINDINGS_OUTPUTS: tuple[str, ...] = (
    "sequence_maps",
    "fused_map",
    "cspca_map",
    "score_map",
    "cspca_probability",
    "pirads_distribution",
)


def _volume(outputs: Mapping[str, np.ndarray], name: str, shape_dhw: tuple[int, int, int]) -> np.ndarray:
    volume = np.asarray(outputs[name], dtype=np.float32)
    if volume.size != int(np.prod(shape_dhw)):
        raise ValueError(
            f"{name} has shape {volume.shape}, expected {int(np.prod(shape_dhw))} voxels ({list(shape_dhw)})"
        )
    return volume.reshape(shape_dhw)


def build_findings(
    outputs: Mapping[str, np.ndarray],
    geometry: GridGeometry,
    settings: CandidateSettings = DEFAULT_CANDIDATES,
    scorer: LesionScorer | None = None,
    images: np.ndarray | None = None,
    availability: np.ndarray | None = None,
) -> Findings:
    """Findings from the ensemble outputs of one unbatched study.

    Args:
        outputs: ``sequence_maps`` ``[S, D, H, W]``, ``fused_map``, ``cspca_map``, ``score_map`` ``[1, D, H, W]``
            (or ``[D, H, W]``), ``cspca_probability`` ``[1]``, ``pirads_distribution`` ``[5]``; a leading batch
            dimension of 1 is accepted.
        geometry: the model grid of that study.
        settings: candidate extraction settings (``settings.source_map`` names the map whose blobs are the
            candidates, ``settings.likelihood_map`` the map whose peak in a blob is its likelihood,
            ``settings.secondary_sequence`` the sequence whose map proposes further candidates:
            :func:`~postprocessing.candidates.extract_study_candidates`).
        scorer: the served model's second-stage lesion scorer (:mod:`postprocessing.lesion_scoring`), or
            ``None``. With one, each lesion's likelihood is the scorer's probability from ``images`` and the maps
            inside its blob (lesions renumbered by it), and the study csPCa probability is the highest lesion
            likelihood, or the scorer's ``no_candidate_probability`` when there is no candidate: derived from the
            lesions, so the two cannot contradict each other. Candidates scored below
            ``settings.min_scored_likelihood`` are not reported as lesions (the study probability still counts
            them). Each lesion's category is its score's, brought into
            agreement with its likelihood (:func:`~postprocessing.lesion_scoring.coherent_category`: >= 4 exactly
            when the likelihood is >= 0.5; a csPCa lesion is 5 or 4 by the scorer's category-5 model where it has
            one; below csPCa, 1 or 2-3 by its lesion model where it has one); the study category is the highest
            lesion category (1-2 outside lesions: 2 when the lesion model finds a lesion among all candidates), and the
            distribution is
            rescaled so that ``P(>= 4)`` is the study probability (and ``P(5)`` that times the category-5
            probability of the most likely candidate, with that model).
        images: the preprocessed study ``[S, D, H, W]`` the ensemble read (required with ``scorer``).
        availability: ``[S]`` sequence availability of that study (absent sequences do not count in the scorer, and
            an absent secondary sequence proposes no candidate); ``None``: every sequence present.

    Raises:
        ValueError: an output is missing or has the wrong size (names it and its shape), or ``scorer`` is given
            without ``images``.
    """
    for name in FINDINGS_OUTPUTS:
        if name not in outputs:
            raise ValueError(f"ensemble output {name!r} is missing (got {sorted(outputs)})")
    shape = tuple(int(n) for n in geometry.size_ijk[::-1])
    fused = _volume(outputs, "fused_map", shape)  # type: ignore[arg-type]
    cspca_map = _volume(outputs, "cspca_map", shape)  # type: ignore[arg-type]
    score_map = _volume(outputs, "score_map", shape)  # type: ignore[arg-type]
    maps = {"cspca_map": cspca_map, "fused_map": fused}
    source, likelihood = maps.get(settings.source_map), maps.get(settings.likelihood_map)
    if source is None or likelihood is None:
        raise ValueError(
            f"candidate maps {settings.source_map!r} / {settings.likelihood_map!r}: expected one of {sorted(maps)}"
        )
    prob = np.asarray(outputs["cspca_probability"], dtype=np.float64).reshape(-1)
    dist = np.asarray(outputs["pirads_distribution"], dtype=np.float64).reshape(-1)
    if prob.size != 1 or dist.size != len(PIRADS_CATEGORIES):
        raise ValueError(f"cspca_probability {prob.shape} / pirads_distribution {dist.shape}: expected [1] / [5]")
    sequence_maps = np.asarray(outputs["sequence_maps"], dtype=np.float32)
    if sequence_maps.size != len(SEQUENCES) * int(np.prod(shape)):
        raise ValueError(
            f"sequence_maps has shape {sequence_maps.shape}, expected {len(SEQUENCES)} x {list(shape)} voxels"
        )
    sequence_maps = sequence_maps.reshape((len(SEQUENCES), *shape))
    candidates, labels = extract_study_candidates(
        source,
        sequence_maps,
        geometry,
        settings,
        likelihood_map=None if likelihood is source else likelihood,
        availability=availability,
    )
    likelihoods = [float(c.likelihood) for c in candidates]
    study_probability = float(prob[0])
    category5: list[float | None] = [None] * len(candidates)  # P(5 | csPCa) per candidate, with such a model
    lesion: list[float | None] = [None] * len(candidates)  # P(a lesion of any kind) per candidate, likewise
    top_category5: float | None = None  # that of the study's most likely candidate
    any_lesion: bool | None = None  # with a lesion model: does any candidate (reported or not) reach its threshold
    if scorer is not None:
        if images is None:
            raise ValueError("a lesion scorer needs the preprocessed images of the study")
        ids = [c.label for c in candidates]
        secondary = [c.source != settings.source_map for c in candidates]
        features = candidate_features(images, labels, ids, cspca_map, score_map, fused, sequence_maps, secondary)
        likelihoods = [float(p) for p in scorer.probability(features, availability)]
        study_probability = max(likelihoods, default=float(scorer.no_candidate_probability))
        five = scorer.category5_probability(features, availability)
        if five is not None:
            category5 = [float(q) for q in five]
        anything = scorer.lesion_probability(features, availability)
        if anything is not None:
            lesion = [float(q) for q in anything]
            any_lesion = bool(np.any(anything >= LESION_PROBABILITY_THRESHOLD))
        order = sorted(range(len(candidates)), key=lambda i: -likelihoods[i])
        top_category5 = category5[order[0]] if order else None
        order = [i for i in order if likelihoods[i] >= settings.min_scored_likelihood]  # the reported lesions
        relabel = np.zeros(len(candidates) + 1, dtype=labels.dtype)
        for new_id, i in enumerate(order, start=1):
            relabel[candidates[i].label] = new_id
        labels = relabel[labels]
        candidates = [dataclasses.replace(candidates[i], label=new_id) for new_id, i in enumerate(order, start=1)]
        likelihoods = [likelihoods[i] for i in order]
        category5 = [category5[i] for i in order]
        lesion = [lesion[i] for i in order]
    scores = [float(score_map[labels == c.label].max()) for c in candidates]  # the blob's, before its growth
    labels, candidates = _grown_regions(labels, candidates, source, sequence_maps, geometry, settings, availability)
    lesions = []
    for c, score, lesion_likelihood, lesion_category5, lesion_any in zip(
        candidates, scores, likelihoods, category5, lesion, strict=True
    ):
        category = pirads_category(score)
        if scorer is not None:
            category = coherent_category(category, lesion_likelihood, lesion_category5, lesion_any)
        lesions.append(
            Lesion(
                id=c.label,
                center_lps_mm=tuple(round(float(v), 3) for v in c.center_lps_mm),  # type: ignore[arg-type]
                volume_ml=round(c.volume_mm3 / MM3_PER_ML, 5),
                likelihood=round(lesion_likelihood, 6),
                pirads=category,
                score=round(score, 4),
                source=c.source,
            )
        )
    # every lesion's score is at most the highest, so no lesion outranks the study
    study_category = pirads_category(float(score_map.max()))
    distribution = [float(v) for v in dist]
    if scorer is not None:
        # the highest lesion category; outside the reported lesions the lesion model decides 2 (a benign lesion
        # among the candidates, reported or not) against 1, or without one the network's reading counts up to 2
        outside = min(study_category, CSPCA_MIN_PIRADS - 2) if any_lesion is None else (2 if any_lesion else 1)
        study_category = max([les.pirads for les in lesions] + [outside])
        distribution = coherent_distribution(distribution, study_probability, top_category5)
    return Findings(
        cspca_probability=study_probability,
        pirads_distribution=distribution,
        pirads_score=study_category,
        lesions=lesions,
        labels=labels,
        fused_map=fused,
        cspca_map=cspca_map,
        geometry=geometry,
    )


def _grown_regions(
    labels: np.ndarray,
    candidates: list[LesionCandidate],
    source: np.ndarray,
    sequence_maps: np.ndarray,
    geometry: GridGeometry,
    settings: CandidateSettings,
    availability: np.ndarray | None,
) -> tuple[np.ndarray, list[LesionCandidate]]:
    """The reported regions: each lesion's blob grown to ``settings.min_region_mm3`` where smaller
    (:func:`postprocessing.regions.grow_small_regions`, along the map it came from), volumes updated."""
    min_voxels = min_region_voxels(settings.min_region_mm3, geometry.voxel_volume_mm3)
    if min_voxels <= 0 or not candidates:
        return labels, candidates
    order = sorted(candidates, key=lambda c: c.label)
    if [c.label for c in order] != list(range(1, len(order) + 1)):
        raise ValueError(f"lesion labels must be 1..{len(order)}, got {[c.label for c in order]}")
    aux = secondary_map(sequence_maps, availability, settings)
    maps = [source if c.source == settings.source_map or aux is None else aux for c in order]
    grown = grow_small_regions(labels, maps, min_voxels)
    counts = np.bincount(grown.ravel().astype(np.int64), minlength=len(order) + 1)
    return grown, [
        dataclasses.replace(c, volume_mm3=float(counts[c.label]) * geometry.voxel_volume_mm3) for c in candidates
    ]
