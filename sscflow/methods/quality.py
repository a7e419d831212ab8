"""Quality checks of stored outputs against an independent truth (the synthetic generator's)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from sscflow.core import store as st
from sscflow.core.geometry import Geometry, resample, to_itk
from sscflow.synth import read_truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty).

    >>> float(dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])))
    0.6666666666666666
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def resample_mask(mask: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """Nearest-neighbour resampling of a (z, y, x) mask onto another grid (uint8)."""
    return resample(np.asarray(mask).astype(np.uint8), geometry, target, interpolator="nearest")


def lung_mask_dice(store: str, synthetic_dir, patient_ids) -> dict[str, float]:
    """Dice of each stored baseline lung mask against the synthetic generator's lung truth."""
    root = st.open_store(store, mode="r")
    scores = {}
    for pid in patient_ids:
        stored = st.read_image(st.patient_group(root, pid, create=False), "lung_mask")
        truth = read_truth(synthetic_dir, pid)
        ref = resample_mask(truth.lung, truth.geometry, stored.geometry)
        scores[pid] = dice(np.asarray(stored.array[...]), ref)
    return scores


def threshold_reference(image: sitk.Image, *, threshold_hu: float = -500.0) -> sitk.Image:
    """A plain lung mask on the scan's own grid, independent of :mod:`sscflow.methods.segment`: the
    reference that ``benchmarks/segment.py`` and the real-CT tests score against where no
    expert label exists.

    Unsmoothed HU below ``threshold_hu``; components (SimpleITK) not touching the in-plane
    border of the image (the air around the body); the airway tree (below -950 HU, connected to
    what reaches the top slice within 40 mm of the image's left-right centre) removed; the two
    largest components kept; a closing of radius 2 voxels and a hole fill per axial slice.
    Returns a uint8 image (1 = lung) on the grid of ``image``.
    """
    arr = sitk.GetArrayFromImage(image)
    air = arr < threshold_hu
    cc = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray(air.astype(np.uint8)))
    )
    border = np.unique(np.concatenate([cc[:, 0].ravel(), cc[:, -1].ravel(), cc[:, :, 0].ravel(),
                                       cc[:, :, -1].ravel()]))  # fmt: skip
    inside = air & ~np.isin(cc, border)
    low = sitk.GetArrayFromImage(sitk.ConnectedComponent(
        sitk.GetImageFromArray((inside & (arr < -950)).astype(np.uint8))))  # fmt: skip
    sx = image.GetSpacing()[0]
    centre = arr.shape[2] / 2.0
    x0, x1 = int(centre - 40.0 / sx), int(centre + 40.0 / sx) + 1
    top = np.unique(low[-3:, :, x0:x1])
    airway = np.isin(low, top[top > 0])
    lungs = sitk.RelabelComponent(sitk.ConnectedComponent(
        sitk.GetImageFromArray((inside & ~airway).astype(np.uint8))))  # fmt: skip
    lungs = sitk.BinaryThreshold(lungs, 1, 2, 1, 0)
    lungs = sitk.BinaryMorphologicalClosing(lungs, [2, 2, 2])
    out = sitk.GetArrayFromImage(lungs).astype(bool)
    for k in range(out.shape[0]):
        out[k] = sitk.GetArrayFromImage(
            sitk.BinaryFillhole(sitk.GetImageFromArray(out[k].astype(np.uint8)))
        ).astype(bool)
    out &= ~airway
    return to_itk(out.astype(np.uint8), Geometry.of(image))
