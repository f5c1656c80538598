"""Scanner headers (nested sequences, Siemens CSA, GE/Philips private groups): same tensor, fast reader used."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pydicom
import pytest

from preprocessing.fast_dicom import fast_dcmread
from preprocessing.pipeline import preprocess_study
from preprocessing.testing import to_bytes
from synth.generator import SynthConfig, synthesize_study

WITH = SynthConfig(scanner_headers_every=1)
WITHOUT = SynthConfig(scanner_headers_every=0)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_scanner_headers_leave_the_tensor_bit_identical_and_the_fast_reader_reads_them(index: int) -> None:
    plain = synthesize_study(11, index, WITHOUT)
    rich = synthesize_study(11, index, WITH)
    plain_blobs = [to_bytes(ds) for dss in plain.series.values() for ds in dss]
    rich_blobs = [to_bytes(ds) for dss in rich.series.values() for ds in dss]
    assert sum(map(len, rich_blobs)) > sum(map(len, plain_blobs))
    assert any(b"\xfe\xff\xdd\xe0" in b for b in rich_blobs)  # undefined-length sequences are really there
    for data in rich_blobs[:5]:  # the fast walker reads them, and builds pydicom's dataset
        fast = fast_dcmread(data)
        assert fast is not None
        assert fast == pydicom.dcmread(io.BytesIO(data))
    a, b = preprocess_study(plain_blobs), preprocess_study(rich_blobs)
    np.testing.assert_array_equal(a.tensor, b.tensor)
    assert a.meta["series"] == b.meta["series"]


def test_every_other_study_of_a_default_dataset_carries_scanner_headers() -> None:
    assert SynthConfig().scanner_headers_every == 2
    assert dataclasses.replace(SynthConfig()).scanner_headers_every == 2
    first = synthesize_study(3, 0).series["t2w_tra"][0]
    second = synthesize_study(3, 1).series["t2w_tra"][0]
    assert "RequestAttributesSequence" not in first and "RequestAttributesSequence" in second
