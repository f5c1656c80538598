"""Damaged files: processed correctly or refused by a typed PreprocessError naming the file; never a crash.

The three crashes measured before this fix (issue 9) each have a test, plus a seeded fuzz run bounded in
count and time (the longer run is ``scripts/fuzz_preprocess.py``).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mpmri.cli import main as mpmri_main
from preprocessing.errors import CorruptDicomError
from preprocessing.pipeline import PreprocessedStudy, preprocess_study
from preprocessing.testing import fuzz_once, fuzz_study, to_bytes

FUZZ_SEED = 20240917
FUZZ_CASES = 1500
FUZZ_BUDGET_S = 25.0


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [to_bytes(ds) for ds in fuzz_study()]


@pytest.fixture(scope="module")
def clean(blobs: list[bytes]) -> PreprocessedStudy:
    return preprocess_study(blobs)


def t2w_index(blobs: list[bytes]) -> int:
    return next(i for i, b in enumerate(blobs) if b"t2_tse_tra" in b)


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


def assert_refused_naming(blobs: list[bytes], index: int, needle: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(CorruptDicomError, match=rf"^bytes\[{index}\]: corrupt DICOM header .*{needle}"):
        preprocess_study(blobs)
    folder = tmp_path / "study"
    folder.mkdir()
    for i, b in enumerate(blobs):
        (folder / f"f{i:03d}.dcm").write_bytes(b)
    rc = mpmri_main(["preprocess", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc != 0 and len(lines) == 1 and f"f{index:03d}.dcm" in lines[0] and "Traceback" not in err


def test_unknown_vr_in_bits_allocated_is_refused_naming_the_file(blobs, tmp_path, capsys) -> None:
    i = t2w_index(blobs)
    damaged = list(blobs)
    damaged[i] = replace_once(blobs[i], b"\x28\x00\x00\x01US", b"\x28\x00\x00\x01Uk")
    assert_refused_naming(damaged, i, r"\(0028,0100\) has unknown VR 'Uk'", tmp_path, capsys)


def test_a_decimal_string_that_does_not_parse_is_refused_naming_the_file(blobs, tmp_path, capsys) -> None:
    i = t2w_index(blobs)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blobs[i]))
    spacing = "\\".join(str(v) for v in ds.PixelSpacing).encode()
    damaged = list(blobs)
    damaged[i] = replace_once(blobs[i], spacing, b"e" + spacing[1:])
    assert_refused_naming(damaged, i, "ValueError", tmp_path, capsys)


def test_missing_bits_allocated_is_refused_naming_the_file(blobs, tmp_path, capsys) -> None:
    i = t2w_index(blobs)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blobs[i]))
    del ds.BitsAllocated
    damaged = list(blobs)
    damaged[i] = to_bytes(ds)
    assert_refused_naming(damaged, i, "required element BitsAllocated is missing", tmp_path, capsys)


def test_a_damaged_file_next_to_a_study_is_refused_not_skipped(blobs) -> None:
    i = t2w_index(blobs)
    damaged = list(blobs)
    damaged[i] = blobs[i][:128] + b"DICX" + blobs[i][132:]  # the DICM prefix damaged: an end slice could be lost
    with pytest.raises(CorruptDicomError, match=rf"^bytes\[{i}\]: damaged DICOM file"):
        preprocess_study(damaged)


def test_seeded_fuzz_of_damaged_headers_finds_no_crash_no_silent_geometry_and_no_unnamed_file(blobs, clean) -> None:
    rng = np.random.default_rng(FUZZ_SEED)
    counts: collections.Counter[str] = collections.Counter()
    defects = []
    end = time.monotonic() + FUZZ_BUDGET_S
    for _ in range(FUZZ_CASES):
        if time.monotonic() > end:
            break
        outcome = fuzz_once(blobs, clean, rng)
        counts[outcome.kind] += 1
        if outcome.kind not in ("ok", "refused", "explained"):
            defects.append(outcome)
    assert not defects, defects[:5]
    assert sum(counts.values()) >= 200, counts  # the budget must not silently shrink the run to nothing
    assert counts["refused"] > 0 and counts["ok"] > 0, counts  # both branches are exercised
