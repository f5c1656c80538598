"""Trivial, training-free baselines on the preprocessed model-grid tensor (the networks' own input).

``adc_min`` (the reported ``baseline_*`` metrics; "low ADC near the centre is suspicious"):

1. smooth the ADC channel (T2W when ADC is missing) with a Gaussian (sigma 1 voxel),
2. keep a central ellipsoid of the grid (:data:`CENTRAL_SEMI_AXES_MM_DHW`: inside the gland of a
   prostate-centred field of view) and ignore voxels at or below :data:`MIN_VALID_VALUE`
   (no signal: background/fat that the ADC fit sets to ~0),
3. likelihood ``= clip(1 - value / median(value in the region), 0, 1)``.

The patient score is the maximum of the map, i.e. ``-min(smoothed ADC)`` up to a per-case scale.

``dwi_max`` (reported as ``baseline_dwi_*``; a stronger heuristic): the smoothed high-b DWI channel
in the same ellipsoid, ``clip(value / 1.5, 0, 1)`` (1.5 = the contract's percentile clip maximum).

Both maps are turned into lesion candidates with the same :func:`postprocessing.candidates.extract_candidates`
as the networks and scored by the same ``picai_eval`` call.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from contract import DEFAULT_GRID, NORMALIZATION, GridSpec, sequence_index

#: semi-axes (mm) of the central ellipsoid searched, along (D, H, W)
CENTRAL_SEMI_AXES_MM_DHW: tuple[float, float, float] = (12.0, 15.0, 15.0)
#: normalized ADC at or below this is background (no signal / fat), not "low ADC"
MIN_VALID_VALUE: float = 0.2
SMOOTHING_SIGMA_VOXELS: float = 1.0
BASELINES: tuple[str, ...] = ("adc_min", "dwi_max")


def central_ellipsoid_mask(
    shape_dhw: tuple[int, ...],
    grid: GridSpec = DEFAULT_GRID,
    semi_axes_mm_dhw: tuple[float, float, float] = CENTRAL_SEMI_AXES_MM_DHW,
) -> np.ndarray:
    """Boolean ``[D, H, W]`` mask of the ellipsoid centred in the grid with the given semi-axes (mm)."""
    idx = np.indices(shape_dhw, dtype=np.float64)
    r2 = np.zeros(shape_dhw)
    for axis, (n, spacing, semi) in enumerate(zip(shape_dhw, grid.spacing_mm_dhw, semi_axes_mm_dhw, strict=True)):
        r2 += (((idx[axis] - (n - 1) / 2.0) * spacing) / semi) ** 2
    return r2 <= 1.0


def _smooth(channel: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(channel.astype(np.float64), SMOOTHING_SIGMA_VOXELS)


def baseline_likelihood_map(images: np.ndarray, availability: np.ndarray, rule: str = "adc_min") -> np.ndarray:
    """Baseline lesion likelihood ``[D, H, W]`` in [0, 1] from one case's ``images [S, D, H, W]``.

    Args:
        images: normalized model input ``[S, D, H, W]``.
        availability: ``[S]``, 1 = present.
        rule: ``"adc_min"`` or ``"dwi_max"`` (see the module docstring); falls back to T2W when the
            needed sequence is missing.
    """
    shape = images.shape[1:]
    region = central_ellipsoid_mask(shape)
    out = np.zeros(shape, dtype=np.float32)
    if rule == "dwi_max" and availability[sequence_index("dwi")] > 0.5:
        clip_max = float(NORMALIZATION["dwi"].clip_max)
        out[region] = np.clip(_smooth(images[sequence_index("dwi")])[region] / clip_max, 0.0, 1.0)
        return out
    if rule not in BASELINES:
        raise ValueError(f"unknown baseline rule {rule!r}; choose from {BASELINES}")
    channel = "adc" if availability[sequence_index("adc")] > 0.5 else "t2w"
    smooth = _smooth(images[sequence_index(channel)])
    valid = region & (smooth > MIN_VALID_VALUE)
    if not valid.any():
        return out
    reference = float(np.median(smooth[valid]))
    out[valid] = np.clip(1.0 - smooth[valid] / reference, 0.0, 1.0)
    return out


def baseline_score(images: np.ndarray, availability: np.ndarray, rule: str = "adc_min") -> float:
    """Patient-level baseline score (higher = more suspicious): the maximum of :func:`baseline_likelihood_map`."""
    return float(baseline_likelihood_map(images, availability, rule).max())
