"""Build MR Image Storage datasets the way scanners write them (explicit VR little endian)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from contract import GridGeometry
from synth.protocol import Protocol, SeriesPlan

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's prefix; UIDs are hashes of (seed, index, ...)


def study_uid(seed: int, index: int, *parts: object) -> str:
    """Deterministic UID derived from ``(seed, index, *parts)``."""
    return str(generate_uid(UID_PREFIX, entropy_srcs=["mpmri-synth", str(seed), str(index), *map(str, parts)]))


@dataclasses.dataclass(frozen=True)
class StudyTags:
    """Study-level identity (synthetic) shared by every instance of a study."""

    seed: int
    index: int
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_age: str
    patient_weight_kg: float
    study_date: str
    study_time: str
    accession_number: str


@dataclasses.dataclass(frozen=True)
class Instance:
    """One image: its slice geometry (one-slice grid), pixels (float, physical units) and extras."""

    geometry: GridGeometry
    pixels: np.ndarray  # (H, W) float, physical value (before rescale)
    b_value: float | None = None


def _ds(v: float, decimals: int = 6) -> str:
    s = f"{v:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def quantize(pixels: np.ndarray, plan: SeriesPlan) -> tuple[np.ndarray, float | None]:
    """Physical values -> stored integers (uint16, or int16 for ``plan.signed``)."""
    slope = plan.rescale_slope
    stored = pixels / slope if slope else pixels
    if plan.signed:
        return np.clip(np.rint(stored), -32768, 32767).astype(np.int16), slope
    return np.clip(np.rint(stored), 0, 65535).astype(np.uint16), slope


def build_series(
    plan: SeriesPlan,
    instances: Sequence[Instance],
    tags: StudyTags,
    protocol: Protocol,
    series_time: str,
    instance_order: Sequence[int] | np.ndarray,
    scanner_headers: bool = False,
) -> list[Dataset]:
    """Datasets for ``instances``; ``instance_order[n]`` is the InstanceNumber-1 of instance ``n``.

    ``scanner_headers`` adds :func:`add_scanner_headers` (sequences, private blocks of ``protocol.vendor``).
    """
    series_uid = study_uid(tags.seed, tags.index, "series", plan.key)
    out: list[Dataset] = []
    for n, inst in enumerate(instances):
        number = int(instance_order[n]) + 1
        ds = _base_dataset(tags, protocol, plan, series_uid, series_time)
        sop_uid = study_uid(tags.seed, tags.index, "sop", plan.key, number)
        ds.SOPInstanceUID = pydicom.uid.UID(sop_uid)
        ds.file_meta = _file_meta(sop_uid)
        ds.preamble = b"\x00" * 128
        ds.InstanceNumber = number
        _set_geometry(ds, inst.geometry)
        stored, slope = quantize(inst.pixels, plan)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if plan.signed else 0
        if slope is not None:
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = _ds(slope)
            ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        values = stored.astype(np.float64) * (slope or 1.0)
        lo, hi = np.percentile(values, [1, 99.5])
        ds.WindowCenter = _ds((lo + hi) / 2, 1)
        ds.WindowWidth = _ds(max(hi - lo, 1.0), 1)
        if inst.b_value is not None:
            ds.DiffusionBValue = float(inst.b_value)
            ds.DiffusionDirectionality = "ISOTROPIC"
        if scanner_headers:
            add_scanner_headers(ds, protocol.vendor, number)
        out.append(ds)
    return out


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MPMRI_SYNTH"
    return meta


def _base_dataset(tags: StudyTags, protocol: Protocol, plan: SeriesPlan, series_uid: str, series_time: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(plan.image_type)
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = tags.study_date
    ds.SeriesDate = tags.study_date
    ds.AcquisitionDate = tags.study_date
    ds.ContentDate = tags.study_date
    ds.StudyTime = tags.study_time
    ds.SeriesTime = series_time
    ds.AcquisitionTime = series_time
    ds.ContentTime = series_time
    ds.AccessionNumber = tags.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = protocol.manufacturer
    ds.InstitutionName = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR PROSTATA MP"
    ds.SeriesDescription = plan.description
    ds.ManufacturerModelName = protocol.model_name
    ds.PatientName = tags.patient_name
    ds.PatientID = tags.patient_id
    ds.PatientBirthDate = tags.patient_birth_date
    ds.PatientSex = "M"
    ds.PatientAge = tags.patient_age
    ds.PatientWeight = _ds(tags.patient_weight_kg, 1)
    ds.BodyPartExamined = "PROSTATE"
    ds.ScanningSequence = plan.scanning_sequence
    ds.SequenceVariant = plan.sequence_variant
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = _ds(plan.repetition_time_ms, 1)
    ds.EchoTime = _ds(plan.echo_time_ms, 2)
    ds.MagneticFieldStrength = _ds(protocol.field_strength_t, 1)
    ds.ImagingFrequency = _ds(42.577478 * protocol.field_strength_t, 6)
    ds.ImagedNucleus = "1H"
    ds.ProtocolName = plan.protocol_name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = tags.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = tags.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _set_geometry(ds: Dataset, geom: GridGeometry) -> None:
    d = geom.direction_matrix
    ds.ImagePositionPatient = [_ds(v) for v in geom.origin_lps_mm]
    ds.ImageOrientationPatient = [_ds(v, 8) for v in (*d[:, 0], *d[:, 1])]
    si, sj, sk = geom.spacing_mm_ijk
    ds.PixelSpacing = [_ds(sj), _ds(si)]  # (row spacing, column spacing)
    ds.SliceThickness = _ds(sk)
    ds.SpacingBetweenSlices = _ds(sk)
    ds.SliceLocation = _ds(float(np.dot(geom.origin_lps_mm, d[:, 2])), 4)


def slice_geometries(geom: GridGeometry) -> list[GridGeometry]:
    """One single-slice grid per slice ``k`` of ``geom`` (origin = ImagePositionPatient of slice k)."""
    ni, nj, nk = geom.size_ijk
    out = []
    for k in range(nk):
        origin = geom.index_to_lps([k, 0, 0])
        out.append(
            dataclasses.replace(
                geom,
                origin_lps_mm=(round(float(origin[0]), 4), round(float(origin[1]), 4), round(float(origin[2]), 4)),
                size_ijk=(ni, nj, 1),
            )
        )
    return out


def write_datasets(datasets: Sequence[Dataset], folder: Path, names: Sequence[str]) -> list[Path]:
    """Write each dataset as a DICOM Part-10 file ``folder/<name>``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds, name in zip(datasets, names, strict=True):
        path = folder / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def add_scanner_headers(ds: Dataset, vendor: str, number: int) -> None:
    """Header parts real scanners write that the model ignores: nested sequences and private blocks.

    Referenced Image Sequence (defined length), Request Attributes Sequence with a nested code sequence
    (undefined lengths), procedure and anatomic region code sequences, and per vendor a Siemens CSA
    header (OB, 12-40 kB, private group 0029), GE private groups 0019/0043 or Philips private groups
    2001/2005 with an undefined-length private sequence. Deterministic in ``number`` (InstanceNumber).
    Never touches the elements preprocessing reads (b-values stay in DiffusionBValue).
    """
    rng = np.random.default_rng([0x5CA11, number])

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return item

    ref = Dataset()
    ref.ReferencedSOPClassUID = MRImageStorage
    ref.ReferencedSOPInstanceUID = generate_uid(UID_PREFIX, entropy_srcs=["ref", str(number)])
    ds.ReferencedImageSequence = DicomSequence([ref, ref])
    request = Dataset()
    request.RequestedProcedureID = f"RP{number % 97:04d}"
    request.ScheduledProcedureStepID = f"SPS{number % 89:04d}"
    request.ScheduledProtocolCodeSequence = DicomSequence([code("MRPROS", "99LOCAL", "MR prostate mpMRI")])
    ds.RequestAttributesSequence = DicomSequence([request])
    ds["RequestAttributesSequence"].is_undefined_length = True
    request["ScheduledProtocolCodeSequence"].is_undefined_length = True
    ds.ProcedureCodeSequence = DicomSequence([code("RPID16", "RADLEX", "MR PELVIS")])
    ds.AnatomicRegionSequence = DicomSequence([code("41216001", "SCT", "Prostate")])
    ds["AnatomicRegionSequence"].is_undefined_length = True
    if vendor == "siemens":
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        size = int(rng.integers(12_000, 40_000)) & ~1
        block.add_new(0x08, "CS", "IMAGE NUM 4")
        block.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01" + rng.bytes(size - 8))
        block.add_new(0x20, "OB", b"SV10\x04\x03\x02\x01" + rng.bytes(size // 2 - 8))
    elif vendor == "ge":
        acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        acq.add_new(0x0F, "DS", "1234.5")
        acq.add_new(0x9C, "LO", "epi2")
        parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        parm.add_new(0x01, "SS", 5)
        parm.add_new(0x2C, "SS", 1)
        parm.add_new(0x83, "DS", ["1", "1"])
    else:  # philips
        img = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        img.add_new(0x0A, "IS", str(number))
        img.add_new(0x63, "CS", "NO")
        mr = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        item = Dataset()
        item.add_new(0x00080100, "SH", "PHX")
        item.add_new(0x00080104, "LO", "private series state")
        mr.add_new(0x0F, "SQ", DicomSequence([item]))
        ds[mr.get_tag(0x0F)].is_undefined_length = True
        mr.add_new(0x0D, "FL", 0.5)
