"""Summary of a log-Jacobian map inside a mask: mean, exact median and percentiles, folding.

For a dask map the summary streams: memory is set by the block size, not the volume. Quantiles
are exact (numpy's default 'linear' method) by a two-pass radix select on the float32 bit
patterns: pass 1 counts values per top-16-bit bucket (and sums, counts folded voxels), pass 2
counts the low 16 bits inside only the buckets that hold the wanted ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sscflow.methods.jacobian.core import DEFAULT_FLOOR, log_floor

DEFAULT_PERCENTILES = (5.0, 25.0, 75.0, 95.0)
_BITS = 16
_BINS = 1 << _BITS
_SIGN = np.uint32(0x80000000)


def summarize(
    log_jac,
    mask=None,
    *,
    floor: float = DEFAULT_FLOOR,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict:
    """Mean, median, percentiles and folding of a log-Jacobian map, inside ``mask``.

    Parameters
    ----------
    log_jac : numpy or dask float32 array, e.g. from ``log_jacobian``; NaN marks voxels that
        were not measured (outside the follow-up's field of view): they are left out
    mask : numpy or dask array of the same shape, nonzero inside; None for every voxel
    floor : the floor ``log_jacobian`` used; voxels at ``log_floor(floor)`` or below count as
        folded
    percentiles : in [0, 100]; reported as keys ``p5``, ``p25``, ...

    Returns
    -------
    dict of plain numbers: ``voxels`` (measured, inside the mask), ``unmeasured`` (NaN inside
    the mask), ``measured_fraction``, ``mean``, ``median``, ``p<q>``,
    ``folded`` and ``folded_fraction`` (inside the mask), ``folded_total`` and
    ``folded_total_fraction`` (whole map), ``floor``, ``log_floor``.

    Raises
    ------
    ValueError when the mask's shape differs, the mask selects no measured voxel, or a
    percentile is outside [0, 100].

    Examples
    --------
    >>> import numpy as np
    >>> lj = np.array([[[-0.2, 0.0, 0.1, 0.3]]], np.float32)
    >>> s = summarize(lj, lj > -1, percentiles=[50])
    >>> print(s["voxels"], round(s["mean"], 4), round(s["median"], 4), s["folded"])
    4 0.05 0.05 0
    """
    qs = [float(q) for q in percentiles]
    if not all(0.0 <= q <= 100.0 for q in qs):
        raise ValueError(f"summarize: percentiles must be within [0, 100], got {list(percentiles)}")
    if mask is not None and tuple(mask.shape) != tuple(log_jac.shape):
        raise ValueError(
            f"summarize: mask shape {tuple(mask.shape)} does not match the map's "
            f"{tuple(log_jac.shape)}"
        )
    lf = log_floor(floor)
    lazy = hasattr(log_jac, "dask") or hasattr(mask, "dask")
    if lazy:
        blocks = _dask_blocks(log_jac, mask)
        run = _run_dask
    else:
        blocks = [(np.asarray(log_jac, np.float32), None if mask is None else np.asarray(mask))]
        run = _run_numpy

    hist, n, total, folded, n_all, folded_all, n_nan = run(_pass1, _reduce1, blocks, lf)
    if n == 0:
        raise ValueError("summarize: the mask selects no measured voxels; check that it is not "
                         "empty and that the follow-up covers the lungs")  # fmt: skip
    wanted = {q: _ranks(q, n) for q in [50.0, *qs]}
    ranks = sorted({r for lo, hi, _ in wanted.values() for r in (lo, hi)})
    cum = np.cumsum(_dense(hist))
    buckets = np.searchsorted(cum, ranks, side="right")
    targets = np.unique(buckets)
    low = run(_pass2, _reduce2, blocks, targets)
    values = {}
    for r, b in zip(ranks, buckets, strict=True):
        within = r - (int(cum[b - 1]) if b > 0 else 0)
        t = int(np.searchsorted(targets, b))
        lo16 = int(np.searchsorted(np.cumsum(_dense(low[t])), within, side="right"))
        values[r] = float(_from_keys(np.array([(int(b) << _BITS) | lo16], np.uint32))[0])

    out = {"voxels": int(n), "unmeasured": int(n_nan),
           "measured_fraction": float(n) / float(n + n_nan), "mean": float(total / n)}
    quantile = {q: _lerp(values[lo], values[hi], t) for q, (lo, hi, t) in wanted.items()}
    out["median"] = quantile[50.0]
    for q in qs:
        out[f"p{q:g}"] = quantile[q]
    out.update(
        folded=int(folded),
        folded_fraction=float(folded) / n,
        folded_total=int(folded_all),
        folded_total_fraction=float(folded_all) / max(n_all, 1),
        floor=float(floor),
        log_floor=float(lf),
    )
    return out


def _ranks(q: float, n: int) -> tuple[int, int, float]:
    """numpy's 'linear' percentile: the two order statistics around q/100 * (n - 1)."""
    pos = q / 100.0 * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    return lo, min(lo + 1, n - 1), pos - lo


def _lerp(a: float, b: float, t: float) -> float:
    """Linear interpolation as numpy's percentile does it (exact at both ends)."""
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def _to_keys(v: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (negative values flipped, positive get the sign)."""
    b = v.view(np.uint32)
    return np.where(b & _SIGN, ~b, b | _SIGN)


def _from_keys(k: np.ndarray) -> np.ndarray:
    return np.where(k & _SIGN, k & ~_SIGN, ~k).astype(np.uint32).view(np.float32)


def _select(v, m) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    return v.ravel() if m is None else v[np.asarray(m) != 0]


def _pass1(v, m, lf):
    sel = _select(v, m)
    nan = np.isnan(sel)
    n_nan = int(np.count_nonzero(nan))
    if n_nan:
        sel = sel[~nan]
    hist = _sparse(np.bincount(_to_keys(sel) >> _BITS, minlength=_BINS))
    v = np.asarray(v)
    return (hist, sel.size, float(sel.sum(dtype=np.float64)), int(np.count_nonzero(sel <= lf)),
            int(np.count_nonzero(~np.isnan(v))), int(np.count_nonzero(v <= lf)), n_nan)


def _reduce1(*parts):
    hist = _merge([p[0] for p in parts])
    return (hist, *(sum(p[i] for p in parts) for i in range(1, 7)))


def _pass2(v, m, targets):
    """Per target bucket, the histogram of the low 16 bits of the keys in it."""
    sel = _select(v, m)
    keys = _to_keys(sel[~np.isnan(sel)])
    keys = keys[np.isin(keys >> _BITS, targets)]
    high = keys >> _BITS
    return [_sparse(np.bincount(keys[high == b] & (_BINS - 1), minlength=_BINS))
            for b in targets]


def _reduce2(*parts):
    return [_merge(hists) for hists in zip(*parts, strict=True)]


def _sparse(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A histogram as (bins, counts) of its nonzero bins: small to hold and to pass around."""
    bins = np.flatnonzero(dense)
    return bins, dense[bins].astype(np.int64)


def _merge(hists) -> tuple[np.ndarray, np.ndarray]:
    dense = np.zeros(_BINS, np.int64)
    for bins, counts in hists:
        dense[bins] += counts  # bins are unique within one histogram
    return _sparse(dense)


def _dense(hist) -> np.ndarray:
    dense = np.zeros(_BINS, np.int64)
    dense[hist[0]] = hist[1]
    return dense


def _run_numpy(fn, reduce, blocks, arg):
    return reduce(*[fn(v, m, arg) for v, m in blocks])


def _dask_blocks(log_jac, mask):
    import dask.array as da

    lj = log_jac if hasattr(log_jac, "dask") else da.from_array(log_jac, chunks=mask.chunks)
    values = lj.to_delayed().ravel()
    if mask is None:
        return [(v, None) for v in values]
    m = mask if hasattr(mask, "dask") else da.from_array(mask)
    return list(zip(values, m.rechunk(lj.chunks).to_delayed().ravel(), strict=True))


def _run_dask(fn, reduce, blocks, arg, *, fan_in: int = 8):
    """One task per block, then a tree of merges: small sparse results, a few blocks per thread."""
    import dask

    parts = [dask.delayed(fn, pure=True)(v, m, arg) for v, m in blocks]
    while len(parts) > 1:
        parts = [dask.delayed(reduce, pure=True)(*parts[i : i + fan_in])
                 for i in range(0, len(parts), fan_in)]
    if len(blocks) == 1:
        parts = [dask.delayed(reduce, pure=True)(parts[0])]
    (result,) = dask.compute(parts[0])
    return result
