"""Intensity harmonization per :data:`contract.NORMALIZATION`.

* Percentile scaling (T2W, DWI): the lower/upper percentiles of the grid voxels that lie inside the
  source field of view map to 0/1; the result is clipped to ``[clip_min, clip_max]``.
* Fixed scaling (ADC, stored in 1e-6 mm^2/s): ``x / divisor`` clipped to ``[clip_min, clip_max]``.

Grid voxels outside the source field of view are set to :data:`OUTSIDE_FOV_VALUE` after scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contract import OUTSIDE_FOV_VALUE, FixedScaleNormalization, NormalizationSpec, PercentileNormalization


def normalize_channel(
    values_dhw: np.ndarray, inside_fov: np.ndarray, spec: NormalizationSpec
) -> tuple[np.ndarray, dict[str, Any]]:
    """Normalize one resampled channel.

    Args:
        values_dhw: float32 ``[D, H, W]`` resampled intensities (physical units for ADC).
        inside_fov: bool ``[D, H, W]``, grid voxels inside the source field of view.
        spec: the contract normalization of this sequence.

    Returns:
        ``(normalized float32 [D, H, W], params)`` where ``params`` records the values actually used.
    """
    inside = values_dhw[inside_fov]
    params: dict[str, Any] = {"kind": spec.kind, "inside_fov_fraction": round(float(inside_fov.mean()), 6)}
    if isinstance(spec, PercentileNormalization):
        if inside.size == 0:
            lo = hi = 0.0
        else:
            lo, hi = (float(v) for v in np.percentile(inside, [spec.lower_percentile, spec.upper_percentile]))
        scale = hi - lo
        degenerate = not scale > 1e-6 * max(abs(hi), abs(lo), 1.0)
        if degenerate:
            scale = 1.0
        out = (values_dhw - np.float32(lo)) * np.float32(1.0 / scale)
        params.update(
            {
                "lower_percentile": spec.lower_percentile,
                "upper_percentile": spec.upper_percentile,
                "lower_value": lo,
                "upper_value": hi,
                "degenerate": degenerate,
            }
        )
    elif isinstance(spec, FixedScaleNormalization):
        out = values_dhw * np.float32(1.0 / spec.divisor)
        params.update(
            {
                "divisor": spec.divisor,
                "unit": spec.unit,
                "median_inside_fov": float(np.median(inside)) if inside.size else None,
            }
        )
    else:  # pragma: no cover - the contract defines only the two kinds
        raise TypeError(f"unknown normalization {spec!r}")
    np.clip(out, spec.clip_min, spec.clip_max, out=out)
    out[~inside_fov] = OUTSIDE_FOV_VALUE
    params.update({"clip_min": spec.clip_min, "clip_max": spec.clip_max, "outside_fov_value": OUTSIDE_FOV_VALUE})
    return out.astype(np.float32, copy=False), params
