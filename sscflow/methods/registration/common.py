"""What every registration backend shares: input checks, the lung crop, the affine-plus-local
composition of the result, and the measures used in QA records and against synthetic truth.

Coordinates inside a backend: physical millimetres (z, y, x) relative to voxel (0, 0, 0) of the
fixed grid; ``register`` has already resampled the moving scan onto that grid through the
initial alignment (``sscflow.methods.registration.frame``). An affine map is ``y = matrix @ x +
offset`` in those coordinates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from sscflow.core.geometry import Geometry, crop_box  # noqa: F401 (re-exported)
from sscflow.errors import ConfigError, RegistrationInputError

FOLD_FLOOR = 1e-6  # det J at or below this counts as folded; the log uses this floor


@dataclass(frozen=True)
class Inputs:
    """Checked registration inputs: float32 volumes, their geometries, bool masks or None."""

    fixed: np.ndarray
    moving: np.ndarray
    spacing: tuple[float, float, float]
    mask: np.ndarray | None
    fixed_geometry: Geometry | None = None
    moving_geometry: Geometry | None = None
    moving_mask: np.ndarray | None = None


def check_inputs(
    fixed, moving, spacing=None, mask=None, *, moving_mask=None, fixed_geometry=None,
    moving_geometry=None, moving_spacing=None,
) -> Inputs:
    """Validate the arguments of :func:`sscflow.methods.registration.register`.

    The two volumes may differ in shape, origin, spacing and direction. Without geometries,
    voxel 0 of each is at 0 mm and ``spacing`` (or ``moving_spacing``) gives the voxel sizes.

    Raises
    ------
    RegistrationInputError (a ValueError) naming what came and what was expected: volumes that
    are not 3-D, NaN or inf values, a spacing that is not three positive numbers, a geometry
    whose shape differs from its volume's or a baseline grid whose direction is not the
    identity, a mask of another shape or with no voxel set.
    """
    fixed = np.asarray(fixed)
    moving = np.asarray(moving)
    for name, a in (("fixed", fixed), ("moving", moving)):
        if a.ndim != 3:
            raise RegistrationInputError(
                f"register: {name} must be a 3-D (Z, Y, X) volume, got shape {a.shape}"
            )
    if fixed_geometry is None:
        if spacing is None:
            raise RegistrationInputError("register: give the fixed spacing or fixed_geometry")
        fixed_geometry = Geometry(fixed.shape, _spacing(spacing, "spacing"), (0.0, 0.0, 0.0))
    if moving_geometry is None:
        msp = _spacing(moving_spacing if moving_spacing is not None else
                       fixed_geometry.spacing, "moving spacing")  # fmt: skip
        moving_geometry = Geometry(moving.shape, msp, (0.0, 0.0, 0.0))
    for name, a, g in (("fixed", fixed, fixed_geometry), ("moving", moving, moving_geometry)):
        if not isinstance(g, Geometry) or tuple(g.shape) != a.shape:
            raise RegistrationInputError(
                f"register: {name}_geometry must be a Geometry of shape {a.shape}, got {g!r}"
            )
    if not fixed_geometry.is_canonical:
        raise RegistrationInputError(
            "register: the fixed (baseline) grid must have an identity direction; resample it "
            "with sscflow.methods.ingest.to_canonical (the moving scan may have any direction)"
        )
    out = []
    for name, a in (("fixed", fixed), ("moving", moving)):
        a = a.astype(np.float32, copy=False)
        bad = ~np.isfinite(a)
        if bad.any():
            raise RegistrationInputError(
                f"register: {name} holds {int(bad.sum())} NaN or inf voxel(s); expected finite HU"
            )
        out.append(a)
    m = _mask(mask, fixed.shape, "mask", "fixed")
    mm = _mask(moving_mask, moving.shape, "moving_mask", "moving")
    return Inputs(out[0], out[1], fixed_geometry.spacing, m, fixed_geometry, moving_geometry, mm)


def _mask(mask, shape, name, of):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise RegistrationInputError(
            f"register: {name} shape {m.shape} differs from the {of} volume {shape}"
        )
    m = m.astype(bool, copy=False)
    if not m.any():
        raise RegistrationInputError(
            f"register: the {name} is empty (no voxel set); pass {name}=None to register "
            "the whole volume, or check the segmentation"
        )
    return m


def _spacing(spacing, name) -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise RegistrationInputError(
            f"register: {name} must be three positive numbers (z, y, x) mm, got {spacing!r}"
        ) from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise RegistrationInputError(
            f"register: {name} must be three positive numbers (z, y, x) mm, got {spacing!r}"
        )
    return sp


def check_common_options(options, where: str) -> None:
    """The checks every backend's ``Options`` shares: ``margin_mm`` >= 0, one voxel size > 0
    (mm) per level and one iteration count >= 0 per level, ``threads`` >= 0. Raises ConfigError
    naming the key (``where.levels_mm``)."""
    if options.margin_mm < 0:
        raise ConfigError(f"{where}.margin_mm must be >= 0, got {options.margin_mm}")
    levels = options.levels_mm
    if not levels or not all(math.isfinite(f) and f > 0 for f in levels):
        raise ConfigError(f"{where}.levels_mm must be voxel sizes > 0 (mm), got {list(levels)}")
    iterations = options.iterations
    if len(iterations) != len(levels) or any(n < 0 for n in iterations):
        raise ConfigError(f"{where}.iterations needs one count >= 0 per level "
                          f"({len(levels)}), got {list(iterations)}")  # fmt: skip
    if options.threads < 0:
        raise ConfigError(f"{where}.threads must be >= 0, got {options.threads}")


def renamed_message(key: str, keypath: str, renamed: dict) -> str | None:
    """The error for a setting that was renamed to millimetres, or None for another key."""
    if key not in renamed:
        return None
    new, how = renamed[key]
    where = keypath.rpartition(".")[0]
    new_path = f"{where}.{new}" if where else new
    return (f"{keypath} is now {new_path} ({how}): settings are in millimetres, so that a "
            "cohort at 1 mm and at 2 mm gets the same regularisation")


def shrink_factor(level_mm: float, spacing) -> int:
    """The shrink factor of a pyramid level of ``level_mm`` voxels on a grid of ``spacing``
    (z, y, x) mm: ``round(level_mm / spacing)`` (the mean spacing), at least 1.

    >>> [shrink_factor(mm, (2.0, 2.0, 2.0)) for mm in (8, 4, 2)]
    [4, 2, 1]
    >>> [shrink_factor(mm, (1.0, 1.0, 1.0)) for mm in (8, 4, 2)]
    [8, 4, 2]
    """
    mean = float(np.mean(np.asarray(spacing, dtype=np.float64)))
    return max(1, int(round(float(level_mm) / mean)))


def levels_run(levels_mm, spacing) -> list[int]:
    """The indices of the demons levels (``levels_mm``, coarse to fine) that the sitk backend
    runs on a grid of ``spacing`` mm: a level whose shrink factor is the previous running
    level's (both on the scan's own voxels, as the 2 mm level of a 4 mm scan) is left out, so
    that the coarser one's smoothing holds there (the finer one's 4 mm is a single 4 mm voxel:
    a 4 mm no-change pair read p99 |log-J| 0.117, 0.026 with the level left out).

    >>> levels_run((8, 4, 2), (2.0, 2.0, 2.0)), levels_run((8, 4, 2), (4.0, 4.0, 4.0))
    ([0, 1, 2], [0, 1])
    """
    out: list[int] = []
    last = None
    for k, mm in enumerate(levels_mm):
        factor = shrink_factor(mm, spacing)
        if factor != last:
            out.append(k)
        last = factor
    return out


def n_threads(threads: int = 0) -> int:
    """``threads`` if > 0; else, on a Dask worker, the worker's thread count (so that workers
    do not oversubscribe the cores); else the CPU cores this process may use."""
    if threads and threads > 0:
        return int(threads)
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError):  # not on a Dask worker
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def compose(local, box, shape, spacing, matrix, offset) -> np.ndarray:
    """The displacement of ``x -> A(x + w(x))`` on the whole fixed grid, float32 mm.

    ``local`` is w, (3, *box shape) mm, on the crop ``box`` and zero outside it (backends make it
    vanish at the crop border, so the field is continuous). ``A`` is ``matrix @ x + offset``.
    Outside the crop the result is the affine part alone.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    lin = matrix - np.eye(3)
    out = np.empty((3, *shape), np.float32)
    axes = [np.arange(n, dtype=np.float64) * spacing[k] for k, n in enumerate(shape)]
    for k in range(3):  # (A - I) x + b, separable per axis
        out[k] = offset[k]
        out[k] += (lin[k, 0] * axes[0])[:, None, None]
        out[k] += (lin[k, 1] * axes[1])[None, :, None]
        out[k] += (lin[k, 2] * axes[2])[None, None, :]
    if local is not None:
        local = np.asarray(local, dtype=np.float32)
        for k in range(3):
            add = matrix[k, 0] * local[0] + matrix[k, 1] * local[1] + matrix[k, 2] * local[2]
            out[(k, *box)] += add.astype(np.float32)
    return out


def log_jacobian(displacement, spacing, floor: float = FOLD_FLOOR) -> np.ndarray:
    """log det(I + grad u) by ``sscflow.methods.jacobian`` (equal to SimpleITK's filter); det J at
    or below ``floor`` (folding) is set to ``log(floor)``."""
    from sscflow.methods.jacobian.core import log_jacobian as _log_jacobian

    return _log_jacobian(np.asarray(displacement, np.float32), spacing, floor=floor)


def _folded(log_jac, floor: float = FOLD_FLOOR) -> np.ndarray:
    from sscflow.methods.jacobian.core import log_floor

    return log_jac <= log_floor(floor)


def folded_fraction(displacement, spacing, mask=None) -> float:
    """Fraction of voxels (inside ``mask`` when given) with det J <= FOLD_FLOOR."""
    folded = _folded(log_jacobian(displacement, spacing))
    sel = folded[mask.astype(bool)] if mask is not None else folded
    return float(sel.mean()) if sel.size else 0.0


def ncc(a, b, mask=None) -> float:
    """Global normalised cross-correlation of two volumes (inside ``mask`` when given)."""
    if mask is not None:
        m = np.asarray(mask, bool)
        a, b = a[m], b[m]
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def local_ncc(a, b, mask=None, window: int = 5) -> float:
    """Mean local NCC (squared, window ``window`` voxels) inside ``mask`` (or everywhere)."""
    from scipy import ndimage  # here: sscflow.config reads the backends' options through this
    # package, and planning a run need not load scipy.ndimage

    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)

    def box(x):
        return ndimage.uniform_filter(x, window, mode="nearest")

    ma, mb = box(a), box(b)
    va = box(a * a) - ma * ma
    vb = box(b * b) - mb * mb
    cov = box(a * b) - ma * mb
    cc = cov * cov / (va * vb + 1e-3)
    sel = cc[np.asarray(mask, bool)] if mask is not None else cc
    return float(sel.mean())


def similarity(fixed, moving, displacement, spacing, mask=None, *, fixed_geometry=None,
               moving_geometry=None, covered=None) -> dict:  # fmt: skip
    """Similarity of fixed and moving before and after warping, inside ``mask`` (and
    ``covered``, the voxels the follow-up imaged, when given): global NCC, local NCC (window 5)
    and mean absolute difference in HU. "Before" reads the follow-up at the same physical
    point (its geometry alone, no registration); without geometries both grids start at 0 mm.
    """
    from sscflow.core.geometry import warp_to_baseline

    fg = fixed_geometry or Geometry(np.shape(fixed), spacing, (0.0, 0.0, 0.0))
    mg = moving_geometry or Geometry(np.shape(moving), spacing, (0.0, 0.0, 0.0))
    before = warp_to_baseline(moving, mg, np.zeros((3, *fg.shape), np.float32), fg)
    warped = warp_to_baseline(moving, mg, displacement, fg)
    sel = np.ones(fg.shape, bool) if mask is None else np.asarray(mask, bool)
    if covered is not None:
        sel = sel & np.asarray(covered, bool)
    out = {}
    for when, m in (("before", before), ("after", warped)):
        out[f"ncc_{when}"] = round(ncc(fixed, m, sel), 5)
        out[f"lncc_{when}"] = round(local_ncc(fixed, m, sel), 5)
        diff = np.abs(np.asarray(fixed, np.float32) - m)
        out[f"mad_hu_{when}"] = round(float(diff[sel].mean()) if sel.any() else float("nan"), 3)
    return out


def truth_errors(displacement, spacing, truth_displacement, truth_log_jacobian, lung, region=None):
    """Errors of a displacement against a known one, inside the (baseline) lung.

    Returns a dict: ``mean_error_mm``, ``p95_error_mm`` (Euclidean displacement error),
    ``logjac_mae`` (mean absolute log-Jacobian error), ``folded_voxels`` (det J <= FOLD_FLOOR),
    and with a non-empty ``region``: ``region_logjac`` and ``region_logjac_truth`` (means in
    the planted region) and their difference ``region_logjac_error``.
    """
    lung = np.asarray(lung, bool)
    err = np.sqrt(((np.asarray(displacement) - truth_displacement) ** 2).sum(axis=0))[lung]
    lj = log_jacobian(displacement, spacing)
    out = {
        "mean_error_mm": float(err.mean()),
        "p95_error_mm": float(np.percentile(err, 95)),
        "logjac_mae": float(np.abs(lj[lung] - truth_log_jacobian[lung]).mean()),
        "folded_voxels": int(_folded(lj[lung]).sum()),
    }
    if region is not None and np.asarray(region).any():
        r = np.asarray(region, bool)
        out["region_logjac"] = float(lj[r].mean())
        out["region_logjac_truth"] = float(truth_log_jacobian[r].mean())
        out["region_logjac_error"] = out["region_logjac"] - out["region_logjac_truth"]
    return out


def dilate_mask(mask, spacing, mm: float) -> np.ndarray:
    """``mask`` grown by about ``mm`` millimetres (an ellipsoidal structuring element)."""
    r = [max(0, int(round(mm / s))) for s in spacing]
    if max(r) == 0:
        return np.asarray(mask, bool)
    g = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    ball = sum((gi / max(k, 1)) ** 2 for gi, k in zip(g, r, strict=True)) <= 1.0
    from scipy import ndimage

    return ndimage.binary_dilation(np.asarray(mask, bool), structure=ball)
