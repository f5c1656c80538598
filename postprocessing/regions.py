"""The reported region of each lesion: a blob smaller than the smallest reportable lesion is grown to it.

A map that answers a lesion with a narrow peak gives a blob of a few voxels (on the default grid 2-17 voxels,
13-115 mm^3) centred on a lesion of 7-13 mm: its centre is right, but its region is too small to show the lesion
in a SEG or to overlap it by PI-CAI's IoU of 0.1. :func:`grow_small_regions` grows such a region, one voxel at a
time, along the map the candidate came from (the highest neighbouring voxel first), to
``CandidateSettings.min_region_mm3``; the candidate's centre, likelihood and category stay the blob's.

Torch-free; the served path (:func:`postprocessing.report.build_findings`) calls it after the lesions are scored.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: the region grows through face neighbours (6-connected)
_FACES = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: no region may touch another (26-connected), so the label map stays a valid PI-CAI detection map
_TOUCH = np.ones((3, 3, 3), dtype=bool)


def min_region_voxels(min_region_mm3: float | None, voxel_volume_mm3: float) -> int:
    """The voxel count a region must reach: ``ceil(min_region_mm3 / voxel_volume_mm3)`` (0: no growth)."""
    if min_region_mm3 is None or min_region_mm3 <= 0:
        return 0
    if voxel_volume_mm3 <= 0:
        raise ValueError(f"voxel_volume_mm3 must be positive, got {voxel_volume_mm3}")
    return int(math.ceil(min_region_mm3 / voxel_volume_mm3 - 1e-9))


def grow_region(region: np.ndarray, values: np.ndarray, forbidden: np.ndarray, min_voxels: int) -> np.ndarray:
    """``region`` grown to ``min_voxels`` voxels along ``values``.

    A priority flood: of the voxels face-adjacent to the region, neither forbidden nor in it, the one of highest
    ``values`` joins first (ties: the lowest raster index), until the region holds ``min_voxels`` voxels or no
    voxel can join.

    Args:
        region: bool ``[D, H, W]``, the blob (not empty).
        values: ``[D, H, W]`` the map the blob came from.
        forbidden: bool ``[D, H, W]``, voxels the region may not take.
        min_voxels: the size to reach.

    Returns:
        A new bool ``[D, H, W]`` mask that contains ``region``.
    """
    grown = np.array(region, dtype=bool, copy=True)
    count = int(grown.sum())
    if count == 0:
        raise ValueError("cannot grow an empty region")
    if count >= min_voxels:
        return grown
    shape = grown.shape
    queued = grown | forbidden
    heap: list[tuple[float, tuple[int, int, int]]] = []

    def push_neighbours(voxel: tuple[int, int, int]) -> None:
        for step in _FACES:
            n = (voxel[0] + step[0], voxel[1] + step[1], voxel[2] + step[2])
            if all(0 <= n[a] < shape[a] for a in range(3)) and not queued[n]:
                queued[n] = True
                heapq.heappush(heap, (-float(values[n]), n))

    for voxel in zip(*np.nonzero(grown), strict=True):
        push_neighbours((int(voxel[0]), int(voxel[1]), int(voxel[2])))
    while count < min_voxels and heap:
        _, voxel = heapq.heappop(heap)
        grown[voxel] = True
        count += 1
        push_neighbours(voxel)
    return grown


def grow_small_regions(labels: np.ndarray, maps: Sequence[np.ndarray], min_voxels: int) -> np.ndarray:
    """A copy of the label map in which every region under ``min_voxels`` voxels is grown (:func:`grow_region`).

    Regions are grown in label order (1 first: the likeliest lesion), each along its own map, away from every
    other region by at least one voxel (26-connected), so no two regions touch; a region already that large, and
    the background's other voxels, are unchanged.

    Args:
        labels: integer ``[D, H, W]`` label map, region ``n`` -> ``n`` for ``n`` in ``1..len(maps)``, 0 background;
            no two regions touch.
        maps: per region ``n`` (at index ``n - 1``), the ``[D, H, W]`` map its blob came from.
        min_voxels: the size every region reaches where there is room (0: none grows).

    Raises:
        ValueError: shapes disagree, or a region is empty.
    """
    out = np.array(labels, copy=True)
    if min_voxels <= 0 or not maps:
        return out
    counts = np.bincount(out.ravel().astype(np.int64), minlength=len(maps) + 1)
    small = [n for n in range(1, len(maps) + 1) if counts[n] < min_voxels]
    if not small:
        return out
    boxes = ndimage.find_objects(out.astype(np.int64), max_label=len(maps))
    for n in small:
        values = np.asarray(maps[n - 1])
        if values.shape != out.shape:
            raise ValueError(f"the map of region {n} has shape {values.shape}, the labels {out.shape}")
        own = boxes[n - 1]
        if own is None:
            raise ValueError(f"region {n} has no voxel")
        margin = min_voxels + 1  # a region of at least one voxel reaches at most this far
        box = tuple(
            slice(max(0, s.start - margin), min(size, s.stop + margin)) for s, size in zip(own, out.shape, strict=True)
        )
        local = out[box]
        region = local == n
        others = (local != 0) & ~region
        forbidden = ndimage.binary_dilation(others, structure=_TOUCH) if others.any() else others
        grown = grow_region(region, values[box], forbidden, min_voxels)
        local[grown & ~region] = n
    return out
