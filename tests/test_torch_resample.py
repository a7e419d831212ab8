"""The torch resampling, blur and composition (``sscflow.methods.registration.torch_resample``)
against SimpleITK, scipy and the numpy composition, on the CPU device; and ``register`` with its
torch path against its SimpleITK path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sscflow.core.geometry import Geometry, index_to_physical
from sscflow.methods.registration.align import Alignment
from sscflow.methods.registration.common import compose as compose_np
from sscflow.methods.registration.frame import compose_rigid, resample_moving
from sscflow.synth import planted

torch = pytest.importorskip("torch")
tr = pytest.importorskip("sscflow.methods.registration.torch_resample")


def _volume(shape, seed=0):
    """A smooth-plus-sharp test volume in HU: blobs, an edge and noise."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    a = -700 + 400 * a / a.std()
    a[:, :, : shape[2] // 3] += 800.0  # a sharp wall
    return a.astype(np.float32)


def _oblique(shape=(18, 22, 20)):
    """A follow-up grid: other spacing and origin, an oblique, x-flipped direction (xyz)."""
    d = np.diag([-1.0, 1.0, 1.0]) @ planted.rotation(9.0, (0.3, 1.0, 0.4))[::-1, ::-1]
    return Geometry(shape, (2.3, 1.7, 1.9), (-12.0, 20.5, 30.0), tuple(map(tuple, d)))


@pytest.mark.parametrize("cubic", [True, False])
def test_resample_matches_simpleitk_across_grids(cubic):
    mg = _oblique()
    moving = _volume(mg.shape)
    fg = Geometry((20, 24, 26), (1.5, 1.5, 1.5), (-25.0, 8.0, 2.0))
    r = planted.rotation(7.0, (1.0, 0.4, 0.2))
    # centre onto centre, then moved 12 mm in x: part of the baseline grid falls outside
    cm = index_to_physical((np.asarray(mg.shape) - 1) / 2, mg)
    cf = index_to_physical((np.asarray(fg.shape) - 1) / 2, fg)
    al = Alignment(r, cm - r @ cf + np.array([3.0, -2.0, 12.0]), float("nan"), "test")
    ref, ref_valid = resample_moving(moving, mg, fg, al, cubic=cubic)
    out, valid = tr.resample(tr.to_device(moving, "cpu"), mg, fg, al.matrix, al.offset,
                             cubic=cubic)  # fmt: skip
    out, valid = out.numpy(), valid.numpy()
    assert 0.2 < ref_valid.mean() < 0.9  # the test crosses the follow-up's edge
    # the edge itself (a point within float rounding of it) may fall either side
    agree = valid == (ref_valid > 0.5)
    assert agree.mean() > 0.999
    np.testing.assert_allclose(valid[agree], ref_valid[agree], atol=1e-6)
    both = agree & (valid > 0)
    # values span ~ 2900 HU; the bound is float32 rounding of coefficients and positions
    assert float(np.abs(out[both] - ref[both]).max()) < 0.005  # measured 0.0009
    assert np.all(out[agree & (valid == 0)] == -1024.0)


def test_bspline_coefficients_interpolate_the_samples():
    """Read at the voxel centres, the cubic B-spline gives the samples back (a small volume,
    where the mirror wraps more than once)."""
    a = _volume((5, 7, 40), seed=3)
    c = tr.bspline_coefficients(torch.from_numpy(a).double())
    g = Geometry(a.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    out, valid = tr.resample(c.float(), g, g, np.eye(3), np.zeros(3), coefficients=c)
    assert valid.min() == 1
    assert float(np.abs(out.numpy() - a).max()) < 2e-3


def test_gaussian_blur_matches_scipy():
    a = _volume((15, 17, 19), seed=1)
    sigma = (0.6, 1.3, 2.0)
    ref = ndimage.gaussian_filter(a, sigma, mode="nearest")
    out = tr.gaussian_blur(torch.from_numpy(a), sigma).numpy()
    assert float(np.abs(out - ref).max()) < 1e-3


def test_compose_matches_the_numpy_composition():
    rng = np.random.default_rng(2)
    fg = Geometry((14, 16, 18), (1.5, 1.2, 1.0), (-30.0, 12.0, 5.0))
    box = (slice(2, 11), slice(3, 14), slice(1, 17))
    local = rng.normal(0, 2, (3, 9, 11, 16)).astype(np.float32)
    a = np.eye(3) + rng.normal(0, 0.03, (3, 3))
    a_off = rng.normal(0, 3, 3)
    r = planted.rotation(11.0, (0.2, 1.0, 0.5))
    al = Alignment(r, np.array([4.0, -7.0, 2.5]), float("nan"), "test")
    ref = compose_rigid(compose_np(local, box, fg.shape, fg.spacing, a, a_off), fg, al)
    out = tr.compose(torch.from_numpy(local), box, fg, a, a_off, al.matrix, al.offset).numpy()
    assert float(np.abs(out - ref).max()) < 1e-4
    ref0 = compose_rigid(compose_np(None, box, fg.shape, fg.spacing, a, a_off), fg, al)
    out0 = tr.compose(None, box, fg, a, a_off, al.matrix, al.offset).numpy()
    assert float(np.abs(out0 - ref0).max()) < 1e-4


def test_warm_up_runs_once_per_device():
    tr._WARM.pop("cpu", None)
    assert tr.warm_up("cpu") > 0.0
    assert tr.warm_up("cpu") == 0.0


def test_warm_up_from_concurrent_threads_runs_once():
    # a GPU worker starts several pairs at once; CUDA's lazily loaded linear algebra fails when
    # two threads load it together, so exactly one thread may warm the device up
    from concurrent.futures import ThreadPoolExecutor

    tr._WARM.pop("cpu", None)
    with ThreadPoolExecutor(4) as pool:
        seconds = list(pool.map(lambda _: tr.warm_up("cpu"), range(4)))
    assert sum(s > 0.0 for s in seconds) == 1, seconds


def _pair_across_grids():
    """A textured baseline on a 2 mm grid and its follow-up, rotated 6 degrees and moved, on an
    oblique grid of other spacing; lung masks of both (a box moved with the content)."""
    rng = np.random.default_rng(4)
    tex = ndimage.gaussian_filter(rng.standard_normal((70, 70, 70)), 1.6)
    tex = -500.0 + 350.0 * tex / tex.std()
    fg = Geometry((36, 36, 36), (2.0, 2.0, 2.0), (10.0, -40.0, 5.0))
    tex_origin = np.asarray(fg.origin) - 34.0  # the texture: 70^3 voxels of 2 mm from here

    def at(points):  # the texture at physical points (..., 3) zyx mm, and the box mask there
        idx = np.moveaxis((points - tex_origin) / 2.0, -1, 0)
        value = ndimage.map_coordinates(tex, idx, order=3, mode="nearest").astype(np.float32)
        lo, hi = np.asarray(fg.origin) + 16.0, np.asarray(fg.origin) + 54.0
        return value, np.all((points >= lo) & (points <= hi), axis=-1)

    c = np.asarray(fg.origin) + 35.0
    r = planted.rotation(6.0, (0.4, 1.0, 0.3))
    t = c - r @ c + np.array([3.0, -4.0, 2.0])  # follow-up point y = r x + t of baseline x
    d = planted.rotation(8.0, (1.0, 0.2, 0.0))[::-1, ::-1]
    mg = Geometry((30, 40, 38), (2.4, 1.8, 1.9), tuple(c + np.array([-34.0, -38.0, -30.0])),
                  tuple(map(tuple, d)))  # fmt: skip
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in fg.shape], indexing="ij"), -1)
    fixed, mask = at(np.asarray(fg.origin) + idx * 2.0)
    midx = np.stack(np.meshgrid(*[np.arange(n) for n in mg.shape], indexing="ij"), -1)
    y = index_to_physical(midx, mg)
    moving, moving_mask = at((y - t) @ np.linalg.inv(r).T)  # content moved by the map's inverse
    return fixed, fg, mask, moving, mg, moving_mask


def test_register_on_the_torch_path_matches_the_simpleitk_path():
    """The whole torch path of ``register`` (on the CPU device here; on CUDA in production)
    gives the field of its SimpleITK path: the follow-up differs by float rounding only."""
    from sscflow.methods.registration import register

    fixed, fg, mask, moving, mg, moving_mask = _pair_across_grids()
    opts = {"levels_mm": (4.0, 2.0), "iterations": (30, 15), "affine_iterations": (60, 30),
            "margin_mm": 6.0, "threads": 1, "device": "cpu"}  # fmt: skip
    out = {}
    for on_device in (False, True):
        out[on_device] = register(fixed, moving, mask=mask, moving_mask=moving_mask,
                                  fixed_geometry=fg, moving_geometry=mg, backend="torch",
                                  return_info=True, resample_on_device=on_device, **opts)
    (u0, info0), (u1, info1) = out[False], out[True]
    assert info0["device"] is None and info1["device"] == "cpu"
    # the baseline filtered as the follow-up was, on both paths (numpy, torch)
    assert info0["interpolation_matched"] and info1["interpolation_matched"]
    diff = np.sqrt(((u1 - u0) ** 2).sum(0))[mask]
    size = np.sqrt((u0**2).sum(0))[mask]
    assert float(size.mean()) > 2.0  # a real motion
    assert float(diff.max()) < 1e-3, (float(diff.mean()), float(diff.max()))  # measured 2e-6
