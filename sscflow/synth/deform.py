"""The planted change between baseline and follow-up: a known smooth invertible field and density.

Convention (sscflow): fixed = baseline, moving = follow-up, ``u`` on the baseline grid with
``followup(x + u(x)) = baseline(x)``; ``log det(I + grad u) < 0`` where tissue shrinks.

Construction: ``x + u(x) = A(psi(x))`` where ``A`` is an affine map about the lung centre (global
inspiration change with log-volume change ``s``: log-scales 0.6 s, 0.2 s, 0.2 s along z, y, x,
then a rotation of at most 2 degrees and a translation of a few mm), and ``psi = exp(v)`` is the
time-1 flow of a stationary velocity field ``v`` made of radial sinks (shrinkage) or sources
(expansion) with a Gaussian divergence profile::

    v(x) = D (x - c) / r * f(r),  r = |x - c|
    f(r) = (sigma^3 / r^2) [sqrt(pi/2) erf(r / (sigma sqrt 2)) - (r / sigma) exp(-r^2 / 2 sigma^2)]
    div v = D exp(-r^2 / (2 sigma^2))

(``D < 0`` for a sink). The flow and its inverse are integrated analytically (RK4 on the exact
``v``, no interpolation) on a coarse grid and upsampled with separable cubic splines, which
reproduce the affine part exactly. Because ``det(I + grad u) = det(M) det(grad psi)`` holds for
finite differences too (they are linear), ``s`` is set from the realised local field so that the
mean true log-Jacobian inside the lung equals the planned value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.interpolate import make_interp_spline
from scipy.special import erf

from sscflow.core.geometry import Geometry, to_itk

Z_SHARE, Y_SHARE, X_SHARE = 0.6, 0.2, 0.2  # how the global log-volume change splits per axis
COARSE_MM = 6.0  # grid on which the flow is integrated (or the image spacing, if coarser)
RK4_STEPS = 2


@dataclass(frozen=True)
class Sink:
    """A radial sink (``strength`` < 0) or source (> 0); anatomy-frame mm."""

    centre: tuple[float, float, float]
    sigma: float  # mm, width of the Gaussian divergence profile
    strength: float  # divergence at the centre, 1/1 (= local log-Jacobian rate)


def velocity(points: np.ndarray, sinks: list[Sink]) -> np.ndarray:
    """Stationary velocity (mm per unit time) at ``points`` (..., 3); zero without sinks.

    >>> s = Sink((0.0, 0.0, 0.0), 20.0, -0.3)
    >>> v = velocity(np.array([[0.0, 0.0, 1.0]]), [s])
    >>> round(float(v[0, 2]), 3)  # ~ D r / 3 near the centre
    -0.1
    """
    out = np.zeros_like(points, dtype=np.float64)
    for s in sinks:
        d = points - np.asarray(s.centre)
        rho = np.sqrt((d**2).sum(axis=-1)) / s.sigma
        safe = np.maximum(rho, 1e-3)
        bracket = (
            np.sqrt(np.pi / 2) * erf(safe / np.sqrt(2)) - safe * np.exp(-0.5 * safe**2)
        ) / safe**3
        bracket = np.where(rho < 0.05, 1.0 / 3.0 - rho**2 / 10.0, bracket)
        out += s.strength * bracket[..., None] * d
    return out


def divergence_profile(points_axes, sinks: list[Sink], scale: float = 1.0) -> np.ndarray:
    """max_k exp(-r_k^2 / (2 (scale sigma_k)^2)) on the grid spanned by 1-D axes (z, y, x)."""
    z, y, x = points_axes
    out = np.zeros((z.size, y.size, x.size), np.float32)
    for s in sinks:
        var = 2.0 * (scale * s.sigma) ** 2
        gz = np.exp(-((z - s.centre[0]) ** 2) / var)[:, None, None]
        gy = np.exp(-((y - s.centre[1]) ** 2) / var)[None, :, None]
        gx = np.exp(-((x - s.centre[2]) ** 2) / var)[None, None, :]
        np.maximum(out, (gz * gy * gx).astype(np.float32), out=out)
    return out


def flow(points: np.ndarray, sinks: list[Sink], *, backward: bool = False) -> np.ndarray:
    """exp(v) (or exp(-v) when ``backward``) at ``points`` (..., 3) by RK4 on the exact v."""
    if not sinks:
        return points.copy()
    dt = (-1.0 if backward else 1.0) / RK4_STEPS
    p = points.astype(np.float64, copy=True)
    for _ in range(RK4_STEPS):
        k1 = velocity(p, sinks)
        k2 = velocity(p + 0.5 * dt * k1, sinks)
        k3 = velocity(p + 0.5 * dt * k2, sinks)
        k4 = velocity(p + dt * k3, sinks)
        p += dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return p


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    """3 x 3 rotation (acting on (z, y, x) vectors) about a unit ``axis`` by ``degrees``."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def global_matrix(log_volume: float, axis, degrees: float) -> np.ndarray:
    """M = R diag(exp(0.6 s), exp(0.2 s), exp(0.2 s)); det M = exp(s)."""
    scale = np.exp(log_volume * np.array([Z_SHARE, Y_SHARE, X_SHARE]))
    return rotation_matrix(axis, degrees) @ np.diag(scale)


def _spline_matrix(coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """(fine, coarse) float32 matrix of cubic-spline interpolation weights."""
    basis = make_interp_spline(coarse, np.eye(coarse.size), k=3)
    return basis(fine).astype(np.float32)


class _Upsampler:
    """Separable cubic-spline interpolation from a coarse grid to the image grid."""

    def __init__(self, fine_axes, step: float):
        self.coarse_axes = tuple(
            a[0] - step + step * np.arange(int(np.ceil((a[-1] - a[0]) / step)) + 3)
            for a in fine_axes
        )
        self.matrices = [
            _spline_matrix(c, f) for c, f in zip(self.coarse_axes, fine_axes, strict=True)
        ]

    def points(self) -> np.ndarray:
        """Coarse grid points, shape (nz, ny, nx, 3), anatomy frame mm."""
        return np.stack(np.meshgrid(*self.coarse_axes, indexing="ij"), axis=-1)

    def __call__(self, coarse: np.ndarray) -> np.ndarray:
        wz, wy, wx = self.matrices
        tmp = coarse.astype(np.float32) @ wx.T  # (nz, ny, X)
        tmp = np.matmul(wy, tmp)  # (nz, Y, X)
        return np.tensordot(wz, tmp, axes=(1, 0))  # (Z, Y, X)


def jacobian_determinant(displacement: np.ndarray, geometry: Geometry) -> np.ndarray:
    """det(I + grad u) by SimpleITK's DisplacementFieldJacobianDeterminant, float64 (Z, Y, X)."""
    image = to_itk(displacement, geometry)
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image))


@dataclass
class Deformation:
    """A planted deformation on a grid (all arrays (Z, Y, X) or (3, Z, Y, X), float32, mm).

    Attributes
    ----------
    displacement : u, baseline grid, ``followup(x + u(x)) = baseline(x)``
    inverse : the displacement of phi^-1 on the follow-up grid: ``y + inverse(y)`` is the
        baseline point imaged at follow-up voxel y
    log_jacobian : log det(I + grad u) of the float32 ``displacement`` (SimpleITK)
    log_volume : s, the global log-volume change (log det M)
    local_mean : mean of log det(grad psi) inside the lung truth
    min_det : smallest det(I + grad u) over the grid (> 0: no folding)
    """

    displacement: np.ndarray
    inverse: np.ndarray
    log_jacobian: np.ndarray
    log_volume: float
    local_mean: float
    min_det: float


def build_deformation(
    geometry: Geometry,
    axes,
    lung: np.ndarray,
    *,
    centre,
    sinks: list[Sink],
    planned_mean: float,
    rotation_axis=(1.0, 0.0, 0.0),
    rotation_deg: float = 0.0,
    translation=(0.0, 0.0, 0.0),
) -> Deformation:
    """Build u and phi^-1 so that the mean true log-Jacobian inside ``lung`` is ``planned_mean``.

    Parameters
    ----------
    geometry : the (isotropic) image grid
    axes : its 1-D anatomy-frame coordinates (z, y, x), mm
    lung : bool (Z, Y, X), the baseline lung truth (the mean is taken over it)
    centre : (3,) anatomy-frame mm, the fixed point of the global scaling
    sinks : local sinks / sources (empty for a stable patient)
    planned_mean : the mean log-Jacobian to reach inside the lung
    rotation_axis, rotation_deg, translation : the patient-position change (mm)

    Raises
    ------
    RuntimeError if the realised field folds (det <= 0 somewhere) or is not finite.
    """
    c = np.asarray(centre, float)
    t = np.asarray(translation, float)
    up = _Upsampler(axes, max(COARSE_MM, geometry.spacing[0]))
    pts = up.points()
    shape = (3, *geometry.shape)

    local, local_mean = None, 0.0
    if sinks:
        w = flow(pts, sinks) - pts
        local = np.stack([up(w[..., k]) for k in range(3)])
        local_mean = float(np.log(jacobian_determinant(local, geometry))[lung].mean())

    # u(x) = A(psi(x)) - x = (M - I)(x - c) + M w(x) + t, built per component
    s = float(planned_mean) - local_mean
    m = global_matrix(s, rotation_axis, rotation_deg)
    u = np.empty(shape, np.float32)
    rel = [a - ci for a, ci in zip(axes, c, strict=True)]
    views = (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])
    for k in range(3):
        acc = np.full(geometry.shape, t[k], np.float32)
        for j in range(3):
            acc += ((m[k, j] - (j == k)) * rel[j])[views[j]].astype(np.float32)
            if local is not None:
                acc += np.float32(m[k, j]) * local[j]
        u[k] = acc
    del local

    # phi^-1(y) = psi^-1(A^-1(y)) on the coarse grid, then upsampled
    q = c + (pts - c - t) @ np.linalg.inv(m).T
    back = flow(q, sinks, backward=True) - pts
    inverse = np.empty(shape, np.float32)
    for k in range(3):
        inverse[k] = up(back[..., k])

    det = jacobian_determinant(u, geometry)
    min_det = float(det.min())
    if not np.isfinite(det).all() or min_det <= 0:
        raise RuntimeError(f"planted field folds: min det(I + grad u) = {min_det:.3g}")
    return Deformation(u, inverse, np.log(det).astype(np.float32), s, local_mean, min_det)


def warp(
    image: np.ndarray,
    inverse: np.ndarray,
    geometry: Geometry,
    *,
    offset=(0, 0, 0),
    order: int = 1,
    slab: int = 32,
) -> np.ndarray:
    """Sample ``image`` at ``y + inverse(y)`` for every voxel y of ``geometry``.

    Parameters
    ----------
    image : (Z', Y', X') array on a grid with the spacing of ``geometry`` whose voxel
        ``offset`` is voxel (0, 0, 0) of ``geometry`` (a larger "world" around the scan)
    inverse : (3, Z, Y, X) float32 mm, on ``geometry``
    order : 1 linear, 3 cubic B-spline (prefiltered once; sharper, so a later linear
        resampling back to the baseline blurs less)

    Points beyond ``image`` take its nearest edge value. Returns float32 (Z, Y, X).
    """
    out = np.empty(geometry.shape, np.float32)
    Z, Y, X = geometry.shape
    sp = geometry.spacing
    iy = np.arange(Y, dtype=np.float32)[:, None]
    ix = np.arange(X, dtype=np.float32)[None, :]
    src = image.astype(np.float32, copy=False)
    if order > 1:
        src = ndimage.spline_filter(src, order=order, output=np.float32, mode="nearest")
    for z0 in range(0, Z, slab):
        z1 = min(Z, z0 + slab)
        iz = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        coords = np.stack(
            [
                iz + (offset[0] + inverse[0, z0:z1] / sp[0]),
                iy + (offset[1] + inverse[1, z0:z1] / sp[1]),
                ix + (offset[2] + inverse[2, z0:z1] / sp[2]),
            ]
        )
        ndimage.map_coordinates(
            src, coords, output=out[z0:z1], order=order, mode="nearest", prefilter=False
        )
    return out


def density_fields(
    parenchyma: np.ndarray,
    axes,
    sinks: list[Sink],
    rng: np.random.Generator,
    spacing: float,
    *,
    ild_hu: float,
    extra_hu: float,
    change_hu: float,
    fibrosis_margin: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disease density (HU, float32, baseline coordinates) at baseline and at follow-up.

    Baseline: ``ild_hu`` of interstitial density over a wide posterior-basal bump (1.6 sigma)
    plus ``extra_hu`` in the planted region; follow-up adds ``change_hu`` x bump there. The
    pattern is ground glass plus a reticular net (the zero set of band-pass noise, 1-3 mm),
    in [0.35, 1]; everything is weighted by the parenchyma fraction (no disease in vessels).
    With ``fibrosis_margin`` (the phantom's, :class:`sscflow.synth.phantom.Phantom`) and
    ``change_hu > 0`` (worsening), the dense subpleural fibrosis grows at follow-up: the lung
    up to ``min(8, change_hu / 15)`` mm deeper than its band gains +600 HU x pattern (to about
    -250 HU, reticular).

    Returns
    -------
    (baseline density, follow-up density, bump), each float32 (Z, Y, X); ``bump`` is the
    planted divergence profile max_k exp(-r_k^2 / (2 sigma_k^2)).
    """
    shape = parenchyma.shape
    white = rng.standard_normal(shape, dtype=np.float32)
    band = ndimage.gaussian_filter(white, 1.0 / spacing) - ndimage.gaussian_filter(
        white, 3.0 / spacing
    )
    band /= max(float(band.std()), 1e-6)
    pattern = (0.35 + 0.65 * np.exp(-((band / 0.6) ** 2))).astype(np.float32)
    pattern *= parenchyma
    bump = divergence_profile(axes, sinks)
    base = pattern * (ild_hu * divergence_profile(axes, sinks, 1.6) + extra_hu * bump)
    follow = base + pattern * (change_hu * bump)
    if fibrosis_margin is not None and change_hu > 0:
        grow = min(8.0, change_hu / 15.0)
        ramp = np.clip(0.5 + (grow - fibrosis_margin) / spacing, 0.0, 1.0)
        ramp *= fibrosis_margin > -0.5 * spacing  # the band itself is dense already
        follow += pattern * (600.0 * ramp).astype(np.float32)
    return base, follow, bump
