"""Cutting a candidate blob that holds several lesions: one part per dome of the map's log-odds.

Two lesions a few millimetres apart, or a cancer beside a BPH nodule, give the localization map one connected
blob (the dynamic extraction grows a blob down to ``peak / 2.5``), and its centroid lies between them. In
probability the map shows hardly a valley there (0.6 between two lesions at 0.999 and 1.0, validation seed 9104);
its log-odds show a deep one (+6.9 at one cancer, +0.4 between, +15.9 at the other). :func:`split_at_saddles`
finds the blob's *domes* of the log-odds clipped at a ceiling (the h-maxima: a regional maximum whose descent to
the saddle joining it to a higher one is at least ``min_depth_logit``), and cuts the blob by a watershed of the
log-odds from them. A blob with one such dome is returned whole. The ceiling keeps a large lesion whole: inside
it the map undulates at saturated log-odds (domes 3-6 deep over saddles above +3), and cutting there moved its
centres away from the lesion's.
"""

from __future__ import annotations

import heapq

import numpy as np
from scipy import ndimage

#: the log-odds of a float32 probability saturate near here (1 - p underflows): larger values are clipped to it
LOGIT_CAP = 16.0
_EPS = 1e-7
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def log_odds(probability: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of ``probability`` (any shape, in [0, 1]) as float64, clipped to +-:data:`LOGIT_CAP`."""
    p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.clip(np.log(p / (1.0 - p)), -LOGIT_CAP, LOGIT_CAP)


def _reconstruct(marker: np.ndarray, limit: np.ndarray, mask: np.ndarray, low: float) -> np.ndarray:
    """Grey reconstruction by dilation of ``marker`` under ``limit`` within ``mask`` (26-connectivity)."""
    current = np.where(mask, np.minimum(marker, limit), low)
    while True:
        grown = ndimage.grey_dilation(current, footprint=_CONNECTIVITY, mode="constant", cval=low)
        grown = np.where(mask, np.minimum(grown, limit), low)
        if np.array_equal(grown, current):
            return current
        current = grown


def dome_markers(values: np.ndarray, mask: np.ndarray, min_depth: float) -> tuple[np.ndarray, int]:
    """The domes of ``values`` inside ``mask`` at least ``min_depth`` deep, labelled (26-connectivity).

    A dome is a regional maximum whose descent to the saddle joining it to a higher (or equally high) maximum is
    at least ``min_depth``; of two equally high maxima joined by a saddle less than ``min_depth`` below them, one
    dome. These are the h-maxima: the regional maxima of the reconstruction by dilation of
    ``values - min_depth`` under ``values`` within ``mask``. The highest maximum always has one.

    Args:
        values: ``[D, H, W]`` float values (here log-odds).
        mask: ``[D, H, W]`` bool, the blob.
        min_depth: the least depth of a dome, in the units of ``values`` (> 0).

    Returns:
        ``(labels, count)``: int labels ``[D, H, W]`` (0 outside the domes) and their number.
    """
    if not min_depth > 0:
        raise ValueError(f"min_depth must be positive, got {min_depth}")
    low = float(values[mask].min()) - min_depth - 1.0
    top = np.where(mask, values, low)
    levelled = _reconstruct(top - min_depth, top, mask, low)
    step = 1e-6 * max(1.0, float(np.abs(levelled[mask]).max()))
    below = _reconstruct(levelled - step, levelled, mask, low)  # the regional maxima stand ``step`` above this
    domes = mask & (levelled - below >= 0.5 * step)
    labels, count = ndimage.label(domes, structure=_CONNECTIVITY)
    return labels, int(count)


def flood_from_markers(values: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The watershed of ``values`` from ``markers`` within ``mask``: a priority flood, highest value first.

    Each voxel of ``mask`` joins the marker from which it is reached along the path whose lowest value is highest
    (26-connectivity; ties: first come). On log-odds costs ``scipy.ndimage.watershed_ift`` (scipy 1.17) let one
    marker take the whole blob and left the other with its own voxels, hence this loop; it runs only on blobs that
    hold two or more domes.

    Args:
        values: ``[D, H, W]`` float.
        markers: ``[D, H, W]`` int, ``k > 0`` on marker ``k``, 0 elsewhere.
        mask: ``[D, H, W]`` bool, connected, holding every marker.

    Returns:
        int ``[D, H, W]``: each voxel of ``mask`` its marker, 0 outside ``mask``.
    """
    shape = tuple(n + 2 for n in mask.shape)  # a one-voxel frame outside the mask: no bounds checks
    inside = np.zeros(shape, dtype=bool)
    inside[1:-1, 1:-1, 1:-1] = mask
    flat_values = np.zeros(shape)
    flat_values[1:-1, 1:-1, 1:-1] = values
    labels = np.zeros(shape, dtype=np.int64)
    labels[1:-1, 1:-1, 1:-1] = np.where(mask, markers, 0)
    inside, flat_values, labels = inside.ravel(), flat_values.ravel(), labels.ravel()
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    offsets = [int(np.dot(o, strides)) for o in np.ndindex(3, 3, 3) if o != (1, 1, 1)]
    offsets = [o - int(strides.sum()) for o in offsets]
    heap: list[tuple[float, int, int, int]] = []
    order = 0
    for index in np.flatnonzero(labels):
        for offset in offsets:
            neighbour = int(index) + offset
            if inside[neighbour] and labels[neighbour] == 0:
                heap.append((-flat_values[neighbour], order, neighbour, int(labels[index])))
                order += 1
    heapq.heapify(heap)
    while heap:
        _, _, index, label = heapq.heappop(heap)
        if labels[index]:
            continue
        labels[index] = label
        for offset in offsets:
            neighbour = index + offset
            if inside[neighbour] and labels[neighbour] == 0:
                heapq.heappush(heap, (-flat_values[neighbour], order, neighbour, label))
                order += 1
    return labels.reshape(shape)[1:-1, 1:-1, 1:-1]


def _plateaus_at_local_maxima(values: np.ndarray, mask: np.ndarray) -> int:
    """How many connected sets of voxels of ``mask`` no neighbour exceeds: an upper bound on its regional maxima
    (adjacent such voxels are equally high, so each set is one plateau, and each regional maximum is one)."""
    low = float(values[mask].min()) - 1.0
    inside = np.where(mask, values, low)
    top = mask & (ndimage.grey_dilation(inside, footprint=_CONNECTIVITY, mode="constant", cval=low) <= inside)
    return int(ndimage.label(top, structure=_CONNECTIVITY)[1])


def split_at_saddles(
    probability: np.ndarray, mask: np.ndarray, min_depth_logit: float, ceiling_logit: float
) -> list[np.ndarray]:
    """Cut the blob ``mask`` of the map ``probability`` into one part per dome of its log-odds.

    The domes (:func:`dome_markers`) are those of the log-odds (:func:`log_odds`) clipped at ``ceiling_logit``: a
    saturated lesion's map undulates at high log-odds (domes 3-6 deep over saddles above +3), and those dips
    are no valleys. A cut therefore needs a saddle at most ``ceiling_logit - min_depth_logit`` with parts rising
    ``min_depth_logit`` above it. The parts are the watershed of the (unclipped) log-odds from the domes.
    Between parts the voxels of the lower-peaking part that touch a higher one are removed, and each part keeps
    the connected piece holding its peak, so that no two parts touch (each a separate 26-connected blob, as a
    PI-CAI detection map needs). Parts are ordered by decreasing peak.

    Args:
        probability: ``[D, H, W]`` the map in [0, 1] (a box around the blob will do).
        mask: ``[D, H, W]`` bool, one connected blob of it.
        min_depth_logit: the least depth of a dome below which it joins its neighbour, in log-odds (> 0).
        ceiling_logit: the log-odds above which the map counts as flat when the domes are sought.

    Returns:
        bool masks ``[D, H, W]``: ``[mask]`` itself when the blob has one dome, else the parts.
    """
    if int(mask.sum()) < 3:  # two domes need a saddle between them
        return [mask]
    logits = log_odds(probability)
    levels = np.minimum(logits, ceiling_logit)
    inside = levels[mask]
    if float(inside.max() - inside.min()) < min_depth_logit:  # no dome can stand that high above a saddle
        return [mask]
    if _plateaus_at_local_maxima(levels, mask) < 2:  # one regional maximum at most: one dome (most blobs)
        return [mask]
    markers, count = dome_markers(levels, mask, min_depth_logit)
    if count < 2:
        return [mask]
    basins = flood_from_markers(logits, markers, mask)
    peaks = ndimage.maximum(logits, basins, index=np.arange(1, count + 1))  # each marker lies in its own basin
    parts: list[np.ndarray] = []
    taken = np.zeros(mask.shape, dtype=bool)  # the higher parts, grown by one voxel
    for k in sorted(range(1, count + 1), key=lambda k: -peaks[k - 1]):
        part = mask & (basins == k) & ~taken
        if not part.any():
            continue
        pieces, _ = ndimage.label(part, structure=_CONNECTIVITY)
        top = np.unravel_index(int(np.argmax(np.where(part, logits, -np.inf))), part.shape)
        part = pieces == pieces[top]
        parts.append(part)
        taken |= ndimage.binary_dilation(part, structure=_CONNECTIVITY)
    return parts if len(parts) > 1 else [mask]
