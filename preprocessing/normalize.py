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
    order statistics come from :func:`percentiles_linear` / :func:`median` (a radix select over the masked
    voxels, no copy), and the arithmetic from one
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
                values_dhw, (spec.lower_percentile, spec.upper_percentile), inside_fov, n_inside
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
                "median_inside_fov": median(values_dhw, inside_fov, n_inside) if n_inside else None,
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


#: below this many values the order statistics come from numpy directly (a histogram would not pay)
_RADIX_MIN_SIZE = 20_000
_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
#: the mask argument of an unmasked :func:`_radix_select` (never read)
_NO_MASK = np.zeros(1, dtype=np.bool_)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _radix_select(bits: np.ndarray, inside: np.ndarray, masked: bool, ranks: np.ndarray) -> tuple[np.ndarray, bool]:
    """The ``ranks``-th smallest (0-based, ascending ranks) of the float32 values whose bit patterns are ``bits``
    (1-D ``uint32`` view), only where ``inside`` when ``masked``; as bit patterns, exactly.

    Each value maps to a 32-bit key that orders like the float (sign flipped for positives, all bits for
    negatives). Pass 1 counts the top 16 key bits; the bins holding the ranks follow from the cumulative
    counts. Pass 2 counts the low 16 bits of the values in those bins only; the key of each rank -- hence
    its value -- follows. No copy, no partition: two streaming passes. Returns ``(bits of the order
    statistics, nan_found)``; with a NaN among the values the result is meaningless (the caller asks numpy).
    ``-0.0`` sorts below ``+0.0`` (numpy treats them as equal and may return either: the same value).
    """
    n_ranks = ranks.size
    out = np.zeros(n_ranks, dtype=np.uint32)
    high = np.zeros(65536, dtype=np.int64)
    for idx in range(bits.size):
        if masked and not inside[idx]:
            continue
        u = bits[idx]
        if (u & _ABS) > _INF_BITS:
            return out, True
        key = (u ^ np.uint32(0xFFFFFFFF)) if (u & _SIGN) else (u | _SIGN)
        high[key >> 16] += 1
    # the bin of every rank, and how many values lie in lower bins
    rank_bin = np.empty(n_ranks, dtype=np.int64)
    rank_below = np.empty(n_ranks, dtype=np.int64)
    slot_of_bin = np.full(65536, -1, dtype=np.int64)
    n_slots = 0
    below = 0
    b = 0
    for t in range(n_ranks):
        while below + high[b] <= ranks[t]:
            below += high[b]
            b += 1
        rank_bin[t] = b
        rank_below[t] = below
        if slot_of_bin[b] < 0:
            slot_of_bin[b] = n_slots
            n_slots += 1
    low = np.zeros((n_slots, 65536), dtype=np.int64)
    for idx in range(bits.size):
        if masked and not inside[idx]:
            continue
        u = bits[idx]
        key = (u ^ np.uint32(0xFFFFFFFF)) if (u & _SIGN) else (u | _SIGN)
        slot = slot_of_bin[key >> 16]
        if slot >= 0:
            low[slot, key & np.uint32(0xFFFF)] += 1
    for t in range(n_ranks):
        counts = low[slot_of_bin[rank_bin[t]]]
        seen = rank_below[t]
        lo = 0
        while seen + counts[lo] <= ranks[t]:
            seen += counts[lo]
            lo += 1
        key = np.uint32((rank_bin[t] << 16) | lo)
        out[t] = (key ^ _SIGN) if (key & _SIGN) else (key ^ np.uint32(0xFFFFFFFF))
    return out, False


def _radix_pays(x: np.ndarray, n: int) -> bool:
    """Whether :func:`order_statistics` takes the radix select for ``n`` selected values of ``x``."""
    return x.dtype == np.float32 and n >= _RADIX_MIN_SIZE


def _selected(x: np.ndarray, inside: np.ndarray | None) -> np.ndarray:
    """The values ``order_statistics`` works on, as a new 1-D array (numpy may reorder it)."""
    return np.array(x, order="C").reshape(-1) if inside is None else x[inside]


def _count(x: np.ndarray, inside: np.ndarray | None, count: int | None) -> int:
    """How many values ``x[inside]`` holds: ``count`` when the caller knows it, else counted once here."""
    if count is not None:
        return count
    return x.size if inside is None else int(np.count_nonzero(inside))


def order_statistics(
    x: np.ndarray, ranks: np.ndarray, inside: np.ndarray | None = None, count: int | None = None
) -> dict[int, Any] | None:
    """``{r: np.sort(v)[r]}`` for the given 0-based ranks, exactly, of ``v = x[inside]`` (all of ``x`` without a
    mask); ``None`` when a NaN is among them (numpy's sort puts NaN last; the callers ask numpy then).

    float32 arrays of at least ``_RADIX_MIN_SIZE`` values: :func:`_radix_select` (two passes over ``x``, no
    copy of the selected values); anything else: ``np.partition`` of the selected values.
    """
    wanted = np.unique(np.asarray(ranks, dtype=np.int64))
    n = _count(x, inside, count)
    if _radix_pays(x, n):
        flat = np.ascontiguousarray(x).reshape(-1)
        mask = np.ascontiguousarray(inside, dtype=np.bool_).reshape(-1) if inside is not None else _NO_MASK
        found, nan_found = _radix_select(flat.view(np.uint32), mask, inside is not None, wanted)
        if nan_found:
            return None
        values = found.view(np.float32)
        return {int(r): values[t] for t, r in enumerate(wanted)}
    v = _selected(x, inside)
    if v.size and np.isnan(v.max()):
        return None
    full = np.partition(v, wanted)
    return {int(r): full[r] for r in wanted}


def percentiles_linear(
    x: np.ndarray, q: Sequence[float], inside: np.ndarray | None = None, count: int | None = None
) -> list[float]:
    """``[float(v) for v in np.percentile(x[inside], q)]`` (method ``linear``; all of ``x`` without a mask),
    bit for bit.

    numpy computes the virtual index ``(n - 1) * q / 100``, partitions the values at its floor and floor + 1
    and interpolates with ``_lerp``. Here the same two order statistics come from :func:`order_statistics`
    and are interpolated with the same operations in the same dtypes. Percentiles at 0 or 100, selections
    too small for the radix select, other dtypes and NaN are left to ``np.percentile``. ``x`` is not
    modified.
    """
    qa = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    n = _count(x, inside, count)
    stats = None
    if _radix_pays(x, n) and bool(np.all((qa > 0) & (qa < 1))):
        virtual = (n - 1) * qa
        previous = np.floor(virtual).astype(np.intp)
        following = previous + 1
        gamma = virtual - previous
        stats = order_statistics(x, np.concatenate([previous, following]), inside, n)
    if stats is None:
        return [float(v) for v in np.percentile(_selected(x, inside), q, overwrite_input=True)]
    a = np.asarray([stats[int(r)] for r in previous], dtype=x.dtype)
    b = np.asarray([stats[int(r)] for r in following], dtype=x.dtype)
    # numpy.lib.function_base._lerp
    diff_b_a = np.subtract(b, a)
    result = np.asarray(np.add(a, diff_b_a * gamma))
    np.subtract(b, diff_b_a * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe", dtype=result.dtype)
    return [float(v) for v in result]


def median(x: np.ndarray, inside: np.ndarray | None = None, count: int | None = None) -> float:
    """``float(np.median(x[inside]))`` (all of ``x`` without a mask) bit for bit: the mean of the middle order
    statistic(s). ``x`` is not modified."""
    n = _count(x, inside, count)
    stats = None
    if _radix_pays(x, n):
        half = n // 2
        ranks = [half] if n % 2 else [half - 1, half]  # numpy's median: mean of the middle one or two
        stats = order_statistics(x, np.asarray(ranks, dtype=np.intp), inside, n)
    if stats is None:
        return float(np.median(_selected(x, inside), overwrite_input=True))
    return float(np.mean(np.asarray([stats[r] for r in ranks], dtype=x.dtype)))


def warm_up() -> None:
    """Compile (or load from numba's cache) the normalization kernels."""
    for spec in NORMALIZATION.values():
        normalize_channel(np.zeros((2, 2, 2), np.float32), np.ones((2, 2, 2), np.bool_), spec)
    order_statistics(np.zeros(_RADIX_MIN_SIZE, np.float32), np.asarray([0]))
