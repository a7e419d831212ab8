"""Writing synthetic DICOM exports: CT slices with chosen headers (tests and benchmarks).

Every slice is a classic CT Image Storage file (explicit VR little endian, int16 HU, slope 1)
that pydicom and SimpleITK read. Positions and orientation are given per series, so a test can
drop a slice, duplicate one, tilt the stack or write a localizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sscflow.imageio import CT_SOP_CLASS_UID, deterministic_uid

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
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = header.get("FrameOfReferenceUID") or deterministic_uid(study_uid, "frame")
    paths = []
    for k, (px, pos) in enumerate(zip(pixels, positions, strict=True)):
        px = np.ascontiguousarray(px, dtype="<i2")
        sop = deterministic_uid(series_uid, "slice", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            frame,
        )
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.4f}" for v in pixel_spacing]
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        for key, value in header.items():
            setattr(ds, key, value)
        ds.PixelData = px.tobytes()
        name = names[k] if names else f"{series_uid[-8:]}_{k:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stack_positions(
    n: int, spacing: float, *, origin=(0.0, 0.0, 0.0), normal=(0, 0, 1), shear=(0.0, 0.0, 0.0)
) -> list[tuple]:
    """``n`` slice positions ``spacing`` mm apart along ``normal``, each shifted by ``shear``
    (mm per slice: a tilted gantry)."""
    o, nrm, sh = (np.asarray(v, float) for v in (origin, normal, shear))
    return [tuple(o + k * spacing * nrm + k * sh) for k in range(n)]
