"""Bad input: each case raises its typed error, and the CLI prints ONE line naming it and exits non-zero.

Real DICOM files shipped inside the installed pydicom package are used where they exist (never downloaded),
plus truncated byte variants made here and series generated in memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from contract.errors import MpmriError
from mpmri.cli import main as mpmri_main
from preprocessing.errors import (
    InconsistentGeometryError,
    MultipleStudiesError,
    NoT2WError,
    NotDicomError,
    NotMRError,
    RulesFileError,
    SingleSliceSeriesError,
    StudyNotFoundError,
    TooManyInstancesError,
    TruncatedDicomError,
)
from preprocessing.pipeline import PreprocessSettings, preprocess_study
from preprocessing.testing import blob, make_series, to_bytes

REPO = Path(__file__).resolve().parents[1]


def pydicom_file(name: str) -> Path:
    """A test file that ships inside the installed pydicom package (skip if this pydicom lacks it)."""
    path = get_testdata_file(name, download=False)
    if not path or not os.path.exists(path):
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(path)


def write_folder(folder: Path, datasets: list[pydicom.Dataset]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        (folder / f"obj{i:04d}").write_bytes(to_bytes(ds))  # no .dcm extension on purpose
    return folder


def t2w_series(uid: str | None = None, **kw) -> list[pydicom.Dataset]:
    args = {"rows": 16, "columns": 16, "num_slices": 6, "pixel_spacing_mm": (4.0, 4.0), "slice_spacing_mm": 5.0}
    args.update(kw)
    return make_series(description="t2_tse_tra", value_fn=blob((0, 0, 0), sigma_mm=10.0), study_uid=uid, **args)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = mpmri_main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip() and " WARNING " not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------------------------------
# one case per error type: library error type + CLI one-liner
# --------------------------------------------------------------------------------------------------
def case_not_dicom(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("this is not a DICOM file\n")
    (tmp / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return tmp


def case_not_mr(tmp: Path) -> Path:
    (tmp / "ct").write_bytes(pydicom_file("CT_small.dcm").read_bytes())
    return tmp


def case_no_t2w(tmp: Path) -> Path:
    (tmp / "mr").write_bytes(pydicom_file("MR_small.dcm").read_bytes())  # no SeriesDescription at all
    return tmp


def case_single_slice(tmp: Path) -> Path:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.SeriesDescription = "t2_tse_tra"
    ds.save_as(tmp / "mr.dcm")
    return tmp


def case_truncated_pydicom(tmp: Path) -> Path:
    (tmp / "mr").write_bytes(pydicom_file("MR_truncated.dcm").read_bytes())
    return tmp


def case_truncated_cut(tmp: Path) -> Path:
    write_folder(tmp, t2w_series())
    first = sorted(tmp.iterdir())[2]
    first.write_bytes(first.read_bytes()[:-100])  # pixel data cut short
    return tmp


def case_too_many(tmp: Path) -> Path:
    return write_folder(tmp, t2w_series(num_slices=6))


def case_inconsistent(tmp: Path) -> Path:
    datasets = t2w_series()
    datasets[3].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9, 0.43589]
    return write_folder(tmp, datasets)


def case_multiple_studies(tmp: Path) -> Path:
    return write_folder(tmp, t2w_series() + t2w_series())


CASES = [
    ("not-dicom", case_not_dicom, NotDicomError, [], "no DICOM object"),
    ("not-mr", case_not_mr, NotMRError, [], "no MR images"),
    ("no-t2w", case_no_t2w, NoT2WError, [], "no T2W series"),
    ("single-slice", case_single_slice, SingleSliceSeriesError, [], "single-slice series"),
    ("truncated-pydicom-file", case_truncated_pydicom, TruncatedDicomError, [], "truncated"),
    ("truncated-cut", case_truncated_cut, TruncatedDicomError, [], "truncated"),
    ("too-many", case_too_many, TooManyInstancesError, ["--max-instances", "5"], "limit of 5 instances"),
    ("inconsistent-geometry", case_inconsistent, InconsistentGeometryError, [], "different orientations"),
    ("multiple-studies", case_multiple_studies, MultipleStudiesError, [], "2 MR studies"),
]


@pytest.mark.parametrize(("make", "error", "cli_args", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_and_cli_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, error, cli_args, needle
) -> None:
    (tmp_path / "in").mkdir()
    folder = make(tmp_path / "in")
    settings = PreprocessSettings(max_instances=int(cli_args[1])) if cli_args else PreprocessSettings()
    with pytest.raises(error) as info:
        preprocess_study(folder, settings)
    assert isinstance(info.value, MpmriError)
    assert "\n" not in str(info.value) and needle in str(info.value)
    rc, err = run_cli(["preprocess", str(folder), "--out", str(tmp_path / "out"), *cli_args], capsys)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_cli_process_prints_no_traceback_for_bad_input(tmp_path: Path) -> None:
    folder = case_truncated_pydicom(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mpmri.cli", "preprocess", str(folder), "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert_one_line_error(proc.returncode, proc.stderr, "truncated DICOM file")


# --------------------------------------------------------------------------------------------------
# details of the checks
# --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_every_truncation_of_a_real_mr_file_is_detected() -> None:
    """Cut pydicom's MR_small.dcm at many points (header, mid-element, pixel data): never read silently."""
    data = pydicom_file("MR_small.dcm").read_bytes()
    pixel_end = len(data) - 138  # MR_small.dcm ends with a 126-byte (FFFC,FFFC) padding element after pixels
    for cut in list(range(132, 1600, 7)) + list(range(1600, pixel_end, 331)) + [pixel_end - 1]:
        with pytest.raises(TruncatedDicomError):
            preprocess_study([data[:cut]])
    with pytest.raises(NotDicomError):
        preprocess_study([data[:100]])  # not even the DICM preamble


def test_not_dicom_bytes_and_empty_inputs() -> None:
    with pytest.raises(NotDicomError):
        preprocess_study([b"hello world"])
    with pytest.raises(NotDicomError):
        preprocess_study([])


def test_non_dicom_files_next_to_a_study_are_skipped_with_a_reason(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "study", t2w_series())
    (folder / "README.txt").write_text("notes")
    out = preprocess_study(folder)
    assert {"source": "README.txt", "reason": "not a DICOM file"} in out.meta["skipped"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (  # same position and InstanceNumber, no times: nothing tells which one is the re-acquisition
            lambda ds: (
                ds[2].__setattr__("ImagePositionPatient", list(ds[3].ImagePositionPatient)),
                ds[2].__setattr__("InstanceNumber", ds[3].InstanceNumber),
            ),
            "duplicate slice",
        ),
        (lambda ds: ds.pop(2), "1 missing slice(s)"),
        (
            lambda ds: ds[2].__setattr__(
                "ImagePositionPatient",
                [float(v) + (1.5 if i == 2 else 0) for i, v in enumerate(ds[2].ImagePositionPatient)],
            ),
            "non-uniform slice spacing",
        ),
        (
            lambda ds: ds[2].__setattr__(
                "ImagePositionPatient",
                [float(v) + (3.0 if i == 0 else 0) for i, v in enumerate(ds[2].ImagePositionPatient)],
            ),
            "not on a line",
        ),
        (lambda ds: ds[1].__setattr__("PixelSpacing", [3.0, 3.0]), "different PixelSpacing"),
        (lambda ds: ds[1].__delattr__("ImagePositionPatient"), "missing ImagePositionPatient"),
    ],
    ids=["duplicate", "missing-slice", "non-uniform", "sheared", "pixel-spacing", "no-position"],
)
def test_geometry_checks_name_the_problem(mutate, needle: str) -> None:
    datasets = t2w_series(num_slices=8, instance_order="sorted")
    mutate(datasets)
    with pytest.raises(InconsistentGeometryError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        preprocess_study(datasets)


def test_a_broken_optional_series_is_an_error_not_silently_dropped() -> None:
    uid = generate_uid()
    adc = make_series(
        description="ADC",
        value_fn=blob((0, 0, 0)),
        study_uid=uid,
        image_type=("DERIVED", "PRIMARY", "ADC"),
        num_slices=1,
    )
    with pytest.raises(SingleSliceSeriesError, match="ADC"):
        preprocess_study(t2w_series(uid) + adc)


def test_unknown_study_choice_and_bad_rules_files(tmp_path: Path) -> None:
    with pytest.raises(StudyNotFoundError):
        preprocess_study(t2w_series(), PreprocessSettings(study_instance_uid="1.2.3"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(RulesFileError, match="not valid JSON"):
        preprocess_study(t2w_series(), PreprocessSettings(rules_path=bad_json))
    bad_regex = tmp_path / "regex.json"
    rules = json.loads((REPO / "preprocessing" / "series_rules.json").read_text())
    rules["sequences"]["t2w"]["match_any"]["description_patterns"] = ["(unclosed"]
    bad_regex.write_text(json.dumps(rules))
    with pytest.raises(RulesFileError, match="invalid regex"):
        preprocess_study(t2w_series(), PreprocessSettings(rules_path=bad_regex))
    with pytest.raises(RulesFileError, match="cannot read"):
        preprocess_study(t2w_series(), PreprocessSettings(rules_path=tmp_path / "missing.json"))


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_real_pydicom_mr_encodings_decode_like_the_uncompressed_file(variant: str) -> None:
    """Stack pydicom's MR_small (and an encoded variant) into 3-slice series: same volume either way."""

    def stack(name: str) -> list[pydicom.Dataset]:
        study, series = "1.2.3.4", generate_uid()
        out = []
        for k in range(3):
            ds = pydicom.dcmread(pydicom_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.SeriesDescription = "Ax T2 FRFSE"
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 5.0 * k]
            ds.InstanceNumber = 3 - k
            out.append(ds)
        return out

    ref = preprocess_study(stack("MR_small.dcm"))
    other = preprocess_study(stack(variant))
    assert ref.availability.tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_array_equal(ref.tensor, other.tensor)
    assert ref.meta["normalization"]["t2w"]["upper_value"] > ref.meta["normalization"]["t2w"]["lower_value"]
