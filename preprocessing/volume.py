"""Volume assembly: sorted, geometry-checked 3D SimpleITK images from the frames of one series.

Slices are sorted by their position along the slice normal (``dot(IPP, normal)``), never by
InstanceNumber or file order. The series must have one orientation, one in-plane geometry, at least
two slices, no duplicate positions and uniform slice spacing (a gap that is a multiple of the spacing
is reported as missing slices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from preprocessing.dicom_io import FrameHeader, Ingested, decode_frames
from preprocessing.errors import InconsistentGeometryError, SingleSliceSeriesError


@dataclass(frozen=True)
class GeometryTolerance:
    """Tolerances of the geometry checks.

    Attributes:
        orientation: max absolute difference of direction cosines within a series.
        spacing_rel: max relative deviation of a slice gap from the nominal slice spacing.
        duplicate_mm: slices closer than this along the normal are duplicates.
        in_plane_rel: max in-plane offset between slice origins, relative to the smallest pixel spacing.
    """

    orientation: float = 1e-3
    spacing_rel: float = 0.05
    duplicate_mm: float = 1e-2
    in_plane_rel: float = 0.1


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of a sorted slice stack (array order ``[D, H, W]``)."""

    order: tuple[int, ...]  #: frame indices sorted along the normal
    origin_lps_mm: tuple[float, float, float]
    direction: tuple[float, ...]  #: 9 values row-major; columns = row dir (i), column dir (j), normal (k)
    spacing_mm_ijk: tuple[float, float, float]
    size_ijk: tuple[int, int, int]


def _orthonormal(orientation: Sequence[float]) -> np.ndarray:
    o = np.asarray(orientation, dtype=np.float64)
    r = o[:3] / np.linalg.norm(o[:3])
    c = o[3:] - np.dot(o[3:], r) * r
    c /= np.linalg.norm(c)
    n = np.cross(r, c)
    return np.stack([r, c, n], axis=1)  # columns: i, j, k directions


def slice_normal_of(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal (row direction x column direction) of an ImageOrientationPatient."""
    return _orthonormal(orientation)[:, 2]


def stack_geometry(
    frames: Sequence[FrameHeader], label: str, tol: GeometryTolerance = GeometryTolerance()
) -> StackGeometry:
    """Check and sort the frames of one series (headers only, nothing decoded).

    Raises:
        SingleSliceSeriesError: fewer than two frames.
        InconsistentGeometryError: missing geometry, mixed orientation/size/pixel spacing, duplicate
            positions, missing slices, non-uniform spacing or slice origins off the slice normal.
    """
    if len(frames) < 2:
        raise SingleSliceSeriesError(f"{label}: single-slice series, cannot build a 3D volume")
    for name, attr in (
        ("ImagePositionPatient", "position_lps_mm"),
        ("ImageOrientationPatient", "orientation"),
        ("PixelSpacing", "pixel_spacing_mm"),
    ):
        if any(getattr(f, attr) is None for f in frames):
            raise InconsistentGeometryError(f"{label}: missing {name} in some slices")
    if len({(f.rows, f.columns) for f in frames}) != 1:
        raise InconsistentGeometryError(f"{label}: slices have different Rows/Columns")
    ori = np.asarray([f.orientation for f in frames], dtype=np.float64)
    if np.max(np.abs(ori - ori[0])) > tol.orientation:
        raise InconsistentGeometryError(f"{label}: slices have different orientations (ImageOrientationPatient)")
    px = np.asarray([f.pixel_spacing_mm for f in frames], dtype=np.float64)
    if np.max(np.abs(px - px[0])) > 1e-3 * float(np.max(px[0])):
        raise InconsistentGeometryError(f"{label}: slices have different PixelSpacing")
    m = _orthonormal(ori[0])
    normal = m[:, 2]
    pos = np.asarray([f.position_lps_mm for f in frames], dtype=np.float64)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    d_sorted = dist[order]
    gaps = np.diff(d_sorted)
    if np.any(gaps < tol.duplicate_mm):
        k = int(np.argmax(gaps < tol.duplicate_mm))
        raise InconsistentGeometryError(
            f"{label}: duplicate slice positions ({int(np.sum(gaps < tol.duplicate_mm))} duplicate(s), "
            f"first at {d_sorted[k]:.2f} mm along the normal)"
        )
    nominal = float(np.min(gaps))
    dev = np.abs(gaps - nominal) / nominal
    if np.max(dev) > tol.spacing_rel:
        ratio = gaps / nominal
        multiples = np.abs(ratio - np.round(ratio)) <= tol.spacing_rel
        if np.all(multiples):
            missing = int(np.sum(np.round(ratio) - 1))
            k = int(np.argmax(ratio > 1 + tol.spacing_rel))
            raise InconsistentGeometryError(
                f"{label}: {missing} missing slice(s) (gap of {gaps[k]:.2f} mm after slice {k}, "
                f"nominal spacing {nominal:.2f} mm)"
            )
        raise InconsistentGeometryError(
            f"{label}: non-uniform slice spacing ({float(np.min(gaps)):.2f}..{float(np.max(gaps)):.2f} mm)"
        )
    rel = pos[order] - pos[order[0]]
    off_normal = rel - np.outer(rel @ normal, normal)
    if np.max(np.linalg.norm(off_normal, axis=1)) > tol.in_plane_rel * float(np.min(px[0])):
        raise InconsistentGeometryError(
            f"{label}: slice origins are not on a line along the slice normal (sheared/tilted stack)"
        )
    spacing_k = float(np.mean(gaps))
    f0 = frames[int(order[0])]
    row_spacing, col_spacing = px[0]
    return StackGeometry(
        order=tuple(int(i) for i in order),
        origin_lps_mm=tuple(float(v) for v in pos[order[0]]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in m.reshape(-1)),
        spacing_mm_ijk=(float(col_spacing), float(row_spacing), spacing_k),
        size_ijk=(f0.columns, f0.rows, len(frames)),
    )


@dataclass
class Volume:
    """One sequence as a 3D image in patient space."""

    array: np.ndarray  #: float32 ``[D, H, W]``, rescaled values (slices the grid does not read may be 0)
    geometry: StackGeometry

    @property
    def image(self) -> sitk.Image:
        """The volume as a SimpleITK image (a copy, built on each access; the pipeline does not need one)."""
        return image_from_array(self.array, self.geometry)

    def to_meta(self) -> dict[str, Any]:
        return {
            "size_ijk": list(self.geometry.size_ijk),
            "spacing_mm_ijk": [round(v, 6) for v in self.geometry.spacing_mm_ijk],
            "origin_lps_mm": [round(v, 4) for v in self.geometry.origin_lps_mm],
            "direction": [round(v, 6) for v in self.geometry.direction],
        }


def image_from_array(array_dhw: np.ndarray, geometry: StackGeometry) -> sitk.Image:
    """SimpleITK image from a ``[D, H, W]`` array and its :class:`StackGeometry`."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_dhw, dtype=np.float32))
    img.SetOrigin(geometry.origin_lps_mm)
    img.SetSpacing(geometry.spacing_mm_ijk)
    img.SetDirection(geometry.direction)
    return img


def build_volume(
    ingested: Ingested,
    frames: Sequence[FrameHeader],
    label: str,
    tol: GeometryTolerance = GeometryTolerance(),
    geometry: StackGeometry | None = None,
) -> Volume:
    """Check geometry, decode (only these frames), rescale, and assemble a float32 :class:`Volume`."""
    geometry = geometry or stack_geometry(frames, label, tol)
    sorted_frames = [frames[i] for i in geometry.order]
    array = decode_frames(ingested, sorted_frames)
    return Volume(array=array, geometry=geometry)
