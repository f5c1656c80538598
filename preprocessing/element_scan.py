"""Compiled scan of the top-level data elements of an Explicit VR Little Endian body.

:func:`scan_body` finds, for every top-level element of ``data[pos:]``, its tag, VR, length and value range,
the way :func:`preprocessing.fast_dicom._walk` does (same rules: known VRs only, no group 0000/0002/FFFE,
values inside the data; undefined-length encapsulated Pixel Data walked to its Sequence Delimitation Item;
undefined-length sequences walked through their items, nested ones included, at most
``_MAX_SEQUENCE_DEPTH + 1`` levels). The scan runs in numba (no Python object per element); the caller builds
the raw elements from the arrays. Anything it does not accept -- including what ``_walk`` would hand to
pydicom's sequence parser -- returns ``None``, and the caller runs ``_walk`` itself, so every decision on an
unusual file stays ``_walk``'s.
"""

from __future__ import annotations

import numba
import numpy as np
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

#: VR names by code (code 0: not a VR); two-letter ones only (pydicom also lists ambiguous ones such as
#: "US or SS", which never occur in a file)
VR_NAMES: tuple[str, ...] = ("",) + tuple(sorted(str(v) for v in VR if len(str(v)) == 2))
_SHORT, _LONG, _PIXELS, _SEQUENCE = 1, 2, 3, 4
#: the nesting limit of fast_dicom._sequence_end (depth 0..16: 17 levels)
_MAX_SEQUENCE_LEVELS = 17


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """``(kind, code)`` indexed by the two VR bytes read as a little-endian uint16."""
    kind = np.zeros(65536, dtype=np.int8)
    code = np.zeros(65536, dtype=np.int16)
    for index, name in enumerate(VR_NAMES[1:], start=1):
        raw = name.encode("ascii")
        key = raw[0] | raw[1] << 8
        code[key] = index
        if name == "SQ":
            kind[key] = _SEQUENCE
        elif name in ("OB", "OW"):
            kind[key] = _PIXELS
        elif VR(name) in EXPLICIT_VR_LENGTH_32:
            kind[key] = _LONG
        else:
            kind[key] = _SHORT
    return kind, code


_VR_KIND, _VR_CODE = _tables()


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _u16(buf: np.ndarray, pos: int) -> int:
    return int(buf[pos]) | int(buf[pos + 1]) << 8


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _u32(buf: np.ndarray, pos: int) -> int:
    return int(buf[pos]) | int(buf[pos + 1]) << 8 | int(buf[pos + 2]) << 16 | int(buf[pos + 3]) << 24


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _encapsulated_end(buf: np.ndarray, pos: int) -> tuple[int, int]:
    """``fast_dicom._encapsulated_end``: ``(value end, next position)``, ``(-1, -1)`` where it gives ``None``."""
    end = buf.size
    while True:
        if end - pos < 4:
            return -1, -1
        group = _u16(buf, pos)
        elem = _u16(buf, pos + 2)
        if group == 0xFFFE and elem == 0xE0DD:
            break
        if not (group == 0xFFFE and elem == 0xE000) or end - pos < 8:
            return -1, -1
        pos += 8 + _u32(buf, pos + 4)
    if pos + 8 > end:
        return -1, -1
    return pos, pos + 8


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _sequence_end(buf: np.ndarray, pos: int, kind_of: np.ndarray) -> tuple[int, int]:
    """``fast_dicom._sequence_end`` without recursion (a stack of open sequences and items):
    ``(value end, next position)``, ``(-1, -1)`` where it gives ``None``."""
    end = buf.size
    in_item = np.zeros(2 * _MAX_SEQUENCE_LEVELS + 2, dtype=np.bool_)  # False: a sequence level, True: an item
    top = 0
    levels = 1
    while True:
        if end - pos < 8:
            return -1, -1
        group = _u16(buf, pos)
        elem = _u16(buf, pos + 2)
        if not in_item[top]:
            if group == 0xFFFE and elem == 0xE0DD:  # Sequence Delimitation Item
                if top == 0:
                    return pos, pos + 8
                top -= 1  # back in the item holding this sequence
                levels -= 1
                pos += 8
                continue
            if not (group == 0xFFFE and elem == 0xE000):
                return -1, -1
            item_length = _u32(buf, pos + 4)
            pos += 8
            if item_length != 0xFFFFFFFF:
                pos += item_length
                if pos > end:
                    return -1, -1
                continue
            top += 1
            in_item[top] = True
            continue
        if group == 0xFFFE and elem == 0xE00D:  # Item Delimitation Item
            pos += 8
            top -= 1
            continue
        if group == 0xFFFE:
            return -1, -1
        kind = kind_of[_u16(buf, pos + 4)]
        if kind == _SHORT:
            length = _u16(buf, pos + 6)
            value_pos = pos + 8
        elif kind != 0:
            if end - pos < 12:
                return -1, -1
            length = _u32(buf, pos + 8)
            value_pos = pos + 12
        else:
            return -1, -1
        if length == 0xFFFFFFFF:
            if kind != _SEQUENCE or levels >= _MAX_SEQUENCE_LEVELS:
                return -1, -1
            levels += 1
            top += 1
            in_item[top] = False
            pos = value_pos
            continue
        pos = value_pos + length
        if pos > end:
            return -1, -1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _grown(a: np.ndarray, cap: int) -> np.ndarray:
    """``a`` copied into a new array of ``cap`` entries."""
    out = np.empty(cap, dtype=a.dtype)
    out[: a.size] = a
    return out


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _scan(
    buf: np.ndarray, pos: int, kind_of: np.ndarray, code_of: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-level elements from ``pos`` to the end: ``(count or -1, tags, VR codes, lengths, value starts,
    value ends)``; -1 where ``_walk`` would not accept the body or would parse a sequence with pydicom."""
    end = buf.size
    cap = 64
    tags = np.empty(cap, dtype=np.int64)
    codes = np.empty(cap, dtype=np.int64)
    lengths = np.empty(cap, dtype=np.int64)
    starts = np.empty(cap, dtype=np.int64)
    stops = np.empty(cap, dtype=np.int64)
    n = 0
    while pos < end:
        if end - pos < 8:
            return -1, tags, codes, lengths, starts, stops
        group = _u16(buf, pos)
        if group == 0x0000 or group == 0x0002 or group == 0xFFFE:
            return -1, tags, codes, lengths, starts, stops
        vr_key = _u16(buf, pos + 4)
        kind = kind_of[vr_key]
        if kind == _SHORT:
            length = _u16(buf, pos + 6)
            value_pos = pos + 8
        elif kind != 0:
            if end - pos < 12:
                return -1, tags, codes, lengths, starts, stops
            length = _u32(buf, pos + 8)
            value_pos = pos + 12
        else:
            return -1, tags, codes, lengths, starts, stops
        if length == 0xFFFFFFFF:
            if kind == _PIXELS:
                value_end, next_pos = _encapsulated_end(buf, value_pos)
            elif kind == _SEQUENCE:
                value_end, next_pos = _sequence_end(buf, value_pos, kind_of)
            else:
                value_end, next_pos = -1, -1
            if value_end < 0:
                return -1, tags, codes, lengths, starts, stops
        else:
            value_end = value_pos + length
            next_pos = value_end
            if next_pos > end:
                return -1, tags, codes, lengths, starts, stops
        if n == cap:
            cap *= 2
            tags = _grown(tags, cap)
            codes = _grown(codes, cap)
            lengths = _grown(lengths, cap)
            starts = _grown(starts, cap)
            stops = _grown(stops, cap)
        tags[n] = group << 16 | _u16(buf, pos + 2)
        codes[n] = code_of[vr_key]
        lengths[n] = length
        starts[n] = value_pos
        stops[n] = value_end
        n += 1
        pos = next_pos
    return n, tags, codes, lengths, starts, stops


def scan_body(data: bytes, pos: int) -> tuple[list[int], list[str], list[int], list[int], list[int]] | None:
    """The top-level elements of ``data[pos:]``: ``(tags, VRs, lengths, value starts, value ends)``, or ``None``
    (leave the body to ``fast_dicom._walk``). An undefined length is 0xFFFFFFFF, its value the bytes up to the
    delimiter."""
    n, tags, codes, lengths, starts, stops = _scan(np.frombuffer(data, dtype=np.uint8), pos, _VR_KIND, _VR_CODE)
    if n < 0:
        return None
    names = VR_NAMES
    return (
        tags[:n].tolist(),
        [names[c] for c in codes[:n].tolist()],
        lengths[:n].tolist(),
        starts[:n].tolist(),
        stops[:n].tolist(),
    )


def warm_up() -> None:
    """Compile (or load from numba's cache) the scanner."""
    scan_body(b"\x08\x00\x16\x00UI\x02\x001\x00", 0)
