"""DICOM objects a PACS stores: a SEG of the lesion candidates and a Comprehensive 3D SR (TID 1500).

Both are written with highdicom and reference the source T2W series (the series that defines the model
grid). The SEG lies on the model grid (passed as an ``hd.Volume`` in the T2W frame of reference); segment
``n`` is lesion ``n``. The SR holds one TID 1410 volumetric measurement group per lesion (volume, lesion
likelihood, PI-RADS-like category) that references its SEG segment, plus the study-level csPCa probability
and PI-RADS-like score (TID 1501). A study without lesions gets no SEG and an SR without lesion groups.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr.coding import CodedConcept
from pydicom.sr.codedict import codes

from contract import __version__
from postprocessing.report import Findings

# highdicom logs dataset UIDs at INFO level; UIDs never reach our logs (a user may lower this again)
logging.getLogger("highdicom").setLevel(logging.WARNING)

MANUFACTURER = "mpmri-serve"
ALGORITHM_NAME = "mpmri-serve lesion localization"
#: SeriesDescription of our outputs; routers use it to never analyze their own results
OUTPUT_SERIES_PREFIX = "mpmri-serve"
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
#: private coding scheme for concepts without a standard code
_SCHEME = "99MPMRI"
LESION_LIKELIHOOD = CodedConcept("L0001", _SCHEME, "Lesion likelihood")
CSPCA_PROBABILITY = CodedConcept("L0002", _SCHEME, "Probability of clinically significant prostate cancer")
PIRADS_LIKE_SCORE = CodedConcept("L0003", _SCHEME, "PI-RADS-like category")
MILLILITRE = CodedConcept("mL", "UCUM", "milliliter")
PROSTATE = CodedConcept("41216001", "SCT", "Prostate")
PROSTATE_MRI = CodedConcept("719178004", "SCT", "Multiparametric MRI of prostate")


@dataclass(frozen=True)
class DicomOutputs:
    """Encoded SEG (``None`` without lesions) and SR: Part 10 bytes plus their datasets."""

    seg: pydicom.Dataset | None
    sr: pydicom.Dataset

    @staticmethod
    def encode(dataset: pydicom.Dataset) -> bytes:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=__version__, family=codes.cid7162.ArtificialIntelligence
    )


#: Type 2 attributes (present, possibly empty) that highdicom copies from the source images; real files
#: sometimes omit them, which must not make the SEG/SR fail
_TYPE2_COPIED: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    copy = pydicom.Dataset(dict(ds.items()))  # a new element dict: the source stays untouched
    copy.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in missing:
        setattr(copy, keyword, "")
    return copy


def sort_source_images(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Source images sorted along the slice normal (highdicom does not sort: sort in one place); type 2
    attributes that highdicom copies are added empty where a file omits them."""

    def position(ds: pydicom.Dataset) -> float:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        return float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal))

    return sorted((_with_type2(ds) for ds in datasets), key=position)


def grid_affine(findings: Findings) -> np.ndarray:
    """4x4 affine from array index ``(d, h, w)`` to LPS mm for the model grid (highdicom's Volume layout)."""
    g = findings.geometry
    direction = g.direction_matrix  # column c: LPS unit vector of ITK axis c (i=W, j=H, k=D)
    si, sj, sk = g.spacing_mm_ijk
    affine = np.eye(4)
    affine[:3, 0] = direction[:, 2] * sk
    affine[:3, 1] = direction[:, 1] * sj
    affine[:3, 2] = direction[:, 0] * si
    affine[:3, 3] = g.origin_lps_mm
    return affine


def build_seg(findings: Findings, source_images: Sequence[pydicom.Dataset]) -> pydicom.Dataset | None:
    """DICOM SEG (BINARY) with one segment per lesion on the model grid; ``None`` when there is no lesion."""
    if not findings.lesions:
        return None
    sources = sort_source_images(source_images)
    frame_of_reference = str(sources[0].FrameOfReferenceUID)
    masks = np.stack([findings.labels == lesion.id for lesion in findings.lesions], axis=-1)  # [D, H, W, S]
    volume = hd.Volume(
        array=masks.astype(np.uint8),
        affine=grid_affine(findings),
        coordinate_system="PATIENT",
        frame_of_reference_uid=frame_of_reference,
        channels={"SegmentNumber": [lesion.id for lesion in findings.lesions]},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=lesion.id,
            segment_label=f"lesion {lesion.id}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(),
            tracking_uid=hd.UID(),
            tracking_id=f"lesion {lesion.id}",
        )
        for lesion in findings.lesions
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"{OUTPUT_SERIES_PREFIX} lesion candidates (SEG)",
        content_label="LESIONS",
        content_description="Lesion candidates of the fused localization map",
        omit_empty_frames=True,
    )


def _referenced_segment(
    seg: pydicom.Dataset, segment_number: int, sources: Sequence[pydicom.Dataset]
) -> hd.sr.ReferencedSegment:
    """Reference to one SEG segment and the source series (``ReferencedSegment.from_segmentation`` fails on a
    single-segment SEG, whose segment identification lives in the shared functional groups)."""
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID)),
    )


def build_sr(
    findings: Findings, source_images: Sequence[pydicom.Dataset], seg: pydicom.Dataset | None
) -> pydicom.Dataset:
    """Comprehensive 3D SR, TID 1500 measurement report of the findings (references SEG segments)."""
    sources = sort_source_images(source_images)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MANUFACTURER, model_name=ALGORITHM_NAME
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for lesion in findings.lesions:
        assert seg is not None
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {lesion.id}"),
                referenced_segment=_referenced_segment(seg, lesion.id, sources),
                finding_type=codes.SCT.Lesion,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=lesion.volume_ml,
                        unit=MILLILITRE,
                        algorithm_id=algorithm,
                    ),
                    hd.sr.Measurement(
                        name=LESION_LIKELIHOOD, value=lesion.likelihood, unit=codes.UCUM.NoUnits, algorithm_id=algorithm
                    ),
                    hd.sr.Measurement(
                        name=PIRADS_LIKE_SCORE, value=lesion.pirads, unit=codes.UCUM.NoUnits, algorithm_id=algorithm
                    ),
                ],
            )
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="study"),
            finding_type=PROSTATE,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=CSPCA_PROBABILITY,
                    value=findings.cspca_probability,
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algorithm,
                ),
                hd.sr.Measurement(
                    name=PIRADS_LIKE_SCORE, value=findings.pirads_score, unit=codes.UCUM.NoUnits, algorithm_id=algorithm
                ),
            ],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROSTATE_MRI,
        imaging_measurements=groups,
        referenced_images=None if seg is not None else sources,
    )
    evidence: list[pydicom.Dataset] = [*sources, *([seg] if seg is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"{OUTPUT_SERIES_PREFIX} findings (SR)",
        is_complete=True,
    )


def build_dicom_outputs(findings: Findings, source_images: Sequence[pydicom.Dataset]) -> DicomOutputs:
    """SEG (when there are lesions) and SR for ``findings``; ``source_images`` is the T2W series."""
    if not source_images:
        raise ValueError("no source images: the SEG and SR must reference the T2W series")
    seg = build_seg(findings, source_images)
    return DicomOutputs(seg=seg, sr=build_sr(findings, source_images, seg))
