"""Reading DICOM headers, never pixel data: one compact record per file.

``read_headers(paths)`` is what a Dask task runs on a batch of files. It reads each file's
elements with pydicom's element parser up to the pixel data (keeping only the tags below, without
building a Dataset; files it cannot take, such as big endian, deflated or without a preamble, go
through ``pydicom.dcmread(stop_before_pixels=True)``), checks from the file size that the pixel
data the header announces is all there (a truncated file), and returns plain tuples, so batches
travel cheaply between workers and the client.

Text (PatientID, descriptions, kernels, contrast agent) is decoded with the file's
SpecificCharacterSet (0008,0005), by pydicom's character set support on both paths, so a
PatientID written in UTF-8 (ISO_IR 192) and in latin-1 (ISO_IR 100) is the same patient; a file
without the element is read as latin-1 (ASCII, the default repertoire, is a subset). Text that
is not valid in the declared character set makes the file 'unreadable', with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# the tags discover reads; identifiers among them (PatientID, birth date) are used in memory to
# group and pseudonymise, never written out
TAGS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "Modality",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "ImageType",
    "FrameOfReferenceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusIngredient",
    "PatientPosition",
    "GantryDetectorTilt",
    "SOPInstanceUID",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
)
_PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1."  # image (and SR, 88.x) storage SOP classes
_UNCOMPRESSED = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
}


@dataclass(frozen=True)
class FileRecord:
    """What discover keeps of one file. ``status``: 'ok', 'not_dicom' or 'unreadable'
    (with ``problem``); for 'ok', ``tags`` maps the names in TAGS to plain values."""

    path: str
    status: str
    problem: str = ""
    tags: dict | None = None


def iter_files(root: str | os.PathLike) -> Iterator[str]:
    """Every regular file under ``root`` (recursively, symlinked folders not followed),
    in a stable order."""
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                elif e.is_file():
                    yield e.path
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _plain(value):
    """pydicom values as str / float / list of those (MultiValue, PersonName, DSfloat, ...)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    return str(value)


# how each tag's raw bytes decode: text, text list (backslash-separated), number, number list,
# or an unsigned 16-bit integer
_KIND = {
    "SpecificCharacterSet": "texts",
    "ImageType": "texts",
    "ImageOrientationPatient": "numbers",
    "ImagePositionPatient": "numbers",
    "ConvolutionKernel": "texts",
    "SliceThickness": "number",
    "SeriesNumber": "number",
    "GantryDetectorTilt": "number",
    "ContrastBolusVolume": "text",
    "NumberOfFrames": "number",
    "Rows": "us",
    "Columns": "us",
    "BitsAllocated": "us",
    "SamplesPerPixel": "us",
}


# the tags whose value representation (LO, SH) follows SpecificCharacterSet
CHARSET_TAGS = frozenset(
    {"PatientID", "SeriesDescription", "ProtocolName", "ConvolutionKernel",
     "ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume"}
)  # fmt: skip


class HeaderTextError(ValueError):
    """A text element is not valid in the file's SpecificCharacterSet."""


def encodings_of(charset) -> list[str] | None:
    """Python codecs for a SpecificCharacterSet value (None: not declared, read as latin-1)."""
    import warnings

    from pydicom.charset import convert_encodings

    terms = [charset] if isinstance(charset, str) else list(charset or [])
    terms = [t.strip() for t in terms]
    if not any(terms):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return list(convert_encodings(terms))
        except (LookupError, UserWarning, ValueError):
            raise HeaderTextError(f"unknown SpecificCharacterSet {chr(92).join(terms)}") from None


def decode_text(b: bytes, encodings: list[str] | None) -> str:
    """``b`` as text in ``encodings`` (pydicom's codecs; ISO 2022 escapes handled)."""
    if encodings is None:
        return b.decode("latin-1")
    import warnings

    from pydicom.charset import decode_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            if len(encodings) == 1 and b"\x1b" not in b:
                return b.decode(encodings[0])  # strict: an invalid byte is an error
            return decode_bytes(b, encodings, set())
        except (UnicodeError, UserWarning, LookupError, ValueError):
            raise HeaderTextError(f"not valid {chr(92).join(encodings)}") from None


def _tag_numbers():
    from pydicom.datadict import tag_for_keyword

    return [(name, tag_for_keyword(name), _KIND.get(name, "text")) for name in TAGS]


_TAG_NUMBERS: list = []


def _decode(raw, kind: str, encodings=None):
    """A raw element's value without pydicom's conversion machinery (the slow part);
    ``encodings`` (from :func:`encodings_of`) for text that follows the character set."""
    b = raw.value
    if b is None or b == b"":
        return None
    if not isinstance(b, bytes):  # already converted by pydicom
        v = _plain(b)
        return None if v in ("", []) else v
    if kind == "us":
        if raw.VR not in (None, "US", "UN", "SS") or len(b) < 2:
            return None
        return float(int.from_bytes(b[:2], "little" if raw.is_little_endian else "big"))
    text = decode_text(b, encodings).strip(" \x00")
    if kind == "text":
        return text or None
    parts = [t.strip(" \x00") for t in text.split("\\")]
    if kind == "texts":
        return parts
    try:
        nums = [float(t) for t in parts]
    except ValueError:
        return None
    return nums[0] if kind == "number" else nums


def _meta_text(meta: dict, tag) -> str:
    try:
        raw = meta.get(tag)
        return (_decode(raw, "text") or "") if raw is not None else ""
    except Exception:  # noqa: BLE001 - a malformed meta element reads as absent
        return ""


_EXPLICIT_BE, _IMPLICIT_LE, _DEFLATED = (
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1.99",
)


def _elements(fh) -> tuple[dict, dict] | None:
    """(file meta, dataset) raw elements up to the pixel data, read by pydicom's element
    parser without building a Dataset; only the tags discover reads keep their values.
    None when the file needs pydicom's full reader (no preamble, big endian, deflated)."""
    from pydicom.filereader import data_element_generator

    pre = fh.read(132)
    if len(pre) < 132 or pre[128:132] != b"DICM":
        return None
    meta = {el.tag: el for el in data_element_generator(
        fh, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)}  # fmt: skip
    syntax = _decode(meta[0x00020010], "text") if 0x00020010 in meta else ""
    if syntax in (_EXPLICIT_BE, _DEFLATED):
        return None
    wanted = [tag for _, tag, _ in _TAG_NUMBERS]
    data = {el.tag: el for el in data_element_generator(
        fh, syntax == _IMPLICIT_LE, True, specific_tags=wanted,
        stop_when=lambda tag, vr, length: tag >= 0x7FE00010)}  # fmt: skip
    return meta, data


def read_header(path: str) -> FileRecord:
    """One file's record (never raises for a bad file: the problem is in the record)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not _TAG_NUMBERS:
        _TAG_NUMBERS.extend(_tag_numbers())
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            try:  # the fast path: pydicom's element parser, no Dataset
                parsed = _elements(fh)
            except Exception:  # noqa: BLE001 - anything odd: pydicom's full reader decides
                parsed = None
            if parsed is None:
                fh.seek(0)
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
                meta = getattr(ds, "file_meta", None)
                meta = {t: meta.get_item(t) for t in (0x00020002, 0x00020010)} if meta else {}
                data = {tag: ds.get_item(tag) for _, tag, _ in _TAG_NUMBERS}
            else:
                meta, data = parsed
            pixel_at = fh.tell()
            head = fh.read(12)
    except InvalidDicomError:
        return FileRecord(path, "not_dicom", "not a DICOM file (no DICM marker)")
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        return FileRecord(path, "unreadable", f"unreadable DICOM ({type(exc).__name__})")
    tags = {}
    try:
        charset = data.get(0x00080005)
        encodings = encodings_of(_decode(charset, "texts") if charset is not None else None)
    except HeaderTextError as exc:
        return FileRecord(path, "unreadable", f"header text: {exc}")
    for name, tag, kind in _TAG_NUMBERS:
        try:
            raw = data.get(tag)
            text_codecs = encodings if name in CHARSET_TAGS else None
            tags[name] = None if raw is None else _decode(raw, kind, text_codecs)
        except HeaderTextError as exc:
            return FileRecord(path, "unreadable", f"header text: {name} is {exc} "
                              "(its SpecificCharacterSet)")  # fmt: skip
        except Exception:  # noqa: BLE001 - a malformed value reads as absent
            tags[name] = None
    syntax, sop = (_meta_text(meta, t) for t in (0x00020010, 0x00020002))
    tags["_pixel"] = _pixel_state(head, size - pixel_at, syntax, tags)
    if tags["_pixel"] == "none" and sop.startswith(_IMAGE_STORAGE) and ".88." not in sop + ".":
        return FileRecord(path, "unreadable", "truncated: the file ends before its pixel data")
    return FileRecord(path, "ok", "", tags)


def _pixel_state(head: bytes, available: int, syntax: str, tags: dict) -> str:
    """'ok', 'none' (no pixel data) or 'truncated', from the bytes after the header."""
    if syntax == "1.2.840.10008.1.2.1.99":  # deflated: file offsets are not the dataset's
        return "ok"
    if len(head) < 8 or head[:4] != _PIXEL_TAG:
        return "none"
    explicit = head[4:6] in (b"OW", b"OB")
    header_len = 12 if explicit else 8
    if len(head) < header_len:
        return "truncated"
    length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
    if length == 0xFFFFFFFF:  # encapsulated (compressed): fragments, not checked here
        return "ok"
    if available - header_len < length:
        return "truncated"
    if syntax in _UNCOMPRESSED:
        try:
            need = (
                int(tags["Rows"])
                * int(tags["Columns"])
                * int(tags["BitsAllocated"])
                // 8
                * int(tags.get("SamplesPerPixel") or 1)
                * int(tags.get("NumberOfFrames") or 1)
            )
        except (TypeError, ValueError):
            return "ok"
        if length < need:
            return "truncated"
    return "ok"


def read_headers(paths: list[str]) -> list[tuple]:
    """A batch of files as (path, status, problem, tags) tuples; run by one Dask task."""
    out = []
    for p in paths:
        r = read_header(p)
        out.append((r.path, r.status, r.problem, r.tags))
    return out


def batches(paths: list[str], size: int) -> list[list[str]]:
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path
