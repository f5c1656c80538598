"""Fast lossless decoders for encapsulated pixel data (imagecodecs), with pydicom's plugins as the fallback.

pydicom's decoding plugins (pylibjpeg-openjpeg, pyjpegls, pylibjpeg-rle, GDCM) hold the GIL and go through
pydicom's generic pixel pipeline. ``imagecodecs`` (BSD-3-Clause; bundles OpenJPEG 2.5 (BSD-2), CharLS
(BSD-3), liblj92 (MIT) and its own DICOM RLE codec) decodes the same codestreams faster and releases the
GIL, so a series' objects decode in threads. Measured on a synthetic study (87 frames, 2-core VM; raw frame
decode, docs/preprocessing.md): JPEG 2000 474 ms (pydicom + pylibjpeg-openjpeg 716 ms), HTJ2K 49 (173),
JPEG-LS 80 (197), JPEG Lossless SV1 48 (GDCM 135).

:func:`decode_encapsulated` returns exactly what ``ds.pixel_array`` returns (same values, same dtype) for
the cases it accepts -- one sample per pixel, 8 or 16 bits allocated, a frame that decodes to
``rows x columns`` of that size, and for signed data ``BitsStored == BitsAllocated`` -- and ``None``
otherwise, so that pydicom (with its corrections: J2K sign, odd bit depths, colour) decodes the object as
before. ``tests/test_preprocess_compressed.py`` checks it against pydicom on every syntax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

imagecodecs: Any
try:  # optional: without it every object goes through pydicom's plugins
    import imagecodecs
except ImportError:  # pragma: no cover - imagecodecs is a declared dependency
    imagecodecs = None

#: lossless only: a lossy (irreversible) codestream's floating-point inverse transform may round differently
#: in another OpenJPEG build than pydicom's plugin, so lossy JPEG 2000 / HTJ2K stay with pydicom
_J2K = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
)


def _codecs() -> dict[str, tuple[str, Callable[[bytes, np.dtype[Any]], np.ndarray]]]:
    """Transfer syntax -> (codec family, decode(frame bytes, stored dtype) -> array)."""
    if imagecodecs is None:
        return {}
    ic: Any = imagecodecs

    def rle(frame: bytes, dtype: np.dtype[Any]) -> np.ndarray:
        return np.frombuffer(ic.dicomrle_decode(frame, dtype), dtype)

    table: dict[str, tuple[str, Callable[[bytes, np.dtype[Any]], np.ndarray]]] = {
        "1.2.840.10008.1.2.5": ("rle", rle),  # RLE Lossless
        "1.2.840.10008.1.2.4.80": ("jpegls", lambda f, _: ic.jpegls_decode(f)),  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.57": ("ljpeg", lambda f, _: ic.ljpeg_decode(f)),  # JPEG Lossless
        "1.2.840.10008.1.2.4.70": ("ljpeg", lambda f, _: ic.ljpeg_decode(f)),  # JPEG Lossless SV1
    }
    for syntax in _J2K:  # JPEG 2000 and HTJ2K (OpenJPEG >= 2.5 decodes both)
        table[syntax] = ("j2k", lambda f, _: ic.jpeg2k_decode(f))
    return table


_CODECS = _codecs()
#: the transfer syntaxes decoded here (the rest, and the cases declined, go to pydicom)
FAST_SYNTAXES: frozenset[str] = frozenset(_CODECS)


def decode_encapsulated(
    pixel_data: bytes,
    tsyntax: str,
    frames: int,
    rows: int,
    columns: int,
    bits_allocated: int,
    bits_stored: int,
    signed: bool,
    samples_per_pixel: int = 1,
) -> np.ndarray | None:
    """``[frames, rows, columns]`` stored values of encapsulated ``pixel_data``, as ``ds.pixel_array`` gives
    them, or ``None`` when this case is left to pydicom (see the module docstring).

    Raises what the codec raises on a damaged codestream (the caller names the file and the syntax).
    """
    entry = _CODECS.get(tsyntax)
    if entry is None or samples_per_pixel != 1 or bits_allocated not in (8, 16):
        return None
    if signed and bits_stored != bits_allocated:
        return None  # sign extension from BitsStored: pydicom's rules
    family, decode = entry
    from pydicom.encaps import generate_frames

    unsigned = np.dtype(f"u{bits_allocated // 8}")
    wanted = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    out = np.empty((frames, rows, columns), dtype=wanted)
    for n, frame in enumerate(generate_frames(pixel_data, number_of_frames=frames)):
        if n >= frames:
            return None
        arr = np.asarray(decode(frame, unsigned))
        if arr.size != rows * columns or arr.dtype.itemsize != wanted.itemsize:
            return None
        if family == "j2k" and (arr.dtype.kind == "i") != signed:
            return None  # codestream signedness differs from PixelRepresentation: pydicom's J2K correction
        out[n] = arr.reshape(rows, columns).view(wanted) if arr.dtype != wanted else arr.reshape(rows, columns)
    return out
