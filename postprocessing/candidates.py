"""Lesion candidates from a fused likelihood map, the PI-CAI way (one implementation for evaluation,
the demo and the service).

:func:`report_guided_annotation.extract_lesion_candidates` turns the map into non-overlapping
connected blobs, each filled with one likelihood (the blob's peak). The result is the *candidate
map* (a PI-CAI "detection map", the input of ``picai_eval``) plus one :class:`LesionCandidate` per
blob with its centre in LPS mm. :func:`extract_study_candidates` adds the *secondary* candidates that one
sequence's own localization map proposes outside those blobs (``CandidateSettings.secondary_sequence``).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from contract import DEFAULT_CANDIDATES, SEQUENCES, CandidateSettings, GridGeometry
from postprocessing.blob_split import split_at_saddles

with contextlib.redirect_stdout(io.StringIO()):  # the package prints a citation banner on import
    from report_guided_annotation import extract_lesion_candidates

#: Defaults of :func:`extract_candidates` (recorded by evaluation), from the contract.
CANDIDATE_THRESHOLD = DEFAULT_CANDIDATES.threshold
MIN_VOXELS_DETECTION = DEFAULT_CANDIDATES.min_voxels_detection
NUM_LESIONS_TO_EXTRACT = DEFAULT_CANDIDATES.num_lesions_to_extract
DYNAMIC_THRESHOLD_FACTOR = DEFAULT_CANDIDATES.dynamic_threshold_factor


@dataclass
class LesionCandidate:
    """One detected lesion candidate.

    Attributes:
        center_lps_mm: centroid of the candidate blob weighted by the map it comes from, LPS mm.
        volume_mm3: blob volume in mm^3 (voxel count x voxel volume of the grid).
        likelihood: the candidate's lesion likelihood in [0, 1]: the peak, inside the blob, of the likelihood
            map (``CandidateSettings.likelihood_map``) or, without one, of the map the blob comes from.
        center_index_dhw: the same centroid as continuous grid index ``(d, h, w)``.
        label: the candidate's number (1-based, by decreasing likelihood): its value in the label map of
            :func:`extract_candidate_labels` and its segment number in the DICOM SEG.
        source: the map whose blob it is: ``CandidateSettings.source_map`` (a primary candidate) or
            ``"<sequence>_map"`` (a secondary one, :func:`extract_study_candidates`).
    """

    center_lps_mm: tuple[float, float, float]
    volume_mm3: float
    likelihood: float
    center_index_dhw: tuple[float, float, float]
    label: int = 0
    source: str = DEFAULT_CANDIDATES.source_map

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract_candidates(
    fused_map: np.ndarray,
    geometry: GridGeometry,
    threshold: str | float = CANDIDATE_THRESHOLD,
    min_voxels_detection: int = MIN_VOXELS_DETECTION,
    num_lesions_to_extract: int = NUM_LESIONS_TO_EXTRACT,
    dynamic_threshold_factor: float = DYNAMIC_THRESHOLD_FACTOR,
    min_likelihood: float = DEFAULT_CANDIDATES.min_likelihood,
) -> tuple[list[LesionCandidate], np.ndarray]:
    """Non-overlapping lesion candidates of ``fused_map``.

    Args:
        fused_map: lesion likelihood ``[D, H, W]`` in [0, 1] (``[1, D, H, W]`` is accepted too).
        geometry: the grid geometry of ``fused_map`` (index -> LPS mm).
        threshold: ``"dynamic"`` (PI-CAI default), ``"dynamic-fast"`` or a static float threshold.
        min_voxels_detection: blobs with at most this many voxels are dropped.
        num_lesions_to_extract: maximum number of candidates.
        dynamic_threshold_factor: a blob extends down to ``peak / factor``.
        min_likelihood: candidates below this likelihood are dropped from the list and the map.

    Returns:
        ``(candidates, candidate_map)``: candidates sorted by decreasing likelihood, and the candidate
        map ``[D, H, W]`` float32 where each candidate's voxels hold its likelihood (0 elsewhere).
    """
    settings = CandidateSettings(
        threshold=threshold,
        min_voxels_detection=min_voxels_detection,
        num_lesions_to_extract=num_lesions_to_extract,
        dynamic_threshold_factor=dynamic_threshold_factor,
        min_likelihood=min_likelihood,
    )
    candidates, candidate_map, _ = extract_candidate_labels(fused_map, geometry, settings)
    return candidates, candidate_map


#: report_guided_annotation's "dynamic" extraction stops once the map's maximum is below this
_DYNAMIC_STOP_LIKELIHOOD = 0.01


#: ``CandidateSettings.floor_mode`` values
FLOOR_MODES: tuple[str, ...] = ("peak", "voxel")


def voxel_floor(settings: CandidateSettings) -> float:
    """The ``source_map`` value below which a voxel joins no candidate (it is set to 0 before the extraction).

    ``floor_mode="voxel"``: the floor itself. ``"peak"``: the lowest extent a blob peaking at the floor can
    have, ``floor / dynamic_threshold_factor`` with a dynamic threshold; with a static threshold the threshold
    bounds the extent, so nothing is zeroed.
    """
    if settings.floor_mode not in FLOOR_MODES:
        raise ValueError(f"floor_mode must be one of {FLOOR_MODES}, not {settings.floor_mode!r}")
    if settings.floor_mode == "voxel":
        return settings.floor_likelihood
    if isinstance(settings.threshold, int | float):
        return 0.0
    return settings.floor_likelihood / settings.dynamic_threshold_factor


def _active_window(volume: np.ndarray, settings: CandidateSettings) -> tuple[slice, ...] | None:
    """The box (plus a one-voxel margin) outside of which no voxel can join a candidate; ``None``: none can.

    With ``"dynamic"`` every threshold is at least ``0.01 / factor`` (the extraction stops below a maximum of
    0.01), with a static threshold it is that threshold; voxels below it are zeroed before labelling. Labelling
    (26-connectivity), the one-voxel dilation and the raster order of labels are local, so running the PI-CAI
    extraction on the window gives exactly the whole-volume result (tested) at a fraction of the cost: the
    fused map is zero almost everywhere (about 0.1 % of the voxels of a study lie above the floor).
    """
    if settings.threshold == "dynamic":
        floor = max(_DYNAMIC_STOP_LIKELIHOOD / settings.dynamic_threshold_factor, voxel_floor(settings))
    elif isinstance(settings.threshold, int | float):
        floor = max(float(settings.threshold), voxel_floor(settings))
    else:  # "dynamic-fast" and others: no floor known, the whole volume
        return tuple(slice(0, n) for n in volume.shape)
    active = volume >= floor
    return _bounding_box(active, margin=1) if active.any() else None


_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def _static_blobs(volume: np.ndarray, threshold: float, min_voxels_detection: int) -> np.ndarray:
    """report_guided_annotation's ``extract_lesion_candidates_static`` (max confidence, no rounding), vectorized.

    Returns its ``all_hard_blobs``: each blob (26-connectivity) of the voxels at or above ``threshold`` with more
    than ``min_voxels_detection`` voxels, filled with its peak; 0 elsewhere. The package loops over the blobs in
    Python, one full-volume comparison each.
    """
    clipped = np.where(volume < threshold, np.float32(0.0), volume)
    index, count = ndimage.label(clipped, structure=_CONNECTIVITY)
    sizes = np.bincount(index.ravel(), minlength=count + 1)
    peaks = np.zeros(count + 1, dtype=np.float64)
    if count:  # each blob's peak (np.maximum.at: about half the time of ndimage.maximum, which sorts)
        flat = index.ravel()
        inside = np.flatnonzero(flat)
        np.maximum.at(peaks, flat[inside], clipped.ravel()[inside])
    kept = sizes > min_voxels_detection
    kept[0] = False
    peaks[~kept] = 0.0
    return peaks[index].astype(volume.dtype)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The smallest box holding every ``True`` voxel of ``mask`` (which has one), grown by ``margin`` voxels
    within the volume."""
    where = np.nonzero(mask)
    return tuple(
        slice(max(int(axis.min()) - margin, 0), min(int(axis.max()) + margin + 1, n))
        for axis, n in zip(where, mask.shape, strict=True)
    )


def _dynamic_blobs(
    volume: np.ndarray, settings: CandidateSettings, stop_likelihood: float
) -> tuple[list[tuple[int, float]], np.ndarray]:
    """report_guided_annotation's ``"dynamic"`` extraction (its version 1, adjacent candidates removed), same
    results, with the loop stopped once the map's maximum is below ``stop_likelihood`` (the package's
    ``max_prob_failsafe_stopping_threshold``, 0.01 by default): blobs peaking below the floor are dropped afterwards
    anyway, and each further pass costs a labelling. Each pass takes the blob holding the map's maximum at the
    threshold ``max / factor`` (:func:`_blob_by_region` when every blob is kept, as the contract does;
    :func:`_blob_by_static_step` otherwise) and keeps it unless it touches an earlier one.
    Returns ``(confidences, indexed)`` like the package (tested against it on random maps)."""
    working = volume.copy()
    grown = np.zeros(volume.shape, dtype=bool)  # the extracted blobs, dilated by one voxel
    indexed = np.zeros(volume.shape, dtype=int)
    confidences: list[tuple[int, float]] = []
    regions = _Regions(volume) if settings.min_voxels_detection <= 0 else None
    while len(confidences) < settings.num_lesions_to_extract:
        tumor_index = 1 + len(confidences)
        max_prob = float(working.max())
        if max_prob < stop_likelihood:
            break
        threshold = max_prob / settings.dynamic_threshold_factor
        if regions is not None:
            box, blob = regions.blob(working, max_prob, threshold)
            seed = blob
        else:
            max_prob, box, blob, seed = _blob_by_static_step(working, threshold, settings.min_voxels_detection)
        if not (grown[box] & blob).any():
            if seed.any():
                _dilate_into(grown, box, seed)
            confidences.append((tumor_index, max_prob))
            indexed[box] += blob * tumor_index
        working[box] *= ~blob
    return confidences, indexed


def _dilate_into(grown: np.ndarray, box: tuple[slice, ...], mask: np.ndarray) -> None:
    """``grown |=`` the one-voxel (26-connected) dilation of ``mask`` (a mask of ``grown[box]``), computed within
    the mask's own box grown by one voxel (all a one-voxel dilation can reach)."""
    own = _bounding_box(mask, margin=0)
    near = tuple(
        slice(max(b.start + o.start - 1, 0), min(b.start + o.stop + 1, n))
        for b, o, n in zip(box, own, grown.shape, strict=True)
    )
    full = np.zeros(grown.shape, dtype=bool)
    full[box] = mask
    grown[near] |= ndimage.binary_dilation(full[near], structure=_CONNECTIVITY)


def _blob_by_static_step(
    working: np.ndarray, threshold: float, min_voxels_detection: int
) -> tuple[float, tuple[slice, ...], np.ndarray, np.ndarray]:
    """The package's pass: its static step on the whole map, then the first (raster order) blob peaking at the
    highest kept peak. Returns ``(that peak, box, blob in box, seed in box)``; with no blob kept the peak is 0
    and the blob the empty region (version 1's artefact, confidence 0), whose seed is empty."""
    hard_blobs = _static_blobs(working, threshold, min_voxels_detection)
    max_prob = float(hard_blobs.max())
    current = hard_blobs == max_prob
    box = _bounding_box(current, margin=0)  # labelling the bounding box keeps raster order (and every blob whole)
    labelled, _ = ndimage.label(current[box], structure=_CONNECTIVITY)
    blob = labelled == 1
    return max_prob, box, blob, blob & (hard_blobs[box] > 0)


class _Regions:
    """The 26-connected regions of a map's nonzero voxels, to find a pass's blob without labelling the whole map.

    Every blob of a pass lies inside one region (passes only zero voxels, and the threshold is positive), so a pass
    labels only the box of the region(s) holding a voxel at the maximum. With every blob kept, the blobs that peak
    at the maximum are exactly those holding such a voxel, and the package takes the one that comes first in raster
    order (the first label of its box of them); so does :meth:`blob`.
    """

    def __init__(self, volume: np.ndarray) -> None:
        self.shape = volume.shape
        labels, _ = ndimage.label(volume > 0, structure=_CONNECTIVITY)
        self.boxes = ndimage.find_objects(labels)
        self.of = labels.reshape(-1)

    def blob(self, working: np.ndarray, max_prob: float, threshold: float) -> tuple[tuple[slice, ...], np.ndarray]:
        """``(box, blob in box)``: the first blob in raster order, at ``threshold``, holding a voxel at ``max_prob``."""
        peaks = np.flatnonzero(working.reshape(-1) == max_prob)
        best: tuple[int, tuple[slice, ...], np.ndarray] | None = None  # (first raster index, box, blob in box)
        for region in np.unique(self.of[peaks]):
            box = self.boxes[int(region) - 1]
            assert box is not None
            labelled, _ = ndimage.label(~(working[box] < threshold), structure=_CONNECTIVITY)
            inside = [np.unravel_index(i, self.shape) for i in peaks[self.of[peaks] == region]]
            local = {int(labelled[tuple(c - b.start for c, b in zip(i, box, strict=True))]) for i in inside}
            for label in local:
                blob = labelled == label
                first_local = np.unravel_index(int(np.argmax(blob)), blob.shape)
                first = int(
                    np.ravel_multi_index(tuple(c + b.start for c, b in zip(first_local, box, strict=True)), self.shape)
                )
                if best is None or first < best[0]:
                    best = (first, box, blob)
        assert best is not None
        return best[1], best[2]


def _as_volume(values: np.ndarray, name: str) -> np.ndarray:
    volume = np.asarray(values, dtype=np.float32)
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"{name} must be [D, H, W], got shape {volume.shape}")
    return volume


def extract_candidate_labels(
    fused_map: np.ndarray,
    geometry: GridGeometry,
    settings: CandidateSettings = DEFAULT_CANDIDATES,
    crop: bool = True,
    likelihood_map: np.ndarray | None = None,
    source_name: str | None = None,
) -> tuple[list[LesionCandidate], np.ndarray, np.ndarray]:
    """Candidates, candidate map and a label map ``[D, H, W]`` uint8 (0 background, candidate ``n`` -> ``n``).

    Args:
        fused_map: the map whose blobs are the candidates ``[D, H, W]`` in [0, 1] (where the lesions are).
        geometry: the grid geometry of the maps.
        settings: extraction settings (the floor, threshold and limits apply to ``fused_map``).
        crop: ``True`` (served): the extraction runs on the window of :func:`_active_window`, for ``"dynamic"``
            with :func:`_dynamic_blobs`. ``False``: report_guided_annotation itself on the whole volume, the
            reference the fast path equals.
        likelihood_map: ``[D, H, W]`` in [0, 1]; when given, each candidate's likelihood is this map's peak
            inside its blob (how suspicious the lesion is) instead of the blob's peak in ``fused_map``.
            ``settings.min_likelihood`` applies to that likelihood. The centre stays the ``fused_map``-weighted
            centroid of the blob.
        source_name: what the candidates record as their ``source`` (default ``settings.source_map``).

    With ``settings.split_min_depth_logit`` a blob holding two or more domes of the map's log-odds is cut into one
    candidate per dome (:func:`postprocessing.blob_split.split_at_saddles`), each with its own centroid and peak;
    the likeliest ``settings.num_lesions_to_extract`` are kept.

    report_guided_annotation's ``"dynamic"`` extraction (its version 1, PI-CAI's default) records a blob of
    confidence 0 covering the *empty* region when the map's maximum lies in a blob of at most
    ``min_voxels_detection`` voxels; PI-CAI never sees it (its detection map holds 0 there), but scored by a
    ``likelihood_map`` it became a box-shaped false candidate. Such blobs are skipped.

    Candidates are numbered 1..N in order of decreasing likelihood (``LesionCandidate.label`` is that number),
    the numbering of the DICOM SEG's segments.
    """
    volume = _as_volume(fused_map, "fused_map")
    scores = None if likelihood_map is None else _as_volume(likelihood_map, "likelihood_map")
    if scores is not None and scores.shape != volume.shape:
        raise ValueError(f"likelihood_map has shape {scores.shape}, fused_map {volume.shape}")
    lowest = voxel_floor(settings)
    if lowest > 0:  # voxels below it join no candidate (see CandidateSettings.floor_mode)
        volume = np.where(volume >= lowest, volume, np.float32(0.0))
    indexed = np.zeros(volume.shape, dtype=int)
    window = _active_window(volume, settings) if crop else tuple(slice(0, n) for n in volume.shape)
    confidences: list[tuple[int, float]] = []
    if window is not None and crop and settings.threshold == "dynamic":
        stop = max(_DYNAMIC_STOP_LIKELIHOOD, settings.floor_likelihood)
        confidences, indexed_window = _dynamic_blobs(np.ascontiguousarray(volume[window]), settings, stop)
        indexed[window] = indexed_window
    elif window is not None:
        _, confidences, indexed_window = extract_lesion_candidates(
            np.ascontiguousarray(volume[window]),  # type: ignore[arg-type]  # float32 is accepted at run time
            threshold=settings.threshold,
            min_voxels_detection=settings.min_voxels_detection,
            num_lesions_to_extract=settings.num_lesions_to_extract,
            dynamic_threshold_factor=settings.dynamic_threshold_factor,
        )
        indexed[window] = np.asarray(indexed_window)
    found: list[tuple[LesionCandidate, np.ndarray]] = []
    source = source_name or settings.source_map
    boxes = ndimage.find_objects(indexed) if confidences else []  # each blob's box: the work below stays in it
    for blob, confidence in confidences:
        if confidence <= 0:  # the "dynamic" (version 1) artefact described in the docstring
            continue
        box = boxes[blob - 1] if blob <= len(boxes) else None
        if box is None:
            continue
        local = indexed[box] == blob
        if settings.split_min_depth_logit is None:
            parts = [local]
        else:
            parts = split_at_saddles(volume[box], local, settings.split_min_depth_logit, settings.split_ceiling_logit)
        for part in parts:
            values = volume[box][part]
            if float(values.max()) < settings.floor_likelihood:  # peaks below the floor
                continue
            if scores is not None:
                likelihood = float(scores[box][part].max())
            else:  # the blob's peak (a part's own peak when the blob was cut)
                likelihood = float(confidence) if len(parts) == 1 else float(values.max())
            if likelihood <= settings.min_likelihood:
                continue
            weights = values.astype(np.float64)
            idx = np.argwhere(part).astype(np.float64) + np.array([b.start for b in box], dtype=np.float64)
            centre = (idx * weights[:, None]).sum(0) / max(weights.sum(), 1e-12)
            mask = np.zeros(volume.shape, dtype=bool)
            mask[box] = part
            candidate = LesionCandidate(
                center_lps_mm=tuple(float(v) for v in geometry.index_to_lps(centre)),  # type: ignore[arg-type]
                volume_mm3=float(part.sum()) * geometry.voxel_volume_mm3,
                likelihood=likelihood,
                center_index_dhw=tuple(float(v) for v in centre),  # type: ignore[arg-type]
                source=source,
            )
            found.append((candidate, mask))
    if len(found) > settings.num_lesions_to_extract:  # cut blobs can outnumber the limit: keep the likeliest
        found = sorted(found, key=lambda item: -item[0].likelihood)[: settings.num_lesions_to_extract]
    return _numbered(found, volume.shape)


def _numbered(
    found: list[tuple[LesionCandidate, np.ndarray]], shape: tuple[int, ...]
) -> tuple[list[LesionCandidate], np.ndarray, np.ndarray]:
    """Candidates (each with its blob mask) numbered 1..N by decreasing likelihood (stable on ties), with the
    candidate map and the uint8 label map ``shape`` they fill."""
    found = sorted(found, key=lambda item: -item[0].likelihood)
    candidate_map = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    candidates: list[LesionCandidate] = []
    for number, (candidate, mask) in enumerate(found, start=1):
        candidate.label = number
        candidate_map[mask] = candidate.likelihood
        labels[mask] = number
        candidates.append(candidate)
    return candidates, candidate_map, labels


def secondary_map(
    sequence_maps: np.ndarray, availability: np.ndarray | None, settings: CandidateSettings
) -> np.ndarray | None:
    """The map ``[D, H, W]`` that proposes secondary candidates, or ``None`` (no secondary sequence in
    ``settings``, or that sequence absent: ``availability`` ``[S]`` 0; ``None`` counts every sequence present).

    ``sequence_maps``: the ensemble output ``[S, D, H, W]`` (``[1, S, D, H, W]`` is accepted), contract order.
    """
    if settings.secondary_sequence is None:
        return None
    if settings.secondary_sequence not in SEQUENCES:
        raise ValueError(f"secondary_sequence must be one of {SEQUENCES} or None, not {settings.secondary_sequence!r}")
    maps = np.asarray(sequence_maps, dtype=np.float32)
    if maps.ndim == 5 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 4 or maps.shape[0] != len(SEQUENCES):
        raise ValueError(f"sequence_maps must be [{len(SEQUENCES)}, D, H, W], got shape {maps.shape}")
    k = SEQUENCES.index(settings.secondary_sequence)
    if availability is not None and float(np.asarray(availability, dtype=np.float64).reshape(-1)[k]) <= 0:
        return None
    return maps[k]


def extract_study_candidates(
    fused_map: np.ndarray,
    sequence_maps: np.ndarray,
    geometry: GridGeometry,
    settings: CandidateSettings = DEFAULT_CANDIDATES,
    likelihood_map: np.ndarray | None = None,
    availability: np.ndarray | None = None,
) -> tuple[list[LesionCandidate], np.ndarray]:
    """A study's candidates: the blobs of ``fused_map`` (primary) plus those of the secondary sequence's map.

    The secondary map (:func:`secondary_map`) is zeroed over the primary candidates grown by
    ``settings.secondary_exclusion_voxels`` (26-connected), then extracted like the primary one
    (:func:`extract_candidate_labels`, same settings: floor, threshold, at most ``num_lesions_to_extract``), each
    blob centred on its own map's weighted centroid. With an exclusion of at least one voxel no two candidates
    touch, so the candidate map is a valid PI-CAI detection map (one connected blob per candidate).

    Args:
        fused_map: ``[D, H, W]`` the primary source map.
        sequence_maps: ``[S, D, H, W]`` the per-sequence localization maps (ensemble output ``sequence_maps``).
        geometry: the grid geometry of the maps.
        settings: extraction settings.
        likelihood_map: ``[D, H, W]``: each candidate's likelihood is its peak in the blob (see
            :func:`extract_candidate_labels`).
        availability: ``[S]`` the study's sequence availability (``None``: all present).

    Returns:
        ``(candidates, labels)``: candidates numbered 1..N by decreasing likelihood (primary before secondary on
        ties) and the uint8 label map ``[D, H, W]`` (candidate ``n`` -> ``n``, 0 background).
    """
    primary, _, labels = extract_candidate_labels(fused_map, geometry, settings, likelihood_map=likelihood_map)
    aux = secondary_map(sequence_maps, availability, settings)
    if aux is None:
        return primary, labels
    if aux.shape != labels.shape:
        raise ValueError(f"the {settings.secondary_sequence} map has shape {aux.shape}, fused_map {labels.shape}")
    taken = labels > 0
    if taken.any() and settings.secondary_exclusion_voxels > 0:  # within the box it can reach (1/9 of the time)
        grow = settings.secondary_exclusion_voxels
        box = _bounding_box(taken, margin=grow)
        taken[box] = ndimage.binary_dilation(taken[box], structure=_CONNECTIVITY, iterations=grow)
    secondary, _, secondary_labels = extract_candidate_labels(
        np.where(taken, np.float32(0.0), aux),
        geometry,
        settings,
        likelihood_map=likelihood_map,
        source_name=f"{settings.secondary_sequence}_map",
    )
    if not secondary:
        return primary, labels
    found = [(c, labels == c.label) for c in primary] + [(c, secondary_labels == c.label) for c in secondary]
    candidates, _, merged = _numbered(found, labels.shape)  # stable: primary first on ties
    return candidates, merged
