"""Image geometry in sscflow's axis order: the one boundary to SimpleITK.

sscflow arrays are numpy (z, y, x). SimpleITK images, spacings, origins and vector components are
(x, y, z). Everything that crosses goes through here: :func:`to_itk` / :func:`from_itk` (images
and displacement fields), :func:`affine_to_itk` / :func:`affine_from_itk` (maps),
:func:`resample` (every change of grid, with or without a field or an affine) and
:meth:`Geometry.same_grid` (whether two grids are one, to :data:`GRID_TOLERANCE_MM`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

# Two grids whose voxel centres all lie within this of each other are one grid. The pipeline's
# own grids agree exactly (stored metadata round-trips floats) or differ by a millimetre or more
# (another acquisition), so any value in between decides the same; 0.01 mm is the registration's
# snap rule too, and wider than what the former checks accepted (np.allclose with atol 1e-6 to
# 1e-3 plus its rtol 1e-5 of an origin of a few hundred mm: up to about 5e-3 mm).
GRID_TOLERANCE_MM = 0.01

@dataclass(frozen=True)
class Geometry:
    """Where an array sits in physical space (LPS, millimetres).

    Attributes
    ----------
    shape : (Z, Y, X) voxels
    spacing : (z, y, x) mm, each > 0
    origin : (z, y, x) mm, the physical position of voxel (0, 0, 0)
    direction : 3 x 3 nested tuple in ITK's (x, y, z) convention; identity on the canonical grid
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def __post_init__(self):
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError(f"Geometry needs three values per field, got {self}")
        if any(not s > 0 for s in self.spacing):
            raise ValueError(f"Geometry spacing must be three positive numbers, got {self.spacing}")
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(
            self, "direction", tuple(tuple(float(v) for v in row) for row in self.direction)
        )

    @property
    def is_canonical(self) -> bool:
        """True when the direction is the identity (the grid every stage after ingest uses)."""
        return bool(np.allclose(self.direction, np.eye(3), atol=1e-6))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    def same_grid(self, other: Geometry, tol_mm: float | None = None) -> bool:
        """Whether ``other`` puts every voxel at the same physical point: the same shape, and no
        voxel centre more than ``tol_mm`` (default :data:`GRID_TOLERANCE_MM`, 0.01 mm) apart.

        One number in millimetres covers origin, spacing and direction together: a voxel's
        position is affine in its index, so the largest gap is at a corner of the grid, and a
        spacing error counts as often as the grid has voxels along that axis, a direction-cosine
        error as often as the grid is long (0.01 mm over a 500 mm field of view is 2e-5).

        >>> g = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (-100.0, 0.0, 0.0))
        >>> g.same_grid(Geometry((10, 10, 10), (1.0, 1.0, 1.0), (-100.004, 0.0, 0.0)))
        True
        >>> g.same_grid(Geometry((10, 10, 10), (1.01, 1.0, 1.0), (-100.0, 0.0, 0.0)))
        False
        """
        if self.shape != other.shape:
            return False
        tol = GRID_TOLERANCE_MM if tol_mm is None else float(tol_mm)
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
        corners *= np.asarray(self.shape, float) - 1.0
        gap = index_to_physical(corners, self) - index_to_physical(corners, other)
        return bool(np.abs(gap).max() <= tol)

    def sub_grid(self, box) -> Geometry:
        """The grid of the voxels ``box`` = ((z0, z1), (y0, y1), (x0, x1)) (index ranges, end
        excluded) of this one: same spacing and direction, its own origin.

        >>> g = Geometry((10, 20, 30), (2.0, 1.0, 1.0), (5.0, 0.0, 0.0))
        >>> g.sub_grid(((2, 5), (0, 20), (10, 30)))
        Geometry(shape=(3, 20, 20), spacing=(2.0, 1.0, 1.0), origin=(9.0, 0.0, 10.0), direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
        """  # noqa: E501
        lo = [int(a) for a, _ in box]
        shape = [int(b) - int(a) for a, b in box]
        if any(n < 1 for n in shape) or any(a < 0 for a in lo) or any(
                int(b) > n for (_, b), n in zip(box, self.shape, strict=True)):
            raise ValueError(f"sub_grid: {box} is not a box of voxels of {self.shape}")
        origin = index_to_physical(np.asarray(lo, float), self)
        return Geometry(tuple(shape), self.spacing, tuple(origin), self.direction)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [list(r) for r in self.direction],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            tuple(d["shape"]),
            tuple(d["spacing"]),
            tuple(d["origin"]),
            tuple(tuple(r) for r in d["direction"]),
        )

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3-D SimpleITK image, in sscflow's (z, y, x) order."""
        d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        return cls(
            tuple(image.GetSize()[::-1]),
            tuple(image.GetSpacing()[::-1]),
            tuple(image.GetOrigin()[::-1]),
            tuple(tuple(r) for r in d),
        )


def to_itk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A (Z, Y, X) array, or a (3, Z, Y, X) displacement field, as a SimpleITK image on
    ``geometry`` (its origin, spacing and direction); the one way an array becomes an ITK image.

    A field's component k is in mm along the grid's array axis k (sscflow's contract; on the
    canonical grid that is physical z, y, x). ITK wants physical (x, y, z) vectors in float64,
    the pixel type ``sitk.DisplacementFieldTransform`` takes: the components are reversed and
    turned by the direction (nothing turns on the canonical grid).
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.view(np.uint8)
    if array.shape == geometry.shape:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    elif array.shape == (3, *geometry.shape):
        vec = np.moveaxis(array[::-1], 0, -1).astype(np.float64, copy=False)
        d = np.asarray(geometry.direction, np.float64)
        if not np.array_equal(d, np.eye(3)):
            vec = vec @ d.T  # index-axis (x, y, z) components -> physical
        image = sitk.GetImageFromArray(np.ascontiguousarray(vec), isVector=True)
    else:
        raise ValueError(
            f"to_itk: an array of shape {array.shape} is neither an image nor a (3, Z, Y, X) "
            f"field on a grid of shape {geometry.shape}"
        )
    image.SetSpacing(geometry.spacing[::-1])
    image.SetOrigin(geometry.origin[::-1])
    image.SetDirection(tuple(np.asarray(geometry.direction, float).ravel()))
    return image


def from_itk(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """A 3-D SimpleITK image as a (Z, Y, X) numpy array (a copy) and its geometry; a vector
    image (a displacement field) as a (3, Z, Y, X) float32 field with component k along array
    axis k, the inverse of :func:`to_itk`."""
    geometry = Geometry.of(image)
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        return array, geometry
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(f"from_itk: a field needs 3 components per voxel, got "
                         f"{image.GetNumberOfComponentsPerPixel()}")  # fmt: skip
    d = np.asarray(geometry.direction, np.float64)
    if not np.array_equal(d, np.eye(3)):
        array = array @ d  # physical (x, y, z) -> index-axis components (D^-1 = D^T)
    field = np.ascontiguousarray(np.moveaxis(array, -1, 0)[::-1]).astype(np.float32)
    return field, geometry


def affine_to_itk(matrix, offset) -> sitk.AffineTransform:
    """``y = matrix @ x + offset`` (physical zyx mm) as an ITK transform (xyz)."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(np.asarray(matrix, float)[::-1, ::-1].ravel()))
    tx.SetTranslation(tuple(np.asarray(offset, float)[::-1]))
    return tx


def affine_from_itk(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) in zyx of any ITK transform that is affine, by mapping 4 points."""
    pts = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], float)  # zyx mm
    out = np.array([tx.TransformPoint(tuple(p[::-1]))[::-1] for p in pts])
    offset = out[0]
    matrix = ((out[1:] - offset) / 100.0).T
    return matrix, offset


def crop_box(mask, spacing, margin_mm: float, shape) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` grown by ``margin_mm`` and clipped to ``shape``.

    With no mask, the whole volume.

    >>> m = np.zeros((20, 20, 20), bool); m[5:8, 5:8, 5:8] = True
    >>> crop_box(m, (1.0, 1.0, 1.0), 2.0, m.shape)
    (slice(3, 10, None), slice(3, 10, None), slice(3, 10, None))
    """
    if mask is None:
        return tuple(slice(0, n) for n in shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        pad = int(np.ceil(margin_mm / spacing[axis]))
        box.append(slice(max(0, int(hit[0]) - pad), min(int(shape[axis]), int(hit[-1]) + 1 + pad)))
    return tuple(box)


INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,  # cubic B-spline (ITK's, prefiltered)
}
_PIXEL = {np.dtype(t): p for t, p in (
    (np.uint8, sitk.sitkUInt8), (np.int8, sitk.sitkInt8), (np.uint16, sitk.sitkUInt16),
    (np.int16, sitk.sitkInt16), (np.uint32, sitk.sitkUInt32), (np.int32, sitk.sitkInt32),
    (np.uint64, sitk.sitkUInt64), (np.int64, sitk.sitkInt64), (np.float32, sitk.sitkFloat32),
    (np.float64, sitk.sitkFloat64))}  # fmt: skip


def _reference(geometry: Geometry) -> sitk.Image:
    """An empty SimpleITK image on ``geometry`` (a Resample reference grid)."""
    ref = sitk.Image([int(n) for n in geometry.shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing(geometry.spacing[::-1])
    ref.SetOrigin(geometry.origin[::-1])
    ref.SetDirection(tuple(np.asarray(geometry.direction, float).ravel()))
    return ref


def resample(
    image,
    geometry: Geometry | None,
    target: Geometry,
    displacement: np.ndarray | None = None,
    *,
    affine=None,
    interpolator: str = "linear",
    fill: float = 0.0,
    dtype=None,
    slab_voxels: int = 1 << 22,
) -> np.ndarray:
    """``image`` read at every voxel x of the grid ``target``: at the physical point x, at
    ``x + u(x)`` with a ``displacement`` u, or at ``matrix @ x + offset`` with an ``affine``.

    The one resampler: every grid change in sscflow goes through it (SimpleITK's Resample).

    Parameters
    ----------
    image : (Z, Y, X) array on ``geometry`` (any origin, spacing, direction), or a SimpleITK
        image already in hand (``geometry`` None: its own), used without a copy
    target : the output grid (any direction)
    displacement : (3, Z, Y, X) mm on ``target``, component k along its array axis k (sscflow's
        contract); the point x + u(x) is read in the image's own geometry
    affine : ``(matrix, offset)``, physical zyx mm (``sscflow.methods.registration.align``'s maps);
        not together with ``displacement``
    interpolator : "nearest" (in the image's own type), "linear" or "bspline" (cubic B-spline),
        both on the image's values as float32
    fill : the value where the point lies more than half a voxel past the image's edge voxel
        centres; within that half voxel the edge voxel is read (ITK's rule)
    dtype : the output's; default float32, or the image's own type for "nearest"
    slab_voxels : a field is handed to ITK in slabs of target slices of about this many
        voxels (24 bytes a voxel in float64), so its copy never takes more memory than that

    Returns the array on ``target``. The same grid (:meth:`Geometry.same_grid`) with no
    transform is a copy, without interpolation.
    """
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"resample: interpolator must be one of {', '.join(INTERPOLATORS)}, "
                         f"got {interpolator!r}")  # fmt: skip
    if displacement is not None and affine is not None:
        raise ValueError("resample: give a displacement or an affine, not both")
    if isinstance(image, sitk.Image):
        src = image
        geometry = Geometry.of(image) if geometry is None else geometry
    else:
        src = to_itk(np.asarray(image), geometry)
    own = np.dtype(sitk.GetArrayViewFromImage(src).dtype)
    out_type = np.dtype(dtype) if dtype is not None else (
        own if interpolator == "nearest" else np.dtype(np.float32))  # fmt: skip
    if displacement is None and affine is None and target.same_grid(geometry):
        return sitk.GetArrayFromImage(src).astype(out_type, copy=False)
    if interpolator != "nearest" and own != np.float32:
        src = sitk.Cast(src, sitk.sitkFloat32)
    interp, pixel = INTERPOLATORS[interpolator], _PIXEL[out_type]

    def run(tx, grid):
        return sitk.GetArrayFromImage(sitk.Resample(src, _reference(grid), tx, interp,
                                                    float(fill), pixel))  # fmt: skip

    if displacement is None:
        tx = sitk.Transform() if affine is None else affine_to_itk(*affine)
        return run(tx, target)
    displacement = np.asarray(displacement)
    if displacement.shape != (3, *target.shape):
        raise ValueError(f"resample: a displacement on a grid of shape {target.shape} must have "
                         f"shape {(3, *target.shape)}, got {displacement.shape}")  # fmt: skip
    nz, ny, nx = target.shape
    step = max(1, slab_voxels // (ny * nx))
    out = np.empty(target.shape, out_type)
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        part = Geometry((z1 - z0, ny, nx), target.spacing,
                        tuple(index_to_physical((z0, 0, 0), target)), target.direction)  # fmt: skip
        tx = sitk.DisplacementFieldTransform(to_itk(displacement[:, z0:z1], part))
        out[z0:z1] = run(tx, part)
    return out


def warp_to_baseline(
    followup: np.ndarray,
    followup_geometry: Geometry,
    displacement: np.ndarray,
    baseline_geometry: Geometry,
    *,
    order: int = 1,
    fill: float = -1024.0,
) -> np.ndarray:
    """The follow-up at ``x + u(x)`` for every baseline voxel x: the follow-up in the
    baseline's frame (float32, on the baseline grid; ``fill`` where x + u(x) is outside it).

    ``displacement`` is sscflow's contract: (3, Z, Y, X) mm on the (canonical) baseline grid,
    component k along array axis k, x + u(x) a physical point read in the follow-up's own
    geometry (any origin, spacing, direction). ``order`` 1 is linear, 0 nearest neighbour.
    :func:`resample` with these settings. The same thing by hand with SimpleITK::

        field = sitk.ReadImage("displacement.mha")       # an ITK vector image, baseline grid
        tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        warped = sitk.Resample(followup_image, field, tx, sitk.sitkLinear, -1024.0)
    """
    if not baseline_geometry.is_canonical:
        raise ValueError("warp_to_baseline: the baseline grid must have an identity direction")
    return resample(np.asarray(followup, np.float32), followup_geometry, baseline_geometry,
                    displacement, interpolator="linear" if order == 1 else "nearest",
                    fill=fill, dtype=np.float32)  # fmt: skip


def inside(points_zyx: np.ndarray, geometry: Geometry, margin_mm: float = 0.0) -> np.ndarray:
    """Whether physical points (3, ...) zyx mm fall inside a grid's field of view, in any
    direction: within half a voxel of its edge voxels' centres (the reach of :func:`resample`),
    less ``margin_mm`` millimetres on every side."""
    pts = np.moveaxis(np.asarray(points_zyx, np.float64), 0, -1)[..., ::-1]  # (..., 3) xyz
    d = np.asarray(geometry.direction, float)
    rel = (pts - np.asarray(geometry.origin[::-1])) @ d  # D^-1 = D^T for a rotation
    sp = np.asarray(geometry.spacing[::-1])
    lo = -0.5 * sp + float(margin_mm)
    hi = (np.asarray(geometry.shape[::-1], float) - 0.5) * sp - float(margin_mm)
    return np.all((rel >= lo) & (rel <= hi), axis=-1)


def index_to_physical(index_zyx, geometry: Geometry) -> np.ndarray:
    """Physical (z, y, x) mm of voxel indices (..., 3) in (z, y, x) order, any direction."""
    idx = np.asarray(index_zyx, np.float64)[..., ::-1] * np.asarray(geometry.spacing[::-1])
    xyz = np.asarray(geometry.origin[::-1]) + idx @ np.asarray(geometry.direction, float).T
    return xyz[..., ::-1]


def grid_points(geometry: Geometry, z0: int = 0, z1: int | None = None) -> np.ndarray:
    """Physical (3, z1 - z0, Y, X) zyx mm of a grid's voxels (slices z0..z1), any direction."""
    z1 = geometry.shape[0] if z1 is None else z1
    _, ny, nx = geometry.shape
    idx = np.stack(np.meshgrid(np.arange(z0, z1), np.arange(ny), np.arange(nx), indexing="ij"),
                   axis=-1)  # fmt: skip
    return np.moveaxis(index_to_physical(idx, geometry), -1, 0)
