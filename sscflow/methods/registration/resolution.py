"""Each scan's blur, measured on its own lung outline, and the blur that matches the two.

Two scans of one patient are rarely equally sharp: slice thickness, reconstruction kernel and
resampling differ between visits. Registration reads a difference in blur as a change of
volume at every edge: the lung's outline of the blurrier scan looks further out, so its rind
reads as expansion and its core as shrinkage (``sscflow synth --timepoints 3`` at 4 mm, the
follow-up 0.4 voxel blurrier than its baseline: subpleural rind +0.018 against the truth, core
-0.012, whole lung unchanged; ``benchmarks/NOTES.md``). Slice thickness from the headers
(``registration.match_slices``: DICOM, a NIfTI's dcm2niix sidecar) covers one cause along one
axis, and only where both scans' headers give it.

Here the blur is measured on the pixels: the lung's outline is the one edge every chest CT has,
of known shape (a step from air-filled lung to soft tissue, hundreds of HU). Around the lung
mask's boundary, each voxel's HU against its signed distance to the boundary (mm) gives the
edge's profile; the median HU per distance bin (robust to vessels, subpleural disease and noise,
thousands of voxels per bin) is fitted with a blurred step ``a + b erf((d - c) / (sqrt 2 w))``.
``w`` (mm) is measured twice: where the outline faces along z (the diaphragm, the apices: the
slice profile) and where it faces in-plane (the chest wall: the kernel and the in-plane
resampling). What the mask's voxels and the outline's roughness add to ``w`` is about the same
in both scans (both are on the ingest grid), and blurs add in quadrature, so the sharper scan is
blurred along each axis by ``sqrt(w_blurry^2 - w_sharp^2)``, the other left alone. The
measured width grows less than a Gaussian's s.d. would along z (real CT at 2 mm, lung1 with its
5 mm slices: 2.5 mm of added z blur measured as 1.8 mm; the slice profile is a box, not a
Gaussian, and the diaphragm a dome), so the blurred scan is measured again and its blur
scaled until the two widths agree (:func:`match_blur`, :data:`REFINE` times).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DISTANCE_MM = 5.0  # the mask's smoothing that gives the distance to the outline (mm)
BAND_MM = 12.0  # the box around the lungs: the band the distances reach, and more
COARSE_MM = 2.0  # the smoothed mask's grid (block means of the mask's voxels)
MAX_POINTS = 1_000_000  # voxels near the outline looked at (every n-th along each axis)
MIN_VOXELS = 200  # per facing (z or in-plane), else that width is not measured
MIN_BIN = 20  # voxels per distance bin
MIN_BLUR_VOXELS = 0.2  # a matching blur below this (voxels of the axis) is not applied
REFINE = 2  # times the blurred scan is measured again and its blur corrected


@dataclass(frozen=True)
class Widths:
    """A scan's edge widths (Gaussian s.d., mm): where the lung's outline faces along z and
    where it faces in-plane; None where too little outline faces that way."""

    z: float | None
    inplane: float | None

    def to_dict(self) -> dict:
        return {"z_mm": _round(self.z), "inplane_mm": _round(self.inplane)}


def _round(v):
    return None if v is None else round(float(v), 3)


def edge_widths(hu: np.ndarray, lung: np.ndarray, spacing) -> Widths:
    """The scan's edge widths (:class:`Widths`) from its HU (Z, Y, X) and lung mask, both on its
    grid of ``spacing`` (z, y, x) mm (a canonical grid: z the patient's long axis).

    The signed distance to the outline comes from the mask smoothed by a Gaussian of
    :data:`DISTANCE_MM`: near a smooth outline that is ``Phi(-d / s)``, so ``d = -s
    Phi^-1(smoothed)``, continuous (no voxel steps) and one filter's cost; its gradient is the
    outline's normal.

    >>> z, y, x = np.mgrid[-40:40, -40:40, -40:40].astype(float)
    >>> ball = z * z + y * y + x * x <= 30 ** 2
    >>> from scipy import ndimage
    >>> hu = ndimage.gaussian_filter(np.where(ball, -850.0, 40.0), (3.0, 1.5, 1.5))
    >>> w = edge_widths(hu, ball, (1.0, 1.0, 1.0))
    >>> bool(2.6 < w.z < 3.4 and 1.3 < w.inplane < 1.7)  # the blur: 3.0 along z, 1.5 in-plane
    True
    """
    from scipy import ndimage, special

    lung = np.asarray(lung, bool)
    if not lung.any():
        return Widths(None, None)
    sp = np.asarray(spacing, float)
    # the lungs' box and the band around it
    idx = [np.flatnonzero(lung.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
    pad = np.ceil((BAND_MM + 3 * DISTANCE_MM) / sp).astype(int)
    box = tuple(slice(max(0, int(i[0]) - p), min(n, int(i[-1]) + 1 + p))
                for i, p, n in zip(idx, pad, lung.shape, strict=True))  # fmt: skip
    # the smoothed mask on a grid of about COARSE_MM (block means of the mask): a 5 mm Gaussian
    # needs no finer one, and a 1 mm scan would spend seconds on it
    f = np.maximum(1, np.round(COARSE_MM / sp).astype(int))
    m = lung[box]
    shape = [-(-n // k) * k for n, k in zip(m.shape, f, strict=True)]
    grown = np.zeros(shape, np.float32)
    grown[: m.shape[0], : m.shape[1], : m.shape[2]] = m
    coarse = grown.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1],
                           shape[2] // f[2], f[2]).mean(axis=(1, 3, 5))  # fmt: skip
    csp = sp * f
    soft = ndimage.gaussian_filter(coarse, DISTANCE_MM / csp, mode="constant")
    grads = np.gradient(soft, *csp)
    # the voxels near the outline (every ``stride``-th along each axis past MAX_POINTS)
    near = (soft > 0.005) & (soft < 0.995)
    for axis, k in enumerate(f):
        near = np.repeat(near, k, axis=axis) if k > 1 else near
    near = near[: m.shape[0], : m.shape[1], : m.shape[2]]
    stride = max(1, int(np.ceil((np.count_nonzero(near) / MAX_POINTS) ** (1 / 3))))
    where = tuple(i * stride for i in np.nonzero(near[::stride, ::stride, ::stride]))
    if (f == 1).all():
        value = soft[where]
        grad = [g[where] for g in grads]
    else:
        at = [(i + 0.5) / k - 0.5 for i, k in zip(where, f, strict=True)]  # coarse index
        value = ndimage.map_coordinates(soft, at, order=1, mode="nearest")
        grad = [ndimage.map_coordinates(g, at, order=1, mode="nearest") for g in grads]
    keep = (value > 0.01) & (value < 0.99)  # within about 2.3 s.d. of the outline
    where = tuple(i[keep] for i in where)
    d = -DISTANCE_MM * special.ndtri(value[keep].astype(np.float64))
    grad = [g[keep] for g in grad]
    norm = np.sqrt(sum(g * g for g in grad))
    facing_z = np.abs(grad[0]) / np.maximum(norm, 1e-12)
    h = np.asarray(hu[box], np.float32)[where]
    widths, mix = [], []
    for sel in (facing_z > 0.8, facing_z < 0.3):
        widths.append(_fit_width(d[sel], h[sel], float(sp.mean())) if sel.sum() >= MIN_VOXELS
                      else None)  # fmt: skip
        mix.append(float(np.mean(facing_z[sel] ** 2)) if sel.any() else 0.0)
    return _per_axis(widths, mix)


def _per_axis(widths, mix) -> Widths:
    """Each facing's width is the blur along the outline's normal, a mix of both axes' blurs:
    ``w^2 = c sz^2 + (1 - c) sxy^2``, ``c`` the facing's mean squared z-component of the normal
    (about 0.9 and 0.03). Both facings measured: the two equations solved for ``sz`` and
    ``sxy``; one: its width taken for its axis."""
    (wz, wxy), (cz, cxy) = widths, mix
    if wz is None or wxy is None:
        return Widths(wz, wxy)
    det = cz * (1 - cxy) - cxy * (1 - cz)
    if abs(det) < 0.3:
        return Widths(wz, wxy)
    sz2 = (wz**2 * (1 - cxy) - wxy**2 * (1 - cz)) / det
    sxy2 = (cz * wxy**2 - cxy * wz**2) / det
    if sz2 <= 0 or sxy2 <= 0:
        return Widths(wz, wxy)
    return Widths(float(np.sqrt(sz2)), float(np.sqrt(sxy2)))


def _fit_width(d: np.ndarray, v: np.ndarray, voxel: float) -> float | None:
    """The width ``w`` (mm) of a blurred step fitted to the median of ``v`` per bin of ``d``."""
    from scipy import optimize, special

    step = max(0.25 * voxel, 0.25)
    key = np.round(d / step).astype(np.int64)
    order = np.argsort(key, kind="stable")
    key, v = key[order], v[order]
    edges = np.flatnonzero(np.diff(key)) + 1
    groups = np.split(v, edges)
    keys = key[np.r_[0, edges]]
    keep = [i for i, g in enumerate(groups) if g.size >= MIN_BIN]
    if len(keep) < 6:
        return None
    x = keys[keep] * step
    y = np.array([np.median(groups[i]) for i in keep])
    n = np.array([groups[i].size for i in keep], float)

    def model(x, a, b, c, w):
        return a + b * special.erf((x - c) / (np.sqrt(2.0) * np.abs(w) + 1e-6))

    lo, hi = float(np.median(y[x < 0])) if (x < 0).any() else y.min(), \
        float(np.median(y[x > 0])) if (x > 0).any() else y.max()  # fmt: skip
    try:
        p, _ = optimize.curve_fit(model, x, y, p0=[(lo + hi) / 2, (hi - lo) / 2, 0.0, 2.0],
                                  sigma=1.0 / np.sqrt(n), maxfev=4000)  # fmt: skip
    except (RuntimeError, ValueError):
        return None
    w = abs(float(p[3]))
    # a step of the wrong sign (no lung-to-tissue edge) or a width past the band is no measure
    if not (p[1] > 0 and 0.05 < w < 2.0 * DISTANCE_MM):
        return None
    return w


def matching_blur(fixed: Widths, moving: Widths, spacing) -> tuple[list[float], list[float]]:
    """The extra Gaussian s.d. (mm, per axis z, y, x) for the fixed and for the moving scan that
    give the sharper one the blurrier one's edge width, axis by axis (z from the z-facing
    outline, y and x from the in-plane one); 0 where a width is unmeasured or the blur would be
    below :data:`MIN_BLUR_VOXELS` voxels.

    >>> matching_blur(Widths(2.0, 1.0), Widths(2.5, 1.0), (1.0, 1.0, 1.0))
    ([1.5, 0.0, 0.0], [0.0, 0.0, 0.0])
    """
    f_extra, m_extra = [0.0] * 3, [0.0] * 3
    for axes, a, b in (((0,), fixed.z, moving.z), ((1, 2), fixed.inplane, moving.inplane)):
        if a is None or b is None:
            continue
        blur = float(np.sqrt(abs(b * b - a * a)))
        for k in axes:
            if blur < MIN_BLUR_VOXELS * float(spacing[k]):
                continue
            (f_extra if b > a else m_extra)[k] = blur
    return f_extra, m_extra


def match_blur(fixed_hu, fixed_lung, fixed_spacing, moving_hu, moving_lung, moving_spacing):
    """Both scans' widths and the blur (mm, z y x) each is given (:func:`matching_blur`), the
    blurred one measured again after its blur and the blur corrected, :data:`REFINE` times.

    Returns ``(fixed widths, moving widths, fixed blur, moving blur)``.
    """
    from scipy import ndimage

    wf = edge_widths(fixed_hu, fixed_lung, fixed_spacing)
    wm = edge_widths(moving_hu, moving_lung, moving_spacing)
    blur_f, blur_m = matching_blur(wf, wm, fixed_spacing)
    sides = ((fixed_hu, fixed_lung, fixed_spacing, wf, wm, blur_f),
             (moving_hu, moving_lung, moving_spacing, wm, wf, blur_m))
    for hu, lung, spacing, own, other, blur in sides:
        for _ in range(REFINE):
            if not any(blur):
                break
            sigma = [b / float(s) for b, s in zip(blur, spacing, strict=True)]
            got = edge_widths(ndimage.gaussian_filter(np.asarray(hu, np.float32), sigma), lung,
                              spacing)  # fmt: skip
            for axes, w0, want, now in (((0,), own.z, other.z, got.z),
                                        ((1, 2), own.inplane, other.inplane, got.inplane)):
                if not blur[axes[0]] or now is None:
                    continue
                # the measured excess (variance) against the one wanted: the blur scaled by
                # its square root, at most doubled per step
                have, need = now * now - w0 * w0, want * want - w0 * w0
                scale = min(2.0, float(np.sqrt(need / have))) if have > 0 else 2.0
                for k in axes:
                    blur[k] *= scale
    return wf, wm, blur_f, blur_m
