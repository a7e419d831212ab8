"""Registration in physical space (issue 12): two scans on different grids relate only through
their geometries. Small volumes with known answers: the rigid lung-mask alignment, the warp of a
follow-up on another grid, the coverage of a field of view, and register() on pairs whose grids
differ in shape, origin, spacing and direction."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from sscflow.core.geometry import Geometry, grid_points, inside, to_itk, warp_to_baseline
from sscflow.methods.registration import register
from sscflow.methods.registration.align import align_masks, rotation_angle_deg
from sscflow.methods.registration.common import log_jacobian
from sscflow.methods.registration.frame import coverage_mask
from sscflow.synth import planted

HAS_TORCH = importlib.util.find_spec("torch") is not None
BACKENDS = ["sitk", pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH,
                                                                   reason="needs torch"))]


def rot(deg, axis):
    return planted.rotation(deg, axis)


def _lungs(geometry: Geometry, matrix=None, offset=None):
    """Two ellipsoidal 'lungs' (chest-like, mm), moved by y = matrix x + offset, on a grid."""
    matrix = np.eye(3) if matrix is None else matrix
    offset = np.zeros(3) if offset is None else offset
    pts = grid_points(geometry, 0, geometry.shape[0])  # (3, Z, Y, X) physical
    x = np.einsum("ij,j...->i...", np.linalg.inv(matrix), pts - offset[:, None, None, None])
    out = np.zeros(geometry.shape, bool)
    for cx in (-55.0, 60.0):  # left lung a bit larger than the right: no mirror symmetry
        semi = (95.0, 55.0, 40.0 if cx < 0 else 46.0)
        d = (x[0] / semi[0]) ** 2 + ((x[1] - 10.0) / semi[1]) ** 2 + ((x[2] - cx) / semi[2]) ** 2
        out |= d <= 1.0
    return out


def test_align_masks_recovers_a_rigid_motion_on_other_grids():
    g = Geometry((64, 56, 72), (4.0, 4.0, 4.0), (-128.0, -110.0, -144.0))
    # follow-up: the patient rotated 15 degrees and moved 120 mm along the table; another grid
    r = rot(15.0, (0.4, 1.0, 0.3))
    t = np.array([120.0, 25.0, -30.0])
    d = rot(6.0, (0.0, 0.0, 1.0))[::-1, ::-1]  # an oblique ITK direction
    fg = Geometry((60, 60, 60), (5.0, 4.5, 4.5), (-60.0, -150.0, -170.0),
                  tuple(tuple(row) for row in d))  # fmt: skip
    a = align_masks(_lungs(g), g, _lungs(fg, r, t), fg)
    assert a.dice > 0.9
    assert rotation_angle_deg(a.matrix @ r.T) < 3.0  # degrees; the affine stage refines it
    c = np.array([0.0, 10.0, 0.0])  # the lungs' centre: where the map must be right
    assert np.linalg.norm(a.apply(c) - (r @ c + t)) < 3.0


def test_align_masks_identity_is_exact():
    g = Geometry((40, 36, 44), (5.0, 5.0, 5.0), (-100.0, -80.0, -110.0))
    m = _lungs(g)
    a = align_masks(m, g, m, g)
    np.testing.assert_allclose(a.matrix, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(a.offset, 0.0, atol=1e-3)


def test_warp_to_baseline_reads_the_followup_in_its_own_geometry():
    """A linear ramp image on a rotated, shifted grid, read at x + u(x) for a known u: the
    values must be the ramp at those physical points (an analytic answer)."""
    d = rot(20.0, (1.0, 0.3, 0.0))[::-1, ::-1]
    # a big grid about the origin, rotated: every point read below lies well inside it
    corner = -np.array([60.0, 64.0, 64.0])[::-1]  # xyz
    fg = Geometry((48, 64, 64), (2.5, 2.0, 2.0), tuple((np.asarray(d) @ corner)[::-1]),
                  tuple(tuple(row) for row in d))  # fmt: skip
    p = grid_points(fg, 0, fg.shape[0])
    ramp = (0.5 * p[0] - 0.25 * p[1] + 0.75 * p[2]).astype(np.float32)  # value = f(physical)
    bg = Geometry((10, 12, 14), (2.0, 2.0, 2.0), (-5.0, -6.0, -7.0))
    x = grid_points(bg, 0, bg.shape[0])
    u = np.stack([3.0 + 0.05 * x[1], -2.0 + 0.0 * x[0], 1.0 - 0.03 * x[0]]).astype(np.float32)
    y = x + u
    expect = 0.5 * y[0] - 0.25 * y[1] + 0.75 * y[2]
    got = warp_to_baseline(ramp, fg, u, bg)
    np.testing.assert_allclose(got, expect, atol=1e-3)


def test_coverage_counts_points_inside_the_field_of_view():
    fov = Geometry((20, 30, 30), (2.0, 1.0, 1.0), (10.0, 0.0, 0.0))  # z covers 9..49 mm
    bg = Geometry((30, 4, 4), (2.0, 2.0, 2.0), (0.0, 5.0, 5.0))  # z 0..58 mm
    u = np.zeros((3, *bg.shape), np.float32)
    u[0] = 5.0  # every point moves 5 mm up: z + 5 inside 9..49  <=>  4 <= z <= 44
    cov = coverage_mask(u, bg, fov)
    z = bg.origin[0] + np.arange(bg.shape[0]) * bg.spacing[0]
    np.testing.assert_array_equal(cov[:, 0, 0], (z + 5 >= 9.0) & (z + 5 <= 49.0))
    pts = np.array([[9.1, 10.0, 10.0], [8.9, 10.0, 10.0]]).T  # zyx, (3, 2)
    np.testing.assert_array_equal(inside(pts, fov), [True, False])


def _texture_world(seed=0):
    """A smooth random CT-like texture defined in physical space (a function of mm)."""
    rng = np.random.default_rng(seed)
    tex = ndimage.gaussian_filter(rng.standard_normal((60, 60, 60)), 1.5)
    tex = (-500.0 + 350.0 * tex / tex.std()).astype(np.float32)
    world = Geometry(tex.shape, (2.0, 2.0, 2.0), (-60.0, -60.0, -60.0))
    return tex, world


def _render(tex, world, grid, matrix=None, offset=None):
    return planted.render_on(tex, world, grid, matrix=matrix, offset=offset, order=3,
                             fill=-500.0)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_register_pair_on_other_grids(backend):
    """The follow-up is the same texture with the patient moved (rotation 8 degrees, shift)
    on a grid of another shape, origin, spacing and direction: u must be the motion."""
    tex, world = _texture_world()
    bg = Geometry((32, 32, 32), (2.0, 2.0, 2.0), (-32.0, -32.0, -32.0))
    r = rot(8.0, (0.2, 1.0, 0.5))
    t = np.array([14.0, -6.0, 5.0])
    d = rot(10.0, (0.0, 1.0, 0.0))[::-1, ::-1]
    fg = Geometry((36, 40, 38), (2.2, 1.8, 1.9), (-30.0, -45.0, -40.0),
                  tuple(tuple(row) for row in d))  # fmt: skip
    fixed = _render(tex, world, bg)
    moving = _render(tex, world, fg, r, t)
    mask = np.zeros(bg.shape, bool)
    mask[6:-6, 6:-6, 6:-6] = True
    # the same tissue seen in the follow-up (where its "lung mask" would be)
    mmask = planted.render_on(mask.astype(np.float32), bg, fg, matrix=r, offset=t, order=1,
                              fill=0.0) >= 0.5  # fmt: skip
    opts = {"sitk": {"levels_mm": (4.0, 2.0), "iterations": (20, 10), "margin_mm": 6.0},
            "torch": {"levels_mm": (4.0, 2.0), "iterations": (30, 15), "margin_mm": 6.0,
                      "threads": 1}}[backend]  # fmt: skip
    u = register(fixed, moving, mask=mask, moving_mask=mmask, fixed_geometry=bg,
                 moving_geometry=fg, backend=backend, **opts)  # fmt: skip
    x = grid_points(bg, 0, bg.shape[0])
    true_u = np.einsum("ij,j...->i...", r, x) + t[:, None, None, None] - x
    err = np.sqrt(((u - true_u) ** 2).sum(axis=0))[mask]
    assert err.mean() < 0.6, err.mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scan_registered_to_itself_stays_put(backend):
    """Same data, same grid: no displacement, no log-Jacobian (the cause of the blobs was
    full-size steps on a vanishing gradient and pyramids averaging different voxel blocks)."""
    tex, world = _texture_world(seed=2)
    bg = Geometry((36, 36, 36), (2.0, 2.0, 2.0), (-36.0, -36.0, -36.0))
    fixed = _render(tex, world, bg)
    mask = np.zeros(bg.shape, bool)
    mask[7:-5, 9:-4, 6:-8] = True  # a crop that starts off the pyramid's block grid
    opts = {"sitk": {}, "torch": {"threads": 1}}[backend]
    u = register(fixed, fixed.copy(), mask=mask, moving_mask=mask, fixed_geometry=bg,
                 moving_geometry=bg, backend=backend, **opts)  # fmt: skip
    mag = np.sqrt((u**2).sum(axis=0))[mask]
    lj = np.abs(log_jacobian(u, bg.spacing)[mask])
    assert mag.mean() < 0.05 and np.percentile(lj, 99) < 0.01, (mag.mean(), lj.max())


def test_to_itk_keeps_the_direction():
    d = rot(30.0, (0.0, 0.0, 1.0))[::-1, ::-1]
    g = Geometry((3, 4, 5), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), tuple(tuple(r) for r in d))
    img = to_itk(np.zeros(g.shape, np.float32), g)
    assert Geometry.of(img) == g
    assert isinstance(img, sitk.Image)


def _store_pair(tmp_path, follow_matrix, follow_shift, cut_z=None, ball_mm=None):
    """A tiny store with one patient: texture 'lungs' on a baseline grid, and a follow-up of
    the same anatomy moved by (matrix, shift) on another grid (z extent cut to ``cut_z``)."""
    from sscflow.core import store as st

    tex, world = _texture_world(seed=4)
    bg = Geometry((40, 36, 44), (3.0, 3.0, 3.0), (-60.0, -54.0, -66.0))
    n = cut_z or 44
    fg = Geometry((n, 40, 48), (3.0, 3.0, 3.0), (-66.0 + follow_shift[0], -60.0, -72.0))
    lungs_b = _lungs(bg)
    lungs_f = _lungs(fg, follow_matrix, np.asarray(follow_shift, float))
    if ball_mm:  # the follow-up's "lungs" are something else: a ball
        p = grid_points(fg, 0, fg.shape[0])
        lungs_f = (p**2).sum(axis=0) <= ball_mm**2
    hu_b = np.where(lungs_b, _render(tex, world, bg), 0.0)
    hu_f = np.where(lungs_f, _render(tex, world, fg, follow_matrix, np.asarray(follow_shift)),
                    0.0)  # fmt: skip
    root = st.open_store(tmp_path / "s.zarr")
    group = st.patient_group(root, "P1")
    for name, arr, geom in (("baseline", hu_b, bg), ("followup", hu_f, fg),
                            ("lung_mask", lungs_b, bg), ("followup_lung_mask", lungs_f, fg)):
        st.write_image(group, name, np.asarray(arr).astype(np.int16 if "lung" not in name
                                                           else np.uint8), geom,
                       stage="test", params={}, input_hash=name)  # fmt: skip
    return tmp_path / "s.zarr"


def test_stage_fails_a_pair_whose_lungs_cannot_be_aligned(tmp_path):
    from sscflow.config import RegistrationConfig
    from sscflow.errors import RegistrationFailedError
    from sscflow.methods.registration.stage import register_patient

    # the follow-up's "lungs" are a 30 mm ball (another anatomy, or a failed segmentation):
    # no rigid map overlaps them with the baseline's
    store = _store_pair(tmp_path, np.eye(3), (0.0, 0.0, 0.0), ball_mm=30.0)
    cfg = RegistrationConfig(backend="sitk")
    cfg.sitk.levels_mm, cfg.sitk.iterations = (3.0,), (2,)
    with pytest.raises(RegistrationFailedError, match="could not be aligned .*Dice 0\\.[0-4]"):
        register_patient(store, "P1", cfg)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_stage_fails_a_followup_covering_too_little_lung(tmp_path):
    from sscflow.config import RegistrationConfig
    from sscflow.core import store as st
    from sscflow.errors import RegistrationFailedError
    from sscflow.methods.registration.stage import register_patient

    # the follow-up's grid stops 60 mm above the lungs' lower end: about 40 % of them imaged
    store = _store_pair(tmp_path, np.eye(3), (0.0, 0.0, 0.0), cut_z=20)
    cfg = RegistrationConfig(backend="torch")
    cfg.torch.levels_mm, cfg.torch.iterations = (6.0, 3.0), (2, 2)
    cfg.torch.affine_iterations = (30,)
    cfg.torch.threads = 1
    with pytest.raises(RegistrationFailedError, match=r"covers \d+% of the baseline lung"):
        register_patient(store, "P1", cfg)
    group = st.patient_group(st.open_store(store, mode="r"), "P1", create=False)
    assert st.output_state(group, "displacement") == "absent"


def test_render_on_continues_the_edge_or_fills():
    """Past the source grid, ``fill=None`` shows the nearest edge voxel; a number fills."""
    g = Geometry((4, 3, 5), (2.0, 1.0, 1.0), (10.0, -1.0, -2.0))
    src = np.broadcast_to(np.arange(5, dtype=np.float32) * 10.0, g.shape).copy()
    src[-1] += 100.0  # the last z slice differs: the one past it must copy it
    # two slices past the top of the source along z, same in-plane grid
    out_g = Geometry((6, 3, 5), g.spacing, g.origin)
    edge = planted.render_on(src, g, out_g, order=1, fill=None)
    filled = planted.render_on(src, g, out_g, order=1, fill=-1024.0)
    np.testing.assert_allclose(edge[:4], src, atol=1e-4)
    np.testing.assert_allclose(edge[4:], np.broadcast_to(src[-1], (2, 3, 5)), atol=1e-4)
    np.testing.assert_array_equal(filled[4:], -1024.0)


def test_rigid_then_affine_composes_as_two_maps():
    """register()'s second pass maps p -> R(A(p)), with A given about the baseline's voxel 0."""
    from sscflow.methods.registration import _then_affine
    from sscflow.methods.registration.align import Alignment

    g = Geometry((20, 30, 40), (2.0, 1.5, 1.0), (-100.0, 35.0, -7.0))
    rigid = Alignment(rot(17.0, (0.3, 1.0, 0.2)), np.array([12.0, -40.0, 5.0]), 0.9, "x")
    m = np.eye(3) + np.array([[0.02, -0.01, 0.0], [0.005, -0.03, 0.01], [0.0, 0.02, 0.01]])
    t = np.array([1.5, -2.0, 0.7])
    p = np.random.default_rng(0).uniform(-150, 150, (50, 3))
    local = (p - np.asarray(g.origin)) @ m.T + t  # A in mm about voxel 0
    expected = rigid.apply(local + np.asarray(g.origin))
    np.testing.assert_allclose(_then_affine(rigid, m, t, g).apply(p), expected, atol=1e-9)
