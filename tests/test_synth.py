"""Synthetic study generator (synth/): determinism, DICOM conformance, geometry and ground truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from contract import DEFAULT_GRID, GridGeometry
from synth import anatomy as anat
from synth.generator import (
    GROUND_TRUTH_FILE,
    LABEL_FILE,
    SynthConfig,
    SynthError,
    generate_dataset,
    synthesize_study,
)
from synth.protocol import ProtocolOptions

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
REQUIRED_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelRepresentation",
    "Modality",
    "SeriesDescription",
    "ProtocolName",
    "ImageType",
    "Manufacturer",
    "MagneticFieldStrength",
    "ScanningSequence",
    "SequenceVariant",
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyTime",
)

LESION_CONFIG = SynthConfig(anatomy=dataclasses.replace(SynthConfig().anatomy, p_no_lesion=0.0, p_cancer=0.6))
CANCER_PZ_CONFIG = SynthConfig(
    anatomy=dataclasses.replace(
        SynthConfig().anatomy, p_no_lesion=0.0, p_cancer=1.0, p_cancer_in_tz=0.0, lesion_diameter_mm=(10.0, 20.0)
    )
)


def geometry_of(datasets: list[pydicom.Dataset]) -> GridGeometry:
    """Volume geometry from the DICOM tags of one single-b stack (sorted along the slice normal)."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    u, v = iop[:3], iop[3:]
    w = np.cross(u, v)
    positions = sorted((np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets), key=lambda p: p @ w)
    row_sp, col_sp = (float(x) for x in datasets[0].PixelSpacing)
    sk = float(np.linalg.norm(positions[1] - positions[0]))
    return GridGeometry(
        origin_lps_mm=tuple(positions[0]),  # type: ignore[arg-type]
        direction=tuple(np.stack([u, v, w], axis=1).reshape(-1)),
        spacing_mm_ijk=(col_sp, row_sp, sk),
        size_ijk=(int(datasets[0].Columns), int(datasets[0].Rows), len(positions)),
    )


def volume_of(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """``(D, H, W)`` float volume (rescaled) sorted along the slice normal."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    w = np.cross(iop[:3], iop[3:])
    ordered = sorted(datasets, key=lambda ds: np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ w)
    return np.stack([ds.pixel_array * float(getattr(ds, "RescaleSlope", 1.0)) for ds in ordered]).astype(np.float64)


def high_b_stack(study_series: dict[str, list[pydicom.Dataset]]) -> list[pydicom.Dataset]:
    dwi = study_series["dwi"]
    b_max = max(float(ds.DiffusionBValue) for ds in dwi)
    return [ds for ds in dwi if float(ds.DiffusionBValue) == b_max]


@pytest.fixture(scope="module")
def lesion_studies() -> list:
    return [synthesize_study(21, i, LESION_CONFIG) for i in range(6)]


def test_same_seed_gives_identical_pixels_and_uids() -> None:
    a, b = synthesize_study(11, 3), synthesize_study(11, 3)
    assert a.case_id == b.case_id == "synth-11-0003"
    assert a.truth == b.truth
    assert a.series.keys() == b.series.keys()
    for key in a.series:
        for da, db in zip(a.series[key], b.series[key], strict=True):
            assert da.SOPInstanceUID == db.SOPInstanceUID
            assert da.SeriesInstanceUID == db.SeriesInstanceUID
            assert da.PixelData == db.PixelData
    assert np.array_equal(sitk.GetArrayFromImage(a.label_image), sitk.GetArrayFromImage(b.label_image))


def test_different_seeds_or_indices_differ() -> None:
    a, b, c = synthesize_study(11, 3), synthesize_study(12, 3), synthesize_study(11, 4)
    uids = {s.truth["study_instance_uid"] for s in (a, b, c)}
    assert len(uids) == 3
    sops = [{ds.SOPInstanceUID for series in s.series.values() for ds in series} for s in (a, b, c)]
    assert not (sops[0] & sops[1]) and not (sops[0] & sops[2])
    assert a.series["t2w_tra"][0].PixelData != b.series["t2w_tra"][0].PixelData


def test_generate_dataset_case_equals_synthesize_study(synthetic_dataset: list[Path]) -> None:
    assert [p.name for p in synthetic_dataset] == [f"synth-1234-{i:04d}" for i in range(4)]
    case = synthetic_dataset[2]
    study = synthesize_study(1234, 2)
    assert json.loads((case / GROUND_TRUTH_FILE).read_text()) == json.loads(json.dumps(study.truth))
    on_disk = {}
    for f in (case / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        on_disk[ds.SOPInstanceUID] = ds.PixelData
    in_memory = {ds.SOPInstanceUID: ds.PixelData for series in study.series.values() for ds in series}
    assert on_disk == in_memory
    label = sitk.ReadImage(str(case / LABEL_FILE))
    assert np.array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(study.label_image))


def test_every_file_reads_back_with_required_tags(synthetic_dataset: list[Path]) -> None:
    for case in synthetic_dataset:
        truth = json.loads((case / GROUND_TRUTH_FILE).read_text())
        by_series: dict[str, list[pydicom.Dataset]] = {}
        for f in sorted((case / "dicom").rglob("*.dcm")):
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_LE
            assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            missing = [t for t in REQUIRED_TAGS if t not in ds]
            assert not missing, f"{f}: missing {missing}"
            assert ds.Modality == "MR" and ds.BitsAllocated == 16
            assert ds.StudyInstanceUID == truth["study_instance_uid"]
            assert ds.FrameOfReferenceUID == truth["frame_of_reference_uid"]
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
            assert str(ds.PatientName).startswith("SYNTH^")
            by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
        assert {s["series_instance_uid"] for s in truth["series"]} == set(by_series)
        for entry in truth["series"]:
            datasets = by_series[entry["series_instance_uid"]]
            assert len(datasets) == entry["num_instances"]
            assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
            assert sorted(int(ds.InstanceNumber) for ds in datasets) == list(range(1, len(datasets) + 1))
            assert {ds.SeriesDescription for ds in datasets} == {entry["series_description"]}
            if entry["sequence"] == "adc":
                assert all("ADC" in ds.ImageType for ds in datasets)
                assert all(ds.PixelRepresentation == 0 for ds in datasets)
                assert all(float(getattr(ds, "RescaleSlope", 1.0)) == 1.0 for ds in datasets)
            if entry["key"] == "localizer":
                assert all("LOCALIZER" in ds.ImageType for ds in datasets)


def test_dwi_series_carry_their_b_values() -> None:
    for seed, index in ((1234, 0), (1234, 1), (5, 1), (5, 2), (5, 3)):
        study = synthesize_study(seed, index)
        dwi_entries = [s for s in study.truth["series"] if s["sequence"] == "dwi"]
        assert any(max(s["b_values"]) >= 1400 for s in dwi_entries)
        for entry in dwi_entries:
            datasets = study.series[entry["key"]]
            b_values = [float(ds.DiffusionBValue) for ds in datasets]
            assert sorted(set(b_values)) == sorted(entry["b_values"])
            # one instance per slice per b, on the ADC map's slices
            assert {b_values.count(b) for b in set(b_values)} == {len(study.series["adc"])}
        assert all("DiffusionBValue" not in ds for ds in study.series["t2w_tra"])


def test_series_geometries_differ() -> None:
    study = synthesize_study(3, 0)
    t2 = geometry_of(study.series["t2w_tra"])
    dwi = geometry_of(high_b_stack(study.series))
    adc = geometry_of(study.series["adc"])
    assert t2.size_ijk != dwi.size_ijk and t2.size_ijk[2] > dwi.size_ijk[2]
    assert not np.allclose(t2.spacing_mm_ijk, dwi.spacing_mm_ijk)
    assert not np.allclose(t2.origin_lps_mm, dwi.origin_lps_mm)
    assert dwi.size_ijk[:2] == (128, 128)
    assert 0.47 <= t2.spacing_mm_ijk[0] <= 0.6 and 320 <= t2.size_ijk[0] <= 384
    np.testing.assert_allclose(adc.origin_lps_mm, dwi.origin_lps_mm, atol=1e-3)
    np.testing.assert_allclose(adc.direction, dwi.direction, atol=1e-6)


def test_label_image_has_the_axial_t2w_geometry(lesion_studies: list) -> None:
    for study in lesion_studies[:3]:
        t2 = geometry_of(study.series["t2w_tra"])
        img = study.label_image
        assert img.GetPixelID() == sitk.sitkUInt8
        assert img.GetSize() == t2.size_ijk
        np.testing.assert_allclose(img.GetOrigin(), t2.origin_lps_mm, atol=1e-3)
        np.testing.assert_allclose(img.GetSpacing(), t2.spacing_mm_ijk, atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), t2.direction, atol=1e-6)


def test_lesion_centres_fall_on_their_label_inside_the_gland(lesion_studies: list) -> None:
    n_lesions = 0
    for study in lesion_studies:
        label = sitk.GetArrayFromImage(study.label_image)
        assert set(np.unique(label)) == set(range(len(study.truth["lesions"]) + 1))
        for lesion in study.truth["lesions"]:
            i, j, k = study.label_image.TransformPhysicalPointToIndex(lesion["center_lps_mm"])
            assert label[k, j, i] == lesion["label"]
            centre = np.asarray(lesion["center_lps_mm"])
            assert study.anatomy.gland_radius(centre) < 1.0
            assert anat.ZONE_NAMES[int(study.anatomy.zone_at(centre))] == lesion["zone"]
            n_lesions += 1
    assert n_lesions >= 6


def test_gland_and_lesions_stay_in_the_central_model_box(lesion_studies: list) -> None:
    half_box = np.asarray(DEFAULT_GRID.extent_mm_dhw)[::-1] / 2  # (W, H, D) half extents, mm
    for study in lesion_studies:
        t2 = geometry_of(study.series["t2w_tra"])
        centre = t2.index_to_lps(np.asarray(t2.size_ijk[::-1], dtype=np.float64) / 2 - 0.5)
        gland = study.anatomy.gland
        d = t2.direction_matrix
        offset = (gland.center_lps_mm - centre) @ d
        assert np.all(np.abs(offset[:2]) <= 5.0 + 1e-6) and abs(offset[2]) <= 3.0 + 1e-6
        extent = np.array([gland.half_extent_mm(d[:, a]) for a in range(3)]) + np.abs(offset)
        assert np.all(extent < half_box), (extent, half_box)
        label = sitk.GetArrayFromImage(study.label_image)
        kji = np.argwhere(label > 0)
        if len(kji):
            pts = t2.index_to_lps(kji.astype(np.float64))
            assert np.all(np.abs((pts - centre) @ d) < half_box)


def test_adc_and_dwi_inside_cancer_differ_from_surrounding_pz() -> None:
    for index in range(3):
        study = synthesize_study(8, index, CANCER_PZ_CONFIG)
        adc_geom = geometry_of(study.series["adc"])
        adc = volume_of(study.series["adc"])
        dwi = volume_of(high_b_stack(study.series))
        t2 = volume_of(study.series["t2w_tra"])
        lesions = anat.lesion_label_map(study.anatomy, adc_geom)
        zones = anat.zone_map(study.anatomy, adc_geom)
        t2_lesions = sitk.GetArrayFromImage(study.label_image)
        t2_zones = anat.zone_map(study.anatomy, geometry_of(study.series["t2w_tra"]))
        cancers = [entry for entry in study.truth["lesions"] if entry["kind"] == "cancer"]
        assert cancers
        for entry in cancers:
            assert entry["significant"] and entry["pirads"] in (4, 5) and entry["zone"] == "pz"
            in_lesion = lesions == entry["label"]
            pz = (zones == anat.ZONE_PZ) & (lesions == 0)
            assert in_lesion.sum() >= 3
            assert np.mean(adc[in_lesion]) < np.mean(adc[pz]) - 300
            assert np.median(dwi[in_lesion]) > 1.5 * np.median(dwi[pz])
            t2_in = t2_lesions == entry["label"]
            t2_pz = (t2_zones == anat.ZONE_PZ) & (t2_lesions == 0)
            # PZ cancer T2 is variable (clearly dark to nearly iso): darker, but T2 alone does not decide
            assert entry["t2_contrast"] <= 0.9
            assert np.mean(t2[t2_in]) < np.mean(t2[t2_pz])


def test_oblique_studies_have_non_axis_aligned_orientation() -> None:
    def axis_aligned(ds: pydicom.Dataset) -> bool:
        iop = np.abs(np.asarray(ds.ImageOrientationPatient, dtype=np.float64))
        return bool(np.all(np.isclose(iop, 0.0, atol=1e-6) | np.isclose(iop, 1.0, atol=1e-6)))

    oblique = SynthConfig(protocol=ProtocolOptions(p_oblique=1.0))
    straight = SynthConfig(protocol=ProtocolOptions(p_oblique=0.0))
    for index in range(2):
        study = synthesize_study(4, index, oblique)
        assert study.truth["oblique"] in ("all", "dwi")
        assert not axis_aligned(study.series["dwi"][0]) and not axis_aligned(study.series["adc"][0])
        assert axis_aligned(study.series["t2w_tra"][0]) == (study.truth["oblique"] == "dwi")
        flat = synthesize_study(4, index, straight)
        assert flat.truth["oblique"] == "none"
        assert all(axis_aligned(ds) for key in ("t2w_tra", "dwi", "adc") for ds in flat.series[key])


def test_truth_is_consistent_with_the_pirads_rules(lesion_studies: list) -> None:
    for study in lesion_studies:
        truth = study.truth
        lesions = truth["lesions"]
        assert truth["significant"] == any(les["significant"] for les in lesions)
        assert truth["max_pirads"] == max([1] + [les["pirads"] for les in lesions])
        for les in lesions:
            assert les["pirads"] == anat.pirads_category(
                les["kind"], les["diameter_mm"], les["adc_um2_per_s"], les["dwi_contrast"]
            )
            assert les["significant"] == (les["kind"] == "cancer")
            assert 5.0 <= les["diameter_mm"] <= 25.0 * 1.001


def test_pirads_rules() -> None:
    assert anat.pirads_category("cancer", 15.0, 800, 3.0) == 5
    assert anat.pirads_category("cancer", 14.9, 800, 3.0) == 4
    assert anat.pirads_category("bph_nodule", 12.0, 1050, 2.5) == 3
    assert anat.pirads_category("bph_nodule", 12.0, 1050, 1.5) == 2
    assert anat.pirads_category("inflammation", 12.0, 1150, 3.0) == 2
    assert anat.pirads_category("bph_stromal", 12.0, 950, 2.2) == 3
    assert anat.pirads_category("haemorrhage", 12.0, 800, 0.9) == 2
    assert anat.pirads_category("cyst", 8.0, 1900, 2.5) == 2  # T2 shine-through: DWI marked, ADC high
    with pytest.raises(ValueError):
        anat.pirads_category("calcification", 5.0, 2500, 0.5)


def test_lesion_frequencies_follow_the_config() -> None:
    rng_truths = [anat.sample_anatomy(np.random.default_rng(i), np.zeros(3), anat.AnatomyRanges()) for i in range(300)]
    none = np.mean([len(a.lesions) == 0 for a in rng_truths])
    cancer = np.mean([any(les.significant for les in a.lesions) for a in rng_truths])
    assert 0.27 <= none <= 0.43 and 0.32 <= cancer <= 0.48
    assert max(len(a.lesions) for a in rng_truths) <= 3


def test_bad_requests_raise_synth_error(tmp_path: Path) -> None:
    with pytest.raises(SynthError):
        synthesize_study(-1)
    with pytest.raises(SynthError):
        generate_dataset(tmp_path, cases=0, seed=1)


def test_cli_writes_one_folder_per_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpmri.cli import main

    assert main(["synth", "--out", str(tmp_path), "--cases", "2", "--seed", "9"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("synth-9-0000")
    for name in ("synth-9-0000", "synth-9-0001"):
        case = tmp_path / name
        assert (case / GROUND_TRUTH_FILE).is_file() and (case / LABEL_FILE).is_file()
        assert len(list((case / "dicom").rglob("*.dcm"))) == sum(
            s["num_instances"] for s in json.loads((case / GROUND_TRUTH_FILE).read_text())["series"]
        )
    assert main(["synth", "--out", str(tmp_path), "--cases", "0"]) == 2


def test_write_study_replaces_an_earlier_studys_dicom_files(tmp_path: Path) -> None:
    """Rewriting a case folder (e.g. after a generator change) leaves no file of the earlier study behind."""
    from synth.generator import synthesize_study, write_study

    case = write_study(synthesize_study(7, 1), tmp_path / "case")
    stale = case / "dicom" / "999" / "1.dcm"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier study's instance")
    write_study(synthesize_study(7, 1), tmp_path / "case")
    assert not stale.exists() and not stale.parent.exists()
    assert any((case / "dicom").rglob("*.dcm"))
