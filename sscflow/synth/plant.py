"""Disease planted into a real CT: dense subpleural texture and emphysema-like low density.

Used by the segmentation tests and ``benchmarks/segment.py`` to ask what a lung mask keeps of
disease whose place is known. The place comes from a reference lung mask given by the caller
(never from the segmentation under test).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtr


def subpleural_region(
    lung: np.ndarray, spacing, *, depth_mm: float = 15.0, midline_x: float | None = None
) -> np.ndarray:
    """Voxels of ``lung`` within ``depth_mm`` of its costal or diaphragmatic surface, in its
    posterior half and inferior half (axis 0 = z increasing superiorly, axis 1 = y increasing
    posteriorly, axis 2 = x): the posterior-basal subpleural lung where systemic sclerosis ILD
    sits. A voxel whose nearest non-lung voxel lies more than 3 mm nearer the midline than itself
    faces the mediastinum and is left out.

    >>> lung = np.zeros((20, 20, 40), bool); lung[2:18, 2:18, 2:18] = lung[2:18, 2:18, 22:38] = 1
    >>> r = subpleural_region(lung, (1.0, 1.0, 1.0), depth_mm=3.0)
    >>> bool(r.any()), bool((r & ~lung).any())
    (True, False)
    """
    lung = np.asarray(lung) > 0
    dist, idx = ndi.distance_transform_edt(lung, sampling=spacing, return_indices=True)
    zs, ys = np.nonzero(lung.any(axis=2))[0], np.nonzero(lung.any(axis=(0, 2)))[0]
    z_mid = 0.5 * (zs.min() + zs.max())
    y_mid = 0.5 * (ys.min() + ys.max())
    if midline_x is None:
        xs = np.nonzero(lung.any(axis=(0, 1)))[0]
        midline_x = 0.5 * (xs.min() + xs.max())
    x = np.arange(lung.shape[2])[None, None, :]
    medial = (np.abs(x - midline_x) - np.abs(idx[2] - midline_x)) * spacing[2] > 3.0
    z = np.arange(lung.shape[0])[:, None, None]
    y = np.arange(lung.shape[1])[None, :, None]
    return lung & (dist <= depth_mm) & (z < z_mid) & (y > y_mid) & ~medial


def plant_texture(
    hu: np.ndarray,
    region: np.ndarray,
    band: tuple[float, float],
    spacing,
    rng: np.random.Generator,
    *,
    grain_mm: float = 1.5,
    cysts: float = 0.0,
) -> np.ndarray:
    """``hu`` with ``region`` replaced by a texture spread over ``band`` (HU, low and high):
    Gaussian noise smoothed over ``grain_mm`` and mapped to a uniform distribution on the band.
    ``cysts`` > 0 adds that fraction of air-filled cysts (honeycombing, -950 HU, 2-5 mm).

    >>> hu = np.full((8, 8, 8), -850, np.int16); r = np.zeros(hu.shape, bool); r[2:6, 2:6, 2:6] = 1
    >>> out = plant_texture(hu, r, (-300.0, 0.0), (1.0, 1.0, 1.0), np.random.default_rng(0))
    >>> bool(out[r].min() >= -300 and out[r].max() <= 0 and (out[~r] == -850).all())
    True
    """
    lo, hi = band
    noise = rng.standard_normal(hu.shape).astype(np.float32)
    sigma = [grain_mm / s for s in spacing]
    noise = ndi.gaussian_filter(noise, sigma)
    noise /= max(float(noise[region].std()), 1e-6)
    value = lo + (hi - lo) * ndtr(noise - float(noise[region].mean()))
    if cysts > 0:
        seeds = (rng.random(hu.shape) < cysts / 30.0) & region
        holes = ndi.binary_dilation(seeds, iterations=2)
        value = np.where(holes, -950.0, value)
    out = hu.copy()
    out[region] = np.rint(value[region]).astype(hu.dtype)
    return out
