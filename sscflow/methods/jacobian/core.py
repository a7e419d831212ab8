"""log_jacobian: the log-determinant of the Jacobian of x + u(x), for numpy or dask fields."""

from __future__ import annotations

import math

import numpy as np

from sscflow.methods.jacobian import blockwise

DEFAULT_FLOOR = 1e-6


def log_floor(floor: float = DEFAULT_FLOOR) -> np.float32:
    """The value a folded voxel gets: ``float32(log(floor))``.

    >>> print(float(log_floor(1e-6)) < -13.8)
    True
    """
    return np.float32(math.log(floor))


def log_jacobian(displacement, spacing, *, floor: float = DEFAULT_FLOOR):
    """Log-determinant of the Jacobian of x + u(x): ``log det(I + grad u)``, voxel by voxel.

    Derivatives are central differences in physical units. At the outer faces of the volume the
    edge value is repeated (ITK's zero-flux Neumann rule), so the difference there is
    ``(u[1] - u[0]) / (2 h)``, and the result equals ``log`` of SimpleITK's
    ``DisplacementFieldJacobianDeterminant`` (image spacing on, its default) at every voxel,
    whatever the chunking. With u defined on the baseline grid and ``followup(x + u(x))`` matching
    ``baseline(x)``, tissue that shrinks from baseline to follow-up has a negative value.

    Parameters
    ----------
    displacement : numpy or dask array, shape (3, Z, Y, X), float32, millimetres
        Component k is the displacement along array axis k (z, y, x).
    spacing : (float, float, float)
        Voxel size in mm along (z, y, x); each > 0.
    floor : float
        Folding: where det J <= floor (or is not finite), the value is ``log(floor)``
        (see ``log_floor``) instead of NaN or -inf. 0 < floor < 1.

    Returns
    -------
    float32 array of shape (Z, Y, X): numpy for numpy input (computed on all cores); for dask
    input a lazy dask array chunked like the spatial chunks of ``displacement``, computed
    blockwise with a one-plane halo. For a field in Zarr larger than memory, ``log_jacobian_zarr``
    bounds the memory whatever the scheduler's order.

    Raises
    ------
    ValueError for a wrong shape, non-positive spacing or a floor outside (0, 1).

    Examples
    --------
    >>> import numpy as np
    >>> z = np.arange(8, dtype=np.float32)[:, None, None]
    >>> u = np.zeros((3, 8, 8, 8), np.float32)
    >>> u[0] = 0.5 * z  # stretch along z by 1.5
    >>> lj = log_jacobian(u, (1.0, 1.0, 1.0))
    >>> print(round(float(lj[4, 4, 4]), 6), round(float(np.log(1.5)), 6))
    0.405465 0.405465
    >>> print(round(float(lj[0, 4, 4]), 6), round(float(np.log(1.25)), 6))  # ITK's face rule
    0.223144 0.223144
    >>> import dask.array as da
    >>> lazy = log_jacobian(da.from_array(u, chunks=(3, 3, 4, 4)), (1.0, 1.0, 1.0))
    >>> print(lazy.chunks[0], float(abs(lazy.compute() - lj).max()))
    (3, 3, 2) 0.0
    """
    spacing = _check(displacement, spacing, floor)
    if hasattr(displacement, "dask"):
        return blockwise.log_jacobian_dask(displacement, _weights(spacing), floor,
                                           log_floor(floor))  # fmt: skip
    from sscflow.methods.jacobian import _kernel

    u = _as_field(np.asarray(displacement))
    out = np.empty(u.shape[1:], np.float32)
    _kernel.log_jacobian_parallel(u, out, 0, 0, 0, *_weights(spacing), float(floor),
                                  log_floor(floor))
    return out


def _check(displacement, spacing, floor) -> tuple[float, float, float]:
    shape = tuple(displacement.shape)
    if len(shape) != 4 or shape[0] != 3 or 0 in shape:
        raise ValueError(
            f"log_jacobian: displacement must have shape (3, Z, Y, X) with Z, Y, X >= 1, "
            f"got {shape}"
        )
    if np.dtype(displacement.dtype).kind not in "fiu":
        raise ValueError(
            f"log_jacobian: displacement must be a real (float32) array, got {displacement.dtype}"
        )
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"log_jacobian: spacing must be three positive numbers, got {spacing!r}")
    if not (isinstance(floor, (int, float, np.floating)) and 0 < floor < 1):
        raise ValueError(f"log_jacobian: floor must be a number in (0, 1), got {floor!r}")
    return sp


def _weights(spacing) -> tuple[float, float, float]:
    return tuple(0.5 / s for s in spacing)


def _as_field(u: np.ndarray) -> np.ndarray:
    """C-contiguous float32 or float64 (one compiled kernel per dtype)."""
    dtype = u.dtype if u.dtype in (np.float32, np.float64) else np.float32
    return np.ascontiguousarray(u, dtype=dtype)


def log_jacobian_zarr(array, spacing, *, floor: float = DEFAULT_FLOOR, window: int = 2):
    """``log_jacobian`` of a (3, Z, Y, X) Zarr array, as a lazy dask array read slab by slab.

    One block per Zarr chunk (so each chunk is decoded once), computed as in the dask path, but
    the reads are sequenced: the chunks of slab k + ``window`` (a slab is one row of chunks along
    z) are read only once the map of slab k is done. Whatever order the scheduler picks, memory
    holds about ``window + 1`` slabs of the field, however many slices the volume has.

    Parameters
    ----------
    array : zarr.Array (or any array with ``chunks`` and numpy slicing), shape (3, Z, Y, X), mm
    spacing, floor : as for ``log_jacobian``
    window : >= 2 (the map of a slab needs the first plane of the next one)

    Examples
    --------
    >>> import zarr
    >>> u = zarr.zeros((3, 8, 8, 8), chunks=(3, 4, 4, 4), dtype="f4")
    >>> lj = log_jacobian_zarr(u, (1.0, 1.0, 1.0))
    >>> print(lj.chunks[0], float(lj.max().compute()))
    (4, 4) 0.0
    """
    spacing = _check(array, spacing, floor)
    if not (isinstance(window, int) and window >= 2):
        raise ValueError(f"log_jacobian_zarr: window must be an integer >= 2, got {window!r}")
    return blockwise.log_jacobian_zarr(array, _weights(spacing), floor, log_floor(floor), window)
