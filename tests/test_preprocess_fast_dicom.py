"""The fast Explicit-VR-LE reader builds exactly pydicom's dataset, and leaves every other encoding to pydicom."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset

from preprocessing.dicom_io import HeaderValueCache, b_value_of, describe_series, read_source
from preprocessing.fast_dicom import fast_dcmread
from preprocessing.pipeline import preprocess_study
from preprocessing.testing import make_series, to_bytes


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if not path or not os.path.exists(path):
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(path)


def assert_same_dataset(fast: FileDataset, ref: FileDataset) -> None:
    """Same raw elements (tag, VR, length, bytes, offset, encoding flags), same file meta, same encodings.

    An undefined-length sequence, which pydicom parses while reading, is kept raw by the fast reader: same
    tag, VR, length and offset, and (below) the same value once converted."""
    assert list(fast.keys()) == list(ref.keys())
    for tag in ref.keys():  # noqa: SIM118 -- the tags, not the (converted) elements
        a, b = fast.get_item(tag), ref.get_item(tag)
        if isinstance(a, RawDataElement) and not isinstance(b, RawDataElement) and b.VR == "SQ":
            assert (a.VR, a.length, a.value_tell) == ("SQ", 0xFFFFFFFF, b.file_tell), tag
            assert b.is_undefined_length, tag
            continue
        assert type(a) is type(b), tag
        assert (tuple(a) if isinstance(a, RawDataElement) else a) == (
            tuple(b) if isinstance(b, RawDataElement) else b
        ), tag
    assert fast.file_meta == ref.file_meta
    assert fast.preamble == ref.preamble
    assert fast.original_encoding == ref.original_encoding
    assert fast.original_character_set == ref.original_character_set
    assert fast._character_set == ref._character_set
    for elem in ref:  # converted values too (public and private elements)
        assert fast[elem.tag].value == elem.value, elem.tag


@pytest.fixture(scope="module")
def synthetic_blobs() -> dict[str, list[bytes]]:
    from synth.generator import synthesize_study

    blobs: dict[str, list[bytes]] = {}
    for seed, index in ((7, 0), (7, 1), (7, 2), (7, 3), (7, 5), (1234, 0)):  # 7/5 has a localizer (generator 3)
        study = synthesize_study(seed, index)
        for name, datasets in study.series.items():
            blobs[f"{seed}/{index}/{name}"] = [to_bytes(ds) for ds in datasets]
    return blobs


def test_fast_reader_builds_pydicoms_dataset_for_every_synthetic_series(
    synthetic_blobs: dict[str, list[bytes]],
) -> None:
    assert {key.rsplit("/", 1)[1] for key in synthetic_blobs} >= {"t2w_tra", "adc", "dwi", "localizer"}
    for key, blobs in synthetic_blobs.items():
        for data in blobs:
            fast = fast_dcmread(data)
            assert fast is not None, f"{key}: the synthetic (Explicit VR LE) object was not read by the fast reader"
            assert_same_dataset(fast, pydicom.dcmread(io.BytesIO(data)))


def test_fast_reader_and_pydicom_give_the_same_series_headers_and_preprocessing(
    synthetic_blobs: dict[str, list[bytes]],
) -> None:
    for study in ("7/0", "7/2", "1234/0"):
        blobs = [b for key, group in synthetic_blobs.items() if key.startswith(study + "/") for b in group]
        fast = read_source(blobs, max_instances=5000)
        slow = read_source([pydicom.dcmread(io.BytesIO(b)) for b in blobs], max_instances=5000)
        assert all(fast_dcmread(b) is not None for b in blobs)
        by_series: dict[str, list[int]] = {}
        for i, ds in enumerate(slow.datasets):
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append(i)
        for indices in by_series.values():
            assert describe_series(fast, indices) == describe_series(slow, indices)
        a = preprocess_study(blobs)
        b = preprocess_study([pydicom.dcmread(io.BytesIO(x)) for x in blobs])
        assert np.array_equal(a.tensor, b.tensor) and np.array_equal(a.availability, b.availability)
        for key in ("series", "source_volumes", "series_table", "normalization", "grid", "warnings"):
            assert a.meta[key] == b.meta[key], key


def test_header_value_cache_gives_the_uncached_values() -> None:
    datasets = make_series(
        description="ep2d_diff b800", value_fn=lambda p: p[..., 0], b_values=(0.0, 800.0), rescale=(2.0, -5.0)
    )
    cache = HeaderValueCache()
    for ds in (pydicom.dcmread(io.BytesIO(to_bytes(d))) for d in datasets):
        assert b_value_of(ds, cache) == b_value_of(ds)
        assert cache.value(ds, "RescaleSlope", float) == float(ds.RescaleSlope)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_truncated.dcm"])
def test_fast_reader_leaves_other_encodings_and_damaged_files_to_pydicom(name: str) -> None:
    assert fast_dcmread(pydicom_file(name).read_bytes()) is None


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"]
)
def test_fast_reader_reads_encapsulated_pixel_data_as_pydicom_does(name: str) -> None:
    data = pydicom_file(name).read_bytes()
    fast = fast_dcmread(data)
    assert fast is not None
    assert_same_dataset(fast, pydicom.dcmread(io.BytesIO(data)))
    for cut in (4, 8, 9, 100, 2000):  # cut in the delimiter, its length, a fragment: declined or pydicom's dataset
        short = fast_dcmread(data[:-cut])
        if short is not None:
            assert_same_dataset(short, pydicom.dcmread(io.BytesIO(data[:-cut])))
    assert fast_dcmread(data[:-8]) is None  # no delimiter length: left to pydicom


@pytest.mark.parametrize("syntax", ["rle", "jpeg-ls", "jpeg2000"])
def test_fast_reader_reads_every_compressed_synthetic_series_as_pydicom_does(
    synthetic_blobs: dict[str, list[bytes]], syntax: str
) -> None:
    from preprocessing.testing import encode

    for data in synthetic_blobs["7/0/t2w_tra"][:4] + synthetic_blobs["7/0/adc"][:4]:
        encoded = encode(data, syntax)
        fast = fast_dcmread(encoded)
        assert fast is not None, syntax
        assert_same_dataset(fast, pydicom.dcmread(io.BytesIO(encoded)))


@pytest.mark.parametrize("undefined_length", [False, True])
def test_fast_reader_reads_enhanced_multiframe_sequences_as_pydicom_does(undefined_length: bool) -> None:
    (enhanced,) = make_series(description="t2_tse_tra", value_fn=lambda p: p[..., 2], enhanced=True)
    if undefined_length:
        for kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            enhanced[kw].is_undefined_length = True
    data = to_bytes(enhanced)
    assert (b"\xfe\xff\xdd\xe0" in data) == undefined_length
    fast = fast_dcmread(data)
    assert fast is not None
    ref = pydicom.dcmread(io.BytesIO(data))
    assert list(fast.keys()) == list(ref.keys()) and fast == ref
    assert fast.PerFrameFunctionalGroupsSequence[3] == ref.PerFrameFunctionalGroupsSequence[3]


def test_fast_reader_reads_pydicoms_explicit_little_endian_mr_exactly() -> None:
    data = pydicom_file("MR_small.dcm").read_bytes()
    fast = fast_dcmread(data)
    assert fast is not None
    assert_same_dataset(fast, pydicom.dcmread(io.BytesIO(data)))


def test_fast_reader_on_cut_files_declines_or_gives_pydicoms_dataset() -> None:
    """Cuts inside an element are left to pydicom (which reports them); a cut at an element boundary is a
    complete, shorter file: then the fast reader must give exactly pydicom's dataset."""
    data = pydicom_file("MR_small.dcm").read_bytes()
    accepted = declined = 0
    for cut in range(0, len(data) - 1, 3):
        part = data[:cut]
        fast = fast_dcmread(part)
        if fast is None:
            declined += 1
            continue
        accepted += 1
        assert_same_dataset(fast, pydicom.dcmread(io.BytesIO(part)))
    assert declined > 10 * accepted
    assert fast_dcmread(data[:-200]) is None  # inside the pixel data
    assert fast_dcmread(b"not a DICOM file at all" * 20) is None
