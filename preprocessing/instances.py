"""Instances as PACS send them: resent copies and re-acquired slices.

Two steps, each a pure function of the ingested headers (nothing is decoded):

* :func:`drop_resent_instances` (right after reading): objects sharing a SOPInstanceUID are one DICOM
  instance sent twice (routers resend, folders get copied). The first copy in input order is kept
  (folder: sorted relative path; bytes/datasets: list order), the others are dropped and counted in a
  warning. Copies must have the same content (every data element outside the file meta; the file meta,
  e.g. a router's ImplementationClassUID, may differ); a copy whose content differs is refused with
  :class:`~preprocessing.errors.ConflictingInstancesError`, because nothing tells which one is right.
* :func:`resolve_reacquired_slices` (per chosen series, before the geometry checks): two *different*
  instances at one slice position of one series are a re-acquired slice (scanners repeat slices
  disturbed by motion). The later acquisition is kept, by the key ``(AcquisitionDateTime or
  AcquisitionDate + AcquisitionTime, ContentDate + ContentTime, InstanceNumber)``, and a warning
  counts the replaced slices. When that key ties, the series is refused with
  :class:`~preprocessing.errors.DuplicateSliceError` naming the series and the position.

Messages never hold raw UIDs (see :func:`preprocessing.pipeline.uid_hash`) or patient data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from preprocessing.dicom_io import FrameHeader, Ingested, header_errors
from preprocessing.errors import ConflictingInstancesError, DuplicateSliceError
from preprocessing.volume import GeometryTolerance, slice_normal_of

_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)
#: Recency key of an instance; missing parts are -inf so that an instance carrying a time wins.
Recency = tuple[float, float, float]
_MISSING = -math.inf
_DEFAULT_TOLERANCE = GeometryTolerance()


def _hash(uid: bytes | str) -> str:
    raw = uid if isinstance(uid, bytes) else uid.encode()
    return hashlib.sha256(raw).hexdigest()[:10]


def _sop_uid(ds: Dataset) -> bytes:
    """SOPInstanceUID as bytes (raw element read without conversion; padding stripped); ``b""`` when absent."""
    elem = ds._dict.get(_SOP_INSTANCE_UID)
    if elem is None:
        return b""
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"").rstrip(b"\x00 ")
    return str(elem.value or "").strip().encode()


def same_content(a: Dataset, b: Dataset) -> bool:
    """True when two datasets hold the same data elements with the same values (file meta not compared).

    Raw (not yet converted) elements are compared on VR and value bytes, others on converted values.
    """
    if a is b:
        return True
    keys = set(a._dict)
    if keys != set(b._dict):
        return False
    for tag in keys:
        ea, eb = a._dict[tag], b._dict[tag]
        if (
            isinstance(ea, RawDataElement)
            and isinstance(eb, RawDataElement)
            and ea.VR == eb.VR
            and ea.value == eb.value
            and ea.is_little_endian == eb.is_little_endian
        ):
            continue
        if a[tag].value != b[tag].value or a[tag].VR != b[tag].VR:
            return False
    return True


def drop_resent_instances(ingested: Ingested) -> tuple[Ingested, list[str]]:
    """Keep the first copy of every SOPInstanceUID; return the reduced input and its warnings.

    Dropped copies are also listed in ``skipped`` (``reason`` names the kept copy's source).

    Raises:
        ConflictingInstancesError: two objects share a SOPInstanceUID but differ in content.
    """
    first: dict[bytes, int] = {}
    drop: list[int] = []
    kept_for: dict[int, int] = {}
    for i, ds in enumerate(ingested.datasets):
        uid = _sop_uid(ds)
        if not uid:
            continue
        j = first.setdefault(uid, i)
        if j == i:
            continue
        with header_errors(ingested.labels[i]):
            same = same_content(ingested.datasets[j], ds)
        if not same:
            raise ConflictingInstancesError(
                f"{ingested.labels[i]} and {ingested.labels[j]} share SOPInstanceUID {_hash(uid)} (sha256 prefix) "
                "but differ in content; remove the wrong copy"
            )
        drop.append(i)
        kept_for[i] = j
    if not drop:
        return ingested, []
    dropped = set(drop)
    keep = [i for i in range(len(ingested.datasets)) if i not in dropped]
    skipped = list(ingested.skipped) + [
        {"source": ingested.labels[i], "reason": f"resent instance (same SOPInstanceUID as {ingested.labels[j]})"}
        for i, j in kept_for.items()
    ]
    reduced = Ingested(
        datasets=[ingested.datasets[i] for i in keep],
        labels=[ingested.labels[i] for i in keep],
        skipped=skipped,
        values=ingested.values,
    )
    n_uids = len({_sop_uid(ingested.datasets[j]) for j in kept_for.values()})
    warning = (
        f"resent instances: dropped {len(drop)} duplicate cop{'y' if len(drop) == 1 else 'ies'} of "
        f"{n_uids} SOP instance(s) (same SOPInstanceUID and content); kept the first copy of each"
    )
    return reduced, [warning]


def _digits(value: Any) -> str:
    return "".join(ch for ch in str(value or "") if ch.isdigit() or ch == ".")


def _seconds(date: Any, time: Any) -> float:
    """``DA`` + ``TM`` (also ``HH:MM:SS`` legacy) as seconds since year 0 (approximate calendar; only ordered)."""
    d, t = _digits(date).replace(".", ""), _digits(time)
    if not d and not t:
        return _MISSING
    try:
        days = 0.0
        if len(d) >= 8:
            days = int(d[:4]) * 372.0 + int(d[4:6]) * 31.0 + int(d[6:8])
        whole, _, frac = t.partition(".")
        whole = (whole + "000000")[:6]
        secs = int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6]) + float("0." + (frac or "0"))
    except ValueError:
        return _MISSING
    return days * 86400.0 + secs


def recency(ds: Dataset) -> Recency:
    """``(acquisition time, content time, InstanceNumber)`` of an instance; larger = later."""
    dt = ds.get("AcquisitionDateTime")
    if dt:
        text = _digits(dt)
        acq = _seconds(text[:8], text[8:])
    else:
        acq = _seconds(ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))
    content = _seconds(ds.get("ContentDate"), ds.get("ContentTime"))
    try:
        number = float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = _MISSING
    return acq, content, number


def resolve_reacquired_slices(
    ingested: Ingested,
    frames: Sequence[FrameHeader],
    label: str,
    tol: GeometryTolerance = _DEFAULT_TOLERANCE,
) -> tuple[list[FrameHeader], list[str]]:
    """Keep the later acquisition where several frames of one series share a slice position.

    Frames at positions closer than ``tol.duplicate_mm`` along the slice normal of the first frame are
    one position. Frames without geometry are passed through (the geometry checks name them).

    Returns:
        ``(frames, warnings)``: the frames to stack (input order otherwise kept) and a warning when
        slices were replaced.

    Raises:
        DuplicateSliceError: frames at one position whose recency key ties (nothing tells which is later).
    """
    if len(frames) < 2 or any(f.position_lps_mm is None or f.orientation is None for f in frames):
        return list(frames), []
    normal = slice_normal_of(frames[0].orientation)  # type: ignore[arg-type]
    dist = np.asarray([f.position_lps_mm for f in frames], dtype=np.float64) @ normal
    order = np.argsort(dist, kind="stable")
    gaps = np.diff(dist[order])
    if not np.any(gaps < tol.duplicate_mm):
        return list(frames), []
    # runs of frames (sorted along the normal) closer than duplicate_mm to their neighbour
    groups: list[list[int]] = [[int(order[0])]]
    for gap, idx in zip(gaps, order[1:]):
        if gap < tol.duplicate_mm:
            groups[-1].append(int(idx))
        else:
            groups.append([int(idx)])
    drop: set[int] = set()
    replaced = 0
    for group in groups:
        if len(group) < 2:
            continue
        keys = {}
        for i in group:
            with header_errors(ingested.labels[frames[i].instance]):
                keys[i] = recency(ingested.datasets[frames[i].instance])
        best = max(keys.values())
        winners = [i for i in group if keys[i] == best]
        if len(winners) > 1:
            raise DuplicateSliceError(
                f"{label}: duplicate slice positions ({len(winners)} instances at {dist[group[0]]:.2f} mm along "
                "the normal with the same AcquisitionTime, ContentTime and InstanceNumber; cannot tell which is "
                "the re-acquisition)"
            )
        drop.update(i for i in group if i != winners[0])
        replaced += 1
    kept = [f for i, f in enumerate(frames) if i not in drop]
    warning = (
        f"{label}: {replaced} slice position(s) acquired more than once; kept the later acquisition "
        f"(AcquisitionTime, ContentTime, InstanceNumber) and dropped {len(drop)} earlier slice(s)"
    )
    return kept, [warning]


def missing_instance_numbers(frames: Sequence[FrameHeader], label: str) -> list[str]:
    """A warning when the InstanceNumbers of a series' instances leave holes between their min and max.

    Scanners number the instances of a series 1..N; a hole means an instance was lost on the way (a damaged
    or unsent file). A lost *end* slice leaves no gap in the slice positions, so this is the only trace.
    """
    numbers = {f.instance: f.instance_number for f in frames}
    values = [n for n in numbers.values() if n is not None]
    if len(values) < 2 or len(values) != len(numbers) or len(set(values)) != len(values):
        return []
    lo, hi = min(values), max(values)
    missing = (hi - lo + 1) - len(values)
    if missing <= 0 or missing > 10 * len(values):
        return []
    first = min(set(range(lo, hi + 1)) - set(values))
    return [
        f"{label}: InstanceNumbers {lo}..{hi} lack {missing} number(s) (first {first}); an instance may be missing "
        "(a lost end slice does not show in the slice positions)"
    ]
