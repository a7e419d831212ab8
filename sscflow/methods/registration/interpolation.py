"""The follow-up's resampling blur, given to the baseline as well.

``register`` resamples the follow-up onto the baseline grid (cubic B-spline) and compares it
with the baseline as it is. An interpolation at a fraction ``t`` of a voxel from the follow-up's
samples passes every frequency below half the sampling rate, but attenuates those near it:
``|H_t(w)|`` falls to ``0.69`` at the Nyquist frequency for ``t = 1/4`` and to ``0`` for
``t = 1/2`` (``t = 0``: no change). So the resampled follow-up is a little blurrier than the
baseline, and by how much changes across the lung with the fraction: after a change of scale
(another inspiration, shrinkage) it is sharp where the two grids agree (near the centre) and
blurrier towards the outline. Registration reads a blurrier outline as expansion there (see
:mod:`sscflow.methods.registration.resolution`): a follow-up that is the baseline 2 % smaller
read +0.011 too much expansion in the subpleural rind and -0.007 in the core at 4 mm, with an
exact affine; +0.005 and -0.003 with this filter (``benchmarks/NOTES.md``).

:func:`match_interpolation` filters the baseline, along each of its axes, with the zero-phase
filter of the same attenuation ``|H_t(w)|``, ``t`` the distance (0 to 1/2 voxel) from the point
the follow-up was sampled at to its nearest voxel along the follow-up's axis that runs most
along that baseline axis: each baseline voxel gets the blur its follow-up counterpart got. The
filters are 15-tap least-squares fits of ``|H_t|`` at ``t`` = 0, 1/8, ... 1/2 (the mean kept
exactly; within 0.012 of ``|H_t|`` up to 3/4 of the Nyquist frequency), blended linearly in
``t``; ``t`` = 0 is the identity, so a pair on one grid in register is left exactly as it is.
numpy (scipy) on the CPU, torch on the registration's device: the same filters. Its cost: 0.36
s on one core for a 2 mm chest (118 x 146 x 146), about 5 % of the registration.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

STEP = 0.125  # the fractions the filters are made for: 0, 1/8, ... 1/2 voxel
TERMS = 7  # cosine terms of each filter beyond the constant: 2 * TERMS + 1 taps
EXACT = 1e-6  # fractions below this (of a voxel) are none: the identity stays exact


def _bspline3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def attenuation(t: float, w: np.ndarray) -> np.ndarray:
    """``|H_t(w)|``: the amplitude response of cubic B-spline interpolation (prefiltered, as
    SimpleITK's ``sitkBSpline``) at a fraction ``t`` of a voxel, frequencies ``w`` in [0, pi].

    >>> w = np.array([0.0, np.pi / 2, np.pi])
    >>> np.round(attenuation(0.5, w), 4).tolist(), np.round(attenuation(0.0, w), 4).tolist()
    ([1.0, 0.9723, 0.0], [1.0, 1.0, 1.0])
    """
    den = (4.0 + 2.0 * np.cos(w)) / 6.0  # the sampled B-spline: what the prefilter inverts
    num = sum(_bspline3(k + t) * np.exp(-1j * w * k) for k in range(-2, 3))
    return np.abs(num / den)


@lru_cache(maxsize=1)
def kernels() -> tuple[tuple[float, ...], ...]:
    """One symmetric filter (taps, length ``2 TERMS + 1``) per fraction 0, STEP, ... 1/2: the
    least-squares fit of :func:`attenuation` over [0, pi] by a cosine series."""
    w = np.linspace(0.0, np.pi, 512)
    # K(w) = a0 + 2 sum a_m cos(m w) with K(0) = 1 (the mean kept): a0 = 1 - 2 sum a_m
    basis = np.stack([2.0 * (np.cos(m * w) - 1.0) for m in range(1, TERMS + 1)], 1)
    out = []
    for i in range(int(round(0.5 / STEP)) + 1):
        a = np.zeros(TERMS)
        if i > 0:
            a, *_ = np.linalg.lstsq(basis, attenuation(i * STEP, w) - 1.0, rcond=None)
        full = np.concatenate([[1.0 - 2.0 * a.sum()], a])
        out.append(tuple(float(v) for v in np.concatenate([full[:0:-1], full])))
    return tuple(out)


def match_resampling(fixed, moving_geometry, fixed_geometry, matrix, offset):
    """:func:`match_interpolation` for the follow-up resampled through ``y = matrix @ x +
    offset`` (physical zyx mm) from ``moving_geometry`` onto ``fixed_geometry``."""
    from sscflow.methods.registration.torch_resample import index_map

    m, b = index_map(moving_geometry, fixed_geometry, matrix, offset)
    return match_interpolation(fixed, m, b)


def _axis_of(m: np.ndarray, k: int) -> int:
    """The follow-up's index axis that runs most along the baseline's axis ``k``."""
    return int(np.argmax(np.abs(np.asarray(m, float)[:, k])))


def match_interpolation(fixed, m, b):
    """The baseline ``fixed`` (a (Z, Y, X) numpy array or torch tensor) filtered as the follow-up
    was by its resampling at follow-up indices ``M i + b`` (``M``, ``b`` from the index map of
    the resampling: baseline voxel ``i`` read the follow-up at continuous index ``M i + b``).

    >>> x = np.zeros((3, 3, 9), np.float32); x[1, 1, 4] = 1.0
    >>> half = match_interpolation(x, np.eye(3), np.array([0.0, 0.0, 0.5]))
    >>> [round(float(v), 3) for v in half[1, 1, 2:7]]  # along x the half-voxel filter; z, y alone
    [-0.094, 0.144, 0.829, 0.144, -0.094]
    >>> bool((match_interpolation(x, np.eye(3), np.zeros(3)) == x).all())
    True
    """
    m = np.asarray(m, np.float64)
    b = np.asarray(b, np.float64)
    is_torch = not isinstance(fixed, np.ndarray)
    out = fixed
    taps = kernels()
    for k in range(3):
        j = _axis_of(m, k)
        d = _distance(out, m[j], b[j], is_torch)
        if d is None:
            continue
        s = d / STEP
        acc = None
        for i, kern in enumerate(taps):
            weight = _hat(s, i, is_torch)
            if weight is None:
                continue
            f = out if i == 0 else _filter(out, k, kern, is_torch)
            acc = f * weight if acc is None else acc + f * weight
        out = acc
    return out


def _distance(like, row, offset, is_torch):
    """Per voxel, the distance (voxels, 0 to 1/2) of ``row . i + offset`` to the nearest
    integer, float32 like ``like``; None when it is below :data:`EXACT` everywhere."""
    shape = tuple(like.shape)
    if is_torch:
        import torch

        axes = [torch.arange(n, dtype=torch.float64, device=like.device) * float(row[a])
                for a, n in enumerate(shape)]  # fmt: skip
        c = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] + offset
        f = c - torch.floor(c)
        d = torch.minimum(f, 1.0 - f).float()
        d = torch.where(d < EXACT, torch.zeros_like(d), d)
        return d if bool((d > 0).any()) else None
    axes = [np.arange(n, dtype=np.float64) * row[a] for a, n in enumerate(shape)]
    c = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] + offset
    f = c - np.floor(c)
    d = np.minimum(f, 1.0 - f).astype(np.float32)
    d[d < EXACT] = 0.0
    return d if d.any() else None


def _hat(s, i, is_torch):
    """The blending weight of filter ``i`` at fraction ``s`` (in steps): 1 at ``s = i``, 0 a step
    away; None where it is 0 everywhere."""
    if is_torch:
        import torch

        w = torch.clamp(1.0 - torch.abs(s - float(i)), min=0.0)
        return w if bool((w > 0).any()) else None
    w = np.clip(1.0 - np.abs(s - np.float32(i)), 0.0, None).astype(np.float32)
    return w if w.any() else None


def _filter(x, axis: int, taps, is_torch):
    """``x`` correlated along ``axis`` with the symmetric ``taps``, the edge value continued."""
    if is_torch:
        from sscflow.methods.registration.torch_resample import correlate_nearest

        return correlate_nearest(x, axis, taps)
    from scipy import ndimage

    return ndimage.correlate1d(x, np.asarray(taps, np.float32), axis=axis, mode="nearest")
