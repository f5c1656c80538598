"""Findings of one study from the ensemble outputs: study scores plus lesions in LPS millimetres.

Torch-free: used by the analysis service, the demo and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract import DEFAULT_CANDIDATES, PIRADS_CATEGORIES, CandidateSettings, GridGeometry
from postprocessing.candidates import extract_candidate_labels

MM3_PER_ML = 1000.0


@dataclass(frozen=True)
class Lesion:
    """One lesion candidate.

    Attributes:
        id: 1..N by decreasing likelihood; the segment number in the DICOM SEG.
        center_lps_mm: likelihood-weighted centroid, DICOM patient coordinates (LPS) in mm.
        volume_ml: candidate volume in millilitres.
        likelihood: lesion likelihood in [0, 1] (the fused map's peak in the candidate).
    """

    id: int
    center_lps_mm: tuple[float, float, float]
    volume_ml: float
    likelihood: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "center_lps_mm": list(self.center_lps_mm),
            "volume_ml": self.volume_ml,
            "likelihood": self.likelihood,
        }


@dataclass
class Findings:
    """Study-level result.

    Attributes:
        cspca_probability: probability of clinically significant cancer in [0, 1].
        pirads_distribution: probabilities of PI-RADS-like categories 1..5 (sums to 1).
        pirads_score: the most probable category.
        lesions: candidates by decreasing likelihood.
        labels: uint8 ``[D, H, W]`` on the model grid, lesion ``n`` -> ``n`` (0 background).
        fused_map: float32 ``[D, H, W]`` fused localization map on the model grid.
        geometry: the model grid in patient space.
    """

    cspca_probability: float
    pirads_distribution: list[float]
    pirads_score: int
    lesions: list[Lesion]
    labels: np.ndarray
    fused_map: np.ndarray
    geometry: GridGeometry

    def to_dict(self) -> dict[str, Any]:
        return {
            "cspca_probability": self.cspca_probability,
            "pirads_distribution": self.pirads_distribution,
            "pirads_score": self.pirads_score,
            "lesions": [lesion.to_dict() for lesion in self.lesions],
        }


def build_findings(
    outputs: Mapping[str, np.ndarray],
    geometry: GridGeometry,
    settings: CandidateSettings = DEFAULT_CANDIDATES,
) -> Findings:
    """Findings from the ensemble outputs of one unbatched study.

    Args:
        outputs: ``fused_map`` ``[1, D, H, W]`` (or ``[D, H, W]``), ``cspca_probability`` ``[1]``,
            ``pirads_distribution`` ``[5]``; a leading batch dimension of 1 is accepted.
        geometry: the model grid of that study.
        settings: candidate extraction settings.

    Raises:
        ValueError: an output is missing or has the wrong size (names it and its shape).
    """
    for name in ("fused_map", "cspca_probability", "pirads_distribution"):
        if name not in outputs:
            raise ValueError(f"ensemble output {name!r} is missing (got {sorted(outputs)})")
    d, h, w = geometry.size_ijk[::-1]
    fused = np.asarray(outputs["fused_map"], dtype=np.float32)
    if fused.size != d * h * w:
        raise ValueError(f"fused_map has shape {fused.shape}, expected {d * h * w} voxels ([{d}, {h}, {w}])")
    fused = fused.reshape(d, h, w)
    prob = np.asarray(outputs["cspca_probability"], dtype=np.float64).reshape(-1)
    dist = np.asarray(outputs["pirads_distribution"], dtype=np.float64).reshape(-1)
    if prob.size != 1 or dist.size != len(PIRADS_CATEGORIES):
        raise ValueError(f"cspca_probability {prob.shape} / pirads_distribution {dist.shape}: expected [1] / [5]")
    candidates, _, labels = extract_candidate_labels(fused, geometry, settings)
    lesions = [
        Lesion(
            id=c.label,
            center_lps_mm=tuple(round(float(v), 3) for v in c.center_lps_mm),  # type: ignore[arg-type]
            volume_ml=round(c.volume_mm3 / MM3_PER_ML, 5),
            likelihood=round(float(c.likelihood), 6),
        )
        for c in candidates
    ]
    return Findings(
        cspca_probability=float(prob[0]),
        pirads_distribution=[float(v) for v in dist],
        pirads_score=int(PIRADS_CATEGORIES[int(np.argmax(dist))]),
        lesions=lesions,
        labels=labels,
        fused_map=fused,
        geometry=geometry,
    )
