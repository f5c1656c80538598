"""The fast Explicit-VR-LE reader builds exactly pydicom's dataset, and leaves every other encoding to pydicom."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset

from preprocessing import fast_dicom
from preprocessing.dicom_io import HeaderValueCache, b_value_of, describe_series, read_source
from preprocessing.element_scan import scan_body
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
    # every instance attribute pydicom's reader sets, on both datasets (the buffers: equal bytes)
    for a, b in ((fast, ref), (fast.file_meta, ref.file_meta)):
        state_a, state_b = dict(vars(a)), dict(vars(b))
        assert state_a.keys() == state_b.keys()
        for key in ("_dict", "file_meta"):
            state_a.pop(key, None), state_b.pop(key, None)
        buffers = state_a.pop("buffer", None), state_b.pop("buffer", None)
        if buffers[1] is not None:
            assert buffers[0].getvalue() == buffers[1].getvalue()
        assert state_a == state_b
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


def _body_start(data: bytes) -> int:
    meta = fast_dicom._walk(data, fast_dicom._META_START, meta_only=True)
    assert meta is not None
    return meta[1]


def _or_none(walk: Any, *args: Any) -> Any:
    """A walk's result; ``None`` where it raises (fast_dcmread then declines the file, as for ``None``)."""
    try:
        return walk(*args)
    except Exception:
        return None


def _same_walk(data: bytes, pos: int) -> bool:
    """The compiled scan's walk equals the Python walk's (both declining, or the same raw elements); returns
    whether the compiled scan accepted the body."""
    scanned = scan_body(data, pos) if pos < len(data) else None
    got = _or_none(fast_dicom._walk_body, data, pos)
    ref = _or_none(fast_dicom._walk, data, pos, False)
    if ref is None or got is None:
        assert got is None and ref is None
        return scanned is not None
    assert list(got[0]) == list(ref[0]) and got[1] == ref[1]
    for tag, elem in ref[0].items():
        if isinstance(elem, RawDataElement):
            assert tuple(got[0][tag]) == tuple(elem), tag
        else:  # a sequence _walk handed to pydicom's parser: the compiled scan declined the body
            assert scanned is None
    return scanned is not None


def test_compiled_element_scan_walks_bodies_exactly_as_the_python_walk_does() -> None:
    """Clean files with scanner headers (nested undefined-length sequences, private blocks) and compressed
    pixel data are scanned by the compiled walk; on thousands of damaged variants it gives the Python walk's
    elements or declines where that declines (then that walk decides)."""
    from preprocessing.testing import corrupt, encode
    from synth.generator import SynthConfig, synthesize_study

    study = synthesize_study(7, 1, SynthConfig(scanner_headers_every=1))
    blobs = [to_bytes(ds) for datasets in study.series.values() for ds in datasets[:3]]
    blobs += [encode(blobs[0], "rle"), encode(blobs[-1], "jpeg-ls")]
    assert any(b"\xfe\xff\xdd\xe0" in b[: len(b) // 2] for b in blobs)  # undefined-length sequences present
    for data in blobs:
        assert _same_walk(data, _body_start(data)), "a clean file was left to the Python walk"
    rng = np.random.default_rng(20261126)
    accepted = 0
    for trial in range(3000):
        data = blobs[trial % len(blobs)]
        damaged, _ = corrupt(data, ("flip", "truncate", "insert", "delete")[trial % 4], rng)
        meta = fast_dicom._walk(damaged, fast_dicom._META_START, meta_only=True) if len(damaged) > 140 else None
        if meta is None or meta[1] >= len(damaged):
            continue
        accepted += _same_walk(damaged, meta[1])
    assert accepted > 500


def test_fast_reader_keys_elements_with_interned_tags_that_header_lookups_share(
    synthetic_blobs: dict[str, list[bytes]],
) -> None:
    """Every dataset read by the compiled scan is keyed by the one interned object per tag, the objects the
    header-value cache looks up with, so its dict hits match by identity (no Python-level ``__eq__``)."""
    from preprocessing.dicom_io import _KEYWORD_TAGS

    a, b = (fast_dcmread(data) for data in synthetic_blobs["7/0/t2w_tra"][:2])
    assert a is not None and b is not None
    for tag in a._dict:
        assert tag is fast_dicom.intern_tag(int(tag)) and tag == int(tag)
    rows = _KEYWORD_TAGS["Rows"]
    assert rows is fast_dicom.intern_tag(0x00280010)
    assert any(key is rows for key in a._dict) and any(key is rows for key in b._dict)
