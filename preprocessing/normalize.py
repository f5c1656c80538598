"""Intensity harmonization per :data:`contract.NORMALIZATION`.

* Percentile scaling (T2W, DWI): the lower/upper percentiles of the grid voxels that lie inside the
  source field of view map to 0/1; the result is clipped to ``[clip_min, clip_max]``.
* Fixed scaling (ADC, stored in 1e-6 mm^2/s): ``x / divisor`` clipped to ``[clip_min, clip_max]``.

Grid voxels outside the source field of view are set to :data:`OUTSIDE_FOV_VALUE` after scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from contract import (
    NORMALIZATION,
    OUTSIDE_FOV_VALUE,
    FixedScaleNormalization,
    NormalizationSpec,
    PercentileNormalization,
)


def normalize_channel(
    values_dhw: np.ndarray, inside_fov: np.ndarray, spec: NormalizationSpec, out: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Normalize one resampled channel.

    Args:
        values_dhw: float32 ``[D, H, W]`` resampled intensities (physical units for ADC).
        inside_fov: bool ``[D, H, W]``, grid voxels inside the source field of view.
        spec: the contract normalization of this sequence.
        out: float32 ``[D, H, W]`` to write the result into (may be ``values_dhw`` itself); a new array if
            ``None``.

    Returns:
        ``(normalized float32 [D, H, W], params)`` where ``params`` records the values actually used.

    The result is the definition above computed with numpy (``np.percentile`` / ``np.median`` of the inside
    voxels, float32 ``np.subtract``, ``np.multiply``, ``np.clip``, then the outside value), bit for bit: the
    order statistics come from :func:`percentiles_linear` / :func:`median`, and the arithmetic from one
    compiled pass (:func:`_scale_clip`) with numpy's float32 operations and its ``clip`` semantics.
    """
    if values_dhw.dtype != np.float32 or not values_dhw.flags.c_contiguous:
        values_dhw = np.ascontiguousarray(values_dhw, dtype=np.float32)
    inside_fov = np.ascontiguousarray(inside_fov, dtype=np.bool_)
    n_inside = int(np.count_nonzero(inside_fov))
    params: dict[str, Any] = {
        "kind": spec.kind,
        "inside_fov_fraction": round(n_inside / inside_fov.size, 6),
    }
    if out is None:
        out = np.empty(values_dhw.shape, dtype=np.float32)
    if isinstance(spec, PercentileNormalization):
        if n_inside == 0:
            lo = hi = 0.0
        else:
            lo, hi = percentiles_linear(
                _inside_values(values_dhw, inside_fov, n_inside), (spec.lower_percentile, spec.upper_percentile)
            )
        scale = hi - lo
        degenerate = not scale > 1e-6 * max(abs(hi), abs(lo), 1.0)
        if degenerate:
            scale = 1.0
        offset, factor = np.float32(lo), np.float32(1.0 / scale)
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
        offset, factor = np.float32(0.0), np.float32(1.0 / spec.divisor)  # x - 0.0 is x, bit for bit
        params.update(
            {
                "divisor": spec.divisor,
                "unit": spec.unit,
                "median_inside_fov": median(_inside_values(values_dhw, inside_fov, n_inside)) if n_inside else None,
            }
        )
    else:  # pragma: no cover - the contract defines only the two kinds
        raise TypeError(f"unknown normalization {spec!r}")
    _scale_clip(
        values_dhw.reshape(-1),
        inside_fov.reshape(-1),
        out.reshape(-1),
        offset,
        factor,
        np.float32(spec.clip_min),
        np.float32(spec.clip_max),
        np.float32(OUTSIDE_FOV_VALUE),
    )
    params.update({"clip_min": spec.clip_min, "clip_max": spec.clip_max, "outside_fov_value": OUTSIDE_FOV_VALUE})
    return out, params


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _scale_clip(
    values: np.ndarray,
    inside: np.ndarray,
    out: np.ndarray,
    offset: np.float32,
    factor: np.float32,
    clip_min: np.float32,
    clip_max: np.float32,
    outside: np.float32,
) -> None:
    """``out = clip((values - offset) * factor, clip_min, clip_max)`` in float32,
    ``outside`` where not ``inside``: numpy's ufuncs fused into one pass. ``np.clip`` on floats is
    ``min(max(x, lo), hi)`` with ``max(a, b) = a if isnan(a) or a > b else b`` (and ``min`` alike), kept
    here to the sign of zero."""
    for idx in range(values.size):
        if not inside[idx]:
            out[idx] = outside
            continue
        x = (values[idx] - offset) * factor
        if not (np.isnan(x) or x > clip_min):
            x = clip_min
        if not (np.isnan(x) or x < clip_max):
            x = clip_max
        out[idx] = x


def _inside_values(values_dhw: np.ndarray, inside: np.ndarray, n_inside: int) -> np.ndarray:
    """``values_dhw[inside]`` as a new 1-D array (the order statistics reorder it); all inside (e.g. T2W on
    its own grid): the same values in the same (C) order by a plain copy."""
    if n_inside == inside.size:
        return np.array(values_dhw, dtype=values_dhw.dtype, order="C").reshape(-1)
    return values_dhw[inside]


#: below this many values the order statistics come from numpy's full partition directly
_CANDIDATE_MIN_SIZE = 20_000
#: size of the strided sample that places the candidate thresholds
_SAMPLE_SIZE = 8192


def percentiles_linear(x: np.ndarray, q: Sequence[float]) -> list[float]:
    """``[float(v) for v in np.percentile(x, q)]`` (method ``linear``), bit for bit, without a full partition.

    ``x`` is a 1-D array that may be reordered. numpy computes the virtual index ``(n - 1) * q / 100``,
    partitions the array at its floor and floor + 1 and interpolates with ``_lerp``. Here the same two order
    statistics are taken from candidate subsets (:func:`order_statistics`) and interpolated with the same
    operations in the same dtypes. Falls back to ``np.percentile`` for small inputs, percentiles at 0 or
    100 and NaN.
    """
    n = x.size
    qa = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    if n < _CANDIDATE_MIN_SIZE or not bool(np.all((qa > 0) & (qa < 1))) or np.isnan(x.min()):
        return [float(v) for v in np.percentile(x, q, overwrite_input=True)]
    virtual = (n - 1) * qa
    previous = np.floor(virtual).astype(np.intp)
    following = previous + 1
    gamma = virtual - previous
    stats = order_statistics(x, np.concatenate([previous, following]))
    a = np.asarray([stats[int(r)] for r in previous], dtype=x.dtype)
    b = np.asarray([stats[int(r)] for r in following], dtype=x.dtype)
    # numpy.lib.function_base._lerp
    diff_b_a = np.subtract(b, a)
    result = np.asarray(np.add(a, diff_b_a * gamma))
    np.subtract(b, diff_b_a * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe", dtype=result.dtype)
    return [float(v) for v in result]


def median(x: np.ndarray) -> float:
    """``float(np.median(x))`` bit for bit (``x`` 1-D, may be reordered): mean of the middle order statistic(s)."""
    n = x.size
    if n < _CANDIDATE_MIN_SIZE or np.isnan(x.min()):
        return float(np.median(x, overwrite_input=True))
    half = n // 2
    ranks = [half] if n % 2 else [half - 1, half]  # numpy's median: mean of the middle one or two
    stats = order_statistics(x, np.asarray(ranks, dtype=np.intp))
    return float(np.mean(np.asarray([stats[r] for r in ranks], dtype=x.dtype)))


def order_statistics(x: np.ndarray, ranks: np.ndarray) -> dict[int, Any]:
    """``{r: np.sort(x)[r]}`` for the given 0-based ranks, exactly, for a 1-D array without NaN.

    Each cluster of nearby ranks is taken from a band of candidates ``x[(x >= t1) & (x <= t2)]`` whose
    thresholds come from a strided sample. With ``below`` values ``< t1`` (all smaller than every candidate,
    and every value ``> t2`` larger), the r-th smallest of ``x`` is the ``(r - below)``-th smallest of the band
    whenever ``below <= r < below + band.size`` -- checked by counting; otherwise the whole array is
    partitioned. So the result is exact; only the partition is smaller (about 2 % of the values for a 1/99
    percentile instead of all of them).
    """
    n = x.size
    wanted = np.unique(np.asarray(ranks, dtype=np.intp))
    out: dict[int, Any] = {}
    stride = max(1, n // _SAMPLE_SIZE)
    sample = np.sort(x[::stride])
    m = sample.size
    clusters: list[list[int]] = []
    for r in (int(v) for v in wanted):
        if clusters and r - clusters[-1][-1] <= n // 1000:
            clusters[-1].append(r)
        else:
            clusters.append([r])
    for cluster in clusters:
        f_lo, f_hi = cluster[0] / n, (cluster[-1] + 1) / n
        k_lo = int(f_lo * m - 4.0 * np.sqrt(f_lo * m) - 16)
        k_hi = int(f_hi * m + 4.0 * np.sqrt(f_hi * m) + 16)
        band_mask: np.ndarray | None = None
        below = 0
        if k_lo > 0 and f_lo > 0.05:  # near the ends one bound suffices (one pass less)
            band_mask = x >= sample[k_lo]
            below = n - int(np.count_nonzero(band_mask))
        if k_hi < m - 1 and f_hi < 0.95:
            upper = x <= sample[k_hi]
            band_mask = upper if band_mask is None else np.logical_and(band_mask, upper, out=upper)
        band = x[band_mask] if band_mask is not None else x.copy()
        local = np.asarray(cluster, dtype=np.intp) - below
        if local[0] < 0 or local[-1] >= band.size:
            full = np.partition(x, wanted)
            return {int(i): full[i] for i in wanted}
        band.partition(local)
        out.update({r: band[r - below] for r in cluster})
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the normalization kernel."""
    for spec in NORMALIZATION.values():
        normalize_channel(np.zeros((2, 2, 2), np.float32), np.ones((2, 2, 2), np.bool_), spec)
