"""Fast reader for the common DICOM encodings (Part 10 file, Explicit VR Little Endian, also with
encapsulated -- compressed -- Pixel Data).

:func:`fast_dcmread` walks the data elements of the raw bytes and builds the
:class:`pydicom.dataset.FileDataset` that :func:`pydicom.dcmread` builds (raw, not yet converted data
elements, same file meta, same encodings; an undefined-length sequence raw where pydicom has parsed it,
converting to the same value), skipping pydicom's general-purpose element generator. Values
are still converted by pydicom on access, so every later result is the same as with ``dcmread``.

The body's element boundaries come from a compiled scan (:mod:`preprocessing.element_scan`, the rules of
:func:`_walk` without a Python object per element); where it declines, :func:`_walk` (``struct``) decides.
The datasets are built from the attribute templates pydicom's constructors produce (:func:`_from_template`).

It only accepts files it fully understands: a 128-byte preamble and ``DICM``, group 0002 meta
information, Transfer Syntax Explicit VR Little Endian or one of :data:`ENCAPSULATED_SYNTAXES` (RLE, JPEG,
JPEG-LS, JPEG 2000, HTJ2K: the same body encoding), then only elements with a known VR and a
complete value, ending exactly at the end of the bytes, no command set (group 0000) and no top-level
item/delimiter tags. Sequences (scanner headers: Referenced Image, Request Attributes, code sequences,
private sequences) are kept raw and converted by pydicom on access: a defined-length SQ is skipped by its
length; an undefined-length SQ by walking its items' element headers to its Sequence Delimitation Item
(:func:`_sequence_end`: defined-length values skipped by length, nested undefined-length sequences and items
walked), its value being the items up to that delimiter -- pydicom's ``convert_SQ`` parses it into the
Sequence that ``dcmread`` parses eagerly. Only what that walk does not accept is parsed on the spot by
pydicom's ``read_sequence``, as ``dcmread`` does. Large private OB blocks (a
Siemens CSA header) are skipped by their length. Encapsulated Pixel Data (undefined-length OB) is walked
item by item to its Sequence Delimitation Item, as pydicom walks it. For anything else (implicit VR, big
endian, deflated syntaxes, enhanced multi-frame objects with sequences, truncated or odd files) it returns
``None`` and the caller reads the object with pydicom as before, so errors and edge cases are
unchanged.
"""

from __future__ import annotations

import io
import struct
from typing import Any, TypeVar

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

from preprocessing.element_scan import scan_body

_HEADER = struct.Struct("<HH2sH")
_UL = struct.Struct("<L")
#: VR bytes -> VR string for the VRs pydicom knows, with a 2-byte / a 4-byte length (SQ left to pydicom)
_SHORT_VR: dict[bytes, str] = {
    str(v).encode("ascii"): str(v) for v in VR if v not in EXPLICIT_VR_LENGTH_32 and str(v) != "SQ"
}
_LONG_VR: dict[bytes, str] = {str(v).encode("ascii"): str(v) for v in VR if v in EXPLICIT_VR_LENGTH_32}
#: groups the walker leaves to pydicom: command set, file meta after the meta block, items/delimiters
_REFUSED_GROUPS = frozenset({0x0000, 0x0002, 0xFFFE})
_PREAMBLE_LEN = 128
_TRANSFER_SYNTAX_TAG = BaseTag(0x00020010)
#: raw (0002,0010) values that mean Explicit VR Little Endian (even length: NUL padded)
_EXPLICIT_LE_RAW = frozenset({ExplicitVRLittleEndian.encode("ascii") + b"\x00"})
_META_START = _PREAMBLE_LEN + 4
#: Explicit VR Little Endian with encapsulated (compressed) Pixel Data: the body is read like Explicit VR LE
#: (``pydicom.dcmread`` treats every syntax it does not name otherwise so); deflated ones are not among them
ENCAPSULATED_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
#: raw (0002,0010) values of the syntaxes read here (UIDs of odd length are NUL padded)
_ACCEPTED_SYNTAX_RAW = _EXPLICIT_LE_RAW | frozenset(
    uid.encode("ascii") + (b"\x00" if len(uid) % 2 else b"") for uid in ENCAPSULATED_SYNTAXES
)
_D = TypeVar("_D", bound=FileMetaDataset | FileDataset)
#: one BaseTag object per tag value (bounded): the elements of every dataset read here are keyed by these
#: objects, so a lookup with the same object (:func:`intern_tag`) matches by identity and skips
#: ``BaseTag.__eq__``, a Python-level method that a dict otherwise calls on every hit
_INTERNED: dict[int, BaseTag] = {}
_MAX_INTERNED = 1 << 16


def intern_tag(key: int) -> BaseTag:
    """The shared :class:`BaseTag` of ``key`` (a new one once the table is full: the same value either way)."""
    tag = _INTERNED.get(key)
    if tag is None:
        tag = int.__new__(BaseTag, key)
        if len(_INTERNED) < _MAX_INTERNED:  # a race between threads only creates an extra equal object
            _INTERNED[key] = tag
    return tag


_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"


def _encapsulated_end(data: bytes, pos: int) -> tuple[int, int] | None:
    """End of an undefined-length value read as encapsulated pixel data, as pydicom reads it.

    pydicom (``fileutil._try_read_encapsulated_pixel_data``) walks the items (``FFFE,E000`` + 4-byte length)
    up to the Sequence Delimitation Item (``FFFE,E0DD``); the value is everything before that tag, and reading
    goes on 8 bytes after it. Returns ``(value end, next element position)``, or ``None`` wherever pydicom
    would fall back to its byte-by-byte scan (an unknown tag, an item running past the end, no delimiter).
    """
    end = len(data)
    unpack_ul = _UL.unpack_from
    while True:
        if end - pos < 4:
            return None
        tag_bytes = data[pos : pos + 4]
        if tag_bytes == _SEQUENCE_DELIMITER:
            break
        if tag_bytes != _ITEM or end - pos < 8:
            return None
        pos += 8 + unpack_ul(data, pos + 4)[0]
    if pos + 8 > end:  # pydicom would go on reading at the end of the data: leave such a file to it
        return None
    return pos, pos + 8


_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0"
#: nesting deeper than this is left to pydicom's parser (no recursion limit reached on hostile input)
_MAX_SEQUENCE_DEPTH = 16


def _sequence_end(data: bytes, pos: int, depth: int) -> tuple[int, int] | None:
    """End of an undefined-length sequence value starting at ``pos`` (Explicit VR Little Endian).

    Walks the items: a defined-length item is skipped by its length; an undefined-length item by walking its
    element headers (defined-length values skipped by length, undefined-length sequences recursively) to its
    Item Delimitation Item. Returns ``(value end, next element position)``: the position of the Sequence
    Delimitation Item and 8 bytes after it, or ``None`` for anything else (an unknown VR, an undefined-length
    non-SQ value, a value past the end, a missing delimiter, deep nesting): the caller then lets pydicom parse.
    """
    if depth > _MAX_SEQUENCE_DEPTH:
        return None
    end = len(data)
    unpack_ul = _UL.unpack_from
    unpack_header = _HEADER.unpack_from
    while True:
        if end - pos < 8:
            return None
        marker = data[pos : pos + 4]
        if marker == _SEQUENCE_DELIMITER:
            return pos, pos + 8
        if marker != _ITEM:
            return None
        item_length = unpack_ul(data, pos + 4)[0]
        pos += 8
        if item_length != 0xFFFFFFFF:
            pos += item_length
            if pos > end:
                return None
            continue
        while True:  # undefined-length item: its elements up to the Item Delimitation Item
            if end - pos < 8:
                return None
            if data[pos : pos + 4] == _ITEM_DELIMITER:
                pos += 8
                break
            group, _, vr_bytes, length = unpack_header(data, pos)
            if group == 0xFFFE:
                return None
            vr = _SHORT_VR.get(vr_bytes)
            if vr is not None:
                value_pos = pos + 8
            else:
                vr = _LONG_VR.get(vr_bytes)  # SQ among them
                if vr is None or end - pos < 12:
                    return None
                length = unpack_ul(data, pos + 8)[0]
                value_pos = pos + 12
            if length == 0xFFFFFFFF:
                if vr != "SQ":
                    return None
                found = _sequence_end(data, value_pos, depth + 1)
                if found is None:
                    return None
                pos = found[1]
                continue
            pos = value_pos + length
            if pos > end:
                return None


def _walk(data: bytes, pos: int, meta_only: bool) -> tuple[dict[BaseTag, DataElement | RawDataElement], int] | None:
    """Raw elements from ``pos``: the group 0002 ones (``meta_only``), else all to the end of ``data``.

    Returns ``(elements, end position)``, or ``None`` when the bytes hold anything this walker does not
    handle exactly as pydicom's reader does.
    """
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    encoding: str | list[str] = default_encoding
    end = len(data)
    unpack_header = _HEADER.unpack_from
    unpack_ul = _UL.unpack_from
    short_vr = _SHORT_VR
    long_vr = _LONG_VR
    refused = _REFUSED_GROUPS
    new_tag = int.__new__
    base_tag = BaseTag
    new_raw = tuple.__new__
    raw_cls = RawDataElement
    while pos < end:
        if end - pos < 8:
            return None
        group, elem, vr_bytes, length = unpack_header(data, pos)
        if meta_only:
            if group != 0x0002:
                break
        elif group in refused or group == 0xFFFE:
            return None
        vr = short_vr.get(vr_bytes)
        if vr is not None:
            value_pos = pos + 8
        else:
            vr = long_vr.get(vr_bytes)
            if vr is None or end - pos < 12:
                return None
            length = unpack_ul(data, pos + 8)[0]
            value_pos = pos + 12
        if length == 0xFFFFFFFF:
            if vr in ("OB", "OW") and not meta_only:  # encapsulated (compressed) Pixel Data
                found = _encapsulated_end(data, value_pos)
                if found is None:
                    return None
                value_end, pos = found
                tag = new_tag(base_tag, group << 16 | elem)
                elements[tag] = new_raw(  # type: ignore[arg-type]
                    raw_cls, (tag, vr, length, data[value_pos:value_end], value_pos, False, True, True, False)
                )
                continue
            if vr != "SQ":  # undefined-length UN/...: left to pydicom
                return None
            tag = new_tag(base_tag, group << 16 | elem)
            found = _sequence_end(data, value_pos, 0)
            if found is not None:
                # Kept raw, like a defined-length one: the items up to the Sequence Delimitation Item, found by
                # walking their element headers (nested sequences and items of undefined length included);
                # pydicom parses them on access (convert_SQ) into the Sequence it would have read now.
                value_end, pos = found
                elements[tag] = new_raw(  # type: ignore[arg-type]
                    raw_cls, (tag, vr, length, data[value_pos:value_end], value_pos, False, True, True, False)
                )
                continue
            # Anything the header walk does not accept: parse it now, as pydicom does.
            fp = io.BytesIO(data)
            fp.seek(value_pos)
            seq = read_sequence(fp, False, True, length, encoding)
            pos = fp.tell()
            if pos > end:
                return None
            elements[tag] = DataElement(tag, vr, seq, value_pos, is_undefined_length=True)
            continue
        pos = value_pos + length
        if pos > end:
            return None
        key = group << 16 | elem
        tag = new_tag(base_tag, key)
        value = data[value_pos:pos] if length else empty_value_for_VR(vr, raw=True)
        if key == 0x00080005:  # Specific Character Set (int compare: BaseTag.__eq__ is Python-level, slow)
            encoding = convert_encodings(convert_string(data[value_pos:pos], True))
        # tuple.__new__: the namedtuple's fields in order, without its Python-level constructor
        elements[tag] = new_raw(raw_cls, (tag, vr, length, value, value_pos, False, True, True, False))  # type: ignore[arg-type]
    return elements, pos


def _walk_body(data: bytes, pos: int) -> tuple[dict[BaseTag, DataElement | RawDataElement], int] | None:
    """``_walk(data, pos, meta_only=False)``: the element boundaries from the compiled scan
    (:func:`preprocessing.element_scan.scan_body`) where it accepts the body, else from ``_walk`` itself."""
    scanned = scan_body(data, pos)
    if scanned is None:
        return _walk(data, pos, meta_only=False)
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    interned = _INTERNED.get
    new_raw = tuple.__new__
    raw_cls = RawDataElement
    for key, vr, length, start, stop in zip(*scanned):
        tag = interned(key) or intern_tag(key)
        value = data[start:stop] if length else empty_value_for_VR(vr, raw=True)
        elements[tag] = new_raw(raw_cls, (tag, vr, length, value, start, False, True, True, False))  # type: ignore[arg-type]
    return elements, len(data)


def fast_dcmread(data: bytes) -> FileDataset | None:
    """The dataset :func:`pydicom.dcmread` would return for ``data``, or ``None`` (read it with pydicom).

    See the module docstring for what is accepted. Pure function: no shared state, thread-safe.
    """
    if len(data) < _META_START + 8 or data[_PREAMBLE_LEN:_META_START] != b"DICM":
        return None
    meta_walk = _walk(data, _META_START, meta_only=True)
    if meta_walk is None or not meta_walk[0]:
        return None
    meta_elements, pos = meta_walk
    syntax = meta_elements.get(_TRANSFER_SYNTAX_TAG)
    if not isinstance(syntax, RawDataElement) or syntax.VR != "UI" or syntax.value not in _ACCEPTED_SYNTAX_RAW:
        return None  # other syntaxes, and unusual spellings of this one, are left to pydicom
    body = _walk_body(data, pos)
    if body is None or not body[0]:
        return None
    # Same meta dataset as pydicom's (pydicom converts two of its elements right away; here they are
    # converted on first access, to the same values).
    file_meta = _from_template(FileMetaDataset, _META_STATE, meta_elements)
    # pydicom builds an intermediate Dataset on the same element dict and takes the encoding from it;
    # building the FileDataset straight on the dict gives the same object.
    ds = _from_template(FileDataset, _FILE_STATE, body[0])
    ds.preamble = data[:_PREAMBLE_LEN]
    ds.file_meta = file_meta
    buffer = io.BytesIO(data)
    ds.buffer = buffer
    ds.fileobj_type = type(buffer)
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


def _constructed_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """The instance attributes pydicom's constructors give an empty file meta dataset (with the encoding the
    reader sets) and an empty Explicit VR Little Endian ``FileDataset`` read from a buffer."""
    meta = FileMetaDataset({})
    meta.set_original_encoding(is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding)
    ds = FileDataset(io.BytesIO(b""), {}, b"", meta, False, True)
    return dict(vars(meta)), dict(vars(ds))


#: read-only templates: what the constructors set, copied per object by :func:`_from_template`
_META_STATE, _FILE_STATE = _constructed_state()


def _from_template(cls: type[_D], state: dict[str, Any], elements: dict[BaseTag, Any]) -> _D:
    """An instance of ``cls`` with the attributes its constructor sets (``state``; containers copied, so no
    two objects share one) on ``elements`` -- without the constructor's ~40 attribute assignments through
    ``Dataset.__setattr__`` (~30 µs per file). The caller sets the per-file attributes (preamble, file meta,
    buffer); the tests compare every attribute with pydicom's own dataset. ``FileMetaDataset``'s constructor
    also checks that every element is in group 0002: the meta walk stops at the first one that is not."""
    obj = cls.__new__(cls)
    attrs = {key: (value.copy() if type(value) in (dict, list) else value) for key, value in state.items()}
    attrs["_dict"] = elements
    object.__setattr__(obj, "__dict__", attrs)
    return obj
