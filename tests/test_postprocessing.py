"""Torch-free postprocessing: findings from ensemble outputs, DICOM SEG and SR; the service runs without torch."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from service_harness import running_service

from contract import GridGeometry
from mpmri_client import AnalysisClient, read_instances
from postprocessing.dicom_outputs import DicomOutputs, build_dicom_outputs
from postprocessing.report import build_findings
from preprocessing.testing import make_series

GEOMETRY = GridGeometry((-16.0, -16.0, -12.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (2.0, 2.0, 4.0), (16, 16, 6))


def _outputs(
    cspca: np.ndarray,
    score: np.ndarray | None = None,
    fused: np.ndarray | None = None,
    dwi_map: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Ensemble outputs around a csPCa map; the score map defaults to 1 + 4 * map (0.5 -> 3, 0.9 -> 4.6), the
    fused map (where the candidate blobs are) to 0.9 * map: the same blobs, other values than the likelihoods.
    The sequence maps are 0 but for the DWI one (``dwi_map``, default 0: no secondary candidate)."""
    score = 1.0 + 4.0 * cspca if score is None else score
    fused = cspca * 0.9 if fused is None else fused
    sequence_maps = np.zeros((3, *cspca.shape), np.float32)
    if dwi_map is not None:
        sequence_maps[2] = dwi_map
    return {
        "sequence_maps": sequence_maps[None],
        "fused_map": fused[None],
        "cspca_map": cspca[None],
        "score_map": score[None].astype(np.float32),
        "cspca_probability": np.array([float(cspca.max())], np.float32),
        "pirads_distribution": np.array([0.05, 0.05, 0.1, 0.3, 0.5], np.float32),
    }


def _two_blobs() -> np.ndarray:
    cspca = np.zeros((6, 16, 16), np.float32)
    cspca[2:4, 3:6, 3:6] = 0.5
    cspca[1:3, 10:13, 9:12] = 0.9
    return cspca


def test_findings_number_lesions_by_likelihood_with_lps_centres_ml_and_own_category() -> None:
    findings = build_findings(_outputs(_two_blobs()), GEOMETRY)
    assert [les.id for les in findings.lesions] == [1, 2]
    assert findings.lesions[0].likelihood == pytest.approx(0.9)  # the csPCa map's peak, not the fused map's
    # blob 1: d 1..2, h 10..12, w 9..11 -> index centre (1.5, 11, 10) -> LPS origin + (10*2, 11*2, 1.5*4)
    assert findings.lesions[0].center_lps_mm == pytest.approx((-16 + 20, -16 + 22, -12 + 6), abs=1e-3)
    assert findings.lesions[0].volume_ml == pytest.approx(2 * 3 * 3 * 16 / 1000)
    assert set(np.unique(findings.labels)) == {0, 1, 2}
    # each lesion its own category from the score map (4.6 -> 5, 3.0 -> 3); the study: the highest one
    assert [(les.pirads, les.score) for les in findings.lesions] == [(5, pytest.approx(4.6)), (3, pytest.approx(3.0))]
    assert findings.pirads_score == 5


def test_candidates_are_fused_map_blobs_scored_by_the_cspca_map_peak() -> None:
    """Localization says where (blobs of ``fused_map``), classification how suspicious (``cspca_map`` peak).

    The localized blob with the weaker localization but the stronger csPCa evidence comes first; a csPCa
    hot spot that localization did not find is no candidate; centres follow the fused blobs.
    """
    fused = np.full((6, 16, 16), 0.004, np.float32)  # normal tissue: below the floor
    fused[2:4, 3:6, 3:6] = 0.9  # blob A: strongly localized
    fused[1:3, 10:13, 9:12] = 0.6  # blob B
    cspca = np.full(fused.shape, 0.06, np.float32)  # calibrated background
    cspca[2:4, 3:6, 3:6] = 0.3
    cspca[1:3, 10:13, 9:12] = 0.8
    cspca[4, 14, 1] = 0.95  # not localized
    findings = build_findings(_outputs(cspca, fused=fused), GEOMETRY)
    assert [les.likelihood for les in findings.lesions] == [pytest.approx(0.8), pytest.approx(0.3)]
    assert findings.lesions[0].center_lps_mm == pytest.approx((-16 + 20, -16 + 22, -12 + 6), abs=1e-3)  # blob B
    assert findings.lesions[1].center_lps_mm == pytest.approx((-16 + 8, -16 + 8, -12 + 10), abs=1e-3)  # blob A
    assert findings.labels[4, 14, 1] == 0
    assert [les.pirads for les in findings.lesions] == [4, 2]  # score 1 + 4 * cspca in each blob: 4.2, 2.2


def test_the_floor_gates_blob_peaks_and_does_not_cut_a_faint_lesion_into_fragments() -> None:
    """A faint lesion (fused map 0.03-0.07 around a floor of 0.05) whose two voxels above the floor lie apart:
    with the floor on the peaks it is one candidate over the whole lesion; zeroing the voxels below the floor
    (the old rule) left two single-voxel fragments, dropped by ``min_voxels_detection=3``. A blob that never
    reaches the floor is no candidate in either mode, and the cut-off follows ``peak / factor``."""
    import dataclasses

    from contract import DEFAULT_CANDIDATES
    from postprocessing.candidates import extract_candidate_labels

    fused = np.full((6, 16, 16), 0.004, np.float32)
    fused[2:4, 4:9, 4:6] = 0.03  # faint lesion, 20 voxels
    fused[2, 4, 4] = fused[3, 8, 5] = 0.07  # its two voxels above the floor, not adjacent
    fused[2:4, 12:15, 12:15] = 0.045  # a blob that never reaches the floor
    fused[1, 0:3, 0] = [0.1, 0.045, 0.03]  # a peak of 0.1 extends down to 0.04 (factor 2.5), not to 0.03
    cspca = np.where(fused > 0.02, 0.3, 0.05).astype(np.float32)
    peak = extract_candidate_labels(fused, GEOMETRY, DEFAULT_CANDIDATES, likelihood_map=cspca)
    assert DEFAULT_CANDIDATES.floor_mode == "peak"
    assert sorted(c.volume_mm3 / GEOMETRY.voxel_volume_mm3 for c in peak[0]) == [2, 20]
    assert peak[2][2, 13, 13] == 0 and peak[2][1, 2, 0] == 0
    old = dataclasses.replace(DEFAULT_CANDIDATES, floor_mode="voxel", min_voxels_detection=3)
    assert extract_candidate_labels(fused, GEOMETRY, old, likelihood_map=cspca)[0] == []
    fragments = extract_candidate_labels(fused, GEOMETRY, dataclasses.replace(old, min_voxels_detection=0))[0]
    assert sorted(c.volume_mm3 / GEOMETRY.voxel_volume_mm3 for c in fragments) == [1, 1, 1]


def test_a_too_small_peak_blob_gives_no_box_shaped_candidate_of_the_empty_region() -> None:
    """report_guided_annotation's "dynamic" extraction records a confidence-0 blob over the empty region when the
    maximum lies in a blob of at most ``min_voxels_detection`` voxels; scored by the csPCa map it was reported as a
    lesion (4 of 100 validation studies of seed 9101 under the release-3/4 rule). It must not be a candidate."""
    import dataclasses

    from contract import DEFAULT_CANDIDATES
    from postprocessing.candidates import extract_candidate_labels

    fused = np.full((6, 16, 16), 0.004, np.float32)
    fused[2, 5, 5] = 0.3  # one voxel: at most min_voxels_detection
    fused[2, 5, 6] = 0.04  # its surroundings, below the floor
    cspca = np.full(fused.shape, 0.2, np.float32)
    for mode in ("voxel", "peak"):
        settings = dataclasses.replace(DEFAULT_CANDIDATES, floor_mode=mode, min_voxels_detection=3)
        candidates, candidate_map, labels = extract_candidate_labels(fused, GEOMETRY, settings, likelihood_map=cspca)
        assert candidates == [] and not candidate_map.any() and not labels.any(), mode


def test_study_category_is_the_highest_score_and_1_without_lesions() -> None:
    empty = np.zeros((6, 16, 16), np.float32)
    findings = build_findings(_outputs(empty, score=np.full(empty.shape, 1.1, np.float32)), GEOMETRY)
    assert findings.lesions == [] and findings.pirads_score == 1
    mimic = np.full(empty.shape, 1.1, np.float32)
    mimic[2, 4, 4] = 2.7  # a PI-RADS-3-like mimic that is no csPCa candidate still sets the study category
    assert build_findings(_outputs(empty, score=mimic), GEOMETRY).pirads_score == 3


def test_a_candidate_below_the_first_cut_point_is_category_1_like_its_study() -> None:
    """Calibrated thresholds can put a weak candidate's score below c_2: it is category 1 (its own score), and the
    study, the highest lesion category, is 1 too; the study is never below one of its lesions."""
    low = np.full((6, 16, 16), 1.0, np.float32)
    low[2:4, 3:6, 3:6] = 1.3  # below c_2 = 1.5
    findings = build_findings(_outputs(_two_blobs() * 0.2, score=low), GEOMETRY)
    assert findings.lesions and [les.pirads for les in findings.lesions] == [1, 1]
    assert findings.pirads_score == 1
    low[1:3, 10:13, 9:12] = 2.7  # the other candidate's score: category 3
    findings = build_findings(_outputs(_two_blobs() * 0.2, score=low), GEOMETRY)
    assert sorted(les.pirads for les in findings.lesions) == [1, 3] and findings.pirads_score == 3


def test_findings_name_a_missing_or_misshapen_output() -> None:
    with pytest.raises(ValueError, match="'sequence_maps' is missing"):
        build_findings({"cspca_probability": np.zeros(1), "pirads_distribution": np.zeros(5)}, GEOMETRY)
    outputs = _outputs(_two_blobs())
    with pytest.raises(ValueError, match="'fused_map' is missing"):
        build_findings({k: v for k, v in outputs.items() if k != "fused_map"}, GEOMETRY)
    with pytest.raises(ValueError, match=r"fused_map has shape \(1, 5, 16, 16\)"):
        build_findings(_outputs(np.zeros((5, 16, 16), np.float32)), GEOMETRY)
    with pytest.raises(ValueError, match=r"sequence_maps has shape \(1, 2, 6, 16, 16\)"):
        build_findings({**outputs, "sequence_maps": outputs["sequence_maps"][:, :2]}, GEOMETRY)


def _secondary_study() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cspca, fused, dwi_map)``: one fused-map blob P; the DWI map sees P, its rim, a lesion S the fused map
    misses (0.4 in the DWI map, 0.006 in the fused one) and a faint spot F below the floor."""
    fused = np.full((6, 16, 16), 0.002, np.float32)
    fused[2:4, 3:6, 3:6] = 0.9  # P
    fused[2:4, 10:12, 10:12] = 0.006  # S, as the fused map sees it
    dwi = np.zeros_like(fused)
    dwi[2:4, 3:6, 3:6] = 0.95  # P
    dwi[2:4, 6, 3:6] = 0.5  # P's rim: one voxel beyond it
    dwi[1, 6, 6] = 0.6  # diagonal to P's corner voxel (2, 5, 5): would touch it as a blob of its own
    dwi[2:4, 10:12, 10:12] = 0.4  # S
    dwi[4, 14, 2] = 0.04  # F: below the floor (0.05)
    cspca = np.where(fused > 0.5, 0.7, 0.2).astype(np.float32)
    cspca[2:4, 10:12, 10:12] = 0.3
    return cspca, fused, dwi


def test_the_dwi_map_proposes_secondary_candidates_the_fused_map_misses() -> None:
    """A small lesion the fused map leaves under the floor but the DWI map sees is a (secondary) candidate; the
    rim of a fused-map blob and DWI voxels below the floor are not; candidates are numbered by likelihood across
    both kinds, their blobs do not overlap, and the secondary centre is its own map's centroid."""
    cspca, fused, dwi = _secondary_study()
    findings = build_findings(_outputs(cspca, fused=fused, dwi_map=dwi), GEOMETRY)
    assert [(les.id, les.source) for les in findings.lesions] == [(1, "fused_map"), (2, "dwi_map")]
    assert [les.likelihood for les in findings.lesions] == [pytest.approx(0.7), pytest.approx(0.3)]
    secondary = findings.lesions[1]
    # S: d 2..3, h 10..11, w 10..11 -> index centre (2.5, 10.5, 10.5)
    assert secondary.center_lps_mm == pytest.approx((-16 + 21, -16 + 21, -12 + 10), abs=1e-3)
    assert secondary.volume_ml == pytest.approx(2 * 2 * 2 * 16 / 1000)
    assert np.array_equal(findings.labels == 2, dwi == np.float32(0.4))
    assert findings.labels[2, 6, 4] == 0 and findings.labels[4, 14, 2] == 0  # the rim; the faint spot
    assert findings.labels[1, 6, 6] == 0
    # no two candidates touch: the candidate map is a valid PI-CAI detection map (one 26-connected blob each)
    assert ndimage.label(findings.labels > 0, structure=np.ones((3, 3, 3)))[1] == len(findings.lesions)
    assert findings.to_dict()["lesions"][1]["source"] == "dwi_map"
    # without the DWI map's proposals (or without DWI in the study) only the fused-map blob remains
    without = build_findings(_outputs(cspca, fused=fused), GEOMETRY)
    assert [les.source for les in without.lesions] == ["fused_map"]
    absent = build_findings(_outputs(cspca, fused=fused, dwi_map=dwi), GEOMETRY, availability=np.array([1, 1, 0.0]))
    assert [les.source for les in absent.lesions] == ["fused_map"]


def test_secondary_candidates_follow_the_contract_settings() -> None:
    import dataclasses

    from contract import DEFAULT_CANDIDATES
    from postprocessing.candidates import extract_study_candidates

    cspca, fused, dwi = _secondary_study()
    maps = np.stack([np.zeros_like(dwi), np.zeros_like(dwi), dwi])
    assert DEFAULT_CANDIDATES.secondary_sequence == "dwi" and DEFAULT_CANDIDATES.secondary_exclusion_voxels == 1
    none = dataclasses.replace(DEFAULT_CANDIDATES, secondary_sequence=None)
    assert len(extract_study_candidates(fused, maps, GEOMETRY, none, likelihood_map=cspca)[0]) == 1
    # without the exclusion zone the primary blob's rim becomes a candidate of its own
    rim = dataclasses.replace(DEFAULT_CANDIDATES, secondary_exclusion_voxels=0)
    candidates, labels = extract_study_candidates(fused, maps, GEOMETRY, rim, likelihood_map=cspca)
    assert len(candidates) == 3 and labels[2, 6, 4] > 0
    # the T2W map proposes nothing here
    t2w = dataclasses.replace(DEFAULT_CANDIDATES, secondary_sequence="t2w")
    assert len(extract_study_candidates(fused, maps, GEOMETRY, t2w, likelihood_map=cspca)[0]) == 1
    with pytest.raises(ValueError, match="secondary_sequence must be one of"):
        extract_study_candidates(fused, maps, GEOMETRY, dataclasses.replace(DEFAULT_CANDIDATES, secondary_sequence="x"))


def _sources(drop: tuple[str, ...] = ()) -> list[pydicom.Dataset]:
    sources = make_series(description="t2", value_fn=lambda p: np.ones(p.shape[:-1]), num_slices=6, rows=16, columns=16)
    for ds in sources:
        for keyword in drop:
            if keyword in ds:
                delattr(ds, keyword)
    return sources


def test_seg_and_sr_are_made_even_when_sources_omit_type2_patient_attributes() -> None:
    sources = _sources(drop=("PatientBirthDate", "PatientSex", "AccessionNumber"))
    outputs = build_dicom_outputs(build_findings(_outputs(_two_blobs()), GEOMETRY), sources)
    assert outputs.seg is not None
    seg = pydicom.dcmread(io.BytesIO(DicomOutputs.encode(outputs.seg)))
    sr = pydicom.dcmread(io.BytesIO(DicomOutputs.encode(outputs.sr)))
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 2
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert sr.Modality == "SR" and sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert all("PatientBirthDate" not in ds for ds in sources), "the sources must stay untouched"


def test_study_without_lesions_gets_an_sr_and_no_seg() -> None:
    outputs = build_dicom_outputs(build_findings(_outputs(np.zeros((6, 16, 16), np.float32)), GEOMETRY), _sources())
    assert outputs.seg is None
    assert pydicom.dcmread(io.BytesIO(DicomOutputs.encode(outputs.sr))).Modality == "SR"


BLOCK_TORCH = (
    "import sys; sys.modules.update(dict.fromkeys(('torch', 'monai', 'onnxruntime', 'pytriton'), None));"
    "from preprocess_service.server import main; sys.exit(main())"
)


@pytest.mark.triton
@pytest.mark.service
def test_service_analyzes_with_torch_and_monai_unimportable(
    serve_stack: Any, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    command = [sys.executable, "-c", BLOCK_TORCH]
    with running_service(serve_stack.triton_url, tmp_path, command=command) as service:
        with AnalysisClient(service.target) as client:
            r = client.analyze(
                read_instances(service_studies["cancer"] / "dicom"), timeout_s=120, include_dicom_outputs=True
            )
        assert r.lesions and r.seg.data and r.sr.data


def test_service_modules_import_without_torch() -> None:
    probe = (
        "import sys; sys.modules.update(dict.fromkeys(('torch', 'monai'), None));"
        "import preprocess_service.server, preprocess_service.cli, postprocessing.dicom_outputs, contract"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def _random_map(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Blobs of random peak, size and position (borders and neighbours included) over a faint noise floor."""
    d, h, w = shape
    grid = np.indices(shape).astype(np.float32)
    volume = (rng.random(shape, dtype=np.float32) * rng.choice([0.0, 0.003, 0.006, 0.02])).astype(np.float32)
    for _ in range(rng.integers(0, 7)):
        centre = [rng.uniform(-1, n) for n in (d, h, w)]
        radius = rng.uniform(0.5, 4.0)
        dist2 = sum((grid[i] - centre[i]) ** 2 for i in range(3))
        blob = rng.uniform(0.005, 1.0) * np.exp(-dist2 / (2 * radius**2))
        if rng.random() < 0.2:  # plateaus: several voxels share the maximum
            blob = np.round(blob, 1)
        volume = np.maximum(volume, blob.astype(np.float32))
    return volume


@pytest.mark.parametrize("min_voxels", [0, 3])
@pytest.mark.parametrize("floor_mode", ["peak", "voxel"])
@pytest.mark.parametrize("threshold", ["dynamic", 0.1, 0.3])
def test_fast_candidate_extraction_equals_the_whole_volume_picai_extraction(
    threshold: str | float, floor_mode: str, min_voxels: int
) -> None:
    """The served path (a window around the voxels that can join a candidate; for ``"dynamic"`` a vectorized port of
    report_guided_annotation's loop that stops at the floor) gives exactly what the package gives on the whole map."""
    from contract import CandidateSettings
    from postprocessing.candidates import extract_candidate_labels

    rng = np.random.default_rng(20261126)
    settings = CandidateSettings(threshold=threshold, floor_mode=floor_mode, min_voxels_detection=min_voxels)
    geometry = GridGeometry((0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (1.5, 1.5, 3.0), (24, 20, 10))
    for _ in range(150):
        volume = _random_map(rng, (10, 20, 24))
        fast = extract_candidate_labels(volume, geometry, settings, crop=True)
        reference = extract_candidate_labels(volume, geometry, settings, crop=False)
        assert [c.to_dict() for c in fast[0]] == [c.to_dict() for c in reference[0]]
        assert np.array_equal(fast[1], reference[1]) and np.array_equal(fast[2], reference[2])
