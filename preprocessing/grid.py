"""Geometric harmonization: the model grid (contract.GridSpec) placed on the T2W volume, and resampling onto it.

The grid takes T2W's direction, is centred on the centre of the T2W volume, and has the size/spacing of
the :class:`~contract.GridSpec`. Every sequence is resampled straight onto this small grid in
physical (LPS) space with SimpleITK, so oblique and differently spaced series are handled alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from contract import DEFAULT_GRID, GridGeometry, GridSpec


def grid_geometry_for(reference: sitk.Image, spec: GridSpec = DEFAULT_GRID) -> GridGeometry:
    """Model grid aligned with ``reference`` (T2W) and centred on the centre of its voxel box."""
    return grid_geometry_of(
        reference.GetOrigin(), reference.GetDirection(), reference.GetSpacing(), reference.GetSize(), spec
    )


def grid_geometry_of(
    origin_lps_mm: Sequence[float],
    direction: Sequence[float],
    spacing_mm_ijk: Sequence[float],
    size_ijk: Sequence[int],
    spec: GridSpec = DEFAULT_GRID,
) -> GridGeometry:
    """:func:`grid_geometry_for` from the reference's geometry alone (origin, 9 direction values row-major,
    spacing and size in ``(i, j, k)`` order), e.g. a :class:`~preprocessing.volume.StackGeometry` before its
    pixels are decoded. The same floats give the same grid."""
    direction_m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    ref_size = np.asarray(size_ijk, dtype=np.float64)
    ref_spacing = np.asarray(spacing_mm_ijk, dtype=np.float64)
    centre = np.asarray(origin_lps_mm) + direction_m @ (ref_spacing * (ref_size - 1) / 2.0)
    grid_size = tuple(int(v) for v in spec.size_dhw[::-1])
    spacing_ijk = np.asarray(spec.spacing_mm_dhw[::-1], dtype=np.float64)
    origin: np.ndarray = centre - direction_m @ (spacing_ijk * (np.asarray(grid_size, dtype=np.float64) - 1) / 2.0)
    return GridGeometry(
        origin_lps_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction_m.reshape(-1)),
        spacing_mm_ijk=tuple(float(v) for v in spacing_ijk),  # type: ignore[arg-type]
        size_ijk=grid_size,  # type: ignore[arg-type]
    )


def source_slices_needed(
    origin_lps_mm: Sequence[float],
    direction: Sequence[float],
    spacing_mm_ijk: Sequence[float],
    size_ijk: Sequence[int],
    geometry: GridGeometry,
    tolerance: float = 1e-3,
) -> tuple[int, int]:
    """Slices ``[start, stop)`` of a source volume that linear resampling onto ``geometry`` can read.

    The source's continuous slice index is affine in the grid index, so over the grid it lies between its
    values at the 8 corners. The linear interpolator reads slices ``floor(k)`` and ``floor(k) + 1`` of a
    source index ``k`` (clamped to the volume). The range is widened by ``tolerance`` (in slices) on each
    side, far more than any rounding difference between this float64 computation and the resampler's
    (~1e-12 slices), so slices outside it are never read and need not be decoded. ``(0, 0)`` when the grid
    lies wholly before or behind the volume.
    """
    src_dir = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    src_spacing = np.asarray(spacing_mm_ijk, dtype=np.float64)
    offset = (
        (np.asarray(geometry.origin_lps_mm) - np.asarray(origin_lps_mm, dtype=np.float64)) @ src_dir
    ) / src_spacing
    steps = ((geometry.direction_matrix * np.asarray(geometry.spacing_mm_ijk)).T @ src_dir) / src_spacing
    last = np.asarray(geometry.size_ijk, dtype=np.float64) - 1
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64) * last
    k = offset[2] + corners @ steps[:, 2]
    n = int(size_ijk[2])
    if not np.all(np.isfinite(k)):
        return 0, n
    start = max(int(np.floor(k.min() - tolerance)), 0)
    stop = min(int(np.floor(k.max() + tolerance)) + 2, n)
    return (start, stop) if start < stop else (0, 0)


def grid_image(geometry: GridGeometry, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
    """An all-zero SimpleITK image with the grid geometry (reference for resampling)."""
    img = sitk.Image([int(v) for v in geometry.size_ijk], pixel_type)
    img.SetOrigin(geometry.origin_lps_mm)
    img.SetSpacing(geometry.spacing_mm_ijk)
    img.SetDirection(geometry.direction)
    return img


def array_to_grid_image(array_dhw: np.ndarray, geometry: GridGeometry) -> sitk.Image:
    """Wrap a ``[D, H, W]`` array on the grid as a SimpleITK image (e.g. to write NIfTI)."""
    expected = tuple(geometry.size_ijk[::-1])
    if tuple(array_dhw.shape) != expected:
        raise ValueError(f"array shape {array_dhw.shape} does not match grid (D, H, W) {expected}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_dhw))
    img.SetOrigin(geometry.origin_lps_mm)
    img.SetSpacing(geometry.spacing_mm_ijk)
    img.SetDirection(geometry.direction)
    return img


def _resample(
    image: sitk.Image, geometry: GridGeometry, interpolator: int, default: float, pixel_type: int
) -> sitk.Image:
    # One thread per call: concurrent service calls and the pipeline's channel threads must not oversubscribe.
    # The output grid is set directly (no all-zero reference image is allocated for it).
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in geometry.size_ijk])
    f.SetOutputOrigin(geometry.origin_lps_mm)
    f.SetOutputSpacing(geometry.spacing_mm_ijk)
    f.SetOutputDirection(geometry.direction)
    f.SetTransform(sitk.Transform())
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(default)
    f.SetOutputPixelType(pixel_type)
    f.SetNumberOfThreads(1)
    return f.Execute(image)


def resample_to_grid(image: sitk.Image, geometry: GridGeometry, default_value: float = 0.0) -> np.ndarray:
    """Linear resampling of ``image`` onto the grid in physical space. Returns float32 ``[D, H, W]``.

    Grid voxels outside the image get ``default_value``.
    """
    return sitk.GetArrayFromImage(resample_to_grid_image(image, geometry, default_value))


def resample_to_grid_image(image: sitk.Image, geometry: GridGeometry, default_value: float = 0.0) -> sitk.Image:
    """:func:`resample_to_grid` as a float32 SimpleITK image (``sitk.GetArrayViewFromImage`` reads it uncopied)."""
    return _resample(image, geometry, sitk.sitkLinear, float(default_value), sitk.sitkFloat32)


def resample_label_to_grid(label: sitk.Image, geometry: GridGeometry) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto the grid. Returns uint8 ``[D, H, W]`` (0 outside)."""
    return sitk.GetArrayFromImage(_resample(label, geometry, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8))


def inside_fov_mask(image: sitk.Image, geometry: GridGeometry) -> np.ndarray:
    """Boolean ``[D, H, W]``: grid voxels whose centre lies inside ``image``'s field of view.

    Inside means the continuous source index lies in ``[-0.5, size - 0.5]`` on every axis (the voxel box),
    the same region in which the linear interpolator returns image values.

    The continuous source index of voxel ``(k, j, i)`` along source axis ``a`` is computed in float64 as
    ``plane[k, j, a] + ci[i, a]`` with ``plane = offset + ck + cj`` and ``ci = i * step_i`` (the definition).
    For one grid row ``(k, j)`` that expression is monotone in ``i`` (float multiplication and addition
    round monotonically), so each of the six comparisons holds on a prefix or a suffix of the row and the
    inside voxels of a row form one interval. The interval ends are estimated by division and then
    corrected by evaluating the defining expression at the ends (:func:`_first_true`), so the mask equals
    the voxel-wise evaluation bit for bit (``tests/test_preprocess_equivalence.py``) at the cost of two
    comparisons per voxel instead of fifteen array operations.
    """
    src_dir = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    src_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    offset, steps = _source_index_affine(image, geometry, src_dir, src_spacing)
    size_i, size_j, size_k = geometry.size_ijk
    ci = np.arange(size_i)[:, None] * steps[0]  # [W, 3]
    cj = np.arange(size_j)[None, :, None] * steps[1]
    ck = np.arange(size_k)[:, None, None] * steps[2]
    plane = offset + ck + cj  # [D, H, 3]
    size = np.asarray(image.GetSize(), dtype=np.float64)
    eps = 1e-6
    lower = -0.5 - eps
    upper = size - 0.5 + eps
    start = np.zeros((size_k, size_j), dtype=np.intp)  # first inside index of each row
    end = np.full((size_k, size_j), size_i, dtype=np.intp)  # one past the last inside index
    for axis in range(3):
        p = plane[..., axis]
        c = ci[:, axis]
        s = float(steps[0][axis])
        ge_lower = lambda idx, p=p, c=c: p + c[idx] >= lower  # noqa: E731
        le_upper = lambda idx, p=p, c=c, u=upper[axis]: p + c[idx] <= u  # noqa: E731
        not_ge_lower = lambda idx, f=ge_lower: ~f(idx)  # noqa: E731
        not_le_upper = lambda idx, f=le_upper: ~f(idx)  # noqa: E731
        if s > 0:  # source index increases along the row
            start = np.maximum(start, _first_true(ge_lower, (lower - p) / s, size_i, ceil=True))
            end = np.minimum(end, _first_true(not_le_upper, (upper[axis] - p) / s, size_i, ceil=False))
        elif s < 0:
            end = np.minimum(end, _first_true(not_ge_lower, (lower - p) / s, size_i, ceil=False))
            start = np.maximum(start, _first_true(le_upper, (upper[axis] - p) / s, size_i, ceil=True))
        else:  # constant along the row: all or nothing
            zero = np.zeros(p.shape, dtype=np.intp)
            row_inside = ge_lower(zero) & le_upper(zero)
            end = np.where(row_inside, end, 0)
    index = np.arange(size_i, dtype=np.intp)
    inside: np.ndarray = index >= start[..., None]
    inside &= index < end[..., None]
    return inside


def _source_index_affine(
    image: sitk.Image, geometry: GridGeometry, src_dir: np.ndarray, src_spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Source continuous index = offset + sum over grid axes a of step[a] * index[a] (affine, separable)."""
    grid_dir = geometry.direction_matrix
    offset = ((np.asarray(geometry.origin_lps_mm) - np.asarray(image.GetOrigin())) @ src_dir) / src_spacing
    steps = ((grid_dir * np.asarray(geometry.spacing_mm_ijk)).T @ src_dir) / src_spacing  # [grid axis, src axis]
    return offset, steps


def _first_true(pred: Any, estimate: np.ndarray, n: int, ceil: bool) -> np.ndarray:
    """Per row, the first index in ``[0, n]`` at which the non-decreasing predicate ``pred`` holds (``n``: never).

    ``estimate`` is the real-valued crossing point (``ceil``: it is the first true index when rounded up,
    else the last false one when rounded down). It is only a starting point: the result is corrected by
    evaluating ``pred`` itself, so rounding in the estimate cannot change it.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        est = np.ceil(estimate) if ceil else np.floor(estimate) + 1.0
    est = np.nan_to_num(est, nan=0.0, posinf=float(n), neginf=0.0)
    t = np.clip(est, 0, n).astype(np.intp)
    for _ in range(n + 1):
        down = (t > 0) & pred(np.maximum(t - 1, 0))  # the previous index already holds: move down
        up = (t < n) & ~pred(np.minimum(t, n - 1))  # this index does not hold yet: move up
        if not (down.any() or up.any()):
            break
        t = t - down + up
    return t
