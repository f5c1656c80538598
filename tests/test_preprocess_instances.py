"""Instances as PACS send them: resent copies (same SOPInstanceUID) and re-acquired slices (same position).

Decisions under test (docs/preprocessing.md, "Resent and re-acquired instances"):
* same SOPInstanceUID + same content -> one copy kept, a warning counts the dropped copies, the tensor is
  bit-identical to the single-copy study (library from a folder and from bytes, and the CLI);
* same SOPInstanceUID + different content -> ConflictingInstancesError naming both files;
* two instances at one slice position of one series -> the later acquisition is kept with a warning;
  when nothing tells which is later -> DuplicateSliceError naming the series and the position.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from contract import SEQUENCES
from mpmri.cli import main as mpmri_main
from preprocessing.errors import ConflictingInstancesError, DuplicateSliceError, InconsistentGeometryError
from preprocessing.pipeline import PreprocessedStudy, preprocess_study, uid_hash
from preprocessing.testing import blob, make_series, oblique_orientation, to_bytes

REPO = Path(__file__).resolve().parents[1]
STUDY_UID = "1.2.826.0.1.3680043.8.498.99"


def small_study() -> list[pydicom.Dataset]:
    """T2W (sorted instances), multi-b DWI and ADC with fixed UIDs; byte-identical on every call."""
    fn = blob((4.0, -2.0, 1.0), sigma_mm=6.0, peak=800.0, background=120.0)
    common = {"study_uid": STUDY_UID, "rows": 40, "columns": 40, "num_slices": 10}
    datasets = (
        make_series(description="t2_tse_tra", value_fn=fn, series_uid=STUDY_UID + ".1", series_number=1,
                    instance_order="sorted", pixel_spacing_mm=(1.5, 1.5), slice_spacing_mm=3.0, **common)
        + make_series(description="ep2d_diff_b50_800_1400", value_fn=fn, orientation=oblique_orientation(6.0),
                      b_values=[50, 800, 1400], series_uid=STUDY_UID + ".2", series_number=2, **common)
        + make_series(description="ADC", value_fn=blob((4.0, -2.0, 1.0), sigma_mm=6.0, peak=-600, background=1500),
                      image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), series_uid=STUDY_UID + ".3",
                      series_number=3, **common)
    )  # fmt: skip
    for n, ds in enumerate(datasets):  # deterministic SOP UIDs, so copies made later are resends
        ds.SOPInstanceUID = f"{STUDY_UID}.9.{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return datasets


@pytest.fixture(scope="module")
def single_copy() -> PreprocessedStudy:
    return preprocess_study([to_bytes(ds) for ds in small_study()])


def assert_same_tensor(out: PreprocessedStudy, ref: PreprocessedStudy) -> None:
    np.testing.assert_array_equal(out.tensor, ref.tensor)
    np.testing.assert_array_equal(out.availability, ref.availability)
    assert out.geometry == ref.geometry
    assert out.meta["series"] == ref.meta["series"]


def assert_no_raw_uids(text: str, datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        assert str(ds.SOPInstanceUID) not in text
    assert STUDY_UID not in text and "Synthetic^Phantom" not in text


# --------------------------------------------------------------------------------------------------
# resent instances (same SOPInstanceUID)
# --------------------------------------------------------------------------------------------------
def test_byte_identical_resends_from_bytes_are_dropped_with_a_count_and_the_tensor_is_unchanged(
    single_copy: PreprocessedStudy,
) -> None:
    datasets = small_study()
    blobs = [to_bytes(ds) for ds in datasets]
    resent = blobs + blobs[3:10] + blobs[25:27]  # 9 objects arrive twice
    out = preprocess_study(resent)
    assert_same_tensor(out, single_copy)
    warnings = [w for w in out.meta["warnings"] if w.startswith("resent instances")]
    assert len(warnings) == 1 and "dropped 9 duplicate copies of 9 SOP instance(s)" in warnings[0]
    assert sum(s["reason"].startswith("resent instance") for s in out.meta["skipped"]) == 9
    assert_no_raw_uids(json.dumps(out.meta["warnings"]), datasets)


def test_resends_in_a_folder_with_other_names_and_file_meta_are_dropped_and_the_tensor_is_unchanged(
    tmp_path: Path, single_copy: PreprocessedStudy
) -> None:
    datasets = small_study()
    for i, ds in enumerate(datasets):
        (tmp_path / "study" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "study" / "a" / f"{i:03d}.dcm").write_bytes(to_bytes(ds))
    copies = tmp_path / "study" / "0_resent_by_router"  # sorts first: the copies are read before the originals
    copies.mkdir()
    for i, ds in enumerate(datasets[:12]):
        ds.file_meta.ImplementationVersionName = "ROUTER_2"  # a router rewrites the file meta only
        (copies / f"copy{i}").write_bytes(to_bytes(ds))
    out = preprocess_study(tmp_path / "study")
    assert_same_tensor(out, single_copy)
    assert any("dropped 12 duplicate copies" in w for w in out.meta["warnings"])


def test_resent_instances_through_the_cli_in_process_and_as_a_subprocess(
    tmp_path: Path, single_copy: PreprocessedStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    datasets = small_study()
    for i, ds in enumerate(datasets):
        blob_ = to_bytes(ds)
        (folder / f"{i}.dcm").write_bytes(blob_)
        if i % 4 == 0:
            (folder / f"{i}-again.dcm").write_bytes(blob_)
    n_copies = len(range(0, len(datasets), 4))
    out_a = tmp_path / "out_a"
    assert mpmri_main(["preprocess", str(folder), "--out", str(out_a)]) == 0, capsys.readouterr().err
    out_b = tmp_path / "out_b"
    proc = subprocess.run(
        [sys.executable, "-m", "mpmri.cli", "preprocess", str(folder), "--out", str(out_b)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_raw_uids(proc.stderr + proc.stdout, datasets)
    for out_dir in (out_a, out_b):
        meta = json.loads((out_dir / "meta.json").read_text())
        assert any(f"dropped {n_copies} duplicate copies" in w for w in meta["warnings"])
        for ch, seq in enumerate(SEQUENCES):
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{seq}.nii.gz")))
            np.testing.assert_array_equal(arr, single_copy.tensor[ch])


def test_same_sop_instance_uid_with_different_pixels_is_refused_naming_both_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets = small_study()
    for i, ds in enumerate(datasets):
        (tmp_path / f"{i:03d}.dcm").write_bytes(to_bytes(ds))
    changed = small_study()[5]
    changed.PixelData = (np.frombuffer(changed.PixelData, dtype=np.uint16) + 1).tobytes()
    (tmp_path / "zz_changed.dcm").write_bytes(to_bytes(changed))
    with pytest.raises(ConflictingInstancesError, match=r"zz_changed\.dcm and 005\.dcm share SOPInstanceUID") as err:
        preprocess_study(tmp_path)
    assert uid_hash(str(changed.SOPInstanceUID)) in str(err.value)
    assert_no_raw_uids(str(err.value), datasets)
    rc = mpmri_main(["preprocess", str(tmp_path), "--out", str(tmp_path / "out")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert rc != 0 and len(lines) == 1 and "differ in content" in lines[0]


# --------------------------------------------------------------------------------------------------
# re-acquired slices (different instances at one position of one series)
# --------------------------------------------------------------------------------------------------
def reacquire(datasets: list[pydicom.Dataset], index: int, acquisition_time: str, delta: int) -> pydicom.Dataset:
    """A new instance (new SOPInstanceUID) at the position of ``datasets[index]`` with pixels + ``delta``."""
    new = copy.deepcopy(datasets[index])
    new.SOPInstanceUID = generate_uid()
    new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    new.AcquisitionTime = acquisition_time
    new.PixelData = (np.frombuffer(datasets[index].PixelData, dtype=np.uint16) + delta).tobytes()
    return new


def with_times(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    for ds in datasets:
        ds.AcquisitionDate, ds.AcquisitionTime = "20240102", "101500"
    return datasets


def test_a_reacquired_slice_replaces_the_earlier_one_with_a_warning() -> None:
    datasets = with_times(small_study())
    new = reacquire(datasets, 4, "102012.5", delta=40)  # the T2W slice 4, acquired again 5 minutes later
    out = preprocess_study([to_bytes(ds) for ds in [*datasets, new]])
    expected_study = with_times(small_study())
    expected_study[4].PixelData = new.PixelData
    expected = preprocess_study([to_bytes(ds) for ds in expected_study])
    assert_same_tensor(out, expected)
    assert not np.array_equal(out.tensor, preprocess_study([to_bytes(ds) for ds in with_times(small_study())]).tensor)
    assert any(
        "series 't2_tse_tra' (t2w): 1 slice position(s) acquired more than once; kept the later" in w
        for w in out.meta["warnings"]
    )


def test_an_earlier_instance_at_a_taken_position_is_the_one_dropped(single_copy: PreprocessedStudy) -> None:
    datasets = with_times(small_study())
    old = reacquire(datasets, 7, "095900", delta=300)  # an older acquisition of slice 7 arrives too
    out = preprocess_study([to_bytes(ds) for ds in [old, *datasets]])
    reference = preprocess_study([to_bytes(ds) for ds in with_times(small_study())])
    assert_same_tensor(out, reference)
    assert any("acquired more than once" in w for w in out.meta["warnings"])


def test_instances_at_one_position_that_tie_on_time_and_number_are_refused_naming_series_and_position() -> None:
    datasets = small_study()
    twin = reacquire(datasets, 2, "", delta=10)
    del twin.AcquisitionTime
    with pytest.raises(DuplicateSliceError, match=r"series 't2_tse_tra' \(t2w\): duplicate slice positions") as err:
        preprocess_study([*datasets, twin])
    assert "mm along the normal" in str(err.value)
    assert isinstance(err.value, InconsistentGeometryError)  # callers catching the geometry error still do
