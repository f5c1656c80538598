"""Small in-memory DICOM series for tests and benchmarks (synthetic, no patient data).

:func:`make_series` builds a classic single-frame MR series (or one enhanced multi-frame MR object)
whose pixel values are a function of the LPS position of each pixel centre, so tests can place a
marker at a known patient coordinate and check where it lands on the model grid.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

ValueFn = Callable[[np.ndarray], np.ndarray]  # LPS points [..., 3] (mm) -> physical values [...]


def blob(
    center_lps_mm: Sequence[float], sigma_mm: float = 3.0, peak: float = 1000.0, background: float = 100.0
) -> ValueFn:
    """Value function: a Gaussian blob of ``peak`` at ``center_lps_mm`` on a constant ``background``."""
    c = np.asarray(center_lps_mm, dtype=np.float64)

    def fn(p: np.ndarray) -> np.ndarray:
        r2 = np.sum((p - c) ** 2, axis=-1)
        return background + peak * np.exp(-r2 / (2.0 * sigma_mm**2))

    return fn


def slice_axes(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and normal of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=np.float64)
    r, c = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    return r, c, np.cross(r, c)


def oblique_orientation(angle_deg: float, axis: Sequence[float] = (1.0, 0.0, 0.0)) -> tuple[float, ...]:
    """Axial orientation rotated by ``angle_deg`` about ``axis`` (Rodrigues), as 6 direction cosines."""
    k = np.asarray(axis, dtype=np.float64)
    k /= np.linalg.norm(k)
    a = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx
    r, c = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    return tuple(float(v) for v in (*r, *c))


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def make_series(
    *,
    description: str,
    value_fn: ValueFn,
    center_lps_mm: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL,
    rows: int = 64,
    columns: int = 64,
    num_slices: int = 12,
    pixel_spacing_mm: tuple[float, float] = (2.0, 2.0),
    slice_spacing_mm: float = 4.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    modality: str = "MR",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    b_values: Sequence[float] | None = None,
    rescale: tuple[float, float] | None = None,
    instance_order: str = "shuffled",
    enhanced: bool = False,
    seed: int = 0,
) -> list[Dataset]:
    """A synthetic MR series centred on ``center_lps_mm``.

    Args:
        description: SeriesDescription (drives identification).
        value_fn: physical value at LPS points (mm); stored values are ``(value - intercept) / slope``.
        b_values: per stack repetition; a series with ``len(b_values)`` stacks (multi-b DWI) and the
            b-value in DiffusionBValue (or MRDiffusionSequence for ``enhanced``).
        rescale: ``(slope, intercept)`` written as RescaleSlope/RescaleIntercept.
        instance_order: ``"shuffled"``, ``"reversed"`` or ``"sorted"``: order of the returned
            instances and their InstanceNumbers (slice order must not depend on it).
        enhanced: one Enhanced MR Image object with per-frame functional groups instead.

    Returns:
        Datasets with file meta (serializable with :func:`to_bytes`).
    """
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    r, c, n = slice_axes(orientation)
    ps_row, ps_col = pixel_spacing_mm
    centre = np.asarray(center_lps_mm, dtype=np.float64)
    origin0 = (
        centre
        - r * ps_col * (columns - 1) / 2.0
        - c * ps_row * (rows - 1) / 2.0
        - n * slice_spacing_mm * (num_slices - 1) / 2.0
    )
    jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    bs: list[float | None] = list(b_values) if b_values is not None else [None]
    frames: list[tuple[np.ndarray, np.ndarray, float | None]] = []  # (ipp, stored [rows, cols], b)
    for b in bs:
        for k in range(num_slices):
            ipp = origin0 + n * slice_spacing_mm * k
            pts = ipp + ii[..., None] * ps_col * r + jj[..., None] * ps_row * c
            value = value_fn(pts)
            if b is not None:
                value = value * np.exp(-b / 3000.0)  # crude diffusion weighting, keeps the marker visible
            stored = np.clip(np.round((value - intercept) / slope), 0, 65535).astype(np.uint16)
            frames.append((ipp, stored, b))
    order = np.arange(len(frames))
    if instance_order == "shuffled":
        rng.shuffle(order)
    elif instance_order == "reversed":
        order = order[::-1]
    elif instance_order != "sorted":
        raise ValueError(f"unknown instance_order {instance_order!r}")

    def base(sop_class: str) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SYNTH"
        ds.ImageType = list(image_type)
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        return ds

    if enhanced:
        ds = base(ENHANCED_MR_IMAGE_STORAGE)
        ds.NumberOfFrames = len(frames)
        ds.InstanceNumber = 1
        shared = Dataset()
        po = Dataset()
        po.ImageOrientationPatient = [float(v) for v in orientation]
        pm = Dataset()
        pm.PixelSpacing = [ps_row, ps_col]
        pm.SliceThickness = slice_spacing_mm
        shared.PlaneOrientationSequence = DicomSequence([po])
        shared.PixelMeasuresSequence = DicomSequence([pm])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        per_frame = []
        pixels = []
        for idx in order:
            ipp, stored, b = frames[idx]
            fg = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [float(v) for v in ipp]
            fg.PlanePositionSequence = DicomSequence([pp])
            pvt = Dataset()
            pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, intercept, "US"
            fg.PixelValueTransformationSequence = DicomSequence([pvt])
            if b is not None:
                dif = Dataset()
                dif.DiffusionBValue = float(b)
                fg.MRDiffusionSequence = DicomSequence([dif])
            per_frame.append(fg)
            pixels.append(stored)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
        ds.PixelData = np.stack(pixels).tobytes()
        return [ds]

    out = []
    for number, idx in enumerate(order, start=1):
        ipp, stored, b = frames[idx]
        ds = base(MR_IMAGE_STORAGE)
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [ps_row, ps_col]
        ds.SliceThickness = slice_spacing_mm
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if b is not None:
            ds.DiffusionBValue = float(b)
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def to_bytes(ds: Dataset) -> bytes:
    """Serialize a dataset as a DICOM Part 10 file (preamble + file meta)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Corruption (fuzzing): damaged headers as PACS and disks deliver them
# --------------------------------------------------------------------------------------------------
CORRUPTIONS = ("flip", "truncate", "insert", "delete")
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"


def header_length(data: bytes) -> int:
    """Bytes before the (top-level) Pixel Data element of an Explicit/Implicit VR LE file (all if none)."""
    pos = data.rfind(_PIXEL_DATA_TAG_LE)
    return pos if pos > 0 else len(data)


def corrupt(data: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One damaged variant of a DICOM file and a short description of the damage.

    Args:
        data: a Part 10 file.
        kind: ``"flip"`` (1-8 header bytes XORed with random non-zero values), ``"truncate"`` (cut at a
            random offset), ``"insert"`` (1-16 random bytes inserted into the header) or ``"delete"``
            (1-16 header bytes removed).
        rng: the random source (seeded by the caller, so every damage is reproducible).
    """
    header = max(header_length(data), 133)
    if kind == "flip":
        out = bytearray(data)
        positions = rng.integers(128, header, size=int(rng.integers(1, 9)))
        for p in positions:
            out[int(p)] ^= int(rng.integers(1, 256))
        return bytes(out), f"flip {sorted(int(p) for p in positions)}"
    if kind == "truncate":
        cut = int(rng.integers(0, len(data)))
        return data[:cut], f"truncate at {cut} of {len(data)}"
    if kind == "insert":
        p, n = int(rng.integers(128, header)), int(rng.integers(1, 17))
        return data[:p] + rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() + data[p:], f"insert {n} at {p}"
    if kind == "delete":
        p, n = int(rng.integers(128, header)), int(rng.integers(1, 17))
        return data[:p] + data[p + n :], f"delete {n} at {p}"
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


@dataclass(frozen=True)
class FuzzOutcome:
    """What :func:`fuzz_once` saw: ``kind`` is ``"ok"``, ``"explained"`` (a result whose geometry differs
    from the clean study's, with a warning or skipped entry saying why), ``"refused"`` (a
    :class:`~preprocessing.errors.PreprocessError`), or a defect: ``"crash"`` (any other exception),
    ``"silent-geometry"`` (different geometry, nothing said), ``"unnamed"`` (a file-level error that
    names no damaged file) or ``"slow"``."""

    kind: str
    damage: tuple[tuple[int, str], ...]
    detail: str
    seconds: float


def fuzz_once(
    blobs: Sequence[bytes], clean: Any, rng: np.random.Generator, max_files: int = 3, slow_s: float = 10.0
) -> FuzzOutcome:
    """Damage 1..``max_files`` files of ``blobs`` (header flips, truncation, inserted/deleted bytes) and
    preprocess the study from bytes. ``clean`` is the :class:`PreprocessedStudy` of the undamaged study."""
    from preprocessing.errors import CorruptDicomError, PreprocessError
    from preprocessing.pipeline import preprocess_study

    damaged = list(blobs)
    damage = []
    for i in rng.choice(len(damaged), size=int(rng.integers(1, max_files + 1)), replace=False):
        kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
        damaged[int(i)], what = corrupt(damaged[int(i)], kind, rng)
        damage.append((int(i), what))
    t = time.perf_counter()
    try:
        out = preprocess_study(damaged)
    except PreprocessError as err:
        seconds = time.perf_counter() - t
        message = str(err)
        kind = "refused"
        if (
            "\n" in message
            or isinstance(err, CorruptDicomError)
            and not any(f"bytes[{i}]" in message for i, _ in damage)
        ):
            kind = "unnamed"
        return FuzzOutcome(
            kind if seconds < slow_s else "slow", tuple(damage), f"{type(err).__name__}: {message}", seconds
        )
    except Exception as err:  # noqa: BLE001 - a crash is exactly what the fuzzer looks for
        return FuzzOutcome("crash", tuple(damage), f"{type(err).__name__}: {err}", time.perf_counter() - t)
    seconds = time.perf_counter() - t
    if seconds >= slow_s:
        return FuzzOutcome("slow", tuple(damage), f"{seconds:.1f} s", seconds)
    if out.geometry == clean.geometry:
        return FuzzOutcome("ok", tuple(damage), "", seconds)
    said = len(out.meta["warnings"]) > len(clean.meta["warnings"]) or len(out.meta["skipped"]) > len(
        clean.meta["skipped"]
    )
    return FuzzOutcome(
        "explained" if said else "silent-geometry", tuple(damage), "; ".join(out.meta["warnings"]), seconds
    )


def fuzz_study(rows: int = 24) -> list[Dataset]:
    """The small three-series study (T2W, 2-b DWI, rescaled ADC; ``rows`` x ``rows`` x 8 each, fixed UIDs)."""
    fn = blob((4.0, -2.0, 1.0), sigma_mm=6.0, peak=800.0, background=120.0)
    uid = "1.2.826.0.1.3680043.8.498.77"
    common: dict[str, Any] = {"study_uid": uid, "rows": rows, "columns": rows, "num_slices": 8}
    datasets = (
        make_series(description="t2_tse_tra", value_fn=fn, series_uid=uid + ".1", series_number=1, **common)
        + make_series(
            description="ep2d_diff_b50_800", value_fn=fn, b_values=[50, 800], series_uid=uid + ".2",
            series_number=2, **common,
        )
        + make_series(
            description="ADC", value_fn=fn, image_type=("DERIVED", "PRIMARY", "ADC"), series_uid=uid + ".3",
            series_number=3, rescale=(2.0, 0.0), **common,
        )
    )  # fmt: skip
    for n, ds in enumerate(datasets):
        ds.SOPInstanceUID = f"{uid}.9.{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return datasets


# --------------------------------------------------------------------------------------------------
# Compressed variants (lossless): the same study in another transfer syntax
# --------------------------------------------------------------------------------------------------
#: transfer syntaxes :func:`encode` can write here: name -> UID
LOSSLESS_SYNTAXES: dict[str, str] = {
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless (pydicom's encoder)
    "jpeg-ls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless (pyjpegls)
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only (pylibjpeg-openjpeg)
    "jpeg-sv1": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (dcmtk's dcmcjpeg, when installed)
    "htj2k": "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless (OpenJPH's ojph_compress, when installed)
    "deflated": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (pydicom writes it)
}


def encode(data: bytes, syntax: str) -> bytes:
    """One Part 10 file re-encoded losslessly in ``syntax`` (a key of :data:`LOSSLESS_SYNTAXES`).

    Raises:
        RuntimeError: the encoder of ``syntax`` is not available on this machine (e.g. no ``dcmcjpeg``,
            no ``ojph_compress``).
    """
    import shutil
    import subprocess
    import tempfile

    ds = pydicom.dcmread(io.BytesIO(data))
    uid = UID(LOSSLESS_SYNTAXES[syntax])
    if syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = uid
        return to_bytes(ds)
    if syntax == "htj2k":
        from pydicom.encaps import encapsulate

        frames = [
            htj2k_encode_frame(f, int(ds.BitsStored), signed=int(ds.PixelRepresentation) == 1) for f in _frames(ds)
        ]
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        return to_bytes(ds)
    if syntax == "jpeg-sv1":
        exe = shutil.which("dcmcjpeg")
        if exe is None:
            raise RuntimeError("dcmcjpeg (dcmtk) is not installed: cannot encode JPEG Lossless SV1")
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = f"{tmp}/in.dcm", f"{tmp}/out.dcm"
            with open(src, "wb") as fh:
                fh.write(data)
            subprocess.run([exe, "+e1", src, dst], check=True, capture_output=True, timeout=60)
            with open(dst, "rb") as fh:
                return fh.read()
    ds.compress(uid)
    return to_bytes(ds)


def _frames(ds: Dataset) -> list[np.ndarray]:
    """The stored values of every frame of a native (uncompressed) monochrome object, ``[rows, cols]`` each."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"only monochrome pixel data can be encoded, SamplesPerPixel is {ds.SamplesPerPixel}")
    arr = np.asarray(ds.pixel_array)
    return list(arr.reshape(-1, int(ds.Rows), int(ds.Columns)))


def htj2k_encode_frame(frame: np.ndarray, bits_stored: int, *, signed: bool) -> bytes:
    """One monochrome frame as a reversible (lossless) HTJ2K codestream (``.j2c``), by OpenJPH's ``ojph_compress``.

    Args:
        frame: stored values ``[rows, cols]`` (unsigned, or two's complement when ``signed``).
        bits_stored: BitsStored (the component's bit depth in the codestream, 1..16).
        signed: PixelRepresentation is 1.

    The frame is handed over as raw samples (``.yuv``: 1 byte per sample up to 8 bits, else 2 bytes in the
    host byte order, which OpenJPH reads). ``ojph_compress`` (OpenJPH 0.9) reads raw samples as unsigned, so a
    signed frame is written offset by ``2**(bits_stored - 1)`` as an unsigned component, and the sign bit
    of the component's Ssiz in the SIZ marker is then set. That is the codestream of the signed frame:
    JPEG 2000 level-shifts an unsigned component by exactly ``-2**(bits_stored - 1)`` before the
    (reversible) transform and signed components not at all, and nothing else in the codestream depends
    on the signedness.

    Raises:
        RuntimeError: ``ojph_compress`` (Debian package ``openjph-tools``) is not installed.
    """
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("ojph_compress")
    if exe is None:
        raise RuntimeError("ojph_compress (OpenJPH, Debian openjph-tools) is not installed: cannot encode HTJ2K")
    if frame.ndim != 2 or not 1 <= bits_stored <= 16:
        raise ValueError(f"one 2-D frame of 1..16 bits expected, got shape {frame.shape}, {bits_stored} bits")
    rows, cols = frame.shape
    values = frame.astype(np.int64)
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if values.size and (values.min() < lo or values.max() > hi):
        raise ValueError(f"frame values {values.min()}..{values.max()} do not fit {bits_stored} bits")
    if signed:
        values = values + (1 << (bits_stored - 1))
    raw = values.astype("u1" if bits_stored <= 8 else "=u2").tobytes()  # OpenJPH reads native byte order
    # 5 decompositions (the default) unless the frame is too small for them
    decomps = max(0, min(5, int(np.floor(np.log2(max(1, min(rows, cols)))))))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = f"{tmp}/frame.yuv", f"{tmp}/frame.j2c"
        with open(src, "wb") as fh:
            fh.write(raw)
        cmd = [
            exe, "-i", src, "-o", dst, "-reversible", "true", "-num_decomps", str(decomps),
            "-dims", f"{{{cols},{rows}}}", "-num_comps", "1", "-signed", "false",
            "-bit_depth", str(bits_stored), "-downsamp", "{1,1}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(
                f"ojph_compress failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
        with open(dst, "rb") as fh:
            codestream = bytearray(fh.read())
    # SOC, SIZ: marker, Lsiz, Rsiz, 8 x 4-byte sizes and offsets, Csiz, then Ssiz of component 0 at byte 42
    if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 43:
        raise RuntimeError("ojph_compress wrote no JPEG 2000 codestream (SOC + SIZ expected)")
    if signed:
        codestream[42] |= 0x80
    return bytes(codestream)
