"""Initial alignment of two scans in physical space, from their lung masks.

Two scans of one patient are never on the same grid: another field of view, table position,
patient position, slice thickness. Before the intensity-based stages, the follow-up is brought
near the baseline by a rigid map found from the lung masks alone:

1. candidates: the translation that matches the lung centroids (rotation none), and the rotation
   that matches the masks' principal axes (eigenvector signs chosen nearest the identity; used
   only when the axes are well separated and the rotation is under ``max_rotation_deg``);
2. each candidate is refined by a rigid (Euler) registration of the Gaussian-smoothed masks on a
   coarse grid (``grid_mm``), mean squares, SimpleITK;
3. the best is kept; its quality is the Dice of the two masks after alignment on that grid.

Nothing assumes that voxel 0 of one scan corresponds to voxel 0 of the other: every position is
a physical point (origin, spacing, direction of each image).

A map is ``y = matrix @ x + offset`` from a physical baseline point x (z, y, x mm, absolute) to
the physical follow-up point y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from sscflow.core.geometry import (
    Geometry,
    affine_from_itk,
    affine_to_itk,
    index_to_physical,
    resample,
    to_itk,
)

__all__ = ["Alignment", "align_masks", "rotation_angle_deg"]


@dataclass(frozen=True)
class Alignment:
    """A rigid map baseline -> follow-up (physical zyx mm) and how well it aligns the lungs."""

    matrix: np.ndarray  # (3, 3) rotation, acting on (z, y, x) vectors
    offset: np.ndarray  # (3,) mm
    dice: float  # lung masks' Dice after alignment (coarse grid, the whole baseline mask)
    method: str  # which candidate won
    seconds: float = 0.0

    def apply(self, points: np.ndarray) -> np.ndarray:
        """The map at ``points`` (..., 3) zyx mm."""
        return points @ self.matrix.T + self.offset

    def to_dict(self) -> dict:
        return {
            "matrix": np.round(self.matrix, 6).tolist(),
            "offset_mm": np.round(self.offset, 3).tolist(),
            "rotation_deg": round(rotation_angle_deg(self.matrix), 3),
            "dice": round(float(self.dice), 4),
            "method": self.method,
            "seconds": round(float(self.seconds), 3),
        }


def identity() -> Alignment:
    return Alignment(np.eye(3), np.zeros(3), float("nan"), "none")


def rotation_angle_deg(matrix) -> float:
    """The angle of a rotation matrix, degrees."""
    c = (np.trace(np.asarray(matrix, float)) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


def _affine(geometry: Geometry):
    """``(o, a)`` with physical (z, y, x) mm = o + a @ index (z, y, x), any direction."""
    pts = index_to_physical(np.vstack([np.zeros(3), np.eye(3)]), geometry)
    return pts[0], (pts[1:] - pts[0]).T


def _projections(mask):
    """The mask's voxel counts summed over x, over y and over z: (Z, Y), (Z, X), (Y, X)."""
    m = np.asarray(mask, bool)
    return (m.sum(axis=2, dtype=np.float64), m.sum(axis=1, dtype=np.float64),
            m.sum(axis=0, dtype=np.float64))  # fmt: skip


def _moments(mask, geometry: Geometry):
    """Centroid (zyx mm) and principal axes (columns, zyx, by decreasing variance) of a mask.

    Exact, from the index moments of the mask's three projections (the map from indices to mm is
    affine): no list of voxel positions, which at 1 mm (millions of lung voxels) cost more than
    the rest of the alignment."""
    pzy, pzx, pyx = _projections(mask)
    z, y, x = (np.arange(n, dtype=np.float64) for n in (pzy.shape[0], pzy.shape[1],
                                                          pzx.shape[1]))  # fmt: skip
    cz, cy, cx = pzy.sum(axis=1), pzy.sum(axis=0), pzx.sum(axis=0)
    n = cz.sum()
    mean = np.array([z @ cz, y @ cy, x @ cx]) / n
    second = np.array([[(z * z) @ cz, z @ pzy @ y, z @ pzx @ x],
                       [0.0, (y * y) @ cy, y @ pyx @ x],
                       [0.0, 0.0, (x * x) @ cx]])  # fmt: skip
    second = np.triu(second) + np.triu(second, 1).T
    cov_idx = (second / n - np.outer(mean, mean)) * (n / max(n - 1.0, 1.0))
    o, a = _affine(geometry)
    c = o + a @ mean
    w, v = np.linalg.eigh(a @ cov_idx @ a.T)
    order = np.argsort(w)[::-1]
    return c, w[order], v[:, order]


def _axes_rotation(vf, vm) -> np.ndarray:
    """The proper rotation taking the baseline's principal axes to the follow-up's, with the
    eigenvector signs that put it nearest the identity."""
    best, best_angle = np.eye(3), 1e9
    for sx in (1, -1):
        for sy in (1, -1):
            for sz in (1, -1):
                r = (vm * np.array([sx, sy, sz])) @ vf.T
                if np.linalg.det(r) < 0:
                    continue
                a = rotation_angle_deg(r)
                if a < best_angle:
                    best, best_angle = r, a
    return best


def _coarse(image: sitk.Image, grid_mm: float, sigma_mm: float) -> sitk.Image:
    """Resampled onto an identity-direction grid of ``grid_mm`` over its extent (each coarse
    voxel the mean of the fine ones in it), then smoothed there."""
    size = np.asarray(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1)
                        for k in (0, size[2] - 1)], float)  # fmt: skip
    pts = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    n = np.maximum(2, np.floor((hi - lo) / grid_mm).astype(int) + 1)
    grid = Geometry(tuple(n[::-1]), (grid_mm,) * 3, tuple(lo[::-1]))
    # block-average first (a cheap anti-alias), then resample, then smooth on the coarse grid
    shrink = [max(1, int(grid_mm // s)) for s in image.GetSpacing()]
    small = sitk.BinShrink(image, shrink) if max(shrink) > 1 else image
    out = resample(small, None, grid, fill=0.0, dtype=np.float32)
    return sitk.SmoothingRecursiveGaussian(to_itk(out, grid), sigma_mm)


def _dice(f: sitk.Image, m: sitk.Image, tx: sitk.Transform) -> tuple[float, float]:
    """Dice of the two masks after ``tx``: over the whole baseline mask, and counted only where
    the follow-up was imaged (which ranks the candidates: a follow-up with a smaller field of
    view is not penalised for what it did not see)."""
    grid, mg = Geometry.of(f), Geometry.of(m)
    affine = affine_from_itk(tx)
    b = resample(m, mg, grid, affine=affine, fill=0.0) > 0.5
    seen = resample(np.ones(mg.shape, np.float32), mg, grid, affine=affine, fill=0.0) > 0.5
    a = sitk.GetArrayFromImage(f) > 0.5

    def dice(x, y):
        den = int(x.sum()) + int(y.sum())
        return 2.0 * int((x & y).sum()) / den if den else 0.0

    return dice(a, b), dice(a & seen, b)


def _refine(f: sitk.Image, m: sitk.Image, matrix, offset, centre_xyz, iterations: int):
    """Rigid refinement of a start (matrix, offset) by mean squares of the smoothed masks."""
    start = affine_to_itk(matrix, offset)
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(float(c) for c in centre_xyz))
    # the start as an Euler transform about the centre (a proper rotation: exact)
    euler.SetMatrix(start.GetMatrix())
    t = np.asarray(start.GetTranslation()) + (np.asarray(start.GetMatrix()).reshape(3, 3)
                                              @ np.asarray(centre_xyz)) - np.asarray(centre_xyz)
    euler.SetTranslation(tuple(float(v) for v in t))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.02, numberOfIterations=int(iterations),
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-10,
    )  # fmt: skip
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.15, 1)
    reg.SetInitialTransform(euler, inPlace=True)
    reg.Execute(f, m)
    return euler


def _profile_shift(fm, fg: Geometry, mm, mg: Geometry, step_mm: float = 2.0):
    """The translation (zyx mm) that best matches the lungs' axial area profiles (1-D
    correlation over the slices both scans imaged), in-plane by the centroids of the matched
    slabs: robust when one field of view misses part of the lungs, where the centroids of the
    whole masks disagree. None when the scans' z extents are too short to compare."""

    def profile(mask, g):  # per slice: its bin, voxel count and sum of physical positions
        o, a = _affine(g)
        if abs(a[0, 1]) + abs(a[0, 2]) > 1e-9 * abs(a[0, 0]):  # oblique slices: voxel by voxel
            idx = np.argwhere(np.asarray(mask, bool))
            pts = index_to_physical(idx, g)
            count, sums, zs = np.ones(len(pts)), pts, pts[:, 0]
        else:  # z depends on the slice only: exact sums from the projections
            pzy, pzx, _ = _projections(mask)
            count = pzy.sum(axis=1)
            idx_sums = np.stack([np.arange(len(count)) * count,
                                 pzy @ np.arange(pzy.shape[1], dtype=np.float64),
                                 pzx @ np.arange(pzx.shape[1], dtype=np.float64)], axis=1)
            sums = count[:, None] * o + idx_sums @ a.T
            zs = o[0] + a[0, 0] * np.arange(len(count))
            keep = count > 0
            count, sums, zs = count[keep], sums[keep], zs[keep]
        z0 = zs.min()
        bins = np.floor((zs - z0) / step_mm).astype(int)
        area = np.bincount(bins, weights=count)
        return (count, sums), z0, bins, area

    pf, zf, bf, af = profile(fm, fg)
    pm, zm, bm, am = profile(mm, mg)
    if len(af) < 8 or len(am) < 8:
        return None
    best = None
    for lag in range(-len(am) + 4, len(af) - 3):  # moving bin j sits at fixed bin j + lag
        j0, j1 = max(0, -lag), min(len(am), len(af) - lag)
        if j1 - j0 < max(4, 0.5 * min(len(am), len(af))):
            continue
        a, b = af[j0 + lag: j1 + lag], am[j0:j1]
        if a.std() == 0 or b.std() == 0:
            continue
        score = float(np.corrcoef(a, b)[0, 1]) - abs(float(a.sum() - b.sum())) / (a.sum() + b.sum())
        if best is None or score > best[0]:
            best = (score, lag, j0, j1)
    if best is None:
        return None
    _, lag, j0, j1 = best
    sel_f = (bf >= j0 + lag) & (bf < j1 + lag)
    sel_m = (bm >= j0) & (bm < j1)
    (cf, sf), (cm, sm) = pf, pm
    shift = sm[sel_m].sum(axis=0) / cm[sel_m].sum() - sf[sel_f].sum(axis=0) / cf[sel_f].sum()
    shift[0] = (zm + j0 * step_mm) - (zf + (j0 + lag) * step_mm)
    return shift


def align_masks(
    fixed_mask,
    fixed_geometry: Geometry,
    moving_mask,
    moving_geometry: Geometry,
    *,
    grid_mm: float = 5.0,
    sigma_mm: float = 5.0,
    iterations: int = 50,
    max_rotation_deg: float = 30.0,
    good_dice: float = 0.9,
) -> Alignment:
    """The rigid map baseline -> follow-up that best overlaps the two lung masks.

    Parameters
    ----------
    fixed_mask, moving_mask : (Z, Y, X) lung masks (nonzero inside) of baseline and follow-up
    fixed_geometry, moving_geometry : their grids (any origin, spacing, direction)
    grid_mm, sigma_mm : the coarse grid and the smoothing the masks are compared on
    iterations : optimiser iterations
    max_rotation_deg : principal-axes candidates rotating more than this are not tried
    good_dice : a candidate reaching this Dice is kept without trying the next

    Returns
    -------
    Alignment (physical zyx mm map baseline -> follow-up, Dice of the aligned masks).

    Raises
    ------
    ValueError when a mask is empty.
    """
    import time

    t0 = time.perf_counter()
    fm, mm = np.asarray(fixed_mask) > 0, np.asarray(moving_mask) > 0
    for name, m in (("baseline", fm), ("follow-up", mm)):
        if not m.any():
            raise ValueError(f"initial alignment: the {name} lung mask is empty")
    cf, wf, vf = _moments(fm, fixed_geometry)
    cm, wm, vm = _moments(mm, moving_geometry)
    f = _coarse(to_itk(fm.astype(np.float32), fixed_geometry), grid_mm, sigma_mm)
    m = _coarse(to_itk(mm.astype(np.float32), moving_geometry), grid_mm, sigma_mm)
    candidates = {"centroids": (np.eye(3), cm - cf)}
    shift = _profile_shift(fm, fixed_geometry, mm, moving_geometry)
    if shift is not None:
        candidates["slice profiles"] = (np.eye(3), shift)
    separated = all(
        min(w[0] - w[1], w[1] - w[2]) > 0.1 * w[0] for w in (wf, wm)
    )  # well-defined axes in both scans
    if separated:
        r = _axes_rotation(vf, vm)
        if rotation_angle_deg(r) <= max_rotation_deg:
            candidates["principal axes"] = (r, cm - r @ cf)
    best = None
    for name, (rot, offset) in candidates.items():
        tx = _refine(f, m, rot, offset, cf[::-1], iterations)
        matrix, off = affine_from_itk(tx)
        whole, seen = _dice(f, m, tx)
        if best is None or seen > best[0] + 1e-4:
            best = (seen, whole, matrix, off, name)
        if best[0] >= good_dice:
            break
    _, whole, matrix, off, name = best
    return Alignment(matrix, off, whole, name, time.perf_counter() - t0)
