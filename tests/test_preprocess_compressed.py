"""Compressed pixel data: every lossless syntax gives the tensor of the uncompressed study, bit for bit.

Encoders: pydicom (RLE, deflate), pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), dcmtk's dcmcjpeg
(JPEG Lossless SV1), OpenJPH's ojph_compress (HTJ2K Lossless; Debian openjph-tools). The two command-line
encoders are installed by ``scripts/install_system_packages.sh`` (``make test``); their syntaxes are skipped
where they are missing. Decoders: imagecodecs (preprocessing/codecs.py) for RLE, JPEG-LS, JPEG Lossless,
JPEG 2000 and HTJ2K; pydicom's plugins for what it declines (and as the reference here).
"""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID

from preprocessing.errors import UnsupportedPixelDataError
from preprocessing.pipeline import PreprocessedStudy, preprocess_study
from preprocessing.testing import LOSSLESS_SYNTAXES, blob, encode, fuzz_study, make_series, to_bytes

needs_ojph = pytest.mark.skipif(
    shutil.which("ojph_compress") is None,
    reason="OpenJPH's ojph_compress (the HTJ2K encoder, Debian openjph-tools) is not installed",
)


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [to_bytes(ds) for ds in fuzz_study(rows=64)]  # JPEG 2000's 6 resolutions need >= 32 px


@pytest.fixture(scope="module")
def uncompressed(blobs: list[bytes]) -> PreprocessedStudy:
    return preprocess_study(blobs)


@pytest.mark.parametrize("syntax", sorted(LOSSLESS_SYNTAXES))
def test_lossless_syntax_gives_the_tensor_of_the_uncompressed_study(
    syntax: str, blobs: list[bytes], uncompressed: PreprocessedStudy
) -> None:
    if syntax == "jpeg-sv1" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg (the JPEG Lossless SV1 encoder) is not installed")
    if syntax == "htj2k" and shutil.which("ojph_compress") is None:
        pytest.skip("OpenJPH's ojph_compress (the HTJ2K encoder, Debian openjph-tools) is not installed")
    encoded = [encode(b, syntax) for b in blobs]
    assert all(LOSSLESS_SYNTAXES[syntax].encode() in e[:400] for e in encoded)  # really re-encoded
    out = preprocess_study(encoded)
    np.testing.assert_array_equal(out.tensor, uncompressed.tensor)
    assert out.meta["series"] == uncompressed.meta["series"]
    assert out.geometry == uncompressed.geometry


def test_a_syntax_without_a_decoder_is_an_error_naming_the_transfer_syntax(blobs: list[bytes]) -> None:
    from pydicom.encaps import encapsulate

    mpeg2 = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile / Main Level: no pixel decoder
    damaged = []
    for b in blobs:
        ds = pydicom.dcmread(DicomBytesIO(b))
        ds.file_meta.TransferSyntaxUID = mpeg2
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        ds["PixelData"].VR = "OB"
        damaged.append(to_bytes(ds))
    with pytest.raises(UnsupportedPixelDataError, match=r"transfer syntax MPEG2 Main Profile / Main Level \(1\.2\.840"):
        preprocess_study(damaged)


def _htj2k_frames(ds: pydicom.Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames

    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


@needs_ojph
@pytest.mark.parametrize(
    ("bits_stored", "signed", "enhanced"),
    [(16, False, False), (12, False, False), (16, True, False), (12, True, False), (16, False, True)],
)
def test_an_htj2k_frame_decodes_to_the_original_frame_bit_for_bit(
    bits_stored: int, signed: bool, enhanced: bool
) -> None:
    rng = np.random.default_rng(bits_stored + 2 * signed)
    (ds,) = make_series(
        description="t2_tse_tra", value_fn=blob((0.0, 0.0, 0.0)), rows=40, columns=56, num_slices=3 if enhanced else 1,
        enhanced=enhanced,
    )  # fmt: skip
    # full-range noise: every bit of the stored values matters, negative values where signed
    lo, hi = (-(1 << (bits_stored - 1)), 1 << (bits_stored - 1)) if signed else (0, 1 << bits_stored)
    original = rng.integers(lo, hi, size=(3 if enhanced else 1, 40, 56)).astype(np.int16 if signed else np.uint16)
    original[..., 0, 0], original[..., 0, 1] = lo, hi - 1  # the extremes of the range
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    ds.PixelData = original.tobytes()
    expected = pydicom.dcmread(DicomBytesIO(to_bytes(ds))).pixel_array
    np.testing.assert_array_equal(expected.reshape(original.shape), original)

    out = pydicom.dcmread(DicomBytesIO(encode(to_bytes(ds), "htj2k")))
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.201"
    assert out.PhotometricInterpretation == "MONOCHROME2"
    frames = _htj2k_frames(out)
    assert len(frames) == original.shape[0]
    for frame in frames:
        # a J2K codestream (SOC, SIZ) whose main header has the CAP marker of Part 15 (HT block coder)
        assert frame[:4] == b"\xff\x4f\xff\x51"
        assert b"\xff\x50" in frame[: frame.index(b"\xff\x90")]  # before the first tile-part (SOT)
        assert frame[42] == (0x80 if signed else 0) | (bits_stored - 1)  # Ssiz: signedness and depth
    decoded = out.pixel_array
    assert decoded.dtype == original.dtype
    np.testing.assert_array_equal(decoded.reshape(original.shape), original)


def test_htj2k_without_ojph_compress_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    (ds,) = make_series(description="t2_tse_tra", value_fn=blob((0.0, 0.0, 0.0)), rows=32, columns=32, num_slices=1)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError, match="ojph_compress .*openjph-tools.* is not installed"):
        encode(to_bytes(ds), "htj2k")


# --------------------------------------------------------------------------------------------------
# The fast decoders (imagecodecs) against pydicom's plugins
# --------------------------------------------------------------------------------------------------
def _pydicom_and_fast(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    from preprocessing.codecs import decode_encapsulated

    ds = pydicom.dcmread(DicomBytesIO(data))
    expected = ds.pixel_array  # pydicom's plugins (the fallback path)
    fast = decode_encapsulated(
        ds.PixelData,
        str(ds.file_meta.TransferSyntaxUID),
        int(ds.get("NumberOfFrames", 1) or 1),
        int(ds.Rows),
        int(ds.Columns),
        int(ds.BitsAllocated),
        int(ds.BitsStored),
        int(ds.PixelRepresentation) == 1,
        int(ds.get("SamplesPerPixel", 1)),
    )
    return np.asarray(expected).reshape(-1, int(ds.Rows), int(ds.Columns)) if fast is not None else expected, fast


@pytest.mark.parametrize("syntax", sorted(LOSSLESS_SYNTAXES))
def test_fast_decoder_equals_pydicom_on_every_lossless_syntax(syntax: str, blobs: list[bytes]) -> None:
    """Same values and dtype as ``ds.pixel_array``, signed 16-bit synthetic frames (the pipeline's data)."""
    from preprocessing.codecs import FAST_SYNTAXES

    if syntax == "jpeg-sv1" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg (the JPEG Lossless SV1 encoder) is not installed")
    if syntax == "htj2k" and shutil.which("ojph_compress") is None:
        pytest.skip("OpenJPH's ojph_compress (the HTJ2K encoder, Debian openjph-tools) is not installed")
    if LOSSLESS_SYNTAXES[syntax] not in FAST_SYNTAXES:
        pytest.skip(f"{syntax} is decoded by pydicom's plugins only")
    for data in blobs[:6]:
        expected, fast = _pydicom_and_fast(encode(data, syntax))
        assert fast is not None, syntax
        assert fast.dtype == expected.dtype
        np.testing.assert_array_equal(fast, expected)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm"]
)
def test_fast_decoder_equals_pydicom_on_pydicom_test_files_or_declines(name: str) -> None:
    """Other encoders' files: equal to pydicom, or declined (colour: left to pydicom)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    with open(str(path), "rb") as f:
        expected, fast = _pydicom_and_fast(f.read())
    if name.startswith("SC_rgb"):
        assert fast is None
        return
    assert fast is not None
    assert fast.dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)


def test_threaded_decoding_gives_the_tensor_of_in_thread_decoding(
    blobs: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from preprocessing import dicom_io

    encoded = [encode(b, "jpeg2000") for b in blobs]
    threaded = preprocess_study(encoded)
    monkeypatch.setattr(dicom_io, "MAX_DECODE_THREADS", 1)
    single = preprocess_study(encoded)
    np.testing.assert_array_equal(threaded.tensor, single.tensor)
