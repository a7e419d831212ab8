"""Lungs at the edge of a scan: does its first or last slice still cut through lung?

A follow-up whose scanning range stops short leaves part of the lungs unimaged, and the
log-Jacobian map is NaN there (the registration stage reports how much and where). Before a run,
``sscflow discover`` and ``sscflow validate`` read only the two end slices of each scan and warn
when lung shows in one: a chest CT that images the whole lungs begins above the apices and
ends below the bases.

Lung in a slice: air (below ``AIR_HU``) enclosed by the body (not connected to the air around
the patient, the slice's border), in components of at least ``MIN_LUNG_CM2`` whose mean is
below ``LUNG_MEAN_HU``. The trachea (2-5 cm² in an axial slice) and bowel gas of a few
cm² stay below the area floor (5 cm²); a large gastric bubble at a base slice may raise a warning,
which is a warning only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

AIR_HU = -400.0
LUNG_MEAN_HU = -600.0
MIN_LUNG_CM2 = 5.0
#: the slice normal within 45 degrees of the body's long axis: the first and last slices are
#: the top ("apex") and bottom ("base") of the scan; otherwise they are its sides
_AXIAL = np.sqrt(0.5)


def lung_area_cm2(slice_hu, spacing_mm) -> float:
    """cm² of lung in one 2-D slice (HU) of pixel size ``spacing_mm`` (row, column mm).

    >>> s = np.full((60, 60), -1000.0); s[5:55, 5:55] = 40.0; s[15:45, 15:45] = -850.0
    >>> round(lung_area_cm2(s, (1.0, 1.0)), 1)  # a 30 x 30 mm air region inside a body
    9.0
    >>> lung_area_cm2(np.full((60, 60), -1000.0), (1.0, 1.0))  # air only: outside the body
    0.0
    """
    hu = np.asarray(slice_hu, np.float32)
    air = hu < AIR_HU
    labels, n = ndimage.label(air)
    if n == 0:
        return 0.0
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(hu), labels, idx)
    means = ndimage.mean(hu, labels, idx)
    pixel_cm2 = float(spacing_mm[0]) * float(spacing_mm[1]) / 100.0
    keep = (~np.isin(idx, border)) & (means < LUNG_MEAN_HU) & (sizes * pixel_cm2 >= MIN_LUNG_CM2)
    return float(sizes[keep].sum() * pixel_cm2)


def _edge_images(path: Path, series_uid: str | None) -> list[sitk.Image]:
    """The scan's first and last slices as 3-D images of one slice (their geometry kept)."""
    if path.is_dir():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_uid or "")
        if not files:
            from sscflow.core.imageio import list_dicom_series

            uids = list_dicom_series(path)
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uids[0]) if uids \
                else ()  # fmt: skip
        if len(files) < 2:
            return []
        out = []
        for f in (files[0], files[-1]):
            reader = sitk.ImageFileReader()
            reader.SetFileName(f)
            reader.LoadPrivateTagsOff()
            out.append(reader.Execute())
        return out
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    reader.ReadImageInformation()
    size = list(reader.GetSize())
    if len(size) != 3 or size[2] < 2:
        return []
    out = []
    for k in (0, size[2] - 1):  # the file's own slices (its third axis)
        reader.SetExtractIndex([0, 0, k])
        reader.SetExtractSize([size[0], size[1], 1])
        out.append(reader.Execute())
    return out


def lungs_at_edges(path, series_uid: str | None = None) -> list[str]:
    """Where the scan at ``path`` (a DICOM series folder, or a NIfTI / MHA / NRRD file) still
    shows lung in its first or last slice: a list of "apex", "base" or "side" (empty when
    neither end slice shows lung). Reads the two end slices only."""
    images = _edge_images(Path(path), series_uid)
    if len(images) != 2:
        return []
    centres = []
    for im in images:
        c = [(n - 1) / 2.0 for n in im.GetSize()]
        centres.append(np.asarray(im.TransformContinuousIndexToPhysicalPoint(c)))
    normal = centres[1] - centres[0]  # first to last slice, LPS x y z
    length = float(np.linalg.norm(normal))
    along = normal[2] / length if length > 0 else 0.0
    parts = []
    for i, im in enumerate(images):
        hu = sitk.GetArrayViewFromImage(im)[0]
        if lung_area_cm2(hu, im.GetSpacing()[1::-1]) <= 0:
            continue
        up = along if i == 1 else -along  # this end's outward direction, its superior part
        parts.append("apex" if up > _AXIAL else "base" if up < -_AXIAL else "side")
    return parts


def edge_warning(which: str, parts: list[str]) -> str:
    """The warning's words for one scan ("baseline", "follow-up")."""
    where = " and ".join(f"{'top' if p == 'apex' else 'bottom' if p == 'base' else 'end'} "
                         f"({p})" for p in parts)  # fmt: skip
    plural = "s" if len(parts) > 1 else ""
    return (f"{which}: lung in the {where} slice{plural}; the scan may stop short of the lungs, "
            "and the log-Jacobian map is NaN where the follow-up did not image them")
