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


def plant_wall_mass(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing,
    rng: np.random.Generator,
    *,
    side: int,
    height: float,
    angle_deg: float,
    diameter_mm: float,
    mass_hu: float = 40.0,
    noise_hu: float = 15.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A pleural-based soft-tissue mass against the costal pleura, replacing lung.

    The place: the axial slice at fraction ``height`` (0 bottom, 1 top) of the extent of ``lung``
    (the caller's reference mask); in it, the lung on ``side`` (-1: smaller x, the patient's
    right; +1: the left) and a ray from that lung's centroid at ``angle_deg`` in the slice (0:
    lateral, 90: posterior, -90: anterior); the last lung voxel on the ray is the costal pleura.
    The mass: an ellipsoid of ``diameter_mm`` across the wall and 0.8 of that deep (flattened
    against the wall, as pleural-based tumours are), whose outer pole lies 2 mm past the pleura
    (it touches the chest wall); inside ``lung`` it gets ``mass_hu`` + Gaussian noise of
    ``noise_hu`` (smoothed over 1 mm). Returns the planted volume and the mass (the ellipsoid
    within ``lung``: what a lung mask should keep).

    >>> lung = np.zeros((40, 60, 60), bool); lung[5:35, 10:50, 8:28] = lung[5:35, 10:50, 32:52] = 1
    >>> hu = np.where(lung, -850, 40).astype(np.int16)
    >>> out, m = plant_wall_mass(hu, lung, (1.0, 1.0, 1.0), np.random.default_rng(0), side=-1,
    ...                          height=0.5, angle_deg=0.0, diameter_mm=12.0)
    >>> bool(m.any() and not (m & ~lung).any()), bool(abs(out[m].mean() - 40) < 5)
    (True, True)
    >>> int(np.flatnonzero(m.any(axis=(0, 1))).min())  # against the right lung's lateral wall
    8
    """
    lung = np.asarray(lung) > 0
    sp = np.asarray(spacing, float)
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    z = int(round(zs[0] + height * (zs[-1] - zs[0])))
    xs = np.flatnonzero(lung.any(axis=(0, 1)))
    mid = 0.5 * (xs[0] + xs[-1])
    cols = np.arange(lung.shape[2])
    one = lung[z] & (((cols - mid) * side) > 0)[None, :]
    if not one.any():
        raise ValueError(f"no lung on side {side} at slice {z}")
    ys, xs1 = np.nonzero(one)
    c = np.array([ys.mean(), xs1.mean()])
    a = np.deg2rad(angle_deg)
    d = np.array([np.sin(a), side * np.cos(a)])  # (y, x) unit vector in mm
    step = 0.25 * min(sp[1:])
    edge, t = None, 0.0
    while True:
        p = c + d * t / sp[1:]
        iy, ix = int(round(p[0])), int(round(p[1]))
        if not (0 <= iy < lung.shape[1] and 0 <= ix < lung.shape[2]):
            break
        if one[iy, ix]:
            edge = t
        elif edge is not None and t - edge > 30.0:
            break
        t += step
    if edge is None:
        raise ValueError("the ray from the lung's centroid met no lung")
    r = 0.5 * diameter_mm
    depth = 0.8 * r
    centre_mm = c * sp[1:] + d * (edge + 2.0 - depth)
    zz, yy, xx = np.ogrid[: lung.shape[0], : lung.shape[1], : lung.shape[2]]
    dz = (zz - z) * sp[0]
    dy, dx = yy * sp[1] - centre_mm[0], xx * sp[2] - centre_mm[1]
    along = dy * d[0] + dx * d[1]
    across = -dy * d[1] + dx * d[0]
    ellipsoid = (along / depth) ** 2 + (across / r) ** 2 + (dz / r) ** 2 <= 1.0
    mass = ellipsoid & lung
    noise = ndi.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 1.0 / sp)
    noise *= noise_hu / max(float(noise.std()), 1e-6)
    out = hu.copy()
    out[mass] = np.rint(mass_hu + noise[mass]).astype(hu.dtype)
    return out, mass
