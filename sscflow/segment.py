"""Lung masks from CT in Hounsfield units: thresholds, airway removal, components, morphology.

Works on the canonical grid (axis 0 = z, axial slices along it) and on partial thorax scans (lungs
touching the first or last slice): the body is filled slice by slice, so nothing relies on air
being enclosed in 3-D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from sscflow.errors import SegmentationError
from sscflow.geometry import crop_box

MIDLINE_HALF_WIDTH_MM = 20.0


@dataclass(frozen=True)
class LungMask:
    mask: np.ndarray  # (Z, Y, X) uint8, 1 = lung
    volume_ml: float
    airway_ml: float
    components: int


def segment_lungs(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    lung_threshold_hu: float = -400.0,
    airway_threshold_hu: float = -950.0,
    closing_mm: float = 5.0,
    min_lung_ml: float = 20.0,
) -> LungMask:
    """Segment both lungs, excluding the trachea, the main bronchi and the air outside the body.

    Parameters
    ----------
    hu : (Z, Y, X) array in Hounsfield units on a grid with identity direction
    spacing : (z, y, x) voxel size in mm

    Raises
    ------
    SegmentationError (a ValueError) when the volume holds no air inside the body, or when no
    component large enough to be a lung is left.
    """
    if hu.ndim != 3:
        raise SegmentationError(f"segment_lungs needs a 3-D volume, got shape {hu.shape}")
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sigma = [max(0.5, 1.0 / s) if s < 2.0 else 0.5 for s in spacing]
    smooth = ndi.gaussian_filter(hu.astype(np.float32), sigma)

    air = smooth < lung_threshold_hu
    body = _largest_component(~air)
    if body is None:
        raise SegmentationError(
            f"no body found (every voxel is below {lung_threshold_hu:g} HU); is this a CT in "
            "Hounsfield units?"
        )
    filled = _fill_slices(body)
    inside = filled & air
    if not inside.any():
        lo = float(hu.min())
        raise SegmentationError(
            f"no air inside the body (lowest value {lo:g} HU, lung threshold "
            f"{lung_threshold_hu:g} HU); is this a chest CT in Hounsfield units?"
        )

    airway = _airways(smooth < airway_threshold_hu, inside, filled, spacing)
    # a one-voxel margin cuts the lungs free of the bronchi; it is given back below
    airway_margin = ndi.binary_dilation(airway, iterations=1) & inside
    labels, n = ndi.label(inside & ~airway_margin)
    if n == 0:
        raise SegmentationError("the lung mask is empty: only airways were found inside the body")
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    keep_min = max(min_lung_ml, 0.1 * sizes.max())
    keep = np.flatnonzero(sizes >= keep_min)
    keep = keep[np.argsort(sizes[keep])[::-1][:2]] + 1  # at most two lungs
    if keep.size == 0:
        raise SegmentationError(
            f"the lung mask is empty: the largest air component inside the body is "
            f"{sizes.max():.1f} mL, below min_lung_ml={min_lung_ml:g}"
        )
    lungs = np.isin(labels, keep)
    lungs |= ndi.binary_dilation(lungs, iterations=1) & airway_margin & ~airway

    if closing_mm > 0:
        lungs = _closing(lungs, closing_mm, spacing)
    lungs = _fill_slices(lungs) & filled & ~airway
    volume = float(lungs.sum()) * voxel_ml
    if volume == 0:
        raise SegmentationError("the lung mask is empty after clean-up")
    return LungMask(
        mask=lungs.astype(np.uint8),
        volume_ml=volume,
        airway_ml=float(airway.sum()) * voxel_ml,
        components=int(keep.size),
    )


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    labels, n = ndi.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (axis 0)."""
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k])
    return out


def _airways(low, inside, filled, spacing) -> np.ndarray:
    """Components of very low density that reach the midline in the upper half of the thorax:
    the trachea and the bronchi attached to it."""
    low = low & inside
    labels, n = ndi.label(low)
    if n == 0:
        return np.zeros_like(low)
    zs = np.flatnonzero(filled.any(axis=(1, 2)))
    upper = np.zeros(low.shape[0], bool)
    upper[(zs[0] + zs[-1]) // 2 :] = True  # z increases superiorly on the canonical grid
    xs = np.flatnonzero(filled.any(axis=(0, 1)))
    mid = 0.5 * (xs[0] + xs[-1])
    half = MIDLINE_HALF_WIDTH_MM / spacing[2]
    band = np.zeros(low.shape[2], bool)
    band[max(0, int(mid - half)) : int(mid + half) + 1] = True
    probe = low & upper[:, None, None] & band[None, None, :]
    ids = np.unique(labels[probe])
    ids = ids[ids > 0]
    return np.isin(labels, ids)


def _closing(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """Morphological closing with a ball of ``radius_mm``, by two Euclidean distance transforms
    (fast for large radii), on the mask's bounding box. Outside the array counts as neither
    foreground nor background, so lungs cut by the first or last slice are not eroded there."""
    if not mask.any():
        return mask
    box = crop_box(mask, spacing, radius_mm + max(spacing), mask.shape)  # the ball, one voxel more
    sub = mask[box]
    dilated = ndi.distance_transform_edt(~sub, sampling=spacing) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    out = mask.copy()
    out[box] |= closed
    return out
