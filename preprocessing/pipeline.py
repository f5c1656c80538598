"""``preprocess_study``: DICOM study -> normalized model tensor ``[S, D, H, W]`` on the contract grid.

Stages (each timed in ``meta["timings_s"]``): read (headers + raw bytes, once) -> select (group by
study/series, ignore non-images/localizers, identify T2W/ADC/high-b DWI by the rules file) -> assemble
(sort along the slice normal, geometry checks) -> decode (pixels of chosen series only, and of those only
the slices the resampling reads; rescale) -> resample (linear, physical space, onto the grid from T2W) ->
normalize (contract.NORMALIZATION).

No global state (only the optional decode process pool, created once and shared: ``decode_workers``): safe
to call concurrently from several threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import UID

from contract import (
    CONTRACT_VERSION,
    DEFAULT_GRID,
    MIN_HIGH_B_VALUE_S_PER_MM2,
    MISSING_CHANNEL_FILL_VALUE,
    NORMALIZATION,
    SEQUENCES,
    GridGeometry,
    GridSpec,
    NormalizationSpec,
)
from preprocessing import grid as grid_mod
from preprocessing.dicom_io import (
    Ingested,
    SeriesInfo,
    decode_frames,
    describe_series,
    header_errors,
    read_source,
    series_key,
)
from preprocessing.errors import (
    MultipleStudiesError,
    NoT2WError,
    NotMRError,
    PreprocessError,
    StudyNotFoundError,
)
from preprocessing.instances import drop_resent_instances, missing_instance_numbers, resolve_reacquired_slices
from preprocessing.linear_resample import resample_array_with_mask
from preprocessing.normalize import normalize_channel
from preprocessing.parallel_decode import available_cores, default_workers
from preprocessing.series_selection import Choice, Selection, load_rules, select_series
from preprocessing.volume import GeometryTolerance, Volume, stack_geometry

logger = logging.getLogger(__name__)

#: plausible median ADC inside the FOV in 1e-6 mm^2/s; outside -> a warning about units
ADC_PLAUSIBLE_MEDIAN_RANGE: tuple[float, float] = (50.0, 5000.0)
#: grids with fewer voxels per channel do the channels one after the other by default (a few ms each: a
#: thread pool would cost more than it saves)
_THREADED_MIN_VOXELS = 1 << 18


@dataclass(frozen=True)
class PreprocessSettings:
    """Settings of :func:`preprocess_study`.

    Attributes:
        grid: model grid (size/spacing); the contract default unless a model was trained otherwise.
        rules_path: series rules JSON; ``None`` uses the packaged ``series_rules.json``.
        max_instances: refuse inputs with more objects than this (protects the service).
        study_instance_uid: which study to use when the input holds several (else an error).
        min_b_value_s_per_mm2: lowest b-value accepted as high-b DWI.
        tolerance: geometry check tolerances.
        normalization: per-sequence intensity normalization; ``None`` uses the contract's
            :data:`contract.NORMALIZATION` (the service passes the one its served model recorded).
        channel_threads: threads that resample (slabs of grid slices of every channel) and normalize (one
            channel each) concurrently; the compiled resampler and numpy release the GIL. ``None``: one
            per available core (at most 8) on grids of at least 2**18 voxels (e.g. ``REALISTIC_GRID``;
            smaller grids run sequentially); ``1``: sequential (e.g. a service whose worker pool already
            keeps every core busy). The result does not depend on it.
        decode_workers: worker processes that decode compressed pixel data (the decoders hold the GIL, so
            threads would not help); ``0`` (default): decode in the calling process; ``None``: one per
            available core (at most 4), none on a single core. Used for series of at least 8 compressed
            objects; the pool is created once per process and shared (:mod:`preprocessing.parallel_decode`).
            Off by default: it costs ~25 % more CPU in all and pays only where cores are idle (on the shared
            2-core VM it was slower; docs/preprocessing.md). The result does not depend on it.
    """

    grid: GridSpec = DEFAULT_GRID
    rules_path: Path | None = None
    max_instances: int = 5000
    study_instance_uid: str | None = None
    min_b_value_s_per_mm2: float = MIN_HIGH_B_VALUE_S_PER_MM2
    tolerance: GeometryTolerance = field(default_factory=GeometryTolerance)
    normalization: Mapping[str, NormalizationSpec] | None = None
    channel_threads: int | None = None
    decode_workers: int | None = 0


@dataclass
class PreprocessedStudy:
    """Output of :func:`preprocess_study`.

    Attributes:
        tensor: float32 ``[S, D, H, W]``, channels in :data:`contract.SEQUENCES` order; a missing
            channel holds :data:`contract.MISSING_CHANNEL_FILL_VALUE`.
        availability: float32 ``[S]``, 1.0 present / 0.0 missing.
        geometry: the grid in patient space (index ``(k, j, i)`` <-> LPS mm).
        meta: JSON-serializable record (chosen series + reasons, skipped objects, normalization
            parameters, grid, warnings, per-stage timings in seconds).
    """

    tensor: np.ndarray
    availability: np.ndarray
    geometry: GridGeometry
    meta: dict[str, Any]

    def grid_image(self) -> sitk.Image:
        """Empty (all-zero uint8) SimpleITK image with the grid geometry, e.g. for resampling labels."""
        return grid_mod.grid_image(self.geometry)

    def channel_image(self, sequence: str) -> sitk.Image:
        """One channel as a float32 SimpleITK image on the grid (for writing NIfTI)."""
        return grid_mod.array_to_grid_image(self.tensor[SEQUENCES.index(sequence)], self.geometry)


def uid_hash(uid: str) -> str:
    """Short, non-reversible tag of a UID for messages and logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


class _Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def add(self, stage: str, start: float) -> None:
        self.t[stage] = self.t.get(stage, 0.0) + (time.perf_counter() - start)


def _group_series(ingested: Ingested, skipped: list[dict[str, str]]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, ds in enumerate(ingested.datasets):
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            sop = str(ds.get("SOPClassUID", ""))
            name = UID(sop).name if sop else "no SOP class"
            skipped.append({"source": ingested.labels[i], "reason": f"non-image object ({name})"})
            continue
        with header_errors(ingested.labels[i]):
            key = series_key(ds, ingested.values)
        groups.setdefault(key, []).append(i)
    return groups


def _choose_study(series: list[SeriesInfo], settings: PreprocessSettings, skipped: list[dict[str, str]]) -> str:
    mr_studies = sorted({s.study_uid for s in series if s.modality.upper() == "MR"})
    if not mr_studies:
        mods = sorted({s.modality or "missing" for s in series})
        found = f"modality {', '.join(mods)}" if mods else "no images"
        raise NotMRError(f"no MR images in the input (found {found})")
    if settings.study_instance_uid is not None:
        if settings.study_instance_uid not in mr_studies:
            raise StudyNotFoundError(
                f"study {uid_hash(settings.study_instance_uid)} (sha256 prefix) is not among the "
                f"{len(mr_studies)} MR studies of the input"
            )
        chosen = settings.study_instance_uid
    elif len(mr_studies) > 1:
        tags = ", ".join(uid_hash(u) for u in mr_studies)
        raise MultipleStudiesError(
            f"input holds {len(mr_studies)} MR studies (StudyInstanceUID sha256 prefixes {tags}); "
            "pass study_instance_uid to choose one"
        )
    else:
        chosen = mr_studies[0]
    for s in series:
        if s.study_uid != chosen:
            skipped.append({"source": f"series '{s.description}'", "series_uid": s.series_uid, "reason": "other study"})
    return chosen


def _build(
    ingested: Ingested,
    choice: Choice,
    settings: PreprocessSettings,
    timer: _Timer,
    warnings: list[str],
    grid: GridGeometry | None,
) -> tuple[Choice, Volume]:
    """Volume of one chosen series; the returned choice holds the frames actually stacked.

    Only the slices that resampling onto ``grid`` reads are decoded (the others stay 0 and are never read);
    ``grid=None``: the grid is placed on this series (T2W), from its geometry before decoding.
    """
    label = f"series '{choice.series.description or uid_hash(choice.series.series_uid)}' ({choice.sequence})"
    t = time.perf_counter()
    frames, replaced = resolve_reacquired_slices(ingested, choice.frames, label, settings.tolerance)
    geometry = stack_geometry(frames, label, settings.tolerance)
    timer.add("assemble", t)
    warnings.extend(missing_instance_numbers(choice.series.frames, label))
    if replaced:
        warnings.extend(replaced)
        choice = dataclasses.replace(choice, frames=frames)
    t = time.perf_counter()
    g = geometry
    if grid is None:
        grid = grid_mod.grid_geometry_of(g.origin_lps_mm, g.direction, g.spacing_mm_ijk, g.size_ijk, settings.grid)
    needed = grid_mod.source_slices_needed(g.origin_lps_mm, g.direction, g.spacing_mm_ijk, g.size_ijk, grid)
    timer.add("assemble", t)
    t = time.perf_counter()
    workers = default_workers() if settings.decode_workers is None else settings.decode_workers
    array = decode_frames(ingested, [frames[i] for i in geometry.order], needed, workers)
    timer.add("decode", t)
    return choice, Volume(array=array, geometry=geometry)


def _build_with_fallback(
    ingested: Ingested,
    selection: Selection,
    seq: str,
    settings: PreprocessSettings,
    timer: _Timer,
    warnings: list[str],
    grid: GridGeometry | None,
) -> tuple[Choice, Volume] | None:
    """Build the chosen series of ``seq``; for ADC/DWI fall back to the next candidate on a geometry error."""
    choice = selection.choices.get(seq)
    if choice is None:
        return None
    candidates = [choice] + (selection.alternatives.get(seq, []) if seq != "t2w" else [])
    first_error: PreprocessError | None = None
    for cand in candidates:
        try:
            return _build(ingested, cand, settings, timer, warnings, grid)
        except PreprocessError as err:
            if first_error is None:
                first_error = err
            if cand is not candidates[-1]:
                warnings.append(f"{seq}: {err}; trying the next candidate")
    assert first_error is not None
    raise first_error


def preprocess_study(
    source: Path | str | Sequence[bytes] | Sequence[pydicom.Dataset] | Mapping[str, Sequence[pydicom.Dataset]],
    settings: PreprocessSettings = PreprocessSettings(),
) -> PreprocessedStudy:
    """Turn one mpMRI DICOM study into the normalized model tensor on the contract grid.

    Args:
        source: a folder (searched recursively, any file names), raw DICOM bytes, read datasets, or a
            mapping of series name -> datasets (e.g. ``synth.generator.SyntheticStudy.series``).
        settings: see :class:`PreprocessSettings`.

    Returns:
        :class:`PreprocessedStudy` with ``tensor`` float32 ``[S, D, H, W]`` and ``availability`` ``[S]``.

    Raises:
        preprocessing.errors.PreprocessError: a subclass naming the problem (not DICOM, truncated,
            too many instances, several studies, not MR, no T2W, inconsistent geometry, single slice, ...).
    """
    t = time.perf_counter()
    ingested = read_source(source, settings.max_instances)
    return preprocess_ingested(ingested, settings, read_s=time.perf_counter() - t)


def preprocess_ingested(ingested: Ingested, settings: PreprocessSettings, read_s: float = 0.0) -> PreprocessedStudy:
    """:func:`preprocess_study` after the read stage: ``ingested`` comes from :func:`read_source` or a
    :class:`preprocessing.dicom_io.SourceReader` fed while the study arrives (``read_s``: the time it took)."""
    timer = _Timer()
    t_total = time.perf_counter() - read_s
    timer.t["read"] = read_s
    t = time.perf_counter()
    rules = load_rules(settings.rules_path)
    ingested, resent_warnings = drop_resent_instances(ingested)
    timer.add("read", t)

    t = time.perf_counter()
    skipped: list[dict[str, str]] = list(ingested.skipped)
    groups = _group_series(ingested, skipped)
    all_series = [describe_series(ingested, idx) for idx in groups.values()]
    study_uid = _choose_study(all_series, settings, skipped)
    study_series = [s for s in all_series if s.study_uid == study_uid]
    selection = select_series(study_series, rules, settings.min_b_value_s_per_mm2)
    skipped.extend(selection.skipped)
    warnings: list[str] = resent_warnings + list(selection.warnings)
    timer.add("select", t)
    if "t2w" not in selection.choices:
        seen = "; ".join(
            f"'{row['description']}' -> {row.get('sequence') or row.get('ignored') or 'unidentified'}"
            for row in selection.series_table
        )
        raise NoT2WError(f"no T2W series identified among {len(study_series)} series ({seen})")

    for seq, choice in selection.choices.items():
        twins = [
            s
            for s in study_series
            if s.series_number == choice.series.series_number
            and s.series_number is not None
            and s.series_uid != choice.series.series_uid
        ]
        if twins:
            warnings.append(
                f"{seq}: {len(twins)} other series share SeriesNumber {choice.series.series_number} with the chosen "
                f"series ({sum(len(t.frames) for t in twins)} frame(s)); a damaged SeriesInstanceUID may have split it"
            )
    built: dict[str, tuple[Choice, Volume]] = {}
    t2w = _build_with_fallback(ingested, selection, "t2w", settings, timer, warnings, None)
    assert t2w is not None  # "t2w" is among the choices
    built["t2w"] = t2w
    t = time.perf_counter()
    g = t2w[1].geometry
    geometry = grid_mod.grid_geometry_of(g.origin_lps_mm, g.direction, g.spacing_mm_ijk, g.size_ijk, settings.grid)
    timer.add("resample", t)
    for seq in SEQUENCES:
        if seq != "t2w":
            result = _build_with_fallback(ingested, selection, seq, settings, timer, warnings, geometry)
            if result is not None:
                built[seq] = result

    normalization = settings.normalization or NORMALIZATION
    d, h, w = settings.grid.size_dhw
    tensor = np.empty((len(SEQUENCES), d, h, w), dtype=np.float32)  # every channel is written below
    availability = np.zeros(len(SEQUENCES), dtype=np.float32)
    norm_meta: dict[str, Any] = {}

    present = [(ch, seq) for ch, seq in enumerate(SEQUENCES) if seq in built]
    inside_masks = {seq: np.empty((d, h, w), dtype=np.bool_) for _, seq in present}
    threads = settings.channel_threads or (min(available_cores(), 8) if d * h * w >= _THREADED_MIN_VOXELS else 1)
    # Resampling (with the FOV mask) is split into slabs of grid slices, so every thread has work to the
    # end; normalization needs a whole channel (its percentiles) and runs per channel once its slabs are done.
    slabs_per_channel = min(d, max(1, threads)) if threads > 1 else 1
    bounds = np.linspace(0, d, slabs_per_channel + 1).round().astype(int)
    slabs = [(ch, seq, int(a), int(b)) for ch, seq in present for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def resample_slab(ch: int, seq: str, k0: int, k1: int) -> tuple[str, int, float]:
        """Resample grid slices ``[k0, k1)`` of one channel into ``tensor[ch]`` and its FOV mask."""
        t0 = time.perf_counter()
        volume = built[seq][1]
        _, _, n_inside = resample_array_with_mask(
            volume.array,
            volume.geometry.origin_lps_mm,
            volume.geometry.direction,
            volume.geometry.spacing_mm_ijk,
            geometry,
            out=tensor[ch],
            inside=inside_masks[seq],
            k_range=(k0, k1),
        )
        return seq, n_inside, time.perf_counter() - t0

    def normalize(ch: int, seq: str) -> tuple[dict[str, Any], float]:
        """Normalize ``tensor[ch]`` in place with its sequence's contract normalization."""
        t0 = time.perf_counter()
        _, params = normalize_channel(tensor[ch], inside_masks[seq], normalization[seq], out=tensor[ch])
        return params, time.perf_counter() - t0

    t = time.perf_counter()
    if threads > 1 and len(slabs) > 1:
        # One FIFO queue: a channel's normalization is queued right after its slabs and the next channel's,
        # so it overlaps the remaining resampling. It waits for its own slabs, which were dequeued before it
        # (FIFO) and wait for nothing: no deadlock.
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mpmri-channel") as pool:
            slab_futures: dict[str, list[Future[tuple[str, int, float]]]] = {seq: [] for _, seq in present}
            norm_futures: list[Future[tuple[dict[str, Any], float]]] = []

            def normalize_after_slabs(ch: int, seq: str) -> tuple[dict[str, Any], float]:
                for future in slab_futures[seq]:
                    future.result()
                return normalize(ch, seq)

            for index, (_, seq) in enumerate(present):
                for item in (item for item in slabs if item[1] == seq):
                    slab_futures[seq].append(pool.submit(resample_slab, *item))
                if index > 0:  # the previous channel's normalization, behind this channel's slabs
                    norm_futures.append(pool.submit(normalize_after_slabs, *present[index - 1]))
            norm_futures.append(pool.submit(normalize_after_slabs, *present[-1]))
            slab_results = [future.result() for futures in slab_futures.values() for future in futures]
            norm_results = [future.result() for future in norm_futures]
        # the stages overlap: split their wall time in proportion to their busy time (the stages add up)
        wall = time.perf_counter() - t
        busy_resample = sum(r[2] for r in slab_results)
        busy = busy_resample + sum(r[1] for r in norm_results)
        share = busy_resample / busy if busy > 0 else 1.0
        t_mid = t + wall * share
    else:
        slab_results = [resample_slab(*item) for item in slabs]
        t_mid = time.perf_counter()
        norm_results = [normalize(*item) for item in present]
    timer.t["resample"] = timer.t.get("resample", 0.0) + (t_mid - t)
    timer.t["normalize"] = timer.t.get("normalize", 0.0) + (time.perf_counter() - t_mid)
    inside_count = {seq: 0 for _, seq in present}
    for seq, n_inside, _ in slab_results:
        inside_count[seq] += n_inside
    results = [(params, inside_count[seq] > 0) for (_, seq), (params, _) in zip(present, norm_results)]
    per_channel = dict(zip((seq for _, seq in present), results))
    for ch, seq in enumerate(SEQUENCES):
        if seq not in built:
            tensor[ch] = MISSING_CHANNEL_FILL_VALUE
            if seq not in selection.choices and not any(w.startswith(f"{seq} missing") for w in warnings):
                warnings.append(
                    f"{seq} missing: no series identified as {seq}; channel filled with "
                    f"{MISSING_CHANNEL_FILL_VALUE:g}, availability 0"
                )
            norm_meta[seq] = None
            continue
        params, any_inside = per_channel[seq]
        availability[ch] = 1.0
        norm_meta[seq] = params
        if not any_inside:
            warnings.append(f"{seq}: its field of view does not overlap the T2W-centred grid")
        if seq == "adc":
            med = params.get("median_inside_fov")
            lo, hi = ADC_PLAUSIBLE_MEDIAN_RANGE
            if med is not None and not lo <= med <= hi:
                warnings.append(
                    f"adc: median {med:.4g} inside the FOV is outside {lo:g}..{hi:g}; expected unit 1e-6 mm^2/s"
                )

    timer.t["total"] = time.perf_counter() - t_total
    meta: dict[str, Any] = {
        "contract_version": CONTRACT_VERSION,
        "sequences": list(SEQUENCES),
        "availability": {seq: bool(availability[i]) for i, seq in enumerate(SEQUENCES)},
        "study_instance_uid": study_uid,
        "series": {seq: (built[seq][0].to_meta() if seq in built else None) for seq in SEQUENCES},
        "source_volumes": {seq: (built[seq][1].to_meta() if seq in built else None) for seq in SEQUENCES},
        "series_table": selection.series_table,
        "skipped": skipped,
        "normalization": norm_meta,
        "grid_spec": settings.grid.to_dict(),
        "grid": geometry.to_dict(),
        "rules": rules.source,
        "warnings": warnings,
        "num_objects": len(ingested.datasets) + len(ingested.skipped),
        "timings_s": {k: round(v, 6) for k, v in timer.t.items()},
    }
    for warning in warnings:
        logger.warning("study %s: %s", uid_hash(study_uid), warning)
    return PreprocessedStudy(tensor=tensor, availability=availability, geometry=geometry, meta=meta)
