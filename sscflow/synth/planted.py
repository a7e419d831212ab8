"""Known changes planted into a real CT: a longitudinal pair whose answer is known.

A real scan cannot say how far its lung moved; a real scan with a planted change can. Tests and
benchmarks use this on ``../shared/data/lung1_image.nrrd``:

- :func:`plant_change`: a follow-up in the baseline's frame, ``followup(x + u(x)) = baseline(x) +
  density(x) + noise``, with posterior-basal sinks (shrinkage) in each lung, a global volume
  change and a fibrosis-like density rise where the lung shrinks (``sscflow.synth.deform``);
- :func:`reacquire`: the same anatomy imaged again, as a scanner would: another grid (spacing,
  field of view, direction) and the patient moved (rotation about any axis, table shift). The
  true field becomes ``R(x + u(x)) - x``, R the motion.
- :func:`cut_view`: a follow-up whose field of view stops short of the lungs (at the apex, the
  bases or one side), past the cut air, the scanner's padding value, or no grid at all.

Everything is physical (z, y, x) mm, LPS: z towards the head, y towards the back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from sscflow.core.geometry import Geometry, grid_points
from sscflow.synth import deform

__all__ = ["CUT_FILLS", "CUT_SIDES", "Pair", "acquisition_grid", "cut_view", "lung_sinks",
           "moved_field", "plant_change", "reacquire", "render_on"]

#: where a follow-up's field of view may stop short: the axis (z, y, x) and the end (+1: the high
#: end) in LPS (z towards the head, x towards the patient's left)
CUT_SIDES = {"apex": (0, +1), "base": (0, -1), "right": (2, -1), "left": (2, +1)}
#: what lies past the cut: air, a scanner's padding value, or nothing (the grid ends there)
CUT_FILLS = {"air": -1024.0, "padding": -3024.0, "crop": None}


@dataclass(frozen=True)
class Pair:
    """A baseline, a follow-up (each on its own grid) and the truth on the baseline grid."""

    baseline: np.ndarray  # HU, float32, on baseline_geometry (canonical)
    baseline_geometry: Geometry
    followup: np.ndarray  # HU, float32, on followup_geometry (any grid)
    followup_geometry: Geometry
    lung: np.ndarray  # bool, baseline grid
    displacement: np.ndarray  # (3, Z, Y, X) mm: followup(x + u(x)) ~ baseline(x), physical
    log_jacobian: np.ndarray  # (Z, Y, X) true log det(I + grad u)
    region: np.ndarray  # bool, the planted-shrinkage region (empty when none)


def _axes(geometry: Geometry):
    return [geometry.origin[k] + np.arange(n) * geometry.spacing[k]
            for k, n in enumerate(geometry.shape)]  # fmt: skip


def lung_sinks(lung, geometry: Geometry, *, sigma_mm: float = 22.0, strength: float = -0.35):
    """One sink per lung in its posterior, inferior part (the lung's own 30 % extremes)."""
    lung = np.asarray(lung, bool)
    axes = _axes(geometry)
    idx = np.argwhere(lung)
    pts = np.stack([axes[k][idx[:, k]] for k in range(3)], axis=1)
    mid_x = np.median(pts[:, 2])
    sinks = []
    for side in (pts[:, 2] < mid_x, pts[:, 2] >= mid_x):
        p = pts[side]
        if len(p) < 100:
            continue
        z_lo = np.percentile(p[:, 0], 30)  # inferior: low z
        y_hi = np.percentile(p[:, 1], 70)  # posterior: high y
        sel = p[(p[:, 0] <= z_lo) & (p[:, 1] >= y_hi)]
        if len(sel) == 0:
            continue
        centre = sel.mean(axis=0)
        sinks.append(deform.Sink(tuple(float(c) for c in centre), float(sigma_mm), float(strength)))
    return sinks


def plant_change(
    hu,
    geometry: Geometry,
    lung,
    *,
    seed: int = 0,
    region_logjac: float = -0.24,
    global_log_volume: float = -0.02,
    density_hu: float = 150.0,
    noise_hu: float = 15.0,
    sigma_mm: float = 22.0,
) -> Pair:
    """A follow-up of ``hu`` (on the canonical ``geometry``) with a known change, same grid.

    Parameters
    ----------
    hu, lung : the real baseline CT (HU) and its lung mask
    region_logjac : the mean true log-Jacobian wanted in the planted region (0: no sinks)
    global_log_volume : the global log-volume change (inspiration), ~ -0.02 for 2 % less
    density_hu : the fibrosis-like rise in the shrinking region (textured)
    noise_hu : independent noise added to the follow-up

    Returns
    -------
    Pair with the follow-up on the baseline grid.
    """
    rng = np.random.default_rng(seed)
    hu = np.asarray(hu, np.float32)
    lung = np.asarray(lung, bool)
    axes = _axes(geometry)
    idx = np.argwhere(lung)
    centre = np.array([axes[k][idx[:, k]].mean() for k in range(3)])
    sinks = lung_sinks(lung, geometry, sigma_mm=sigma_mm) if region_logjac else []
    bump = deform.divergence_profile(axes, sinks) if sinks else np.zeros(hu.shape, np.float32)
    region = lung & (bump > 0.5)

    def build(sinks, planned):
        return deform.build_deformation(geometry, axes, lung, centre=centre, sinks=sinks,
                                        planned_mean=planned)  # fmt: skip

    field = build(sinks, global_log_volume)
    if sinks and region.any():  # scale the sinks once so the region's mean is as wanted
        got = float(field.log_jacobian[region].mean()) - field.log_volume
        scale = region_logjac / got if got else 1.0
        sinks = [replace(s, strength=s.strength * scale) for s in sinks]
        field = build(sinks, global_log_volume)
    # the global part: s = planned - local_mean, so planned = local_mean + global_log_volume
    field = build(sinks, field.local_mean + global_log_volume)

    parenchyma = (lung & (hu < -500)).astype(np.float32)
    if sinks and density_hu:
        _, density, _ = deform.density_fields(parenchyma, axes, sinks, rng, geometry.spacing[0],
                                              ild_hu=0.0, extra_hu=0.0,
                                              change_hu=float(density_hu))  # fmt: skip
    else:
        density = np.zeros_like(hu)
    follow = deform.warp(hu + density, field.inverse, geometry, order=3)
    follow += _noise(rng, follow.shape, noise_hu)
    return Pair(hu, geometry, follow, geometry, lung, field.displacement, field.log_jacobian,
                region)  # fmt: skip


def _noise(rng, shape, sd):
    if not sd:
        return np.zeros(shape, np.float32)
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5)
    return (n * (sd / max(float(n.std()), 1e-6))).astype(np.float32)


def rotation(degrees, axis) -> np.ndarray:
    """A (z, y, x) rotation matrix about ``axis`` by ``degrees``."""
    return deform.rotation_matrix(axis, degrees)


def acquisition_grid(lung, geometry: Geometry, *, spacing, margin_mm=(30.0, 30.0),
                     inplane_margin_mm: float = 15.0, direction=None, matrix=None,
                     offset=None) -> Geometry:  # fmt: skip
    """A scanner's grid for the moved patient: the lung's bounding box after the motion
    ``y = matrix @ x + offset``, grown by ``margin_mm`` (below the bases, above the apices;
    negative cuts into the lung) and ``inplane_margin_mm`` (or the whole body's extent, when
    larger), with ``spacing`` (z, y, x) mm and ITK ``direction``."""
    matrix = np.eye(3) if matrix is None else np.asarray(matrix, float)
    offset = np.zeros(3) if offset is None else np.asarray(offset, float)
    d = np.eye(3) if direction is None else np.asarray(direction, float)
    axes = _axes(geometry)
    idx = np.argwhere(np.asarray(lung, bool))[::7]
    pts = np.stack([axes[k][idx[:, k]] for k in range(3)], axis=1) @ matrix.T + offset
    # corners of the whole baseline grid, moved: the body's in-plane extent
    corners = np.array([[axes[0][i], axes[1][j], axes[2][k]] for i in (0, -1) for j in (0, -1)
                        for k in (0, -1)]) @ matrix.T + offset  # fmt: skip
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    lo[0] -= margin_mm[0]
    hi[0] += margin_mm[1]
    lo[1:] = np.minimum(lo[1:] - inplane_margin_mm, corners[:, 1:].min(axis=0))
    hi[1:] = np.maximum(hi[1:] + inplane_margin_mm, corners[:, 1:].max(axis=0))
    # grid axes along the direction's columns (ITK xyz), in grid index order (z, y, x)
    sp = np.asarray(spacing, float)
    cols = d[:, ::-1].T[:, ::-1]  # row k: the physical zyx direction of array axis k
    box = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                    for c in (lo[2], hi[2])])  # fmt: skip
    proj = box @ cols.T  # coordinate of each box corner along each grid axis
    start = proj.min(axis=0)
    n = np.floor((proj.max(axis=0) - start) / sp).astype(int) + 1
    origin = cols.T @ start  # physical zyx of voxel 0
    return Geometry(tuple(int(v) for v in n), tuple(sp), tuple(origin),
                    tuple(tuple(r) for r in d))  # fmt: skip


def render_on(image, geometry: Geometry, grid: Geometry, *, matrix=None, offset=None,
              order: int = 3, fill: float | None = -1024.0,
              slab: int = 8) -> np.ndarray:  # fmt: skip
    """``image`` (on ``geometry``) seen by a scanner on ``grid`` after the patient moved by
    ``y = matrix @ x + offset``: grid point q shows ``image`` at R^-1(q). B-spline of ``order``
    (3: cubic; 1: linear, e.g. for a mask), ``fill`` outside ``geometry`` (None: the image's
    edge continued, each point showing the nearest edge voxel). float32 on ``grid``.
    """
    matrix = np.eye(3) if matrix is None else np.asarray(matrix, float)
    offset = np.zeros(3) if offset is None else np.asarray(offset, float)
    inv = np.linalg.inv(matrix)
    sp = np.asarray(geometry.spacing)[:, None, None, None]
    org = np.asarray(geometry.origin)[:, None, None, None]
    src = np.asarray(image, np.float32)
    if order > 1:
        src = ndimage.spline_filter(src, order=order, output=np.float32, mode="nearest")
    hi = np.asarray(geometry.shape)[:, None, None, None] - 0.5
    out = np.empty(grid.shape, np.float32)
    for z0 in range(0, grid.shape[0], slab):
        z1 = min(grid.shape[0], z0 + slab)
        q = grid_points(grid, z0, z1)  # (3, n, Y, X)
        y = np.einsum("ij,j...->i...", inv, q - offset[:, None, None, None])
        idx = (y - org) / sp
        vals = ndimage.map_coordinates(src, idx, order=order, mode="nearest", prefilter=False)
        if fill is not None:
            vals[np.any((idx < -0.5) | (idx > hi), axis=0)] = fill
        out[z0:z1] = vals
    return out


def reacquire(pair: Pair, *, matrix=None, offset=None, grid: Geometry, noise_hu: float = 0.0,
              seed: int = 1, fill: float | None = None) -> Pair:  # fmt: skip
    """The pair's follow-up imaged again: the patient moved by ``y = matrix @ x + offset``
    (physical zyx mm) and the scan on ``grid`` (any spacing, field of view, direction).

    A point q of the new grid shows the same-grid follow-up at R^-1(q) (cubic B-spline, so a
    second interpolation after the planted warp's blurs little). Give the noise here
    (``noise_hu``) rather than in ``plant_change``, so it is not interpolated. The truth
    becomes ``R(x + u(x)) - x``.

    Where the new grid reaches past the baseline's field of view, what a scanner would show is
    unknown; by default (``fill`` None) the baseline's edge is continued there (each point
    shows the nearest edge voxel), as a real follow-up shows the anatomy that goes on past the
    baseline's last slice. Air there (``fill=-1024``) plants a flat lung-to-air interface
    where the baseline's field of view cuts the lungs, an image difference no acquisition
    makes, which the registration rightly reads as a change: on the real CT (its field of
    view cuts the lung bases), the benchmark's rigidly moved copy rendered with air had 97 %
    of its largest 5 % of log-Jacobians within 20 mm of that cut and p95 |log-Jacobian|
    0.0243; with the edge continued, 13 % and 0.0062 (2026-12).
    """
    matrix = np.eye(3) if matrix is None else np.asarray(matrix, float)
    offset = np.zeros(3) if offset is None else np.asarray(offset, float)
    g = pair.baseline_geometry
    if pair.followup_geometry != g:
        raise ValueError("reacquire: the pair's follow-up must still be on the baseline grid")
    out = render_on(pair.followup, g, grid, matrix=matrix, offset=offset, fill=fill)
    if noise_hu:
        out += _noise(np.random.default_rng(seed), out.shape, noise_hu)
    u = moved_field(pair.displacement, g, matrix, offset)
    return replace(pair, followup=out, followup_geometry=grid, displacement=u)


def moved_field(displacement, geometry: Geometry, matrix, offset) -> np.ndarray:
    """``R(x + u(x)) - x`` on ``geometry`` (float32 mm): a field after the patient moved by R."""
    matrix = np.asarray(matrix, float)
    offset = np.asarray(offset, float)
    out = np.empty(displacement.shape, np.float32)
    axes = _axes(geometry)
    for z0 in range(0, geometry.shape[0], 16):
        z1 = min(geometry.shape[0], z0 + 16)
        x = np.stack(np.meshgrid(axes[0][z0:z1], axes[1], axes[2], indexing="ij"))
        moved = np.einsum("ij,j...->i...", matrix, x + displacement[:, z0:z1])
        out[:, z0:z1] = moved + offset[:, None, None, None] - x
    return out


def cut_view(image, geometry: Geometry, lung, *, side: str, short_mm: float,
             fill: str = "air") -> tuple[np.ndarray, Geometry, Geometry]:  # fmt: skip
    """A follow-up whose field of view stops ``short_mm`` inside the lungs on one ``side``
    (:data:`CUT_SIDES`: "apex", "base", "right", "left"), as a scan with a shorter range or a
    smaller reconstruction field is. ``image`` and ``lung`` (bool) are on ``geometry`` (a
    canonical grid); ``lung`` says where the lungs end on that side.

    Past the cut (:data:`CUT_FILLS`): ``"air"`` -1024 HU or ``"padding"`` -3024 HU on the same
    grid, as a tool that writes the scan onto a larger grid leaves it, or ``"crop"``: the grid
    stops at the cut. Returns (HU float32, its grid, the part of the grid that was imaged):
    the truth of what :func:`sscflow.methods.ingest.imaged_field_of_view` should find.
    """
    if side not in CUT_SIDES:
        raise ValueError(f"cut_view: side must be one of {', '.join(CUT_SIDES)}, got {side!r}")
    if fill not in CUT_FILLS:
        raise ValueError(f"cut_view: fill must be one of {', '.join(CUT_FILLS)}, got {fill!r}")
    axis, end = CUT_SIDES[side]
    others = tuple(a for a in range(3) if a != axis)
    rows = np.flatnonzero(np.asarray(lung, bool).any(axis=others))
    if rows.size == 0:
        raise ValueError("cut_view: the lung mask is empty")
    step = int(round(short_mm / geometry.spacing[axis]))
    n = geometry.shape[axis]
    if end > 0:
        lo, hi = 0, int(rows[-1]) + 1 - step
    else:
        lo, hi = int(rows[0]) + step, n
    if not 0 <= lo < hi <= n:
        raise ValueError(f"cut_view: cutting {short_mm} mm at the {side} leaves nothing")
    box = [(0, s) for s in geometry.shape]
    box[axis] = (lo, hi)
    imaged = geometry.sub_grid(box)
    value = CUT_FILLS[fill]
    if value is None:
        sl = tuple(slice(a, b) for a, b in box)
        return np.array(image[sl], np.float32), imaged, imaged
    out = np.array(image, np.float32)
    index = [slice(None)] * 3
    index[axis] = slice(0, lo)
    out[tuple(index)] = value
    index[axis] = slice(hi, n)
    out[tuple(index)] = value
    return out, geometry, imaged
