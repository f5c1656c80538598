"""End to end: output contract, missing channels, source kinds, CLI files, synthetic studies, golden values."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from contract import (
    DEFAULT_GRID,
    MISSING_CHANNEL_FILL_VALUE,
    NORMALIZATION,
    SEQUENCES,
    GridGeometry,
    contract_dict,
)
from mpmri.cli import main as mpmri_main
from preprocessing.grid import resample_label_to_grid
from preprocessing.pipeline import PreprocessedStudy, preprocess_study
from preprocessing.testing import SAGITTAL, blob, make_series, oblique_orientation, to_bytes

GOLDEN = Path(__file__).with_name("golden") / "preprocess_golden.json"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"  # fixed UIDs so the golden study is byte-identical each run


def golden_study() -> list[pydicom.Dataset]:
    """A deterministic 4-series study (T2W axial + sagittal, oblique multi-b DWI, ADC with rescale)."""
    fn = blob((6.0, -4.0, 3.0), sigma_mm=5.0, peak=900.0, background=150.0)
    common = {"study_uid": STUDY_UID}
    return (
        make_series(
            description="Ax T2 FRFSE", value_fn=fn, rows=96, columns=96, num_slices=20,
            pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=3.0, series_uid=STUDY_UID + ".1", series_number=1,
            **common,
        )
        + make_series(
            description="Sag T2 FRFSE", value_fn=fn, orientation=SAGITTAL, series_uid=STUDY_UID + ".2",
            series_number=2, **common,
        )
        + make_series(
            description="Ax DWI b50_800_1400", value_fn=fn, orientation=oblique_orientation(10.0),
            b_values=[50, 800, 1400], series_uid=STUDY_UID + ".3", series_number=3, **common,
        )
        + make_series(
            description="Apparent Diffusion Coefficient (mm2/s)",
            value_fn=blob((6.0, -4.0, 3.0), sigma_mm=5.0, peak=-700.0, background=1600.0),
            image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), rescale=(2.0, 0.0),
            series_uid=STUDY_UID + ".4", series_number=4, **common,
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def golden_result() -> PreprocessedStudy:
    return preprocess_study(golden_study())


def test_output_follows_the_contract(golden_result: PreprocessedStudy) -> None:
    out = golden_result
    assert out.tensor.shape == (len(SEQUENCES), *DEFAULT_GRID.size_dhw) and out.tensor.dtype == np.float32
    assert out.availability.dtype == np.float32 and out.availability.tolist() == [1.0, 1.0, 1.0]
    assert out.geometry.size_ijk == tuple(DEFAULT_GRID.size_dhw[::-1])
    assert out.geometry.spacing_mm_ijk == tuple(DEFAULT_GRID.spacing_mm_dhw[::-1])
    for ch, seq in enumerate(SEQUENCES):
        spec = NORMALIZATION[seq]
        assert spec.clip_min <= out.tensor[ch].min() and out.tensor[ch].max() <= spec.clip_max
    meta = json.loads(json.dumps(out.meta))  # JSON-serializable
    assert meta["sequences"] == list(SEQUENCES)
    assert set(meta["timings_s"]) >= {"decode", "assemble", "resample", "normalize", "total"}
    assert GridGeometry.from_dict(meta["grid"]) == out.geometry
    for seq in SEQUENCES:
        assert set(meta["series"][seq]) >= {"series_uid", "description", "reason", "b_value"}
    t2 = meta["normalization"]["t2w"]
    assert t2["lower_percentile"] == 1.0 and t2["upper_value"] > t2["lower_value"]


def test_golden_values(golden_result: PreprocessedStudy) -> None:
    """picai_prep-style golden file: chosen series, grid and per-channel statistics of a fixed study.

    Regenerate after an intended change with ``MPMRI_REGEN_GOLDEN=1 pytest tests/test_preprocess_pipeline.py``.
    """
    out = golden_result
    actual = {
        "series": {
            s: {k: out.meta["series"][s][k] for k in ("series_uid", "b_value", "num_frames")} for s in SEQUENCES
        },
        "grid": out.geometry.to_dict(),
        "normalization": {
            s: {k: v for k, v in out.meta["normalization"][s].items() if isinstance(v, float)} for s in SEQUENCES
        },
        "channels": {
            s: {
                "mean": float(out.tensor[i].mean()),
                "std": float(out.tensor[i].std()),
                "p50": float(np.percentile(out.tensor[i], 50)),
                "argmax_kji": [int(v) for v in np.unravel_index(np.argmax(out.tensor[i]), out.tensor[i].shape)],
                "argmin_kji": [int(v) for v in np.unravel_index(np.argmin(out.tensor[i]), out.tensor[i].shape)],
            }
            for i, s in enumerate(SEQUENCES)
        },
    }
    if os.environ.get("MPMRI_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert actual["series"] == expected["series"]
    np.testing.assert_allclose(actual["grid"]["origin_lps_mm"], expected["grid"]["origin_lps_mm"], atol=1e-6)
    np.testing.assert_allclose(actual["grid"]["direction"], expected["grid"]["direction"], atol=1e-9)
    for s in SEQUENCES:
        for k, v in expected["normalization"][s].items():
            assert actual["normalization"][s][k] == pytest.approx(v, rel=1e-4, abs=1e-4), (s, k)
        for k in ("mean", "std", "p50"):
            assert actual["channels"][s][k] == pytest.approx(expected["channels"][s][k], rel=1e-4, abs=1e-5), (s, k)
        for k in ("argmax_kji", "argmin_kji"):
            assert actual["channels"][s][k] == expected["channels"][s][k], (s, k)


def test_missing_adc_gives_availability_zero_fill_value_and_a_warning() -> None:
    datasets = [ds for ds in golden_study() if "Diffusion Coefficient" not in ds.SeriesDescription]
    out = preprocess_study(datasets)
    adc = SEQUENCES.index("adc")
    assert out.availability.tolist() == [1.0, 0.0, 1.0]
    assert np.all(out.tensor[adc] == MISSING_CHANNEL_FILL_VALUE)
    assert out.meta["series"]["adc"] is None and out.meta["availability"]["adc"] is False
    assert any(w.startswith("adc missing") for w in out.meta["warnings"])


def test_same_output_from_folder_bytes_and_datasets(tmp_path: Path, golden_result: PreprocessedStudy) -> None:
    datasets = golden_study()
    blobs = [to_bytes(ds) for ds in datasets]
    folder = tmp_path / "study" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, b in zip(rng.permutation(len(blobs)), blobs, strict=True):
        (folder / f"x{i}").write_bytes(b)  # arbitrary names, no extension
    from_folder = preprocess_study(tmp_path / "study")
    from_bytes = preprocess_study(blobs)
    for out in (from_folder, from_bytes):
        np.testing.assert_array_equal(out.tensor, golden_result.tensor)
        np.testing.assert_array_equal(out.availability, golden_result.availability)
        assert out.geometry == golden_result.geometry
        assert out.meta["series"] == golden_result.meta["series"]


def test_concurrent_calls_give_identical_results(golden_result: PreprocessedStudy) -> None:
    blobs = [to_bytes(ds) for ds in golden_study()]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: preprocess_study(blobs), range(3)))
    for out in results:
        np.testing.assert_array_equal(out.tensor, golden_result.tensor)


def test_cli_writes_nifti_channels_on_the_grid_and_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    datasets = [ds for ds in golden_study() if "Diffusion Coefficient" not in ds.SeriesDescription]  # ADC missing
    for i, ds in enumerate(datasets):
        (folder / f"{i}.dcm").write_bytes(to_bytes(ds))
    out_dir = tmp_path / "out"
    rc = mpmri_main(["preprocess", str(folder), "--out", str(out_dir)])
    assert rc == 0, capsys.readouterr().err
    expected = preprocess_study(folder)
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["contract"] == json.loads(json.dumps(contract_dict()))
    assert meta["availability"] == {"t2w": True, "adc": False, "dwi": True}
    assert any(w.startswith("adc missing") for w in meta["warnings"])
    for ch, seq in enumerate(SEQUENCES):
        img = sitk.ReadImage(str(out_dir / f"{seq}.nii.gz"))
        # NIfTI stores RAS; ITK converts back to LPS on read, so the geometry must round-trip
        np.testing.assert_allclose(img.GetOrigin(), expected.geometry.origin_lps_mm, atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), expected.geometry.direction, atol=1e-6)
        np.testing.assert_allclose(img.GetSpacing(), expected.geometry.spacing_mm_ijk, atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expected.tensor[ch])


# --------------------------------------------------------------------------------------------------
# synthetic studies (synth/ generator, written as DICOM folders)
# --------------------------------------------------------------------------------------------------
def test_synthetic_studies_choose_the_generators_series_and_lesions_land_on_the_grid(
    synthetic_dataset: list[Path],
) -> None:
    for case in synthetic_dataset:
        truth = json.loads((case / "ground_truth.json").read_text())
        out = preprocess_study(case)  # the case folder also holds ground_truth.json and lesions.nii.gz
        assert {s["source"] for s in out.meta["skipped"]} >= {"ground_truth.json", "lesions.nii.gz"}
        by_seq: dict[str, list[dict]] = {}
        for s in truth["series"]:
            by_seq.setdefault(s["sequence"], []).append(s)
        t2w_uids = {s["series_instance_uid"] for s in by_seq["t2w"] if s.get("plane") == "tra"}
        assert out.meta["series"]["t2w"]["series_uid"] in t2w_uids, case.name
        for seq in ("adc", "dwi"):
            if seq in by_seq:
                uids = {s["series_instance_uid"] for s in by_seq[seq]}
                assert out.meta["series"][seq]["series_uid"] in uids, (case.name, seq)
            else:
                assert out.availability[SEQUENCES.index(seq)] == 0.0
        if "dwi" in by_seq:
            top_b = max(b for s in by_seq["dwi"] for b in s.get("b_values", []))
            assert out.meta["series"]["dwi"]["b_value"] == top_b
        labels = resample_label_to_grid(sitk.ReadImage(str(case / "lesions.nii.gz")), out.geometry)
        for lesion in truth["lesions"]:
            mask = labels == lesion["label"]
            expected = out.geometry.lps_to_index(lesion["center_lps_mm"])
            if not mask.any():
                assert np.any((expected < -0.5) | (expected > np.asarray(DEFAULT_GRID.size_dhw) - 0.5))
                continue
            assert np.all(np.abs(np.argwhere(mask).mean(axis=0) - expected) < 1.0), (case.name, lesion["label"])
            if out.availability[SEQUENCES.index("dwi")] and lesion["kind"] == "cancer":
                dwi = out.tensor[SEQUENCES.index("dwi")]
                assert dwi[mask].mean() > 2 * dwi.mean(), (case.name, lesion["label"])
            if out.availability[SEQUENCES.index("adc")] and lesion["diameter_mm"] >= 10.0:
                centre = tuple(np.round(expected).astype(int))
                adc_um2_per_s = out.tensor[SEQUENCES.index("adc")][centre] * NORMALIZATION["adc"].divisor
                assert adc_um2_per_s == pytest.approx(lesion["adc_um2_per_s"], rel=0.15), (case.name, lesion)


def test_in_memory_synthetic_study_series_mapping_equals_its_folder(synthetic_case: Path) -> None:
    """``SyntheticStudy.series`` ({name: [Dataset]}) is accepted and gives the same tensor as the written folder."""
    from synth.generator import synthesize_study

    truth = json.loads((synthetic_case / "ground_truth.json").read_text())
    study = synthesize_study(truth["seed"], truth["index"])
    in_memory = preprocess_study(study.series)
    from_folder = preprocess_study(synthetic_case / "dicom")
    np.testing.assert_array_equal(in_memory.tensor, from_folder.tensor)
    assert in_memory.geometry == from_folder.geometry
