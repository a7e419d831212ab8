"""Writing synthetic DICOM exports: CT slices with chosen headers (tests and benchmarks).

Every slice is a classic CT Image Storage file (explicit VR little endian, int16 HU, slope 1)
that pydicom and SimpleITK read. Positions and orientation are given per series, so a test can
drop a slice, duplicate one, tilt the stack or write a localizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sscflow.core.imageio import CT_SOP_CLASS_UID, deterministic_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def image_slices(image) -> tuple[list[np.ndarray], list[tuple], tuple, tuple]:
    """A SimpleITK volume as (pixels per slice (rows, cols) int16, ImagePositionPatient per
    slice, ImageOrientationPatient, PixelSpacing (row, column))."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    arr = np.rint(arr).astype(np.int16) if arr.dtype != np.int16 else arr
    d = image.GetDirection()
    sx, sy, _ = image.GetSpacing()
    positions = [tuple(image.TransformIndexToPhysicalPoint((0, 0, k))) for k in range(arr.shape[0])]
    return list(arr), positions, (d[0], d[3], d[6], d[1], d[4], d[7]), (sy, sx)


def write_slices(
    folder: str | os.PathLike,
    pixels,
    positions,
    *,
    header: dict,
    series_uid: str,
    study_uid: str,
    orientation=AXIAL,
    pixel_spacing=(1.0, 1.0),
    names=None,
    sop_class_uid: str = CT_SOP_CLASS_UID,
) -> list[Path]:
    """Write one file per slice into ``folder``; returns the paths.

    ``header`` maps pydicom keywords to values (PatientID, StudyDate, SeriesDescription,
    ConvolutionKernel, SliceThickness, ImageType, ContrastBolusAgent, PatientPosition, ...);
    ``names`` gives the file names (default ``<series_uid tail>_<k>.dcm``).
    """
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = [np.ascontiguousarray(px, dtype="<i2") for px in pixels]
    if len(pixels) != len(positions):
        raise ValueError(f"{len(pixels)} slices of pixels but {len(positions)} positions")
    if len({px.shape for px in pixels}) > 1:
        raise ValueError("every slice of a series must have the same shape")
    frame = header.get("FrameOfReferenceUID") or deterministic_uid(study_uid, "frame")
    # One file is made with pydicom, with fixed-width placeholders; every slice is that file
    # with its own instance UID, number, position and pixels put in: same layout, and fast.
    stem = deterministic_uid(series_uid, "slice")[:50]
    sop0, num0, pos0 = f"{stem}.100000", "000000", "\\".join(["+0000000.0000"] * 3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop0
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop0
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame
    ds.SeriesNumber = 1
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.4f}" for v in pixel_spacing]
    ds.Rows, ds.Columns = pixels[0].shape if pixels else (1, 1)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    for key, value in header.items():
        setattr(ds, key, value)
    ds.InstanceNumber = num0
    ds.ImagePositionPatient = pos0.split("\\")
    ds.PixelData = b"\0" * (pixels[0].nbytes if pixels else 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    template = buf.getvalue()
    body = template[: len(template) - len(ds.PixelData)]
    # value offsets of the placeholders, found by their element headers (explicit VR LE)
    spots = []
    for group, elem, vr, value in (
        (2, 3, b"UI", sop0),
        (8, 0x18, b"UI", sop0),
        (0x20, 0x13, b"IS", num0),
        (0x20, 0x32, b"DS", pos0),
    ):
        tag = group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr
        at = body.find(tag) + 8
        if at < 8 or body[at : at + len(value)] != value.encode():
            raise RuntimeError(f"synthetic DICOM: placeholder for {vr.decode()} not found")
        spots.append((at, len(value)))
    paths = []
    if len(pixels) > 899999:
        raise ValueError("at most 899,999 slices per series")
    for k, (px, pos) in enumerate(zip(pixels, positions, strict=True)):
        p = "\\".join(f"{v:+013.4f}" for v in pos)
        if len(p) != len(pos0):
            raise ValueError(f"slice position {pos} is out of the writable range (|v| < 1e7 mm)")
        sop, num = f"{stem}.{100001 + k}", f"{k + 1:06d}"
        data = bytearray(body)
        for (at, n), value in zip(spots, (sop, sop, num, p), strict=True):
            data[at : at + n] = value.encode()
        name = names[k] if names else f"{series_uid[-8:]}_{k:04d}.dcm"
        path = folder / name
        path.write_bytes(bytes(data) + px.tobytes())
        paths.append(path)
    return paths


def stack_positions(
    n: int, spacing: float, *, origin=(0.0, 0.0, 0.0), normal=(0, 0, 1), shear=(0.0, 0.0, 0.0)
) -> list[tuple]:
    """``n`` slice positions ``spacing`` mm apart along ``normal``, each shifted by ``shear``
    (mm per slice: a tilted gantry)."""
    o, nrm, sh = (np.asarray(v, float) for v in (origin, normal, shear))
    return [tuple(o + k * spacing * nrm + k * sh) for k in range(n)]
