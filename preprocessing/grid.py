"""Geometric harmonization: the model grid (contract.GridSpec) placed on the T2W volume, and resampling onto it.

The grid takes T2W's direction, is centred on the centre of the T2W volume, and has the size/spacing of
the :class:`~contract.GridSpec`. Every sequence is resampled straight onto this small grid in
physical (LPS) space (:mod:`preprocessing.linear_resample`), so oblique and differently spaced series are
handled alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from contract import DEFAULT_GRID, GridGeometry, GridSpec
from preprocessing.linear_resample import resample_with_mask, source_index_affine


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
    source index ``k`` (clamped to the volume). The index map is the resampler's own
    (:func:`preprocessing.linear_resample.source_index_affine`); the range is widened by ``tolerance`` (in
    slices) on each side, far more than the rounding of the corner sums (~1e-12 slices), so slices outside
    it are never read and need not be decoded. ``(0, 0)`` when the grid lies wholly before or behind the
    volume.
    """
    offset, steps = source_index_affine(origin_lps_mm, direction, spacing_mm_ijk, geometry)
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


def resample_to_grid(image: sitk.Image, geometry: GridGeometry, default_value: float = 0.0) -> np.ndarray:
    """Linear resampling of ``image`` onto the grid in physical space. Returns float32 ``[D, H, W]``.

    Grid voxels outside the image's field of view (:func:`inside_fov_mask`) get ``default_value``. The
    compiled resampler of :mod:`preprocessing.linear_resample` (ITK's linear interpolation).
    """
    return resample_with_mask(image, geometry, default_value)[0]


def resample_label_to_grid(label: sitk.Image, geometry: GridGeometry) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto the grid. Returns uint8 ``[D, H, W]`` (0 outside)."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in geometry.size_ijk])
    f.SetOutputOrigin(geometry.origin_lps_mm)
    f.SetOutputSpacing(geometry.spacing_mm_ijk)
    f.SetOutputDirection(geometry.direction)
    f.SetTransform(sitk.Transform())
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(sitk.sitkUInt8)
    f.SetNumberOfThreads(1)
    return sitk.GetArrayFromImage(f.Execute(label))


def inside_fov_mask(image: sitk.Image, geometry: GridGeometry) -> np.ndarray:
    """Boolean ``[D, H, W]``: grid voxels whose centre lies inside ``image``'s field of view.

    Inside means the continuous source index lies in ``[-0.5 - 1e-6, size - 0.5 + 1e-6]`` on every axis (the
    voxel box), the region in which the linear interpolator returns image values. The continuous source
    index of voxel ``(k, j, i)`` along source axis ``a`` is computed in float64 as
    ``((offset[a] + k * step_k[a]) + j * step_j[a]) + i * step_i[a]``
    (:func:`preprocessing.linear_resample.source_index_affine`). Computed by the resampler, in its pass.
    """
    return resample_with_mask(image, geometry)[1]
