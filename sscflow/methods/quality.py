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


# lung1_image.nrrd's trachea (a point in its lumen) and the centrelines of its main bronchi, from
# the carina to where the lobar bronchi leave them, traced by hand on its axial and coronal slices
# (LPS mm, listed z, y, x as the canonical grid's axes)
LUNG1_TRACHEA_MM = (-577.5, -160.0, 1.0)
LUNG1_BRONCHI_MM = (
    ((-659.5, -121.0, 4.0), (-664.5, -120.0, 0.0), (-673.5, -119.0, -10.0)),  # right main
    ((-659.5, -121.0, 6.0), (-664.5, -120.0, 11.0), (-672.5, -115.0, 18.0),
     (-676.5, -109.0, 29.0), (-676.5, -107.0, 38.0)),  # left main
)  # fmt: skip


def airway_reference(
    hu: np.ndarray,
    geometry: Geometry,
    trachea_mm=LUNG1_TRACHEA_MM,
    bronchi_mm=LUNG1_BRONCHI_MM,
    *,
    threshold_hu: float = -500.0,
    radius_mm: float = 7.0,
    max_section_mm2: float = 500.0,
) -> np.ndarray:
    """The trachea and main bronchi of a CT on the canonical grid, independent of
    :mod:`sscflow.methods.segment`: what a lung mask must leave out.

    Trachea: the in-plane component below ``threshold_hu`` (unsmoothed) at the point
    ``trachea_mm``, tracked slice by slice up and down through overlapping components until one
    is larger than ``max_section_mm2`` (it has joined a lung, at the carina) or none is left.
    Main bronchi: voxels below ``threshold_hu`` within ``radius_mm`` of hand-traced centrelines
    (``bronchi_mm``: polylines of (z, y, x) points in mm), connected to the trachea. Returns a
    bool array shaped like ``hu``.
    """
    from scipy import ndimage as ndi

    sp = np.asarray(geometry.spacing, float)
    org = np.asarray(geometry.origin, float)
    low = hu < threshold_hu
    seed = np.rint((np.asarray(trachea_mm) - org) / sp).astype(int)
    out = np.zeros(hu.shape, bool)
    px = sp[1] * sp[2]
    lab = ndi.label(low[seed[0]])[0]
    first = lab == lab[seed[1], seed[2]]
    if not lab[seed[1], seed[2]]:
        raise ValueError(f"airway_reference: the trachea point {trachea_mm} is not air")
    out[seed[0]] = first
    for step in (-1, 1):
        prev, z = first, seed[0] + step
        while 0 <= z < hu.shape[0]:
            lab = ndi.label(low[z])[0]
            ids = np.unique(lab[prev & (lab > 0)])
            parts = [lab == i for i in ids if i > 0]
            if not parts or any(p.sum() * px > max_section_mm2 for p in parts):
                break
            prev = np.logical_or.reduce(parts)
            out[z] = prev
            z += step
    near = np.zeros(hu.shape, bool)
    axes = [org[a] + sp[a] * np.arange(hu.shape[a]) for a in range(3)]
    for line in bronchi_mm:
        for a, b in zip(line[:-1], line[1:], strict=True):
            a, b = np.asarray(a, float), np.asarray(b, float)
            lo = np.minimum(a, b) - radius_mm
            hi = np.maximum(a, b) + radius_mm
            box = tuple(slice(int(np.searchsorted(ax, u)), int(np.searchsorted(ax, v, "right")))
                        for ax, u, v in zip(axes, lo, hi, strict=True))  # fmt: skip
            grid = np.stack(np.meshgrid(*[ax[s] for ax, s in zip(axes, box, strict=True)],
                                        indexing="ij"), axis=-1)  # fmt: skip
            d = b - a
            t = np.clip(((grid - a) @ d) / float(d @ d), 0.0, 1.0)
            near[box] |= np.linalg.norm(grid - a - t[..., None] * d, axis=-1) <= radius_mm
    tree = (low & near) | out
    lab, _ = ndi.label(tree)
    ids = np.unique(lab[out])
    return np.isin(lab, ids[ids > 0])


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
