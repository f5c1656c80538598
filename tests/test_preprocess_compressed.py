"""Compressed pixel data: every lossless syntax gives the tensor of the uncompressed study, bit for bit.

Encoders: pydicom (RLE, deflate), pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), dcmtk's dcmcjpeg
(JPEG Lossless SV1; skipped where dcmtk is not installed). HTJ2K cannot be encoded on this machine
(openjpeg decodes HTJ2K but does not encode it; no OpenJPH/Kakadu): its decoder is declared, not tested here.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pydicom.uid import UID

from preprocessing.errors import UnsupportedPixelDataError
from preprocessing.pipeline import PreprocessedStudy, preprocess_study
from preprocessing.testing import LOSSLESS_SYNTAXES, encode, fuzz_study, to_bytes


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
    encoded = [encode(b, syntax) for b in blobs]
    assert all(LOSSLESS_SYNTAXES[syntax].encode() in e[:400] for e in encoded)  # really re-encoded
    out = preprocess_study(encoded)
    np.testing.assert_array_equal(out.tensor, uncompressed.tensor)
    assert out.meta["series"] == uncompressed.meta["series"]
    assert out.geometry == uncompressed.geometry


def test_a_syntax_without_a_decoder_is_an_error_naming_the_transfer_syntax(blobs: list[bytes]) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.filebase import DicomBytesIO

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
