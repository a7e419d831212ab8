"""Image geometry in sscflow's axis order; the one place ITK's (x, y, z) order is converted.

sscflow arrays are numpy (z, y, x). SimpleITK images, spacings, origins and vector components are
(x, y, z). Convert only through the helpers here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


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

    def physical_point(self, index_zyx) -> np.ndarray:
        """Physical (z, y, x) mm of a (possibly fractional) voxel index (z, y, x)."""
        idx_xyz = np.asarray(index_zyx, dtype=float)[::-1]
        d = np.asarray(self.direction)
        p_xyz = np.asarray(self.origin[::-1]) + d @ (idx_xyz * np.asarray(self.spacing[::-1]))
        return p_xyz[::-1]

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


def to_numpy(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """A SimpleITK image as a (z, y, x) numpy array (a copy) and its geometry."""
    return sitk.GetArrayFromImage(image), Geometry.of(image)


def to_sitk(array: np.ndarray, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """A (z, y, x) numpy array as a SimpleITK image; spacing and origin are (z, y, x) mm."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in origin[::-1]))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in np.asarray(direction, dtype=float).ravel()))
    return image


def field_to_sitk(displacement: np.ndarray, spacing, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A (3, Z, Y, X) displacement (component k along array axis k) as an ITK vector image.

    ITK vector components are (x, y, z), so the components are reversed here.
    """
    if displacement.ndim != 4 or displacement.shape[0] != 3:
        raise ValueError(
            f"a displacement field must have shape (3, Z, Y, X), got {displacement.shape}"
        )
    vec = np.moveaxis(displacement[::-1], 0, -1).astype(np.float64, copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(vec), isVector=True)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in origin[::-1]))
    return image


def field_from_sitk(image: sitk.Image) -> np.ndarray:
    """An ITK displacement image (components x, y, z) as (3, Z, Y, X) float32, z-y-x components."""
    vec = sitk.GetArrayFromImage(image)  # (Z, Y, X, 3) with components x, y, z
    return np.ascontiguousarray(np.moveaxis(vec, -1, 0)[::-1]).astype(np.float32)


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


def image_of(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A (z, y, x) array as a SimpleITK image with the geometry's origin, spacing, direction."""
    return to_sitk(array, geometry.spacing, geometry.origin, geometry.direction)


def reference_image(geometry: Geometry) -> sitk.Image:
    """An empty SimpleITK image on ``geometry`` (a Resample reference grid)."""
    ref = sitk.Image([int(n) for n in geometry.shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing(geometry.spacing[::-1])
    ref.SetOrigin(geometry.origin[::-1])
    ref.SetDirection(tuple(np.asarray(geometry.direction, float).ravel()))
    return ref


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
    The same thing by hand with SimpleITK::

        field = sitk.ReadImage("displacement.mha")       # an ITK vector image, baseline grid
        tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        warped = sitk.Resample(followup_image, field, tx, sitk.sitkLinear, -1024.0)
    """
    if not baseline_geometry.is_canonical:
        raise ValueError("warp_to_baseline: the baseline grid must have an identity direction")
    image = image_of(np.asarray(followup, np.float32), followup_geometry)
    field = field_to_sitk(np.asarray(displacement), baseline_geometry.spacing,
                          baseline_geometry.origin)  # fmt: skip
    tx = sitk.DisplacementFieldTransform(field)
    interp = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    out = sitk.Resample(image, reference_image(baseline_geometry), tx, interp, float(fill),
                        sitk.sitkFloat32)  # fmt: skip
    return sitk.GetArrayFromImage(out)


def inside(points_zyx: np.ndarray, geometry: Geometry, margin_vox: float = 0.0) -> np.ndarray:
    """Whether physical points (3, ...) zyx mm fall inside a grid's field of view (between its
    first and last voxel centres, less ``margin_vox`` voxels), in any direction."""
    pts = np.moveaxis(np.asarray(points_zyx, np.float64), 0, -1)[..., ::-1]  # (..., 3) xyz
    d = np.asarray(geometry.direction, float)
    rel = (pts - np.asarray(geometry.origin[::-1])) @ d  # D^-1 = D^T for a rotation
    idx = rel / np.asarray(geometry.spacing[::-1])
    hi = np.asarray(geometry.shape[::-1], float) - 1.0
    return np.all((idx >= -0.5 + margin_vox) & (idx <= hi + 0.5 - margin_vox), axis=-1)


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
