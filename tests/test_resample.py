"""The geometry boundary (``sscflow.core.geometry``): ``resample``, ``to_itk`` / ``from_itk``,
``affine_to_itk`` / ``affine_from_itk`` and ``Geometry.same_grid``, against references that do
not use them: ``scipy.ndimage.map_coordinates`` in physical coordinates, SimpleITK's own
Resample with hand-built ITK transforms, and closed forms. Small volumes, grids that differ in
origin, spacing, shape and direction.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from sscflow.core.geometry import (
    GRID_TOLERANCE_MM,
    Geometry,
    affine_from_itk,
    affine_to_itk,
    from_itk,
    grid_points,
    index_to_physical,
    inside,
    resample,
    to_itk,
)


def rotated(shape, spacing, origin, degrees, axis) -> Geometry:
    """A grid whose direction (ITK xyz) is a rotation of ``degrees`` about ``axis`` (xyz)."""
    d = Rotation.from_rotvec(np.deg2rad(degrees) * np.asarray(axis, float)).as_matrix()
    return Geometry(shape, spacing, origin, tuple(tuple(r) for r in d))


SOURCE = rotated((14, 16, 18), (2.5, 1.5, 1.25), (-12.0, -9.0, -11.0), 25.0, (1.0, 2.0, 0.5))
TARGET = Geometry((12, 15, 17), (2.0, 1.75, 1.5), (-10.0, -8.0, -9.5))  # canonical
TILTED = rotated((11, 13, 12), (1.5, 2.0, 1.8), (-8.0, -6.0, -7.0), -15.0, (0.3, 1.0, 0.2))


def reference(vol, source: Geometry, target: Geometry, *, displacement=None, affine=None,
              order=1, fill=0.0) -> np.ndarray:  # fmt: skip
    """The value of ``vol`` at each target voxel's physical point (plus u, or through the
    affine), by scipy in index coordinates: the point taken into the source's index frame by
    hand. ``fill`` more than half a voxel past the edge voxels' centres."""
    pts = grid_points(target)  # (3, Z, Y, X) physical zyx
    if displacement is not None:
        d = np.asarray(target.direction)  # array-axis components -> physical
        pts = pts + np.einsum("ij,j...->i...", d[::-1, ::-1], displacement)
    if affine is not None:
        matrix, offset = affine
        pts = np.einsum("ij,j...->i...", np.asarray(matrix), pts) + np.asarray(offset)[:, None,
                                                                                         None, None]
    rel = pts - np.asarray(source.origin)[:, None, None, None]
    d_zyx = np.asarray(source.direction)[::-1, ::-1]  # column k: physical zyx of array axis k
    idx = np.einsum("ji,j...->i...", d_zyx, rel) / np.asarray(source.spacing)[:, None, None, None]
    vals = ndimage.map_coordinates(np.asarray(vol, np.float64), idx, order=order, mode="nearest")
    hi = np.asarray(source.shape)[:, None, None, None] - 0.5
    vals[np.any((idx < -0.5) | (idx > hi), axis=0)] = fill
    return vals


def smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (300.0 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)).astype(np.float32)


def smooth_field(shape, amp=2.0, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) for _ in range(3)])
    return (amp * f / np.abs(f).max()).astype(np.float32)


def away_from_edges(source, target, displacement=None, affine=None, margin=0.02):
    """Target voxels whose sample point is not within ``margin`` voxels of the fill boundary
    (where float rounding decides between the edge voxel and ``fill``)."""
    pts = grid_points(target)
    if displacement is not None:
        d = np.asarray(target.direction)[::-1, ::-1]
        pts = pts + np.einsum("ij,j...->i...", d, displacement)
    if affine is not None:
        pts = (np.einsum("ij,j...->i...", np.asarray(affine[0]), pts)
               + np.asarray(affine[1])[:, None, None, None])  # fmt: skip
    mm = margin * max(source.spacing)
    return inside(pts, source, margin_mm=mm) | ~inside(pts, source, margin_mm=-mm)


@pytest.mark.parametrize("interpolator, order", [("linear", 1), ("nearest", 0)])
def test_resample_onto_another_grid_matches_scipy_in_physical_space(interpolator, order):
    vol = smooth_volume(SOURCE.shape)
    got = resample(vol, SOURCE, TARGET, interpolator=interpolator, fill=-1024.0)
    want = reference(vol, SOURCE, TARGET, order=order, fill=-1024.0)
    sel = away_from_edges(SOURCE, TARGET)
    assert got.dtype == np.float32 and got.shape == TARGET.shape
    assert sel.mean() > 0.9 and (want[sel] == -1024.0).any() and (want[sel] != -1024.0).any()
    np.testing.assert_allclose(got[sel], want[sel], atol=2e-3)


def test_resample_with_a_field_matches_scipy_on_a_tilted_source():
    vol = smooth_volume(SOURCE.shape, seed=2)
    u = smooth_field(TARGET.shape, amp=3.0)
    got = resample(vol, SOURCE, TARGET, u, fill=-1024.0)
    want = reference(vol, SOURCE, TARGET, displacement=u, fill=-1024.0)
    sel = away_from_edges(SOURCE, TARGET, displacement=u)
    assert sel.mean() > 0.9
    np.testing.assert_allclose(got[sel], want[sel], atol=2e-3)
    # the field really moved the samples: without it the answer differs
    assert np.abs(resample(vol, SOURCE, TARGET, fill=-1024.0) - got)[sel].max() > 10.0


def test_a_field_on_a_tilted_target_has_its_components_along_the_target_axes():
    vol = smooth_volume(SOURCE.shape, seed=3)
    u = smooth_field(TILTED.shape, amp=2.0, seed=4)
    got = resample(vol, SOURCE, TILTED, u, fill=0.0)
    want = reference(vol, SOURCE, TILTED, displacement=u, fill=0.0)
    sel = away_from_edges(SOURCE, TILTED, displacement=u)
    np.testing.assert_allclose(got[sel], want[sel], atol=2e-3)


def test_affine_matches_simpleitk_with_a_hand_built_transform_and_scipy():
    """y = M x + t in physical zyx; the same map built by hand in ITK's xyz."""
    m = Rotation.from_rotvec([0.1, -0.05, 0.2]).as_matrix() * 1.03  # zyx, scaled rotation
    t = np.array([1.5, -2.0, 0.75])
    vol = smooth_volume(SOURCE.shape, seed=5)
    got = resample(vol, SOURCE, TILTED, affine=(m, t), fill=-5.0)
    tx = sitk.AffineTransform(3)
    p = np.eye(3)[::-1]  # zyx <-> xyz
    tx.SetMatrix(tuple((p @ m @ p).ravel()))
    tx.SetTranslation(tuple(t[::-1]))
    ref = sitk.Image([int(n) for n in TILTED.shape[::-1]], sitk.sitkFloat32)
    ref.SetOrigin(TILTED.origin[::-1])
    ref.SetSpacing(TILTED.spacing[::-1])
    ref.SetDirection(tuple(np.ravel(TILTED.direction)))
    img = sitk.GetImageFromArray(vol)
    img.SetOrigin(SOURCE.origin[::-1])
    img.SetSpacing(SOURCE.spacing[::-1])
    img.SetDirection(tuple(np.ravel(SOURCE.direction)))
    itk = sitk.GetArrayFromImage(sitk.Resample(img, ref, tx, sitk.sitkLinear, -5.0))
    np.testing.assert_array_equal(got, itk)
    want = reference(vol, SOURCE, TILTED, affine=(m, t), fill=-5.0)
    sel = away_from_edges(SOURCE, TILTED, affine=(m, t))
    assert (want[sel] == -5.0).any() and (want[sel] != -5.0).any()
    np.testing.assert_allclose(got[sel], want[sel], atol=2e-3)


def test_cubic_reproduces_a_linear_ramp_inside_and_closed_form_translation():
    """Cubic B-spline reproduces a linear function away from the edges, and a constant field t
    reads the ramp at x + t: h(x + t) in closed form."""
    src = Geometry((30, 30, 30), (1.5, 1.5, 1.5), (-20.0, -22.0, -21.0))
    a, b = np.array([0.7, -1.3, 2.1]), 40.0
    vol = (b + np.einsum("i,i...->...", a, grid_points(src))).astype(np.float32)
    tgt = Geometry((10, 10, 10), (1.3, 1.1, 1.2), (-5.0, -6.0, -4.0))
    t = np.array([1.25, -0.8, 0.6], np.float32)
    u = np.broadcast_to(t[:, None, None, None], (3, *tgt.shape)).copy()
    want = b + np.einsum("i,i...->...", a, grid_points(tgt) + t[:, None, None, None])
    for interpolator in ("linear", "bspline"):
        got = resample(vol, src, tgt, u, interpolator=interpolator)
        np.testing.assert_allclose(got, want, atol=2e-3, err_msg=interpolator)


def test_slabs_give_the_whole_volume_answer():
    vol = smooth_volume(SOURCE.shape, seed=6)
    u = smooth_field(TARGET.shape, amp=2.0, seed=7)
    whole = resample(vol, SOURCE, TARGET, u, fill=-1024.0)
    slabbed = resample(vol, SOURCE, TARGET, u, fill=-1024.0, slab_voxels=3 * 15 * 17)
    np.testing.assert_allclose(slabbed, whole, atol=1e-4)


def test_the_same_grid_is_copied_and_types_are_kept():
    vol = np.arange(np.prod(TARGET.shape), dtype=np.int16).reshape(TARGET.shape)
    out = resample(vol, TARGET, TARGET)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, vol)
    mask = vol % 3 == 0
    near = resample(mask, TARGET, TARGET, interpolator="nearest")
    assert near.dtype == np.uint8
    np.testing.assert_array_equal(near, mask)
    other = resample(mask.astype(np.uint8), TARGET, SOURCE, interpolator="nearest")
    assert other.dtype == np.uint8 and set(np.unique(other)) <= {0, 1}


def test_resample_takes_a_simpleitk_image_as_it_is():
    vol = smooth_volume(SOURCE.shape, seed=8)
    image = to_itk(vol, SOURCE)
    np.testing.assert_array_equal(resample(image, None, TARGET), resample(vol, SOURCE, TARGET))


def test_resample_refuses_what_it_cannot_do():
    vol = np.zeros(TARGET.shape, np.float32)
    with pytest.raises(ValueError, match="interpolator must be one of"):
        resample(vol, TARGET, TARGET, interpolator="cubic")
    with pytest.raises(ValueError, match="not both"):
        resample(vol, TARGET, TARGET, np.zeros((3, *TARGET.shape)), affine=(np.eye(3), [0, 0, 0]))
    with pytest.raises(ValueError, match="must have shape"):
        resample(vol, TARGET, TARGET, np.zeros((3, 2, 2, 2)))


def test_image_round_trip_keeps_values_and_geometry():
    vol = smooth_volume(SOURCE.shape, seed=9)
    image = to_itk(vol, SOURCE)
    assert image.GetSpacing() == SOURCE.spacing[::-1]
    assert image.GetOrigin() == SOURCE.origin[::-1]
    # ITK's physical point of index (i, j, k) xyz is our index_to_physical of (k, j, i)
    p = image.TransformIndexToPhysicalPoint((3, 5, 7))
    np.testing.assert_allclose(p[::-1], index_to_physical((7, 5, 3), SOURCE), atol=1e-9)
    back, geometry = from_itk(image)
    np.testing.assert_array_equal(back, vol)
    assert geometry == SOURCE


def test_field_round_trip_on_a_tilted_grid_turns_the_components_into_physical_xyz():
    u = smooth_field(TILTED.shape, seed=10)
    image = to_itk(u, TILTED)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorFloat64  # what DisplacementFieldTransform takes
    d = np.asarray(TILTED.direction)  # ITK xyz; array-axis (x, y, z) components -> physical
    np.testing.assert_allclose(image[4, 2, 6], d @ u[::-1, 6, 2, 4], atol=1e-6)
    back, geometry = from_itk(image)
    assert back.dtype == np.float32 and geometry == TILTED
    np.testing.assert_allclose(back, u, atol=1e-6)
    with pytest.raises(ValueError, match="neither an image nor"):
        to_itk(np.zeros((2, *TILTED.shape)), TILTED)


def test_affine_round_trip_through_itk():
    m = Rotation.from_rotvec([0.2, 0.1, -0.3]).as_matrix()
    t = np.array([3.0, -1.0, 2.5])
    matrix, offset = affine_from_itk(affine_to_itk(m, t))
    np.testing.assert_allclose(matrix, m, atol=1e-12)
    np.testing.assert_allclose(offset, t, atol=1e-12)
    # the ITK transform maps a physical xyz point as M maps the zyx one
    x = np.array([4.0, -7.0, 11.0])
    y = affine_to_itk(m, t).TransformPoint(tuple(x[::-1]))
    np.testing.assert_allclose(np.asarray(y)[::-1], m @ x + t, atol=1e-12)


def test_same_grid_tolerance():
    g = Geometry((200, 300, 400), (1.0, 1.0, 1.0), (-300.0, -250.0, -200.0))

    def moved(**kw):
        fields = {"shape": g.shape, "spacing": g.spacing, "origin": g.origin,
                  "direction": g.direction} | kw  # fmt: skip
        return Geometry(**fields)

    assert g.same_grid(g)
    # what the former checks accepted: np.allclose(origin, atol=1e-4 ... 1e-3) with its rtol 1e-5
    assert g.same_grid(moved(origin=(-300.004, -250.0, -200.0)))
    assert g.same_grid(moved(spacing=(1.0, 1.0, 1.0 + 1e-6)))
    # the tolerance is in mm at the farthest voxel: a spacing error counts 399 times along x
    assert g.same_grid(moved(spacing=(1.0, 1.0, 1.0 + 0.9 * GRID_TOLERANCE_MM / 399)))
    assert not g.same_grid(moved(spacing=(1.0, 1.0, 1.0 + 1.1 * GRID_TOLERANCE_MM / 399)))
    assert not g.same_grid(moved(origin=(-300.0, -250.02, -200.0)))
    assert not g.same_grid(moved(shape=(200, 300, 401)))
    # a direction-cosine error counts as often as the grid is long (here ~ 500 mm at the corner)
    tilt = Rotation.from_rotvec([0.0, 0.0, 1e-6]).as_matrix()
    assert g.same_grid(moved(direction=tuple(map(tuple, tilt))))
    tilt = Rotation.from_rotvec([0.0, 0.0, 1e-4]).as_matrix()
    assert not g.same_grid(moved(direction=tuple(map(tuple, tilt))))
    assert g.same_grid(moved(origin=(-300.02, -250.0, -200.0)), tol_mm=0.05)


def test_inside_is_the_reach_of_resample():
    """A point inside the field of view (within half a voxel of the edge voxels) reads a voxel,
    one outside reads the fill."""
    src = Geometry((4, 5, 6), (2.0, 1.0, 1.5), (0.0, 0.0, 0.0))
    vol = np.full(src.shape, 7.0, np.float32)
    tgt = Geometry((1, 1, 2), (1.0, 1.0, 1.0), (2.0, 2.0, 0.0))
    u = np.zeros((3, *tgt.shape), np.float32)
    u[2, 0, 0, 0], u[2, 0, 0, 1] = -0.7, -1.9  # x = -0.7 mm (-0.47 voxel), x = -0.9 mm (-0.6)
    out = resample(vol, src, tgt, u, fill=-1.0)
    pts = grid_points(tgt) + u
    np.testing.assert_array_equal(inside(pts, src)[0, 0], [True, False])
    np.testing.assert_array_equal(out[0, 0], [7.0, -1.0])


def _former_template_resample(vol, source: Geometry, target: Geometry, u, fill):
    """What ``template._resample`` computed before it called ``resample``: scipy, order 1,
    edge voxels continued half a voxel, both grids canonical."""
    axes = [(target.origin[k] + np.arange(n) * target.spacing[k] - source.origin[k])
            / source.spacing[k] for k, n in enumerate(target.shape)]  # fmt: skip
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float64)
    coords += u / np.asarray(source.spacing)[:, None, None, None]
    out = ndimage.map_coordinates(vol, coords, order=1, mode="nearest").astype(np.float32)
    hi = np.asarray(vol.shape)[:, None, None, None] - 0.5
    out[np.any((coords < -0.5) | (coords > hi), axis=0)] = fill
    return out


def test_the_template_warp_is_the_former_one_bit_for_bit_except_next_to_nan():
    """On canonical grids with a field, ``resample`` gives what the template stage's own scipy
    resampler gave, bit for bit. One difference, a fix: scipy gives NaN at a point exactly on a
    voxel centre whose neighbour is NaN (weight 0 times NaN); ITK reads the voxel."""
    rng = np.random.default_rng(11)
    src = Geometry((30, 34, 32), (1.0, 1.0, 1.0), (-15.3, -17.1, -16.7))
    tgt = Geometry((28, 33, 31), (1.0, 1.0, 1.0), (-14.0, -16.0, -15.5))
    vol = ndimage.gaussian_filter(rng.standard_normal(src.shape), 2.0).astype(np.float32)
    vol[vol > np.quantile(vol, 0.95)] = np.nan  # NaN where a map is not measured
    u = smooth_field(tgt.shape, amp=3.0, seed=12)
    old = _former_template_resample(vol, src, tgt, u, 0.0)
    new = resample(vol, src, tgt, u, fill=0.0)
    assert np.isnan(new).any()
    np.testing.assert_array_equal(new, old)  # NaN where NaN, every other value equal
    still = np.zeros((3, *src.shape), np.float32)
    old = _former_template_resample(vol, src, src, still, 0.0)
    new = resample(vol, src, src, still, fill=0.0)
    np.testing.assert_array_equal(new, vol)
    assert np.isnan(old).sum() > np.isnan(vol).sum()
