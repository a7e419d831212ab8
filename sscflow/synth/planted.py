"""Known changes planted into a real CT: a longitudinal pair whose answer is known.

A real scan cannot say how far its lung moved; a real scan with a planted change can. Tests and
benchmarks use this on ``../shared/data/lung1_image.nrrd``:

- :func:`plant_change`: a follow-up in the baseline's frame, ``followup(x + u(x)) = baseline(x) +
  density(x) + noise``, with posterior-basal sinks (shrinkage) in each lung, a global volume
  change and a fibrosis-like density rise where the lung shrinks (``sscflow.synth.deform``);
- :func:`plant_disease`: the same with the shrinkage at any of :data:`PLACES` (posterior-basal,
  apical, anterior, lateral, or one lobe-like region), any width, and a textured density rise
  whose mean in the planted region is exactly the one asked for (0, +180, +450 HU ...), with
  honeycomb cysts (air, 2-6 mm) in its densest part when asked (:func:`textured_rise`);
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

__all__ = ["CUT_FILLS", "CUT_SIDES", "PLACES", "Pair", "acquisition_grid", "cut_view",
           "lung_sinks", "moved_field", "place_sinks", "plant_change", "plant_disease",
           "reacquire", "render_on", "textured_rise"]

#: where a follow-up's field of view may stop short: the axis (z, y, x) and the end (+1: the high
#: end) in LPS (z towards the head, x towards the patient's left)
CUT_SIDES = {"apex": (0, +1), "base": (0, -1), "right": (2, -1), "left": (2, +1)}
#: what lies past the cut: air, a scanner's padding value, or nothing (the grid ends there)
CUT_FILLS = {"air": -1024.0, "padding": -3024.0, "crop": None}
AIR_HU = -1000.0  # what a honeycomb cyst holds
PLACES = ("posterior-basal", "apical", "anterior", "lateral", "right-lower", "left-upper",
          "right-upper", "left-lower")  # fmt: skip


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
    density: np.ndarray | None = None  # HU added before the warp, baseline grid (plant_disease)
    cysts: np.ndarray | None = None  # bool, honeycomb cysts (air at follow-up), baseline grid
    sinks: tuple = ()  # the planted deform.Sink's, scaled; the global log-volume is log_volume
    log_volume: float = 0.0  # s, the global part: log det of the affine map


def _axes(geometry: Geometry):
    return [geometry.origin[k] + np.arange(n) * geometry.spacing[k]
            for k, n in enumerate(geometry.shape)]  # fmt: skip


def _lung_points(lung, geometry: Geometry) -> np.ndarray:
    """Physical (z, y, x) mm of every lung voxel, (n, 3)."""
    axes = _axes(geometry)
    idx = np.argwhere(np.asarray(lung, bool))
    return np.stack([axes[k][idx[:, k]] for k in range(3)], axis=1)


def lung_sinks(lung, geometry: Geometry, *, sigma_mm: float = 22.0, strength: float = -0.35):
    """One sink per lung in its posterior, inferior part (the lung's own 30 % extremes)."""
    lung = np.asarray(lung, bool)
    pts = _lung_points(lung, geometry)
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


def _lobe(p: np.ndarray, upper: bool) -> np.ndarray:
    """Points of one lung above (``upper``) or below an oblique plane standing for the major
    fissure: at 15 % of the lung's height at its front, 75 % at its back (fractions of the
    lung's own z and y extents, so of the imaged part when the scan cuts it)."""
    zn = (p[:, 0] - p[:, 0].min()) / max(np.ptp(p[:, 0]), 1e-6)
    yn = (p[:, 1] - p[:, 1].min()) / max(np.ptp(p[:, 1]), 1e-6)
    below = zn < 0.15 + 0.6 * yn
    return p[~below] if upper else p[below]


def place_sinks(lung, geometry: Geometry, place: str = "posterior-basal", *,
                sigma_mm: float = 22.0, strength: float = -0.35) -> list[deform.Sink]:  # fmt: skip
    """Sinks (shrinkage, ``strength`` < 0) of width ``sigma_mm`` at ``place``, from the lung
    mask in physical (z, y, x) mm, LPS: z towards the head, y towards the back, x towards the
    patient's left (so the right lung is the part below the median x).

    Each selection uses the lung's own percentiles, so it follows the patient's anatomy and
    the grid does not matter:

    - ``posterior-basal``: :func:`lung_sinks` (z at most its 30th percentile, y at least its
      70th), one sink per lung;
    - ``apical``: the upper fifth of each lung's volume (z at least its 80th percentile);
    - ``anterior``: y at most its 30th percentile, at mid height (z between its 30th and 70th);
    - ``lateral``: the 30 % of each lung farthest from the midline, at mid height;
    - ``right-lower``, ``right-upper``, ``left-lower``, ``left-upper``: one sink, in one lung,
      at the centroid of a lobe-like part below or above an oblique plane standing for the
      major fissure (:func:`_lobe`; right-upper includes the middle lobe).

    A sink sits at its selection's centroid, or at the selection's point nearest to it when the
    centroid is not lung (a curved selection).
    """
    if place not in PLACES:
        raise ValueError(f"place {place!r}: choose one of {', '.join(PLACES)}")
    if place == "posterior-basal":
        return lung_sinks(lung, geometry, sigma_mm=sigma_mm, strength=strength)
    lung = np.asarray(lung, bool)
    pts = _lung_points(lung, geometry)
    mid_x = np.median(pts[:, 2])
    sides = {"right": pts[pts[:, 2] < mid_x], "left": pts[pts[:, 2] >= mid_x]}
    selections = []
    if "-" in place and place.split("-")[0] in sides:  # a lobe
        side, part = place.split("-")
        selections.append(_lobe(sides[side], part == "upper"))
    else:
        for p in sides.values():
            if len(p) < 100:
                continue
            z30, z70 = np.percentile(p[:, 0], [30, 70])
            mid = (p[:, 0] >= z30) & (p[:, 0] <= z70)
            if place == "apical":
                sel = p[:, 0] >= np.percentile(p[:, 0], 80)
            elif place == "anterior":
                sel = mid & (p[:, 1] <= np.percentile(p[:, 1], 30))
            else:  # lateral
                far = np.abs(p[:, 2] - mid_x)
                sel = mid & (far >= np.percentile(far, 70))
            selections.append(p[sel])
    axes = _axes(geometry)
    sinks = []
    for sel in selections:
        if len(sel) == 0:
            continue
        centre = sel.mean(axis=0)
        index = tuple(int(np.clip(np.rint((c - a[0]) / (a[1] - a[0])), 0, a.size - 1))
                      for c, a in zip(centre, axes, strict=True))  # fmt: skip
        if not lung[index]:
            centre = sel[np.argmin(((sel - centre) ** 2).sum(axis=1))]
        sinks.append(deform.Sink(tuple(float(c) for c in centre), float(sigma_mm), float(strength)))
    return sinks


def _honeycomb(weight, where, spacing, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Air-filled cysts: balls of radius drawn uniformly in 1-3 mm (2-6 mm across), centred in
    the densest half of ``weight`` over ``where`` and kept inside ``where``, added until they
    fill ``fraction`` of ``where``. Bool, the grid of ``weight``."""
    holes = np.zeros(where.shape, bool)
    w = weight[where]
    if not w.size or fraction <= 0:
        return holes
    centres = np.argwhere(where & (weight >= np.median(w)))
    want = fraction * int(where.sum())
    sp = np.asarray(spacing, float)
    shape = np.asarray(where.shape)
    filled = 0
    for i in rng.permutation(len(centres)):
        if filled >= want:
            break
        c = centres[i]
        radius = rng.uniform(1.0, 3.0)
        if holes[tuple(c)]:
            continue
        k = np.floor(radius / sp).astype(int)
        lo, hi = np.maximum(c - k, 0), np.minimum(c + k + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        g = np.ogrid[box]
        d2 = sum(((gi - ci) * s) ** 2 for gi, ci, s in zip(g, c, sp, strict=True))
        ball = (d2 <= radius**2) & where[box] & ~holes[box]
        holes[box] |= ball
        filled += int(ball.sum())
    return holes


def textured_rise(hu, lung, geometry: Geometry, sinks, rng: np.random.Generator, rise_hu: float,
                  *, cysts: float = 0.0, cap_hu: float = 0.0):  # fmt: skip
    """The density added where ``sinks`` shrink the lung: (HU float32, cyst mask bool), on the
    baseline grid, before the warp.

    The texture is :func:`sscflow.synth.deform.density_fields`'s (ground glass plus a reticular
    net from band-pass noise, 1-3 mm, in [0.35, 1]) times the sinks' divergence profile, on
    the parenchyma only (lung below -500 HU: no disease in vessels), scaled so that the mean
    rise over the planted region (lung where the profile exceeds 0.5, :class:`Pair`'s
    ``region``) is exactly ``rise_hu``. No voxel rises above ``cap_hu`` (soft tissue), so a
    large rise spreads rather than saturating a few voxels. ``cysts`` > 0 turns that fraction of
    the region's parenchyma into honeycombing (:func:`_honeycomb`): air (-1000 HU) in the
    densest half; the cysts count in the mean, the rest of the region makes up for them.

    Raises ValueError when no sink reaches the lung or ``rise_hu`` needs more than the cap.
    """
    from scipy.optimize import brentq

    hu = np.asarray(hu, np.float32)
    lung = np.asarray(lung, bool)
    parenchyma = lung & (hu < -500)
    _, weight, bump = deform.density_fields(parenchyma.astype(np.float32), _axes(geometry),
                                            sinks, rng, geometry.spacing[0], ild_hu=0.0,
                                            extra_hu=0.0, change_hu=1.0)  # fmt: skip
    region = lung & (bump > 0.5)
    if not region.any():
        raise ValueError("textured_rise: the sinks' region holds no lung")
    holes = _honeycomb(weight, region & parenchyma, geometry.spacing, rng, cysts)
    room = np.maximum(np.float32(cap_hu) - hu, 0.0).astype(np.float32)
    air = (np.float32(AIR_HU) - hu).astype(np.float32)
    w_r, room_r, hole_r, air_r = weight[region], room[region], holes[region], air[region]

    def mean_rise(a: float) -> float:
        return float(np.where(hole_r, air_r, np.minimum(a * w_r, room_r)).mean(dtype=np.float64))

    top = float(np.where(hole_r, air_r, np.where(w_r > 0, room_r, 0.0)).mean(dtype=np.float64))
    if rise_hu > top - 1e-3:
        raise ValueError(f"textured_rise: a mean rise of {rise_hu:g} HU needs more than the "
                         f"{cap_hu:g} HU cap allows ({top:.0f} HU at most)")  # fmt: skip
    if rise_hu <= mean_rise(0.0):
        scale = 0.0
    else:
        hi = max(rise_hu, 1.0) / max(float(w_r.mean()), 1e-6)
        while mean_rise(hi) < rise_hu:
            hi *= 2.0
        scale = brentq(lambda a: mean_rise(a) - rise_hu, 0.0, hi, xtol=1e-9, rtol=1e-12)
    out = np.minimum(np.float32(scale) * weight, room)
    out[holes] = air[holes]
    return out.astype(np.float32), holes


def _plant(hu, geometry: Geometry, lung, sinks, density, *, seed, region_logjac,
           global_log_volume, noise_hu) -> Pair:  # fmt: skip
    """The shared recipe: the sinks scaled once so the region's mean local log-Jacobian is
    ``region_logjac``, the global part on top, ``density(rng, hu, lung, axes, sinks)`` ->
    (HU, cysts or None) added before the warp, then noise."""
    rng = np.random.default_rng(seed)
    hu = np.asarray(hu, np.float32)
    lung = np.asarray(lung, bool)
    axes = _axes(geometry)
    idx = np.argwhere(lung)
    centre = np.array([axes[k][idx[:, k]].mean() for k in range(3)])
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

    dens, holes = density(rng, hu, lung, axes, sinks)
    follow = deform.warp(hu + dens, field.inverse, geometry, order=3)
    follow += _noise(rng, follow.shape, noise_hu)
    return Pair(hu, geometry, follow, geometry, lung, field.displacement, field.log_jacobian,
                region, dens, holes, tuple(sinks), field.log_volume)  # fmt: skip


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
    region_logjac : the mean true log-Jacobian wanted in the planted region (0: no sinks),
        before the global part (the region's true mean is about this + ``global_log_volume``)
    global_log_volume : the global log-volume change (inspiration), ~ -0.02 for 2 % less
    density_hu : the peak of the fibrosis-like rise in the shrinking region (textured,
        ``deform.density_fields``): its mean in the region is far less (on the real CT at
        2 mm, 150 gives +59 HU); :func:`plant_disease` sets the mean itself
    noise_hu : independent noise added to the follow-up

    Returns
    -------
    Pair with the follow-up on the baseline grid.
    """
    lung = np.asarray(lung, bool)
    sinks = lung_sinks(lung, geometry, sigma_mm=sigma_mm) if region_logjac else []

    def density(rng, hu, lung, axes, sinks):
        if not (sinks and density_hu):
            return np.zeros_like(hu), None
        parenchyma = (lung & (hu < -500)).astype(np.float32)
        _, dens, _ = deform.density_fields(parenchyma, axes, sinks, rng, geometry.spacing[0],
                                           ild_hu=0.0, extra_hu=0.0,
                                           change_hu=float(density_hu))  # fmt: skip
        return dens, None

    return _plant(hu, geometry, lung, sinks, density, seed=seed, region_logjac=region_logjac,
                  global_log_volume=global_log_volume, noise_hu=noise_hu)  # fmt: skip


def plant_disease(
    hu,
    geometry: Geometry,
    lung,
    *,
    place: str = "posterior-basal",
    sigma_mm: float = 22.0,
    region_logjac: float = -0.24,
    rise_hu: float = 180.0,
    cysts: float = 0.0,
    cap_hu: float = 0.0,
    seed: int = 0,
    global_log_volume: float = -0.02,
    noise_hu: float = 15.0,
) -> Pair:
    """A follow-up of ``hu`` with shrinkage at ``place`` and a textured density rise there.

    Parameters
    ----------
    place, sigma_mm : where the sinks sit (:func:`place_sinks`, :data:`PLACES`) and their
        width (mm, the Gaussian divergence profile's s.d.; the region is the lung within about
        1.18 ``sigma_mm`` of a sink)
    region_logjac : the strength: the mean local log-Jacobian wanted in the planted region (the
        region's true mean is about this + ``global_log_volume``; 0: no sinks, no rise)
    rise_hu, cysts, cap_hu : the density rise (:func:`textured_rise`): its exact mean over the
        region before the warp (HU), the fraction of the region's parenchyma made honeycomb
        cysts (air), the highest HU a voxel reaches
    seed : the texture, the cysts and the noise

    Returns
    -------
    Pair on the baseline grid, with ``density`` (the rise, baseline grid) and ``cysts``.
    """
    lung = np.asarray(lung, bool)
    sinks = place_sinks(lung, geometry, place, sigma_mm=sigma_mm) if region_logjac else []

    def density(rng, hu, lung, axes, sinks):
        if not sinks or (not rise_hu and not cysts):
            return np.zeros_like(hu), np.zeros(hu.shape, bool)
        return textured_rise(hu, lung, geometry, sinks, rng, rise_hu, cysts=cysts,
                             cap_hu=cap_hu)  # fmt: skip

    return _plant(hu, geometry, lung, sinks, density, seed=seed, region_logjac=region_logjac,
                  global_log_volume=global_log_volume, noise_hu=noise_hu)  # fmt: skip


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
                     offset=None, phase=None) -> Geometry:  # fmt: skip
    """A scanner's grid for the moved patient: the lung's bounding box after the motion
    ``y = matrix @ x + offset``, grown by ``margin_mm`` (below the bases, above the apices;
    negative cuts into the lung) and ``inplane_margin_mm`` (or the whole body's extent, when
    larger), with ``spacing`` (z, y, x) mm and ITK ``direction``. ``phase`` (three fractions
    of a voxel, grid axis order) moves the grid's start back by that much: a scanner's voxels
    have no relation to ``geometry``'s lattice (without it, a patient who did not move on a
    grid of the identity direction starts on that lattice in-plane)."""
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
    if phase is not None:
        start = start - np.asarray(phase, float) * sp
    n = np.floor((proj.max(axis=0) - start) / sp).astype(int) + 1
    origin = cols.T @ start  # physical zyx of voxel 0
    return Geometry(tuple(int(v) for v in n), tuple(sp), tuple(origin),
                    tuple(tuple(r) for r in d))  # fmt: skip


def render_on(image, geometry: Geometry, grid: Geometry, *, matrix=None, offset=None,
              order: int = 3, fill: float | None = -1024.0, inverse=None,
              frame: Geometry | None = None, slab: int = 8) -> np.ndarray:  # fmt: skip
    """``image`` (on ``geometry``) seen by a scanner on ``grid`` after the patient moved by
    ``y = matrix @ x + offset``: grid point q shows ``image`` at R^-1(q). B-spline of ``order``
    (3: cubic; 1: linear, e.g. for a mask), ``fill`` outside ``geometry`` (None: the image's
    edge continued, each point showing the nearest edge voxel). float32 on ``grid``.

    With ``inverse`` ((3, Z, Y, X) mm on ``frame``, a grid of ``geometry``'s spacing) the
    anatomy changed too: q shows ``image`` at ``y + inverse(y)``, y = R^-1(q) (the change and
    the scanner composed, one interpolation of ``image``); ``fill`` then applies outside
    ``frame``.
    """
    matrix = np.eye(3) if matrix is None else np.asarray(matrix, float)
    offset = np.zeros(3) if offset is None else np.asarray(offset, float)
    frame = geometry if frame is None else frame
    inv = np.linalg.inv(matrix)
    sp = np.asarray(geometry.spacing)[:, None, None, None]
    org = np.asarray(geometry.origin)[:, None, None, None]
    f_org = np.asarray(frame.origin)[:, None, None, None]
    src = np.asarray(image, np.float32)
    if order > 1:
        src = ndimage.spline_filter(src, order=order, output=np.float32, mode="nearest")
    hi = np.asarray(frame.shape)[:, None, None, None] - 0.5
    out = np.empty(grid.shape, np.float32)
    for z0 in range(0, grid.shape[0], slab):
        z1 = min(grid.shape[0], z0 + slab)
        q = grid_points(grid, z0, z1)  # (3, n, Y, X)
        y = np.einsum("ij,j...->i...", inv, q - offset[:, None, None, None])
        at = (y - f_org) / sp  # the frame's voxels
        if inverse is not None:
            y = y + np.stack([ndimage.map_coordinates(inverse[k], at, order=1, mode="nearest")
                              for k in range(3)])  # fmt: skip
        idx = at if frame is geometry and inverse is None else (y - org) / sp
        vals = ndimage.map_coordinates(src, idx, order=order, mode="nearest", prefilter=False)
        if fill is not None:
            vals[np.any((at < -0.5) | (at > hi), axis=0)] = fill
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
