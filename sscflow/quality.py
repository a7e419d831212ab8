"""Quality checks of stored outputs against an independent truth (the synthetic generator's)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from sscflow import store as st
from sscflow.geometry import Geometry, to_sitk


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty).

    >>> float(dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])))
    0.6666666666666666
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def resample_mask(mask: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """Nearest-neighbour resampling of a (z, y, x) mask from one canonical grid to another."""
    if geometry == target:
        return mask
    src = to_sitk(mask.astype(np.uint8), geometry.spacing, geometry.origin, geometry.direction)
    ref = to_sitk(np.zeros(target.shape, np.uint8), target.spacing, target.origin)
    return sitk.GetArrayFromImage(
        sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor)
    )


def lung_mask_dice(store: str, synthetic_dir, patient_ids) -> dict[str, float]:
    """Dice of each stored baseline lung mask against the synthetic generator's lung truth."""
    from sscflow.synth import read_truth

    root = st.open_store(store, mode="r")
    scores = {}
    for pid in patient_ids:
        stored = st.read_image(st.patient_group(root, pid, create=False), "lung_mask")
        truth = read_truth(synthetic_dir, pid)
        ref = resample_mask(truth.lung, truth.geometry, stored.geometry)
        scores[pid] = dice(np.asarray(stored.array[...]), ref)
    return scores
