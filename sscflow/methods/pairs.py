"""Chains of registrations: consecutive pairs composed, and checked against the direct pair.

A patient with N >= 3 timepoints is registered pair by pair: 0 -> 1, 1 -> 2, ..., and 0 -> N-1.
:func:`compose` chains consecutive fields into one field 0 -> k; :func:`composition_inconsistency`
measures how far that chain lands from the direct field 0 -> k inside the baseline lung.

Conventions (those of the registration stage, ``sscflow.methods.registration.stage.CONVENTION``)
------------------------------------------------------------------------------------------------
* A pair a -> b is a displacement ``u`` of shape (3, Z, Y, X), float, in millimetres, on scan
  a's grid (a :class:`~sscflow.core.geometry.Geometry`: origin, spacing, direction; the array
  axes are z, y, x). For the physical point x of voxel i of scan a, ``x + u[:, i]`` is the
  physical point (LPS mm) of the same tissue in scan b, read through scan b's own geometry.
* Component k of ``u`` is in mm along the grid's array axis k (z, y, x): on the canonical grid
  every stage after ingest uses (identity direction) these are the physical z, y, x offsets;
  on a grid with another direction the vector is turned by it as
  :func:`sscflow.core.geometry.to_itk` does. Results here are in the same convention, on the
  first pair's grid (scan 0's).
* A coverage array (uint8 or bool on scan a's grid, optional) is 1 where ``x + u(x)`` was imaged
  by scan b (``patients/<id>/coverage``); 0 means the value there was not measured.

Composition
-----------
``u_0k(x) = u_01(x) + u_12(x1) + ... + u_(k-1)k(x_(k-1))`` with ``x_j = x + u_01(x) + ...`` (the
point reached after j pairs). Each later field is read at a physical point through its own
geometry with :func:`sscflow.core.geometry.resample` (linear interpolation, the project's one
resampler), one slab of scan 0's slices at a time. A point is *measured* (``valid``) when

* the first field's value is finite and its coverage is nonzero at the voxel;
* every point ``x_j`` lies inside field j's grid, as :func:`sscflow.core.geometry.inside`
  defines it (within half a voxel of its edge voxel centres, the reach of ``resample``, where the
  edge voxel is read; less ``margin_mm``): nothing is extrapolated beyond that;
* where field j has a coverage, every voxel that the linear interpolation at ``x_j`` weighs (by
  more than :data:`COVERAGE_WEIGHT_TOL`) is covered: a value partly built from unmeasured voxels
  is unmeasured.

Elsewhere the composed field is NaN (as the log-Jacobian map is NaN where nothing was measured).
Affine fields compose exactly up to float32 rounding at points whose ``x_j`` lie between the
edge voxel centres of the later grids (trilinear interpolation reproduces any affine function
of the index); in the half-voxel band past them the edge value is read.

The functions take numpy arrays (or arrays that slice like them, e.g. zarr arrays) and
geometries; reading the pairs of a patient from the store is left to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sscflow.core.geometry import Geometry, grid_points, inside, resample, to_itk

__all__ = ["COVERAGE_WEIGHT_TOL", "Composition", "PairField", "compose",
           "composition_inconsistency"]  # fmt: skip

#: a later field's linear interpolation may give at most this weight, in all, to voxels whose
#: coverage is 0 before the point counts as unmeasured (the coverage is interpolated linearly
#: like the field, so 1 - that value is the weight of the uncovered voxels)
COVERAGE_WEIGHT_TOL = 1e-3


class PairField(NamedTuple):
    """One registered pair a -> b: displacement (3, Z, Y, X) mm on ``geometry`` (scan a's grid),
    and optionally its coverage (Z, Y, X), nonzero where ``x + u(x)`` was imaged by scan b."""

    displacement: np.ndarray
    geometry: Geometry
    coverage: np.ndarray | None = None


class Composition(NamedTuple):
    """A composed field 0 -> k on ``geometry`` (the first pair's grid): ``displacement``
    (3, Z, Y, X) float32 mm, NaN where not measured; ``valid`` (Z, Y, X) bool, where measured."""

    displacement: np.ndarray
    valid: np.ndarray
    geometry: Geometry


def _pair(field) -> PairField:
    """A (displacement, geometry[, coverage]) sequence as a checked :class:`PairField`."""
    if isinstance(field, PairField):
        out = field
    elif isinstance(field, Sequence) and len(field) in (2, 3):
        out = PairField(*field)
    else:
        raise ValueError("compose: each field must be (displacement, geometry) or "
                         "(displacement, geometry, coverage)")  # fmt: skip
    if not isinstance(out.geometry, Geometry):
        raise ValueError(f"compose: a field's geometry must be a Geometry, got "
                         f"{type(out.geometry).__name__}")  # fmt: skip
    shape = tuple(out.displacement.shape)
    if shape != (3, *out.geometry.shape):
        raise ValueError(f"compose: a displacement on a grid of shape {out.geometry.shape} must "
                         f"have shape {(3, *out.geometry.shape)}, got {shape}")  # fmt: skip
    if out.coverage is not None and tuple(out.coverage.shape) != out.geometry.shape:
        raise ValueError(f"compose: a coverage on a grid of shape {out.geometry.shape} must have "
                         f"that shape, got {tuple(out.coverage.shape)}")  # fmt: skip
    return out


def _axes_to_physical(geometry: Geometry) -> np.ndarray:
    """3 x 3 matrix taking a vector's components along the grid's array axes (z, y, x) to
    physical (z, y, x) mm: the direction (ITK's x, y, z rows and columns) in z, y, x order."""
    return np.asarray(geometry.direction, np.float64)[::-1, ::-1]


def _turn(matrix: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``matrix`` applied to every vector of a (3, ...) field (float64)."""
    if np.array_equal(matrix, np.eye(3)):
        return np.asarray(field, np.float64)
    return np.einsum("ij,j...->i...", matrix, field, dtype=np.float64)


def _slab_grid(geometry: Geometry, z0: int, z1: int) -> Geometry:
    _, ny, nx = geometry.shape
    return geometry.sub_grid(((z0, z1), (0, ny), (0, nx)))


def compose(fields, *, margin_mm: float = 0.0, slab_voxels: int = 1 << 21) -> Composition:
    """The consecutive pairs 0 -> 1, 1 -> 2, ..., (k-1) -> k composed into 0 -> k.

    Parameters
    ----------
    fields : list of (displacement, geometry) or (displacement, geometry, coverage), one per pair
        in order, each on its own first scan's grid (see the module's conventions); a coverage
        may be None (all measured)
    margin_mm : a point must lie this far inside a later field's grid (beyond the half voxel of
        :func:`~sscflow.core.geometry.inside`) to count as measured
    slab_voxels : scan 0's grid is processed in slabs of slices of about this many voxels; the
        working memory is a few tens of bytes per slab voxel, besides the output and one later
        field's copy for SimpleITK (12 bytes a voxel, 16 with a coverage)

    Returns
    -------
    :class:`Composition`: the field 0 -> k (float32 mm on the first grid, component k along its
    array axis k; NaN where not measured), the bool map of where it was measured, and that grid.

    Examples
    --------
    >>> g0 = Geometry((4, 5, 6), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    >>> g1 = Geometry((6, 6, 6), (3.0, 3.0, 3.0), (-4.0, -4.0, -4.0))
    >>> u01 = np.zeros((3, 4, 5, 6), np.float32); u01[2] = 1.5     # 1.5 mm along x
    >>> u12 = np.zeros((3, 6, 6, 6), np.float32); u12[0] = -2.0    # -2 mm along z
    >>> out = compose([(u01, g0), (u12, g1)])
    >>> [float(out.displacement[k, 1, 1, 1]) for k in range(3)], bool(out.valid.all())
    ([-2.0, 0.0, 1.5], True)
    """
    pairs = [_pair(f) for f in fields]
    if not pairs:
        raise ValueError("compose: no fields given")
    first = pairs[0]
    g0 = first.geometry
    nz, ny, nx = g0.shape
    step = max(1, int(slab_voxels) // (ny * nx))
    slabs = [(z0, min(nz, z0 + step)) for z0 in range(0, nz, step)]
    to_phys0 = _axes_to_physical(g0)

    out = np.empty((3, nz, ny, nx), np.float32)
    valid = np.empty((nz, ny, nx), bool)
    for z0, z1 in slabs:
        u = np.asarray(first.displacement[:, z0:z1], np.float32)
        ok = np.isfinite(u).all(axis=0)
        if first.coverage is not None:
            ok &= np.asarray(first.coverage[z0:z1]) > 0
        out[:, z0:z1] = np.where(ok, u, np.nan)
        valid[z0:z1] = ok

    for later in pairs[1:]:
        gj = later.geometry
        # field j's components -> scan 0's array-axis components, through physical space
        turn = to_phys0.T @ _axes_to_physical(gj)
        sources = [to_itk(np.asarray(later.displacement[k], np.float32), gj) for k in range(3)]
        cover = None
        if later.coverage is not None:  # float32 once, not cast again for every slab
            cover = to_itk(np.asarray(later.coverage, np.float32), gj)
        for z0, z1 in slabs:
            ok = valid[z0:z1]
            if not ok.any():
                continue
            u = np.where(ok, out[:, z0:z1], 0.0).astype(np.float64)
            ok = ok & inside(grid_points(g0, z0, z1) + _turn(to_phys0, u), gj, margin_mm)
            u[:, ~ok] = 0.0  # a point outside is never handed to ITK
            part = _slab_grid(g0, z0, z1)
            got = np.stack([resample(src, gj, part, u, interpolator="linear", fill=np.nan,
                                     slab_voxels=part.shape[0] * ny * nx)
                            for src in sources])  # fmt: skip
            ok &= np.isfinite(got).all(axis=0)
            if cover is not None:
                seen = resample(cover, gj, part, u, interpolator="linear", fill=0.0,
                                slab_voxels=part.shape[0] * ny * nx)  # fmt: skip
                ok &= seen >= 1.0 - COVERAGE_WEIGHT_TOL
            total = u + _turn(turn, np.where(ok, got, 0.0))
            out[:, z0:z1] = np.where(ok, total, np.nan)
            valid[z0:z1] = ok
        del sources, cover
    return Composition(out, valid, g0)


def composition_inconsistency(consecutive, direct, mask, *, margin_mm: float = 0.0,
                              slab_voxels: int = 1 << 21) -> dict:  # fmt: skip
    """How far the composed consecutive pairs land from the direct pair, inside ``mask``.

    Parameters
    ----------
    consecutive : the pairs 0 -> 1, ..., (k-1) -> k, as for :func:`compose`
    direct : the pair 0 -> k, (displacement, geometry[, coverage]), on scan 0's grid (the same
        grid as the first consecutive pair, to :meth:`Geometry.same_grid`)
    mask : (Z, Y, X) uint8 or bool on scan 0's grid, e.g. the baseline lung mask
    margin_mm, slab_voxels : as for :func:`compose`

    Returns
    -------
    dict: over the voxels of ``mask`` where every field was measured (the composition's
    ``valid``, the direct field finite and covered), the Euclidean distance
    ``|u_composed(x) - u_direct(x)|`` in mm: ``mean_mm``, ``p95_mm``, ``max_mm``; ``n_voxels``
    (how many voxels that is), ``mask_voxels`` and ``measured_fraction`` (n_voxels / mask_voxels).
    The distances are NaN when nothing was measured, the fraction NaN for an empty mask.

    Examples
    --------
    >>> g = Geometry((4, 4, 4), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    >>> u = np.zeros((3, 4, 4, 4), np.float32); u[1] = 0.5
    >>> direct = u.copy(); direct[1] += 0.5
    >>> r = composition_inconsistency([(u, g), (np.zeros_like(u), g)], (direct, g),
    ...                               np.ones((4, 4, 4), bool))
    >>> r["mean_mm"], r["max_mm"], r["measured_fraction"]
    (0.5, 0.5, 1.0)
    """
    composed = compose(consecutive, margin_mm=margin_mm, slab_voxels=slab_voxels)
    d = _pair(direct)
    g0 = composed.geometry
    if not d.geometry.same_grid(g0):
        raise ValueError("composition_inconsistency: the direct field must be on the first "
                         f"pair's grid {g0}, got {d.geometry}")  # fmt: skip
    if tuple(mask.shape) != g0.shape:
        raise ValueError(f"composition_inconsistency: the mask must have the grid's shape "
                         f"{g0.shape}, got {tuple(mask.shape)}")  # fmt: skip
    nz, ny, nx = g0.shape
    step = max(1, int(slab_voxels) // (ny * nx))
    dist, n_mask = [], 0
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        m = np.asarray(mask[z0:z1]).astype(bool)
        n_mask += int(m.sum())
        ud = np.asarray(d.displacement[:, z0:z1], np.float64)
        m &= composed.valid[z0:z1] & np.isfinite(ud).all(axis=0)
        if d.coverage is not None:
            m &= np.asarray(d.coverage[z0:z1]) > 0
        diff = composed.displacement[:, z0:z1][:, m].astype(np.float64) - ud[:, m]
        dist.append(np.sqrt((diff * diff).sum(axis=0)))
    dist = np.concatenate(dist) if dist else np.zeros(0)
    n = int(dist.size)
    nan = float("nan")
    return {
        "mean_mm": float(dist.mean()) if n else nan,
        "p95_mm": float(np.percentile(dist, 95.0)) if n else nan,
        "max_mm": float(dist.max()) if n else nan,
        "measured_fraction": n / n_mask if n_mask else nan,
        "n_voxels": n,
        "mask_voxels": n_mask,
    }

