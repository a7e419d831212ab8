"""Reading CT volumes in the formats users have, and writing them (for the synthetic cohort).

Formats: a DICOM series (a folder of slices), NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) and
NRRD (.nrrd, .nhdr). Everything goes through SimpleITK; nothing but geometry and the slice
thickness is taken from headers (DICOM's, and a NIfTI file's JSON sidecar as dcm2niix writes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sscflow.discover.slices import SliceLayoutError, check_slice_layout
from sscflow.errors import InputImageError, MissingInputError

FILE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
CT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.2"


def describe_format(path: str | os.PathLike) -> str:
    """'dicom' for a folder, else the file format by suffix ('nifti', 'mha', 'nrrd', ...)."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    for suffix, kind in (
        (".nii.gz", "nifti"),
        (".nii", "nifti"),
        (".mha", "metaimage"),
        (".mhd", "metaimage"),
        (".nrrd", "nrrd"),
        (".nhdr", "nrrd"),
        (".dcm", "dicom-file"),
    ):
        if name.endswith(suffix):
            return kind
    return "unknown"


def list_dicom_series(folder: str | os.PathLike) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series found directly in ``folder``.

    ITK's own warning for a folder without a series ("GDCMSeriesFileNames ... No Series were
    found") is silenced: the callers say it in a sentence that names the folder."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def input_fingerprint(path: str | os.PathLike, series_uid: str | None = None) -> tuple[str, int]:
    """A hash of the scan ``read_volume(path, series_uid=...)`` reads, and the bytes it holds.

    Cheap enough to take on every rerun: no pixel is read. For a DICOM folder the hash covers
    the chosen series' files (names relative to the folder, sizes, modification times), so
    another series in the same folder may change without touching it; for a file (NIfTI, MHA,
    NRRD) its size, modification time and header (geometry, pixel type and the header's
    fields, as ITK reads them), with the size and time of a detached data file (``.mhd``,
    ``.nhdr``) and of a NIfTI file's JSON sidecar (:func:`sidecar_of`). The path itself is
    not hashed: a moved or renamed input stays current.

    An edit in place that keeps a file's size and modification time is not seen: rerun with
    ``--force`` to read every scan again.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     f = Path(d, "ct.mha")
    ...     write_volume(sitk.Image([4, 4, 4], sitk.sitkInt16), f)
    ...     first = input_fingerprint(f)
    ...     os.utime(f, ns=(0, f.stat().st_mtime_ns + 10**9))
    ...     first[0] != input_fingerprint(f)[0], first[1] == f.stat().st_size
    (True, True)
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        files = _series_files(p, series_uid)
        for f in files:
            h.update(_stat_key(f, f.relative_to(p).as_posix()))
    else:
        files = [p, *_detached_data(p)]
        for f in files:
            h.update(_stat_key(f, "" if f == p else f.name))
        h.update(_header_digest(p))
        side = sidecar_of(p)
        if side is not None and side.is_file():  # its SliceThickness is read with the scan
            h.update(_stat_key(side, "sidecar"))
    h.update(str(series_uid or "").encode())
    return h.hexdigest(), sum(f.stat().st_size for f in files if f.is_file())


def _series_files(folder: Path, series_uid: str | None) -> list[Path]:
    """The files of the series ``series_uid`` in ``folder``, from each file's header up to the
    series UID (pydicom; no pixel data is read); every file of the folder when no series is
    named or none is found (reading the folder then fails with the reason)."""
    files = sorted(f for f in folder.iterdir() if f.is_file())
    if series_uid is None:
        return files
    import pydicom

    chosen = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(ds.get("SeriesInstanceUID", "")) == series_uid:
            chosen.append(f)
    return chosen or files


def _stat_key(f: Path, name: str) -> bytes:
    try:
        s = f.stat()
    except OSError:
        return f"{name}:absent;".encode()
    return f"{name}:{s.st_size}:{s.st_mtime_ns};".encode()


def _header_digest(p: Path) -> bytes:
    """What ITK reads from the header, or a marker when it cannot (the read then says why)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return b"unreadable header"
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    fields = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    info = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
            reader.GetPixelIDValue(), reader.GetNumberOfComponents(), sorted(fields.items()))
    return repr(info).encode()


def _detached_data(p: Path) -> list[Path]:
    """The data file a ``.mhd`` (``ElementDataFile``) or ``.nhdr`` (``data file``) names."""
    keys = {".mhd": "elementdatafile", ".nhdr": "data file"}
    key = keys.get(p.suffix.lower())
    if key is None:
        return []
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    for line in head.splitlines():
        name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
        if sep and name.strip().lower() in (key, "datafile"):
            value = value.strip()
            if value.upper() != "LOCAL" and (p.parent / value).is_file():
                return [p.parent / value]
    return []


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> sitk.Image:
    """Read one 3-D CT volume as a SimpleITK image (LPS geometry as stored).

    Parameters
    ----------
    path : a DICOM series folder, or a NIfTI / MHA / MHD / NRRD file
    series_uid : for a folder holding several DICOM series, the SeriesInstanceUID to read

    Raises
    ------
    MissingInputError (a FileNotFoundError) if the path does not exist;
    InputImageError (a ValueError) if it cannot be read, is not 3-D, or the folder holds no
    series, several series and no ``series_uid``, or not the requested one.
    """
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"{p} does not exist")
    if p.is_dir():
        image = _read_dicom_folder(p, series_uid)
    else:
        if describe_format(p) == "unknown":
            raise InputImageError(
                f"{p}: unknown image format; use a DICOM folder or one of "
                f"{', '.join(FILE_SUFFIXES)}"
            )
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise InputImageError(
                f"{p} could not be read (truncated or not an image): {_itk_reason(exc)}"
            ) from None
    what = "the DICOM series" if p.is_dir() else str(p)  # an export's folder names nobody
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        size = "x".join(str(s) for s in image.GetSize())
        raise InputImageError(
            f"{what} has {image.GetDimension()} dimensions (size {size}); a CT volume needs 3 "
            "with at least 2 voxels along each"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a CT volume "
            "has one (Hounsfield units)"
        )
    if not p.is_dir() and slice_thickness_of(image) is None:
        thickness = _sidecar_thickness(p)
        if thickness is not None:
            image.SetMetaData(SLICE_THICKNESS_TAG, f"{thickness:g}")
    return image


def sidecar_of(path: str | os.PathLike) -> Path | None:
    """The JSON sidecar beside a NIfTI file, as dcm2niix writes it (BIDS): ``scan.nii.gz`` ->
    ``scan.json``; None for other formats.

    >>> sidecar_of("/data/P1/t0.nii.gz").name, sidecar_of("t0.mha")
    ('t0.json', None)
    """
    p = Path(path)
    for suffix in (".nii.gz", ".nii"):
        if p.name.lower().endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + ".json")
    return None


def _sidecar_thickness(path: Path) -> float | None:
    """``SliceThickness`` (mm, > 0) from a NIfTI file's JSON sidecar (:func:`sidecar_of`), else
    None: no sidecar, unreadable, or no usable value. Nothing else of the sidecar is read (it
    may hold names and dates)."""
    side = sidecar_of(path)
    if side is None or not side.is_file():
        return None
    try:
        value = json.loads(side.read_text(encoding="utf-8")).get("SliceThickness")
        value = float(value)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    """A series of ``folder``. The messages name neither the folder nor a UID (they reach the
    store's status records; the folder of an export carries names, IDs and dates): the caller
    says which scan it was."""
    uids = list_dicom_series(folder)
    if not uids:
        raise InputImageError("the DICOM folder holds no DICOM series")
    if series_uid is None:
        if len(uids) > 1:
            raise InputImageError(
                f"the DICOM folder holds {len(uids)} DICOM series; give the one to use as the "
                "SeriesInstanceUID in the manifest (baseline_series_uid / followup_series_uid), "
                "or let 'sscflow discover' choose"
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputImageError(
            f"the DICOM folder has no DICOM series with the SeriesInstanceUID the manifest gives "
            f"(it holds {len(uids)} other series)"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    thickness = _check_slice_layout(series_uid, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOff()  # never load patient tags
    try:
        image = reader.Execute()
        if thickness is not None:  # the one header value kept (see slice_thickness_of)
            image.SetMetaData(SLICE_THICKNESS_TAG, f"{thickness:g}")
        return image
    except RuntimeError as exc:
        reason = _itk_reason(exc).replace(str(folder), "<folder>")
        for f in files:
            reason = reason.replace(os.path.basename(f), "<file>")
        raise InputImageError(f"the DICOM series could not be read: {reason}") from None


def _check_slice_layout(series_uid: str, files) -> float | None:
    """Refuse a series whose slices are not one evenly spaced, untilted stack (a gap, a
    duplicated position, uneven spacing, gantry tilt): ITK would read it as uniform. Returns
    the series' SliceThickness (mm; the median over the slices that give a positive one), or
    None."""
    positions, orientations, tilt, thick = [], [], 0.0, []
    reader = sitk.ImageFileReader()
    for k, f in enumerate(files):
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            orientations.append([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            if reader.HasMetaDataKey("0018|1120") and reader.GetMetaData("0018|1120").strip():
                tilt = tilt or float(reader.GetMetaData("0018|1120"))
        except (RuntimeError, ValueError):
            raise InputImageError(f"DICOM series: slice {k + 1} of {len(files)} has no "
                                  "readable position or orientation") from None  # fmt: skip
        thick.append(_positive_number(reader, SLICE_THICKNESS_TAG))
    thick = [t for t in thick if t is not None]
    thickness = float(np.median(thick)) if thick else None
    if len(files) < 2:
        return thickness  # a single slice fails the 3-D check after reading
    try:
        check_slice_layout(positions, orientations, tilt_deg=tilt)
    except SliceLayoutError as exc:
        raise InputImageError(f"DICOM series refused: {exc.detail}; ingest never assumes "
                              "uniform spacing (re-export the series complete and "
                              "untilted)") from None  # fmt: skip
    return thickness


#: the DICOM SliceThickness (0018,0050) as SimpleITK names it; a series read by
#: :func:`read_volume` carries it (the median over its slices) when the files give it
SLICE_THICKNESS_TAG = "0018|0050"


def _positive_number(source, key) -> float | None:
    """The metadata ``key`` of an image or a file reader as a finite number > 0, else None."""
    try:
        v = float(source.GetMetaData(key)) if source.HasMetaDataKey(key) else None
    except ValueError:
        return None
    return v if v is not None and np.isfinite(v) and v > 0 else None


def slice_thickness_of(image: sitk.Image) -> float | None:
    """The slice thickness (mm) of a scan read by :func:`read_volume`, where its headers give
    one: a DICOM series' SliceThickness; an MHA or NRRD file that carries that tag in its
    header (``0018|0050``, as SimpleITK writes a DICOM image's dictionary); a NIfTI file's
    ``SliceThickness`` in its JSON sidecar (:func:`sidecar_of`, as dcm2niix writes it). Else
    None: a file's slice spacing is not its thickness (a resampled scan, overlapping slices)."""
    return _positive_number(image, SLICE_THICKNESS_TAG)


def _itk_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def write_volume(image: sitk.Image, path: str | os.PathLike, *,
                 slice_thickness_mm: float | None = None) -> None:  # fmt: skip
    """Write a volume as NIfTI / MHA / NRRD (compressed), choosing the format by suffix. With
    ``slice_thickness_mm``, the scan's slice thickness goes where :func:`slice_thickness_of`
    reads it back: a JSON sidecar for NIfTI (as dcm2niix writes it), the header for the
    others."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_of(p)
    if slice_thickness_mm is not None and side is None:
        image = sitk.Image(image)
        image.SetMetaData(SLICE_THICKNESS_TAG, f"{float(slice_thickness_mm):g}")
    sitk.WriteImage(image, str(p), useCompression=True)
    if slice_thickness_mm is not None and side is not None:
        side.write_text(json.dumps({"SliceThickness": round(float(slice_thickness_mm), 4)}),
                        encoding="utf-8")


def deterministic_uid(*parts: object) -> str:
    """A DICOM UID under the 2.25 (UUID-derived) root, fixed by ``parts``."""
    u = uuid.uuid5(uuid.NAMESPACE_URL, "sscflow:" + ":".join(str(p) for p in parts))
    return f"2.25.{u.int}"


def write_dicom_series(
    image: sitk.Image,
    folder: str | os.PathLike,
    *,
    patient_id: str,
    patient_name: str,
    series_uid: str,
    study_uid: str,
    series_description: str = "",
    study_date: str = "20200101",
    birth_date: str = "",
    series_number: int = 1,
) -> list[str]:
    """Write a 3-D HU volume as a CT DICOM series, one file per slice (int16, slope 1).

    The files are readable by SimpleITK's series reader and by pydicom. Returns the file paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype != np.int16:
        image = sitk.Cast(sitk.Round(image) if arr.dtype.kind == "f" else image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    sx, sy, sz = image.GetSpacing()
    frame_uid = deterministic_uid(study_uid, "frame")
    common = {
        "0008|0016": CT_SOP_CLASS_UID,
        "0008|0060": "CT",
        "0008|0020": study_date,
        "0008|0021": study_date,
        "0008|0030": "120000",  # fixed times: same input, same bytes (GDCM writes now otherwise)
        "0008|0031": "120000",
        "0008|0012": study_date,
        "0008|0013": "120000",
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|103e": series_description,
        "0010|0010": patient_name,
        "0010|0020": patient_id,
        "0010|0030": birth_date,
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": str(series_number),
        "0020|0052": frame_uid,
        "0020|0037": orientation,
        "0018|0050": f"{sz:.4f}",
        "0028|1052": "0",
        "0028|1053": "1",
        "0028|1054": "HU",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", deterministic_uid(series_uid, k))
        path = folder / f"slice_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(str(path))
    return paths
