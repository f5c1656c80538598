"""DICOM ingestion: read every object once (headers + raw pixel bytes, no decoding) and describe its frames.

Sources are a folder (recursive, any file names), a sequence of raw DICOM bytes (what the gRPC service
receives) or already-read :class:`pydicom.Dataset` objects. Pixel data is decoded later, only for the
series that are chosen (:func:`decode_frames`).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

from preprocessing.codecs import FAST_SYNTAXES, decode_encapsulated
from preprocessing.errors import (
    CorruptDicomError,
    NotDicomError,
    TooManyInstancesError,
    TruncatedDicomError,
    UnsupportedPixelDataError,
)
from preprocessing.fast_dicom import fast_dcmread, intern_tag
from preprocessing.parallel_decode import available_cores

Source = Path | str | Sequence[bytes] | Sequence[Dataset] | Mapping[str, Sequence[Dataset]]

ENHANCED_MR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
#: SOP classes that must carry Pixel Data; such an object without it was cut short.
_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        *ENHANCED_MR_SOP_CLASSES,
    }
)
#: implicit / explicit LE, and deflated explicit LE (inflated by the reader: its Pixel Data is native LE)
_UNCOMPRESSED_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})
#: pydicom decoding plugin per compressed transfer syntax, the fastest measured of the declared ones
#: (docs/preprocessing.md, "Compressed pixel data"); another available plugin is used when it is missing.
DECODING_PLUGINS: dict[str, str] = {
    "1.2.840.10008.1.2.5": "pylibjpeg",  # RLE Lossless: pylibjpeg-rle
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless: pyjpegls (CharLS)
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg",  # JPEG 2000 Lossless: pylibjpeg-openjpeg
    "1.2.840.10008.1.2.4.91": "pylibjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg",  # HTJ2K Lossless: pylibjpeg-openjpeg (openjpeg >= 2.5)
    "1.2.840.10008.1.2.4.202": "pylibjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.70": "gdcm",  # JPEG Lossless SV1: python-gdcm (pylibjpeg-libjpeg is GPL-3.0)
    "1.2.840.10008.1.2.4.57": "gdcm",  # JPEG Lossless
    "1.2.840.10008.1.2.4.50": "gdcm",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "gdcm",  # JPEG Extended
}
_PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
_GE_BVALUE = Tag(0x0043, 0x1039)
_SIEMENS_BVALUE = Tag(0x0019, 0x100C)
#: VRs whose pydicom conversion depends only on the raw bytes (not on the dataset's character set)
_CHARSET_FREE_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "US", "SS", "UL", "SL", "FL", "FD"}
)


#: exceptions that reading or converting a damaged header element raises (pydicom and int()/float())
HEADER_EXCEPTIONS: tuple[type[Exception], ...] = (
    ValueError,  # a number that does not parse (also UnicodeDecodeError)
    TypeError,  # int(None), int([..]) of a missing or multi-valued element
    NotImplementedError,  # pydicom: unknown VR
    AttributeError,  # a required element missing
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
    EOFError,
)
_KNOWN_VRS = frozenset(str(v) for v in VR)


@contextmanager
def header_errors(label: str) -> Iterator[None]:
    """Turn the exceptions of a damaged header (see :data:`HEADER_EXCEPTIONS`) into :class:`CorruptDicomError`.

    Wrap every place that converts header elements of one object; ``label`` names the object's file.
    """
    try:
        yield
    except HEADER_EXCEPTIONS as err:
        detail = str(err).splitlines()[0][:160] if str(err) else ""
        raise CorruptDicomError(f"{label}: corrupt DICOM header ({type(err).__name__}: {detail})") from err


def _looks_like_damaged_dicom(data: bytes) -> bool:
    """A file pydicom refused as 'not DICOM' that still carries DICOM traits (a damaged one, not a README)."""
    head = data[:1024]
    if b"DICM" in head:
        return True
    if len(data) >= 32 and not any(data[: min(len(data), 128)]):
        return True  # the zero preamble of a Part 10 file, cut or with a damaged DICM prefix
    return data[:4] in (b"\x02\x00\x00\x00", b"\x02\x00\x01\x00", b"\x08\x00\x05\x00", b"\x08\x00\x08\x00")


def _check_vrs(ds: Dataset, label: str) -> None:
    """Refuse a dataset with an element whose VR is not a DICOM VR (a damaged explicit-VR header)."""
    for tag, elem in ds._dict.items():
        if isinstance(elem, RawDataElement) and elem.VR is not None and elem.VR not in _KNOWN_VRS:
            raise CorruptDicomError(f"{label}: corrupt DICOM header (element {Tag(tag)} has unknown VR {elem.VR!r})")


class HeaderValueCache:
    """Per-read memo of header values derived from raw (not yet converted) data elements.

    The frames of a series repeat most header values byte for byte (Rows, PixelSpacing, UIDs, rescale,
    ...): each distinct raw value of a public, character-set independent element is converted by pydicom
    and passed through ``derive`` once; later frames reuse the result. ``derive`` must be a module-level
    function returning an immutable value, so results are the same as without the cache. One instance
    per :func:`read_source` call (no state shared between calls).
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], Any] = {}

    def value(self, ds: Dataset, keyword: str, derive: Callable[[Any], Any], default: Any = None) -> Any:
        """``derive(ds.get(keyword, default))``, memoized on the element's raw bytes where that is exact."""
        tag = _keyword_tag(keyword)
        elem = ds._dict.get(tag)
        if (
            isinstance(elem, RawDataElement)
            and elem.VR in _CHARSET_FREE_VRS
            and elem.value is not None
            and not tag.is_private
        ):
            key = (derive, tag, elem.VR, elem.value, elem.is_implicit_VR, elem.is_little_endian)
            try:
                return self._memo[key]
            except KeyError:
                result = derive(ds.get(keyword, default))
                self._memo[key] = result
                return result
        return derive(ds.get(keyword, default))


_CACHED_KEYWORDS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "InstanceNumber",
    "RescaleSlope",
    "RescaleIntercept",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "DiffusionBValue",
    "TransferSyntaxUID",
)
#: read-only; the interned tag objects the fast reader keys its elements with (lookups match by identity)
_KEYWORD_TAGS: dict[str, BaseTag] = {kw: intern_tag(tag_for_keyword(kw) or 0) for kw in _CACHED_KEYWORDS}


def _keyword_tag(keyword: str) -> BaseTag:
    return _KEYWORD_TAGS[keyword]


@dataclass(frozen=True)
class FrameHeader:
    """One 2D image plane: a single-frame instance, or one frame of an enhanced multi-frame instance.

    Geometry fields are ``None`` when the object lacks them (the volume builder then refuses the series).
    """

    instance: int  #: index into :attr:`Ingested.datasets`
    frame_index: int | None  #: 0-based frame of a multi-frame object, ``None`` for single-frame
    position_lps_mm: tuple[float, float, float] | None  #: ImagePositionPatient (centre of first voxel)
    orientation: tuple[float, ...] | None  #: ImageOrientationPatient, 6 direction cosines (row, column)
    pixel_spacing_mm: tuple[float, float] | None  #: PixelSpacing (between rows, between columns)
    rows: int
    columns: int
    rescale_slope: float
    rescale_intercept: float
    b_value_s_per_mm2: float | None
    instance_number: int | None


@dataclass
class SeriesInfo:
    """Header summary of one series (all its frames); nothing is decoded yet."""

    study_uid: str
    series_uid: str
    modality: str
    sop_class_uid: str
    description: str
    protocol_name: str
    series_number: int | None
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    frames: list[FrameHeader] = field(default_factory=list)

    @property
    def b_values_s_per_mm2(self) -> list[float]:
        """Distinct b-values (s/mm^2) found in the frame headers, ascending."""
        return sorted({f.b_value_s_per_mm2 for f in self.frames if f.b_value_s_per_mm2 is not None})

    def summary(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "description": self.description,
            "protocol_name": self.protocol_name,
            "series_number": self.series_number,
            "modality": self.modality,
            "image_type": list(self.image_type),
            "num_frames": len(self.frames),
            "b_values_s_per_mm2": self.b_values_s_per_mm2,
        }


@dataclass
class Ingested:
    """Every readable DICOM object of the input plus the objects skipped while reading."""

    datasets: list[Dataset]
    labels: list[str]  #: where each dataset came from (relative file path or ``bytes[i]``)
    skipped: list[dict[str, str]]  #: ``{"source": ..., "reason": ...}``
    #: memo of converted header values for this input (see :class:`HeaderValueCache`)
    values: HeaderValueCache = field(default_factory=HeaderValueCache)


def _int_or_zero(value: Any) -> int:
    return int(value or 0)


def _int_or_one(value: Any) -> int:
    return int(value or 1)


def _int_or_none(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _slope(value: Any) -> float:
    return float(value) if value not in (None, "") else 1.0


def _intercept(value: Any) -> float:
    return float(value) if value not in (None, "") else 0.0


def _floats2(value: Any) -> tuple[float, ...] | None:
    return _floats(value, 2)


def _floats3(value: Any) -> tuple[float, ...] | None:
    return _floats(value, 3)


def _floats6(value: Any) -> tuple[float, ...] | None:
    return _floats(value, 6)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _list_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names))
    return files


def _check_complete(ds: Dataset, label: str, cache: HeaderValueCache | None = None) -> None:
    """Raise :class:`TruncatedDicomError` when the last element is shorter than declared, or pixel data is short."""
    cache = cache or HeaderValueCache()
    keys = list(ds.keys())
    if not keys:
        raise TruncatedDicomError(f"{label}: truncated DICOM file (no data elements after the file meta)")
    if keys:
        last = ds.get_item(keys[-1])
        if (
            isinstance(last, RawDataElement)
            and last.length != 0xFFFFFFFF
            and last.value is not None
            and len(last.value) < last.length
        ):
            raise TruncatedDicomError(
                f"{label}: truncated DICOM file (element {Tag(last.tag)} declares {last.length} bytes, "
                f"{len(last.value)} present)"
            )
    sop_class = cache.value(ds, "SOPClassUID", str, "")
    meta = getattr(ds, "file_meta", None)
    if not sop_class and meta is not None:
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
    if sop_class in _IMAGE_SOP_CLASSES and "PixelData" not in ds:
        raise TruncatedDicomError(f"{label}: truncated DICOM file ({UID(sop_class).name} without Pixel Data)")
    if "PixelData" in ds and _is_uncompressed(ds, cache):
        expected = _expected_pixel_bytes(ds, cache)
        raw = ds._dict.get(_PIXEL_DATA_TAG)
        # an OB/OW value converts to the same bytes: take the length without converting the element
        actual = len(raw.value) if isinstance(raw, RawDataElement) and raw.value is not None else len(ds.PixelData)
        if expected is not None and actual < expected:
            raise TruncatedDicomError(f"{label}: truncated DICOM file (Pixel Data has {actual} of {expected} bytes)")


def transfer_syntax(ds: Dataset, cache: HeaderValueCache | None = None) -> str:
    """The file meta's TransferSyntaxUID as a string (``""`` without file meta or without the element)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return ""
    if cache is None or not isinstance(meta, Dataset):
        return str(getattr(meta, "TransferSyntaxUID", ""))
    return str(cache.value(meta, "TransferSyntaxUID", str, ""))


def _is_uncompressed(ds: Dataset, cache: HeaderValueCache | None = None) -> bool:
    tsyntax = transfer_syntax(ds, cache)
    return tsyntax in _UNCOMPRESSED_SYNTAXES or tsyntax == "1.2.840.10008.1.2.2" or tsyntax == ""


def _expected_pixel_bytes(ds: Dataset, cache: HeaderValueCache) -> int | None:
    try:
        frames = cache.value(ds, "NumberOfFrames", _int_or_one, 1)
        bits = cache.value(ds, "BitsAllocated", int)  # missing -> int(None) -> TypeError, as AttributeError before
        rows, cols = cache.value(ds, "Rows", int), cache.value(ds, "Columns", int)
        return int(rows * cols * frames * cache.value(ds, "SamplesPerPixel", int, 1) * bits // 8)
    except (AttributeError, TypeError, ValueError):
        return None


def _read_one(data: bytes, label: str, cache: HeaderValueCache | None = None) -> Dataset:
    """Read one object; :class:`InvalidDicomError` means 'not DICOM', other failures mean a damaged file.

    The common encoding is read by :func:`~preprocessing.fast_dicom.fast_dcmread` (same dataset,
    faster); everything else by :func:`pydicom.dcmread`.
    """
    try:
        fast = fast_dcmread(data)
    except Exception:  # anything the fast reader trips over is left to pydicom, which reports it as before
        fast = None
    if fast is not None:
        with header_errors(label):
            _check_complete(fast, label, cache)
        return fast
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise
    except Exception as err:  # struct.error, EOFError, BytesLengthException, ...: all mean a damaged file
        raise TruncatedDicomError(f"{label}: truncated or corrupt DICOM file ({type(err).__name__})") from err
    with header_errors(label):
        _check_vrs(ds, label)
        if ds.file_meta is not None:
            _check_vrs(ds.file_meta, label)
        _check_complete(ds, label, cache)
    return ds


def read_source(source: Source, max_instances: int) -> Ingested:
    """Read every DICOM object of ``source`` once (no pixel decoding).

    Non-DICOM files inside a folder are skipped and recorded; an input without any DICOM object raises
    :class:`NotDicomError`. A damaged DICOM object raises :class:`TruncatedDicomError`.
    """
    if isinstance(source, bytes | bytearray | memoryview):  # one object's bytes, not a sequence of objects
        source = [bytes(source)]
    if isinstance(source, Mapping):  # e.g. SyntheticStudy.series: {name: [Dataset, ...]}
        source = [obj for group in source.values() for obj in group]
    if isinstance(source, str | Path):
        folder = Path(source)
        if folder.is_file():
            items: list[tuple[bytes | Path | Dataset, str]] = [(folder, folder.name)]
        elif folder.is_dir():
            items = [(p, str(p.relative_to(folder))) for p in _list_files(folder)]
        else:
            raise NotDicomError(f"{folder}: no such file or folder")
    else:
        items = []
        for i, obj in enumerate(source):
            if isinstance(obj, Dataset):
                items.append((obj, f"dataset[{i}]"))
            elif isinstance(obj, bytes | bytearray | memoryview):
                items.append((bytes(obj), f"bytes[{i}]"))
            else:
                raise NotDicomError(f"item {i} of the input is {type(obj).__name__}, not DICOM bytes or a Dataset")
    if len(items) > max_instances:
        raise TooManyInstancesError(
            f"input holds {len(items)} objects, more than the limit of {max_instances} instances"
        )
    reader = SourceReader(max_instances)
    for obj, label in items:
        reader.add(obj, label)
    return reader.finish()


class SourceReader:
    """:func:`read_source` one object at a time, e.g. while a study is still arriving over the network.

    ``add`` each object in order, then ``finish``; the result equals :func:`read_source` on the same objects.
    Not thread-safe: one caller at a time (the objects share a header-value cache).
    """

    def __init__(self, max_instances: int) -> None:
        self.max_instances = max_instances
        self.datasets: list[Dataset] = []
        self.labels: list[str] = []
        self.skipped: list[dict[str, str]] = []
        self.damaged: list[str] = []
        self.cache = HeaderValueCache()
        self.count = 0

    def add(self, obj: bytes | Path | Dataset, label: str) -> None:
        """Read one object's header (no pixel decoding); raises the typed errors of :func:`read_source`."""
        self.count += 1
        if self.count > self.max_instances:
            raise TooManyInstancesError(f"input holds more than the limit of {self.max_instances} instances")
        if isinstance(obj, Dataset):
            with header_errors(label):
                _check_complete(obj, label, self.cache)
            ds = obj
        else:
            if isinstance(obj, Path):
                try:
                    obj = obj.read_bytes()
                except OSError as err:
                    self.skipped.append(
                        {"source": label, "reason": f"unreadable file ({err.strerror or type(err).__name__})"}
                    )
                    return
            try:
                ds = _read_one(obj, label, self.cache)
            except InvalidDicomError:
                if _looks_like_damaged_dicom(obj):
                    self.damaged.append(label)
                self.skipped.append({"source": label, "reason": "not a DICOM file"})
                return
        self.datasets.append(ds)
        self.labels.append(label)

    def finish(self) -> Ingested:
        """Everything read; raises :class:`NotDicomError` without any DICOM object, :class:`CorruptDicomError`
        when a damaged DICOM file lies among readable ones."""
        if not self.datasets:
            what = f"{self.count} input object(s)" if self.count else "an empty input"
            raise NotDicomError(f"no DICOM object found in {what}")
        if self.damaged:  # next to readable DICOM objects, a damaged one may be a lost slice: never drop it silently
            raise CorruptDicomError(
                f"{self.damaged[0]}: damaged DICOM file (a preamble or DICM prefix, but no readable file meta)"
                + (f"; {len(self.damaged) - 1} more such file(s)" if len(self.damaged) > 1 else "")
            )
        return Ingested(datasets=self.datasets, labels=self.labels, skipped=self.skipped, values=self.cache)


# --------------------------------------------------------------------------------------------------
# Header interpretation
# --------------------------------------------------------------------------------------------------
def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` numbers of a multi-valued DS element; ``None`` when absent or empty.

    Raises:
        ValueError: a present value that is not ``n`` finite numbers (a damaged header, named by the caller).
    """
    if value is None or value == "" or (isinstance(value, list | tuple | pydicom.multival.MultiValue) and not value):
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"a value that should be {n} numbers does not parse") from None
    if len(vals) != n or not all(np.isfinite(vals)):
        raise ValueError(f"{len(vals)} value(s) where {n} finite numbers are expected")
    return vals


def _number(value: Any) -> float | None:
    """First number of a (possibly private, possibly raw-bytes) element value."""
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("ascii", errors="ignore").replace("\x00", " ").strip()
        value = text.split("\\")[0] if text else None
        if value is None:
            return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def b_value_of(ds: Dataset, cache: HeaderValueCache | None = None) -> float | None:
    """b-value (s/mm^2) of a single-frame object: DiffusionBValue, else GE (0043,1039), else Siemens (0019,100C)."""
    b = (cache or HeaderValueCache()).value(ds, "DiffusionBValue", _number)
    if b is not None:
        return b
    if _GE_BVALUE in ds:
        b = _number(ds[_GE_BVALUE].value)
        if b is not None:
            return b % 1e9 if b >= 1e9 else b  # some GE versions add 1e9 to the b-value
    if _SIEMENS_BVALUE in ds:
        return _number(ds[_SIEMENS_BVALUE].value)
    return None


def _first(seq_parent: Dataset | None, seq_name: str) -> Dataset | None:
    if seq_parent is None:
        return None
    seq = seq_parent.get(seq_name)
    return seq[0] if seq else None


def _frames_of(ds: Dataset, instance: int, cache: HeaderValueCache) -> list[FrameHeader]:
    rows, cols = cache.value(ds, "Rows", _int_or_zero, 0), cache.value(ds, "Columns", _int_or_zero, 0)
    inst_no = cache.value(ds, "InstanceNumber", _int_or_none)
    if cache.value(ds, "SOPClassUID", str, "") in ENHANCED_MR_SOP_CLASSES or "PerFrameFunctionalGroupsSequence" in ds:
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        n = int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame))
        frames = []
        for f in range(n):
            pf = per_frame[f] if f < len(per_frame) else None

            def group(name: str, pf: Dataset | None = pf) -> Dataset | None:
                return _first(pf, name) or _first(shared, name)

            pos = group("PlanePositionSequence")
            ori = group("PlaneOrientationSequence")
            pix = group("PixelMeasuresSequence")
            pvt = group("PixelValueTransformationSequence")
            dif = group("MRDiffusionSequence")
            frames.append(
                FrameHeader(
                    instance=instance,
                    frame_index=f,
                    position_lps_mm=_floats(pos.get("ImagePositionPatient") if pos else None, 3),  # type: ignore[arg-type]
                    orientation=_floats(ori.get("ImageOrientationPatient") if ori else None, 6),
                    pixel_spacing_mm=_floats(pix.get("PixelSpacing") if pix else None, 2),  # type: ignore[arg-type]
                    rows=rows,
                    columns=cols,
                    rescale_slope=float(pvt.get("RescaleSlope", 1.0) or 1.0) if pvt else 1.0,
                    rescale_intercept=float(pvt.get("RescaleIntercept", 0.0) or 0.0) if pvt else 0.0,
                    b_value_s_per_mm2=_number(dif.get("DiffusionBValue")) if dif else None,
                    instance_number=inst_no,
                )
            )
        return frames
    return [
        FrameHeader(
            instance=instance,
            frame_index=None,
            position_lps_mm=cache.value(ds, "ImagePositionPatient", _floats3),
            orientation=cache.value(ds, "ImageOrientationPatient", _floats6),
            pixel_spacing_mm=cache.value(ds, "PixelSpacing", _floats2),
            rows=rows,
            columns=cols,
            rescale_slope=cache.value(ds, "RescaleSlope", _slope),
            rescale_intercept=cache.value(ds, "RescaleIntercept", _intercept),
            b_value_s_per_mm2=b_value_of(ds, cache),
            instance_number=inst_no,
        )
    ]


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\") if v.strip())
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def series_key(ds: Dataset, cache: HeaderValueCache | None = None) -> tuple[str, str]:
    """``(StudyInstanceUID, SeriesInstanceUID)`` of an object (empty strings when absent)."""
    cache = cache or HeaderValueCache()
    return cache.value(ds, "StudyInstanceUID", str, ""), cache.value(ds, "SeriesInstanceUID", str, "")


def describe_series(ingested: Ingested, indices: Sequence[int]) -> SeriesInfo:
    """Build the :class:`SeriesInfo` of the objects ``indices`` (all of one series), frames in input order."""
    first = ingested.datasets[indices[0]]
    with header_errors(ingested.labels[indices[0]]):
        info = _series_info(first)
    for i in indices:
        with header_errors(ingested.labels[i]):
            info.frames.extend(_frames_of(ingested.datasets[i], i, ingested.values))
    return info


def _series_info(first: Dataset) -> SeriesInfo:
    study_uid, series_uid = series_key(first)
    sn = first.get("SeriesNumber")
    return SeriesInfo(
        study_uid=study_uid,
        series_uid=series_uid,
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        description=str(first.get("SeriesDescription", "") or ""),
        protocol_name=str(first.get("ProtocolName", "") or ""),
        series_number=int(sn) if sn not in (None, "") else None,
        image_type=_strings(first.get("ImageType")),
        scanning_sequence=_strings(first.get("ScanningSequence")),
    )


# --------------------------------------------------------------------------------------------------
# Pixel decoding (chosen series only)
# --------------------------------------------------------------------------------------------------
def _required_int(ds: Dataset, keyword: str, cache: HeaderValueCache, label: str) -> int:
    """``int(ds.<keyword>)``; a missing or empty element raises :class:`CorruptDicomError` naming it."""
    if _keyword_tag(keyword) not in ds._dict or ds._dict[_keyword_tag(keyword)].value in (None, b"", ""):
        raise CorruptDicomError(f"{label}: corrupt DICOM header (required element {keyword} is missing or empty)")
    with header_errors(label):
        return int(cache.value(ds, keyword, int))


def _decode_instance(ds: Dataset, label: str, cache: HeaderValueCache | None = None) -> np.ndarray:
    """Stored pixel values of one object as ``[frames, rows, columns]`` (no rescale applied)."""
    cache = cache or HeaderValueCache()
    if cache.value(ds, "SamplesPerPixel", _int_or_one, 1) != 1:
        raise UnsupportedPixelDataError(f"{label}: colour pixel data (SamplesPerPixel != 1) is not an MR image")
    rows, cols = _required_int(ds, "Rows", cache, label), _required_int(ds, "Columns", cache, label)
    frames = cache.value(ds, "NumberOfFrames", _int_or_one, 1)
    bits_alloc = _required_int(ds, "BitsAllocated", cache, label)
    bits_stored = int(cache.value(ds, "BitsStored", int, bits_alloc))
    signed = cache.value(ds, "PixelRepresentation", int, 0) == 1
    tsyntax = transfer_syntax(ds, cache)
    little = tsyntax in _UNCOMPRESSED_SYNTAXES or (tsyntax == "" and getattr(ds, "is_little_endian", True) is not False)
    # Fast path: uncompressed little-endian 8/16-bit data straight from the bytes.
    if little and bits_alloc in (8, 16) and (bits_stored == bits_alloc or not signed):
        dtype = np.dtype(f"{'i' if signed else 'u'}{bits_alloc // 8}").newbyteorder("<")
        n = rows * cols * frames
        arr = np.frombuffer(ds.PixelData, dtype=dtype, count=n)
        if not signed and bits_stored < bits_alloc:
            arr = arr & np.asarray((1 << bits_stored) - 1, dtype=dtype)
        return arr.reshape(frames, rows, cols)
    try:
        fast: np.ndarray | None = None
        if tsyntax in FAST_SYNTAXES:  # imagecodecs: same values, faster, without the GIL
            fast = decode_encapsulated(ds.PixelData, tsyntax, frames, rows, cols, bits_alloc, bits_stored, signed)
        arr = fast if fast is not None else _decode_compressed(ds, tsyntax)
    except Exception as err:  # codec missing, corrupt fragments, ...
        name = UID(tsyntax).name if tsyntax else "no transfer syntax"
        detail = str(err).splitlines()[0][:120] if str(err) else ""
        raise UnsupportedPixelDataError(
            f"{label}: cannot decode pixel data in transfer syntax {name} ({tsyntax or '-'}): "
            f"{type(err).__name__}: {detail}"
        ) from err
    if arr.size != frames * rows * cols:
        raise CorruptDicomError(
            f"{label}: decoded pixel data has {arr.size} values, the header says {frames * rows * cols}"
        )
    return np.asarray(arr).reshape(frames, rows, cols)


def _decode_compressed(ds: Dataset, tsyntax: str) -> np.ndarray:
    """``ds.pixel_array`` with the preferred plugin of :data:`DECODING_PLUGINS` (any available one without it)."""
    plugin = DECODING_PLUGINS.get(tsyntax)
    if plugin:
        from pydicom.pixels import get_decoder

        try:
            available = plugin in get_decoder(UID(tsyntax)).available_plugins
        except Exception:  # noqa: BLE001 - no decoder for this syntax at all: pixel_array names the problem
            available = False
        if available:
            ds.pixel_array_options(decoding_plugin=plugin)
    return np.asarray(ds.pixel_array)


def decode_instance_checked(ds: Dataset, label: str, cache: HeaderValueCache | None = None) -> np.ndarray:
    """Stored pixel values of one object as ``[frames, rows, columns]``; a damaged header raises
    :class:`CorruptDicomError` naming ``label`` (module-level: worker processes run it too)."""
    with header_errors(label):
        return _decode_instance(ds, label, cache)


#: threads that decode one series' compressed objects (at most; fewer on fewer cores)
MAX_DECODE_THREADS = 4
#: fewer objects than this are decoded in the calling thread
MIN_THREADED_OBJECTS = 4


def decode_frames(
    ingested: Ingested,
    frames: Sequence[FrameHeader],
    needed: tuple[int, int] | None = None,
    workers: int = 0,
) -> np.ndarray:
    """Decode ``frames`` and apply each frame's RescaleSlope/Intercept. Returns float32 ``[N, rows, cols]``.

    Every object is decoded once, even when several of its frames are requested. ``needed``: only frames
    ``[start, stop)`` are decoded (e.g. the slices a resampling reads,
    :func:`preprocessing.grid.source_slices_needed`); the others are left 0 and their objects are not
    decoded at all. ``None``: every frame. ``workers``: when every object to decode is compressed (and there
    are at least :data:`preprocessing.parallel_decode.MIN_OBJECTS`), they are decoded in up to this many
    worker processes (:mod:`preprocessing.parallel_decode`); same values, same first error. Without worker
    processes, objects whose syntax :mod:`preprocessing.codecs` decodes (without the GIL) are decoded in up to
    :data:`MAX_DECODE_THREADS` threads (one per core) when there are at least :data:`MIN_THREADED_OBJECTS`.
    """
    if not frames:
        raise ValueError("no frames to decode")
    rows, cols = frames[0].rows, frames[0].columns
    start, stop = (0, len(frames)) if needed is None else needed
    if start > 0 or stop < len(frames):
        out = np.zeros((len(frames), rows, cols), dtype=np.float32)
    else:
        out = np.empty((len(frames), rows, cols), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    instances = list(dict.fromkeys(frames[n].instance for n in range(start, stop)))  # in first-use order
    threads = min(available_cores(), MAX_DECODE_THREADS)
    if workers < 2 and threads >= 2 and len(instances) >= MIN_THREADED_OBJECTS:
        # decoders that release the GIL (imagecodecs) run in threads when every object uses one; results and
        # the first error (in input order: pool.map) are those of the loop below
        fast = [i for i in instances if transfer_syntax(ingested.datasets[i], ingested.values) in FAST_SYNTAXES]
        if len(fast) == len(instances):
            with ThreadPoolExecutor(threads, thread_name_prefix="mpmri-decode") as pool:
                decoded = pool.map(
                    lambda i: decode_instance_checked(ingested.datasets[i], ingested.labels[i], ingested.values),
                    fast,
                )
                cache.update(zip(fast, decoded))
    if workers >= 2 and not any(_is_uncompressed(ingested.datasets[i], ingested.values) for i in instances):
        from preprocessing.parallel_decode import decode_objects

        arrays = decode_objects(
            decode_instance_checked,
            [ingested.datasets[i] for i in instances],
            [ingested.labels[i] for i in instances],
            workers,
        )
        cache.update(zip(instances, arrays))
    for n in range(start, stop):
        fr = frames[n]
        stored = cache.get(fr.instance)
        if stored is None:
            label = ingested.labels[fr.instance]
            stored = decode_instance_checked(ingested.datasets[fr.instance], label, ingested.values)
            cache[fr.instance] = stored
        if stored.shape[1:] != (rows, cols):
            label = ingested.labels[fr.instance]
            raise CorruptDicomError(f"{label}: pixel data is {stored.shape[1:]}, the series is {(rows, cols)}")
        out[n] = stored[fr.frame_index or 0]
    if stop <= start:
        return out
    part = frames[start:stop]
    slopes = np.asarray([f.rescale_slope for f in part], dtype=np.float32)
    intercepts = np.asarray([f.rescale_intercept for f in part], dtype=np.float32)
    if np.any(slopes != 1.0) or np.any(intercepts != 0.0):
        view = out[start:stop]
        view *= slopes[:, None, None]
        view += intercepts[:, None, None]
    return out
