"""The per-voxel kernel: log det(I + grad u) with central differences, fused in one pass (numba).

Both entry points compute ``out[i, j, k]`` from ``u[:, i + oz, j + oy, k + ox]`` and its six
neighbours. A neighbour index outside ``u`` is clamped to the nearest voxel, which is ITK's
zero-flux Neumann boundary: at an outer face the difference is ``(u[1] - u[0]) / (2 h)``.

- ``log_jacobian_parallel`` spreads the slices over numba's threads (``prange``): the numpy path.
- ``log_jacobian_serial`` runs on the calling thread and releases the GIL: the dask path, where
  dask's threads give the parallelism (numba's thread pool is not safe to enter from several
  threads at once with every threading layer).

Arithmetic is float64 with fastmath off; the result is rounded to float32 once. A row is done in
three loops that LLVM can vectorise: the determinant into a row buffer, then the log by the series
log d = 2 atanh(s), s = (d - 1) / (d + 1), which for 0.5 <= d <= 2 is within 2e-14 (relative) of
``np.log`` and needs no call, then a scalar pass for the rare determinants outside that range
(``np.log``) and for folding. Compiled code is cached next to this file (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_MAX = np.finfo(np.float64).max
_SERIES_LO, _SERIES_HI = 0.5, 2.0
_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")


@njit(**_JIT)
def _det_row(u, det, z, zm, zp, y, ym, yp, ox, k0, k1, edge, wz, wy, wx):
    """det[k] for k in [k0, k1); ``edge`` clamps the x neighbours (the first and last voxel)."""
    nx = u.shape[3]
    for k in range(k0, k1):
        x = k + ox
        xm, xp = x - 1, x + 1
        if edge:
            xm, xp = max(xm, 0), min(xp, nx - 1)
        # J[r, c] = delta_rc + d u_r / d axis_c; component r is along array axis r
        j00 = 1.0 + (np.float64(u[0, zp, y, x]) - np.float64(u[0, zm, y, x])) * wz
        j01 = (np.float64(u[0, z, yp, x]) - np.float64(u[0, z, ym, x])) * wy
        j02 = (np.float64(u[0, z, y, xp]) - np.float64(u[0, z, y, xm])) * wx
        j10 = (np.float64(u[1, zp, y, x]) - np.float64(u[1, zm, y, x])) * wz
        j11 = 1.0 + (np.float64(u[1, z, yp, x]) - np.float64(u[1, z, ym, x])) * wy
        j12 = (np.float64(u[1, z, y, xp]) - np.float64(u[1, z, y, xm])) * wx
        j20 = (np.float64(u[2, zp, y, x]) - np.float64(u[2, zm, y, x])) * wz
        j21 = (np.float64(u[2, z, yp, x]) - np.float64(u[2, z, ym, x])) * wy
        j22 = 1.0 + (np.float64(u[2, z, y, xp]) - np.float64(u[2, z, y, xm])) * wx
        det[k] = (j00 * (j11 * j22 - j12 * j21)
                  - j01 * (j10 * j22 - j12 * j20)
                  + j02 * (j10 * j21 - j11 * j20))


@njit(**_JIT)
def _row(u, out, det, i, j, oz, oy, ox, wz, wy, wx, floor, log_floor):
    """One output row ``out[i, j, :]``; w* are 1 / (2 h) per axis; ``det`` is a scratch row."""
    nz, ny = u.shape[1], u.shape[2]
    z, y = i + oz, j + oy
    zm, zp = max(z - 1, 0), min(z + 1, nz - 1)
    ym, yp = max(y - 1, 0), min(y + 1, ny - 1)
    n = out.shape[2]
    lo = min(1, n)
    hi = max(lo, n - 1)
    _det_row(u, det, z, zm, zp, y, ym, yp, ox, 0, lo, True, wz, wy, wx)
    _det_row(u, det, z, zm, zp, y, ym, yp, ox, lo, hi, False, wz, wy, wx)
    _det_row(u, det, z, zm, zp, y, ym, yp, ox, hi, n, True, wz, wy, wx)
    for k in range(n):  # log by the atanh series (Horner, 13 terms), no calls: vectorised
        d = det[k]
        s = (d - 1.0) / (d + 1.0)
        s2 = s * s
        p = 1.0 / 25.0
        p = p * s2 + 1.0 / 23.0
        p = p * s2 + 1.0 / 21.0
        p = p * s2 + 1.0 / 19.0
        p = p * s2 + 1.0 / 17.0
        p = p * s2 + 1.0 / 15.0
        p = p * s2 + 1.0 / 13.0
        p = p * s2 + 1.0 / 11.0
        p = p * s2 + 1.0 / 9.0
        p = p * s2 + 1.0 / 7.0
        p = p * s2 + 1.0 / 5.0
        p = p * s2 + 1.0 / 3.0
        p = p * s2 + 1.0
        out[i, j, k] = np.float32(2.0 * s * p)
    for k in range(n):  # outside the series' range: np.log, or the floor when folded
        d = det[k]
        if not (_SERIES_LO <= d <= _SERIES_HI):
            if d > floor and d <= _MAX:  # NaN and inf (a broken field) also go to the floor
                out[i, j, k] = np.float32(np.log(d))
            else:
                out[i, j, k] = log_floor


@njit(parallel=True, **_JIT)
def log_jacobian_parallel(u, out, oz, oy, ox, wz, wy, wx, floor, log_floor):
    ny, nx = out.shape[1], out.shape[2]
    for i in prange(out.shape[0]):
        det = np.empty(nx, np.float64)
        for j in range(ny):
            _row(u, out, det, i, j, oz, oy, ox, wz, wy, wx, floor, log_floor)


@njit(**_JIT)
def log_jacobian_serial(u, out, oz, oy, ox, wz, wy, wx, floor, log_floor):
    ny, nx = out.shape[1], out.shape[2]
    det = np.empty(nx, np.float64)
    for i in range(out.shape[0]):
        for j in range(ny):
            _row(u, out, det, i, j, oz, oy, ox, wz, wy, wx, floor, log_floor)
