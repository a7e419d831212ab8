"""Consecutive registrations composed (sscflow.methods.pairs) against known answers.

Physical space is the truth: every grid here has its own shape, spacing, origin and an oblique
direction, and every expected value is computed from analytic maps y = A x + t (and a Gaussian
bump) at physical points, with this file's own index <-> physical arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest

from sscflow.core.geometry import Geometry
from sscflow.methods.pairs import (
    COVERAGE_WEIGHT_TOL,
    compose,
    composition_inconsistency,
)

# --- this file's own geometry arithmetic (zyx mm; a grid's point = origin + M @ index) -------


def rotation(deg: float, axis) -> np.ndarray:
    """A proper rotation (Rodrigues) about ``axis``, in z, y, x coordinates."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def grid(shape, spacing, centre, turn: np.ndarray) -> Geometry:
    """A grid whose array axes z, y, x point along the columns of ``turn`` (zyx), centred on
    ``centre`` (mm)."""
    m = turn @ np.diag(spacing)
    origin = np.asarray(centre, float) - m @ ((np.asarray(shape, float) - 1) / 2)
    return Geometry(shape, spacing, tuple(origin), tuple(map(tuple, turn[::-1, ::-1])))


def frame(g: Geometry):
    """(origin, M, axes): physical = origin + M @ index, axes the unit array axes (columns)."""
    axes = np.asarray(g.direction, float)[::-1, ::-1]  # ITK's xyz rows/columns -> zyx
    return np.asarray(g.origin), axes @ np.diag(g.spacing), axes


def points(g: Geometry) -> np.ndarray:
    """(3, Z, Y, X) physical zyx of the voxel centres."""
    o, m, _ = frame(g)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"))
    return o[:, None, None, None] + np.einsum("ij,j...->i...", m, idx)


def to_index(p: np.ndarray, g: Geometry) -> np.ndarray:
    """Continuous (3, ...) index zyx of physical points (3, ...)."""
    o, m, _ = frame(g)
    return np.einsum("ij,j...->i...", np.linalg.inv(m), p - o.reshape(3, *[1] * (p.ndim - 1)))


def components(v: np.ndarray, g: Geometry) -> np.ndarray:
    """Physical vectors (3, ...) as components along g's array axes (the stored convention)."""
    return np.einsum("ji,j...->i...", frame(g)[2], v)


def physical(c: np.ndarray, g: Geometry) -> np.ndarray:
    return np.einsum("ij,j...->i...", frame(g)[2], c)


def affine(a, t):
    a, t = np.asarray(a, float), np.asarray(t, float)
    return lambda p: np.einsum("ij,j...->i...", a, p) + t.reshape(3, *[1] * (p.ndim - 1))


def bump(amplitude_mm: float, sigma_mm: float, centre, direction):
    """x -> x + a v exp(-|x - c|^2 / 2 s^2): a smooth local translation along unit v."""
    c = np.asarray(centre, float).reshape(3, 1, 1, 1)
    v = np.asarray(direction, float) / np.linalg.norm(direction)

    def f(p):
        g = np.exp(-((p - c.reshape(3, *[1] * (p.ndim - 1))) ** 2).sum(0) / (2 * sigma_mm**2))
        return p + amplitude_mm * v.reshape(3, *[1] * (p.ndim - 1)) * g

    return f


def field(phi, g: Geometry) -> np.ndarray:
    """The stored displacement of the map ``phi`` on grid g: float32 components of phi(x) - x."""
    x = points(g)
    return components(phi(x) - x, g).astype(np.float32)


def within(idx: np.ndarray, g: Geometry, lo: float, hi_less: float) -> np.ndarray:
    """Continuous indices in [lo, n - 1 - hi_less] on every axis."""
    n = np.asarray(g.shape, float).reshape(3, *[1] * (idx.ndim - 1))
    return np.all((idx >= lo) & (idx <= n - 1 - hi_less), axis=0)


def boundary_distance(idx: np.ndarray, g: Geometry, lo: float, hi_less: float) -> np.ndarray:
    """Smallest distance (index units) of a continuous index to a face of that box."""
    n = np.asarray(g.shape, float).reshape(3, *[1] * (idx.ndim - 1))
    return np.minimum(np.abs(idx - lo), np.abs(n - 1 - hi_less - idx)).min(axis=0)


def ellipsoid(g: Geometry, centre, semi) -> np.ndarray:
    x = points(g)
    c = np.asarray(centre, float).reshape(3, 1, 1, 1)
    s = np.asarray(semi, float).reshape(3, 1, 1, 1)
    return (((x - c) / s) ** 2).sum(0) <= 1.0


# --- the scans: four grids, each with its own shape, spacing, origin and direction ----------

G0 = grid((30, 32, 28), (4.0, 3.5, 3.0), (10.0, -20.0, 5.0), rotation(9.0, (1.0, 0.4, 0.2)))
G1 = grid((36, 34, 38), (3.5, 4.0, 3.2), (16.0, -24.0, 9.0), rotation(-14.0, (0.3, 1.0, 0.5)))
G2 = grid((34, 38, 36), (4.5, 3.0, 3.5), (20.0, -16.0, 2.0), rotation(11.0, (0.6, -0.2, 1.0)))
CANONICAL = grid((30, 32, 28), (4.0, 3.5, 3.0), (10.0, -20.0, 5.0), np.eye(3))

A01 = 1.03 * rotation(4.0, (0.2, 1.0, 0.1))
T01 = np.array([5.0, -3.0, 4.0])
A12 = np.diag([0.97, 1.02, 1.0]) @ rotation(-5.0, (1.0, 0.3, -0.4))
T12 = np.array([3.0, 6.0, -4.0])
A23 = 1.015 * rotation(3.0, (0.0, 0.5, 1.0))
T23 = np.array([-2.0, 2.5, -6.0])
PHI01, PHI12, PHI23 = affine(A01, T01), affine(A12, T12), affine(A23, T23)

LUNG_C, LUNG_SEMI = (10.0, -20.0, 5.0), (40.0, 35.0, 28.0)

#: float32 storage and output: values of at most ~25 mm carry ~1.5e-6 mm of rounding each;
#: a few roundings per field (the stored value, ITK's float32 interpolation, the sum)
ROUNDING_MM = 1e-4


def composed_truth(g0: Geometry, *maps) -> np.ndarray:
    x = points(g0)
    y = x
    for phi in maps:
        y = phi(y)
    return y - x


def stage_points(g0: Geometry, *maps):
    """The physical points x_j reached after each map (x_1 = phi01(x), ...)."""
    y, out = points(g0), []
    for phi in maps:
        y = phi(y)
        out.append(y)
    return out


# --- (a) analytic compositions ---------------------------------------------------------------


@pytest.mark.parametrize("slab_voxels", [1, 5000, 1 << 21])
def test_affine_chain_is_exact_between_edge_voxel_centres(slab_voxels):
    """Three affine pairs on four oblique grids. Trilinear interpolation reproduces any function
    affine in the index, and an affine map in physical space is affine in any grid's index, so
    at points whose x_1, x_2 lie between the later grids' edge voxel centres (all 8 neighbours
    on the grid) the composition is exact up to float32 rounding (ROUNDING_MM)."""
    fields = [(field(PHI01, G0), G0), (field(PHI12, G1), G1), (field(PHI23, G2), G2)]
    out = compose(fields, slab_voxels=slab_voxels)
    assert out.displacement.shape == (3, *G0.shape) and out.displacement.dtype == np.float32
    assert out.geometry == G0
    truth = components(composed_truth(G0, PHI01, PHI12, PHI23), G0)
    x1, x2 = stage_points(G0, PHI01, PHI12)
    interior = within(to_index(x1, G1), G1, 0.0, 0.0) & within(to_index(x2, G2), G2, 0.0, 0.0)
    assert interior.mean() > 0.5  # most of the grid is tested
    assert out.valid[interior].all()
    err = np.linalg.norm(out.displacement[:, interior] - truth[:, interior], axis=0)
    assert err.max() < ROUNDING_MM, err.max()
    assert np.abs(truth[:, interior]).max() > 10.0  # a real displacement, not a near-zero one


def test_half_voxel_band_reads_the_edge_value_within_its_bound():
    """Past the edge voxel centres, within half a voxel (the reach of resample), the edge voxel
    is read: the point moves by at most half a voxel's diagonal h/2, so the error is at most
    ||A12 - I||_2 |h1| / 2."""
    out = compose([(field(PHI01, G0), G0), (field(PHI12, G1), G1)])
    truth = components(composed_truth(G0, PHI01, PHI12), G0)
    idx1 = to_index(PHI01(points(G0)), G1)
    band = within(idx1, G1, -0.5, -0.5) & ~within(idx1, G1, 0.0, 0.0)
    band &= boundary_distance(idx1, G1, -0.5, -0.5) > 1e-6
    assert band.sum() > 100
    assert out.valid[band].all()
    bound = np.linalg.norm(A12 - np.eye(3), 2) * np.linalg.norm(G1.spacing) / 2
    err = np.linalg.norm(out.displacement[:, band] - truth[:, band], axis=0)
    assert err.max() <= bound + ROUNDING_MM, (err.max(), bound)
    assert err.max() > 10 * ROUNDING_MM  # the band is really read at the edge, not extrapolated


def test_bump_composition_within_the_interpolation_bound():
    """u12 a Gaussian bump (amplitude a, width s) on top of an affine map: trilinear
    interpolation errs by at most sum_i h_i^2 / 8 * max|d^2 f / de_i^2| <= sum h_i^2 / 8 * a / s^2
    (the affine part is exact; the bump's vector is a fixed direction times a scalar Gaussian,
    whose second derivative along any unit vector is at most a / s^2)."""
    a, s = 6.0, 18.0
    bmp = bump(a, s, (14.0, -22.0, 8.0), (1.0, -0.5, 0.8))
    phi12 = lambda p: bmp(PHI12(p))  # noqa: E731
    out = compose([(field(PHI01, G0), G0), (field(phi12, G1), G1)])
    truth = components(composed_truth(G0, PHI01, phi12), G0)
    interior = within(to_index(PHI01(points(G0)), G1), G1, 0.0, 0.0)
    bound = sum(h * h for h in G1.spacing) / 8 * a / s**2
    err = np.linalg.norm(out.displacement[:, interior] - truth[:, interior], axis=0)
    print(f"bump: max error {err.max():.4f} mm, mean {err.mean():.5f} mm, bound {bound:.4f} mm")
    assert err.max() <= bound + ROUNDING_MM
    # the bump is really there: without it the answer would be a mm or more off near its centre
    flat = components(composed_truth(G0, PHI01, PHI12), G0)
    assert np.linalg.norm(truth - flat, axis=0).max() > 5.0


def test_components_follow_each_grid_direction():
    """The same physical maps stored on a canonical first grid (the pipeline's baseline) and on
    an oblique one give the same physical composition: the components are turned by each
    grid's direction, not taken as physical z, y, x on an oblique grid."""
    for g0 in (CANONICAL, G0):
        out = compose([(field(PHI01, g0), g0), (field(PHI12, G1), G1)])
        ok = within(to_index(PHI01(points(g0)), G1), G1, 0.0, 0.0)
        got = physical(out.displacement.astype(np.float64), g0)
        want = composed_truth(g0, PHI01, PHI12)
        assert np.abs(got[:, ok] - want[:, ok]).max() < ROUNDING_MM
    # on the canonical grid the components are physical z, y, x
    out = compose([(field(PHI01, CANONICAL), CANONICAL), (field(PHI12, G1), G1)])
    ok = within(to_index(PHI01(points(CANONICAL)), G1), G1, 0.0, 0.0)
    want = composed_truth(CANONICAL, PHI01, PHI12)
    assert np.abs(out.displacement[:, ok] - want[:, ok]).max() < ROUNDING_MM


# --- (b) consistency against the direct pair -------------------------------------------------


def _lung(g0=G0):
    mask = ellipsoid(g0, LUNG_C, LUNG_SEMI)
    # the test's premise: the whole mask maps between G1's edge voxel centres
    assert within(to_index(PHI01(points(g0))[:, mask], G1), G1, 0.0, 0.0).all()
    return mask.astype(np.uint8)


def test_direct_equal_to_the_composition_is_consistent():
    a, s = 4.0, 20.0
    bmp = bump(a, s, (14.0, -22.0, 8.0), (0.3, 1.0, -0.6))
    phi12 = lambda p: bmp(PHI12(p))  # noqa: E731
    consecutive = [(field(PHI01, G0), G0), (field(phi12, G1), G1)]
    direct = components(composed_truth(G0, PHI01, phi12), G0).astype(np.float32)
    mask = _lung()
    r = composition_inconsistency(consecutive, (direct, G0), mask)
    print("consistent:", r)
    assert r["mean_mm"] < 0.05
    assert r["max_mm"] <= sum(h * h for h in G1.spacing) / 8 * a / s**2 + ROUNDING_MM
    assert r["measured_fraction"] == 1.0 and r["n_voxels"] == int(mask.sum()) > 3000
    assert r["p95_mm"] <= r["max_mm"]


def test_direct_off_by_a_known_shift():
    consecutive = [(field(PHI01, G0), G0), (field(PHI12, G1), G1)]
    shift = np.array([0.9, -1.2, 0.0])  # physical mm, |shift| = 1.5
    truth = composed_truth(G0, PHI01, PHI12) + shift.reshape(3, 1, 1, 1)
    direct = components(truth, G0).astype(np.float32)
    r = composition_inconsistency(consecutive, (direct, G0, np.ones(G0.shape, np.uint8)),
                                  _lung())  # fmt: skip
    print("shifted:", r)
    assert abs(r["mean_mm"] - 1.5) < 0.01
    assert abs(r["p95_mm"] - 1.5) < 0.01 and abs(r["max_mm"] - 1.5) < 0.01
    assert r["measured_fraction"] == 1.0


def test_direct_on_another_grid_is_refused():
    consecutive = [(field(PHI01, G0), G0), (field(PHI12, G1), G1)]
    moved = Geometry(G0.shape, G0.spacing, (G0.origin[0] + 1.0, *G0.origin[1:]), G0.direction)
    with pytest.raises(ValueError, match="first pair's grid"):
        composition_inconsistency(consecutive, (field(PHI01, G0), moved), _lung())
    with pytest.raises(ValueError, match="shape"):
        compose([(field(PHI01, G0)[:, :-1], G0)])


# --- (c) coverage ----------------------------------------------------------------------------


def test_uncovered_slab_of_a_later_field_is_excluded():
    """G1's slices z >= zc not covered: a point is unmeasured when the interpolation at x_1 gives
    those slices weight > COVERAGE_WEIGHT_TOL, i.e. x_1's continuous z index in G1 is past
    zc - 1 + COVERAGE_WEIGHT_TOL (G1 is oblique: that plane is tilted in G0)."""
    zc = 20
    cover = np.ones(G1.shape, np.uint8)
    cover[zc:] = 0
    mask = _lung().astype(bool)
    consecutive = [(field(PHI01, G0), G0), (field(PHI12, G1), G1, cover)]
    direct = components(composed_truth(G0, PHI01, PHI12), G0).astype(np.float32)
    full = composition_inconsistency([consecutive[0], consecutive[1][:2]], (direct, G0), mask)
    cut = composition_inconsistency(consecutive, (direct, G0), mask)

    zi = to_index(PHI01(points(G0)), G1)[0]
    edge = zc - 1 + COVERAGE_WEIGHT_TOL
    lost = mask & (zi > edge)
    unsure = mask & (np.abs(zi - edge) < 1e-4)
    expected_drop = lost.sum() / mask.sum()
    print(f"coverage: full {full['measured_fraction']:.4f}, cut {cut['measured_fraction']:.4f}, "
          f"expected drop {expected_drop:.4f} (+- {unsure.sum()} voxels)")
    assert full["measured_fraction"] == 1.0
    assert 0.1 < expected_drop < 0.6
    drop = full["measured_fraction"] - cut["measured_fraction"]
    assert abs(drop - expected_drop) <= unsure.sum() / mask.sum() + 1e-12
    assert cut["n_voxels"] == full["n_voxels"] - int(round(drop * mask.sum()))
    # voxel by voxel, and NaN (not a value) where unmeasured
    out = compose(consecutive)
    sure = mask & ~unsure
    assert np.array_equal(out.valid[sure], ~lost[sure])
    assert np.isnan(out.displacement[:, lost & sure]).all()
    assert cut["max_mm"] < ROUNDING_MM  # what is kept is still right


def test_uncovered_slabs_of_the_first_and_direct_fields_are_excluded():
    mask = _lung().astype(bool)
    c01 = np.ones(G0.shape, bool)
    c01[:12] = False
    c02 = np.ones(G0.shape, np.uint8)
    c02[:, :, 16:] = 0
    consecutive = [(field(PHI01, G0), G0, c01), (field(PHI12, G1), G1)]
    direct = components(composed_truth(G0, PHI01, PHI12), G0).astype(np.float32)
    r = composition_inconsistency(consecutive, (direct, G0, c02), mask)
    kept = mask & c01 & (c02 > 0)
    assert r["n_voxels"] == int(kept.sum())
    assert r["measured_fraction"] == pytest.approx(kept.sum() / mask.sum(), abs=1e-12)
    assert 0.2 < 1 - r["measured_fraction"] < 0.8
    assert r["mask_voxels"] == int(mask.sum())
    assert np.array_equal(compose(consecutive).valid[mask], c01[mask])  # the rest maps into G1


# --- (d) points mapped outside a later grid ---------------------------------------------------


def test_points_mapped_outside_the_second_grid_are_excluded_not_extrapolated():
    """phi01 moves the lung by some 60 mm, partly past G1's edge: those points are unmeasured
    (NaN), however well an affine u12 would extrapolate; the rest are exact (or within the edge
    band's bound)."""
    phi01 = affine(A01, T01 + np.array([50.0, 20.0, -40.0]))
    mask = ellipsoid(G0, LUNG_C, LUNG_SEMI)
    consecutive = [(field(phi01, G0), G0), (field(PHI12, G1), G1)]
    truth = composed_truth(G0, phi01, PHI12)
    direct = components(truth, G0).astype(np.float32)
    idx1 = to_index(phi01(points(G0)), G1)
    reach = within(idx1, G1, -0.5, -0.5)  # half a voxel past the edge voxel centres
    unsure = boundary_distance(idx1, G1, -0.5, -0.5) < 1e-6
    out = compose(consecutive)
    assert 0.1 < 1 - reach[mask].mean() < 0.7
    assert np.array_equal(out.valid[~unsure], reach[~unsure])
    assert np.isnan(out.displacement[:, ~reach]).all()
    r = composition_inconsistency(consecutive, (direct, G0), mask)
    assert abs(r["measured_fraction"] - reach[mask].mean()) <= unsure[mask].mean() + 1e-12
    bound = np.linalg.norm(A12 - np.eye(3), 2) * np.linalg.norm(G1.spacing) / 2
    assert r["max_mm"] <= bound + ROUNDING_MM
    interior = mask & within(idx1, G1, 0.0, 0.0)
    d = np.linalg.norm(out.displacement[:, interior] - components(truth, G0)[:, interior], axis=0)
    assert d.max() < ROUNDING_MM
    # a margin: points must lie margin_mm inside the reach, along each of G1's axes
    m = 6.0
    idx = idx1
    sp = np.asarray(G1.spacing).reshape(3, 1, 1, 1)
    n = np.asarray(G1.shape).reshape(3, 1, 1, 1)
    inner = np.all((idx >= -0.5 + m / sp) & (idx <= n - 0.5 - m / sp), axis=0)
    near = np.min(np.minimum(np.abs(idx + 0.5 - m / sp), np.abs(n - 0.5 - m / sp - idx)),
                  axis=0) < 1e-6  # fmt: skip
    got = compose(consecutive, margin_mm=m).valid
    assert np.array_equal(got[~near], inner[~near])
    assert inner.sum() < reach.sum()


def test_points_mapped_outside_the_third_grid_are_excluded():
    small = grid((16, 18, 14), (4.0, 3.0, 3.5), (25.0, -18.0, 0.0), rotation(20.0, (1, 0, 1)))
    consecutive = [(field(PHI01, G0), G0), (field(PHI12, G1), G1), (field(PHI23, small), small)]
    x1, x2 = stage_points(G0, PHI01, PHI12)
    idx1, idx2 = to_index(x1, G1), to_index(x2, small)
    reach = within(idx1, G1, -0.5, -0.5) & within(idx2, small, -0.5, -0.5)
    unsure = (boundary_distance(idx1, G1, -0.5, -0.5) < 1e-6) | (
        boundary_distance(idx2, small, -0.5, -0.5) < 1e-6)  # fmt: skip
    out = compose(consecutive)
    assert 0.05 < reach.mean() < 0.6
    assert np.array_equal(out.valid[~unsure], reach[~unsure])
    assert np.isnan(out.displacement[:, ~reach]).all()
    interior = within(idx1, G1, 0.0, 0.0) & within(idx2, small, 0.0, 0.0)
    truth = components(composed_truth(G0, PHI01, PHI12, PHI23), G0)
    assert interior.sum() > 500
    d = np.linalg.norm(out.displacement[:, interior] - truth[:, interior], axis=0)
    assert d.max() < ROUNDING_MM
