"""Log-Jacobian maps against SimpleITK, closed forms, folding, summaries and the store stage."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as hs
from scipy import ndimage as ndi

from sscflow.config import JacobianConfig, config_from_dict
from sscflow.core import store as st
from sscflow.core.geometry import Geometry, to_itk
from sscflow.errors import ConfigError, IncompleteOutputError
from sscflow.methods.jacobian import (
    log_floor,
    log_jacobian,
    log_jacobian_patient,
    log_jacobian_zarr,
    summarize,
)

ISO = (1.0, 1.0, 1.0)
ANISO = (2.5, 0.7, 1.3)
PROPS = settings(max_examples=30, deadline=None)


def smooth_field(shape, seed=0, amp=3.0, sigma=2.0) -> np.ndarray:
    """A smooth random (3, Z, Y, X) float32 field in mm."""
    rng = np.random.default_rng(seed)
    comps = [ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap") for _ in range(3)]
    return (amp * np.stack(comps)).astype(np.float32)


def sitk_det(u, spacing) -> np.ndarray:
    image = sitk.DisplacementFieldJacobianDeterminant(
        to_itk(u, Geometry(u.shape[1:], spacing, (0.0, 0.0, 0.0))))
    return sitk.GetArrayFromImage(image)


def sitk_log_jacobian(u, spacing) -> np.ndarray:
    det = sitk_det(u, spacing)
    assert det.min() > 0, "test field folds; the reference needs det > 0"
    return np.log(det)


def grid(shape, spacing):
    """Physical z, y, x (mm) of every voxel, each (Z, Y, X)."""
    return np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, spacing, strict=True)],
                       indexing="ij")


# --- equality with SimpleITK ------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [ISO, ANISO])
def test_numpy_equals_sitk_everywhere(spacing):
    u = smooth_field((17, 20, 23), seed=1)
    out = log_jacobian(u, spacing)
    assert out.dtype == np.float32 and out.shape == u.shape[1:]
    ref = sitk_log_jacobian(u, spacing)
    assert ref.std() > 0.03  # a field that really deforms
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


CHUNKINGS = {
    "one chunk": (3, 21, 19, 23),
    "even": (3, 7, 19, 23),
    "uneven, edge chunks of 1 to 3": (3, (1, 9, 9, 2), (3, 13, 3), (2, 20, 1)),
    "split components, ragged": (1, (5, 16), (10, 9), (8, 8, 7)),
    "single voxels at both ends": (3, (1, 19, 1), (2, 15, 2), (3, 17, 3)),
}


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("spacing", [ISO, ANISO])
def test_dask_equals_sitk_whatever_the_chunking(chunks, spacing):
    u = smooth_field((21, 19, 23), seed=2)
    lazy_u = da.from_array(u, chunks=chunks)
    out = log_jacobian(lazy_u, spacing)
    assert isinstance(out, da.Array)
    assert out.chunks == lazy_u.chunks[1:]
    assert out.dtype == np.float32
    computed = out.compute()
    np.testing.assert_allclose(computed, sitk_log_jacobian(u, spacing), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(computed, log_jacobian(u, spacing))  # the same kernel


@pytest.mark.parametrize("window", [2, 3])
def test_zarr_streaming_equals_sitk(tmp_path, window):
    import zarr

    u = smooth_field((21, 19, 23), seed=9)
    field = zarr.create_array(tmp_path / "u.zarr", shape=u.shape, chunks=(3, 4, 8, 8),
                              dtype=np.float32)
    field[...] = u
    out = log_jacobian_zarr(field, ANISO, window=window)
    assert out.chunks == ((4, 4, 4, 4, 4, 1), (8, 8, 3), (8, 8, 7))
    computed = out.compute()
    np.testing.assert_array_equal(computed, log_jacobian(u, ANISO))
    np.testing.assert_allclose(computed, sitk_log_jacobian(u, ANISO), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="window must be an integer >= 2"):
        log_jacobian_zarr(field, ANISO, window=1)


def test_every_block_a_single_voxel():
    u = smooth_field((5, 6, 7), seed=3, sigma=1.0, amp=0.3)
    out = log_jacobian(da.from_array(u, chunks=1), ANISO).compute()
    np.testing.assert_allclose(out, sitk_log_jacobian(u, ANISO), rtol=0, atol=1e-5)


def test_thin_volumes_follow_itk():
    for shape in [(1, 6, 7), (2, 1, 5), (3, 4, 1)]:
        u = smooth_field(shape, seed=4, sigma=1.0, amp=0.3)
        np.testing.assert_allclose(log_jacobian(u, ANISO), sitk_log_jacobian(u, ANISO),
                                   rtol=0, atol=1e-5)


def test_float64_input_gives_float32_and_the_same_values():
    u = smooth_field((9, 10, 11), seed=5)
    out = log_jacobian(u.astype(np.float64), ANISO)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, sitk_log_jacobian(u, ANISO), rtol=0, atol=1e-5)


def test_log_is_accurate_beyond_the_series_range():
    """Stretches of about 0.3x to 6x (outside 0.5 <= det <= 2) take the np.log branch."""
    z, y, x = grid((12, 12, 12), ISO)
    for a in (-0.7, -0.45, 0.9, 1.2, 5.0):
        u = np.stack([a * z, np.zeros_like(y), np.zeros_like(x)]).astype(np.float32)
        ref = np.log(sitk_det(u, ISO))
        np.testing.assert_allclose(log_jacobian(u, ISO), ref, rtol=2e-7, atol=1e-7)


# --- closed forms -----------------------------------------------------------------------------

@pytest.mark.parametrize("a", [-0.4, 0.1, 0.8])
def test_linear_stretch_along_z(a):
    shape = (10, 6, 7)
    z, _, _ = grid(shape, ANISO)
    u = np.zeros((3, *shape), np.float32)
    u[0] = a * z
    out = log_jacobian(u, ANISO)
    np.testing.assert_allclose(out[1:-1], np.log1p(a), rtol=1e-6)
    # at the z faces ITK repeats the edge value: the difference covers half the stretch
    np.testing.assert_allclose(out[[0, -1]], np.log1p(a / 2), rtol=1e-6)


@given(shift=hs.tuples(*[hs.floats(-50, 50, allow_nan=False)] * 3),
       shape=hs.tuples(*[hs.integers(1, 9)] * 3),
       spacing=hs.tuples(*[hs.floats(0.2, 5.0)] * 3))
@PROPS
def test_translation_has_log_jacobian_zero_everywhere(shift, shape, spacing):
    u = np.empty((3, *shape), np.float32)
    for k in range(3):
        u[k] = shift[k]
    assert np.all(log_jacobian(u, spacing) == 0.0)
    lazy = log_jacobian(da.from_array(u, chunks=(3, 2, 3, 4)), spacing)
    assert np.all(lazy.compute() == 0.0)


def test_quadratic_field_matches_its_analytic_jacobian_inside():
    """Central differences are exact for quadratics, so the interior matches the analytic J."""
    shape = (14, 15, 16)
    z, y, x = grid(shape, ANISO)
    a, b, c, d = 0.004, 0.003, -0.005, 0.002
    u = np.stack([a * z**2, b * x * y, c * z * x + d * y**2]).astype(np.float32)
    jac = np.zeros((*shape, 3, 3))
    jac[..., 0, 0] = 1 + 2 * a * z
    jac[..., 1, 1] = 1 + b * x
    jac[..., 1, 2] = b * y
    jac[..., 2, 0] = c * x
    jac[..., 2, 1] = 2 * d * y
    jac[..., 2, 2] = 1 + c * z
    expected = np.log(np.linalg.det(jac))
    inner = (slice(1, -1),) * 3
    assert np.ptp(expected[inner]) > 0.05
    np.testing.assert_allclose(log_jacobian(u, ANISO)[inner], expected[inner], rtol=0, atol=1e-5)


@given(scale=hs.floats(0.25, 4.0), seed=hs.integers(0, 2**16))
@PROPS
def test_scaling_the_field_and_the_grid_together_changes_nothing(scale, seed):
    u = smooth_field((6, 7, 8), seed=seed, sigma=1.0, amp=0.5)
    a = log_jacobian(u, ANISO)
    b = log_jacobian(u * np.float32(scale), tuple(h * scale for h in ANISO))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@given(seed=hs.integers(0, 2**16), data=hs.data())
@settings(max_examples=12, deadline=None)
def test_any_chunking_gives_bitwise_the_numpy_result(seed, data):
    shape = (5, 6, 7)
    u = smooth_field(shape, seed=seed, sigma=1.5, amp=1.0)
    chunks = [3]
    for n in shape:
        sizes, left = [], n
        while left:
            sizes.append(data.draw(hs.integers(min(left, 2), left)))
            left -= sizes[-1]
        chunks.append(tuple(sizes))
    lazy = log_jacobian(da.from_array(u, chunks=tuple(chunks)), ISO)
    np.testing.assert_array_equal(lazy.compute(), log_jacobian(u, ISO))


# --- folding ----------------------------------------------------------------------------------

def test_folding_goes_to_the_floor_never_nan_or_inf():
    u = smooth_field((16, 16, 16), seed=6, amp=12.0, sigma=1.5)
    det = sitk_det(u, ISO)
    folded = det <= 1e-6
    assert 0 < folded.sum() < folded.size  # some folding, not all
    for out in (log_jacobian(u, ISO), log_jacobian(da.from_array(u, chunks=5), ISO).compute()):
        assert np.isfinite(out).all()
        assert np.all(out[folded] == log_floor(1e-6))
        np.testing.assert_allclose(out[~folded], np.log(det[~folded]), rtol=0, atol=1e-5)
        s = summarize(out)
        assert s["folded"] == s["folded_total"] == folded.sum()
        assert s["folded_fraction"] == pytest.approx(folded.mean())
        assert s["log_floor"] == pytest.approx(np.log(1e-6))


def test_zero_determinant_and_custom_floor():
    shape = (8, 5, 5)
    z, _, _ = grid(shape, ISO)
    u = np.zeros((3, *shape), np.float32)
    u[0] = -z  # det 0 inside, 0.5 on the z faces
    out = log_jacobian(u, ISO)
    assert np.all(out[1:-1] == log_floor(1e-6))
    np.testing.assert_allclose(out[[0, -1]], np.log(0.5), rtol=1e-6)
    floored = log_jacobian(u, ISO, floor=0.5)  # det <= floor also at the faces
    assert np.all(floored == np.float32(np.log(0.5)))
    s = summarize(floored, floor=0.5)
    assert s["folded"] == floored.size and s["folded_fraction"] == 1.0


def test_non_finite_displacement_counts_as_folded():
    u = np.zeros((3, 6, 6, 6), np.float32)
    u[1, 3, 3, 3] = np.nan
    u[2, 1, 1, 1] = np.inf
    out = log_jacobian(u, ISO)
    assert np.isfinite(out).all()
    assert summarize(out)["folded"] == np.count_nonzero(out == log_floor())
    assert out[3, 2, 3] == log_floor() and out[3, 3, 3] == 0.0  # the NaN's neighbours


# --- summaries --------------------------------------------------------------------------------

def _expected_summary(values, mask, qs):
    sel = values[mask.astype(bool)].astype(np.float64)
    return sel.mean(), np.percentile(sel, [50, *qs])


@pytest.mark.parametrize("lazy", [False, True])
def test_summary_matches_numpy_inside_a_mask(lazy):
    u = smooth_field((20, 18, 22), seed=7)
    lj = log_jacobian(u, ANISO)
    z, y, x = grid(lj.shape, ISO)
    mask = ((z - 10) ** 2 / 64 + (y - 9) ** 2 / 49 + (x - 11) ** 2 / 81 <= 1).astype(np.uint8)
    qs = (5, 25, 75, 95, 99.5)
    if lazy:
        s = summarize(log_jacobian(da.from_array(u, chunks=(3, 6, 7, 8)), ANISO),
                      da.from_array(mask, chunks=9), percentiles=qs)
    else:
        s = summarize(lj, mask, percentiles=qs)
    mean, pct = _expected_summary(lj, mask, qs)
    assert s["voxels"] == mask.sum()
    assert s["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-12)
    got = [s["median"]] + [s[f"p{q:g}"] for q in qs]
    np.testing.assert_allclose(got, pct, rtol=1e-12, atol=1e-15)
    assert s["folded"] == 0 and s["folded_total"] == 0


@given(values=hs.lists(hs.sampled_from([-2.5, -0.1, -0.0, 0.0, 1e-7, 0.25, 3.0])
                       | hs.floats(-20, 20, width=32), min_size=1, max_size=60),
       q=hs.floats(0, 100), chunk=hs.integers(1, 7))
@PROPS
def test_summary_quantiles_are_exact(values, q, chunk):
    v = np.array(values, np.float32).reshape(1, 1, -1)
    expected = np.percentile(v.astype(np.float64), [50, q])
    for arr in (v, da.from_array(v, chunks=(1, 1, chunk))):
        s = summarize(arr, percentiles=[q])
        np.testing.assert_allclose([s["median"], s[f"p{q:g}"]], expected, rtol=1e-12, atol=0)
        assert s["mean"] == pytest.approx(v.astype(np.float64).mean(), rel=1e-9, abs=1e-12)


def test_summary_rejects_bad_input():
    lj = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="selects no measured voxels"):
        summarize(lj, np.zeros_like(lj, np.uint8))
    with pytest.raises(ValueError, match="mask shape"):
        summarize(lj, np.ones((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="within \\[0, 100\\]"):
        summarize(lj, percentiles=[101])
    with pytest.raises(ValueError, match="no measured voxels"):
        summarize(np.full((2, 2, 2), np.nan, np.float32))


@pytest.mark.parametrize("lazy", [False, True])
def test_summary_leaves_unmeasured_voxels_out(lazy):
    """NaN (outside the follow-up's field of view) is left out of every number, and counted."""
    rng = np.random.default_rng(3)
    lj = rng.normal(-0.05, 0.1, (6, 8, 10)).astype(np.float32)
    mask = np.ones(lj.shape, np.uint8)
    mask[:, :, 0] = 0
    lj[:2] = np.nan  # the follow-up missed the first two slices
    measured = lj[(mask > 0) & ~np.isnan(lj)].astype(np.float64)
    arr = da.from_array(lj, chunks=(3, 4, 5)) if lazy else lj
    s = summarize(arr, mask, percentiles=[5, 95])
    assert s["voxels"] == measured.size
    assert s["unmeasured"] == 2 * 8 * 9
    assert s["measured_fraction"] == pytest.approx(measured.size / (6 * 8 * 9))
    assert s["mean"] == pytest.approx(measured.mean(), rel=1e-9)
    np.testing.assert_allclose([s["median"], s["p5"], s["p95"]],
                               np.percentile(measured, [50, 5, 95]), rtol=1e-6)  # fmt: skip


# --- input checks -----------------------------------------------------------------------------

def test_log_jacobian_rejects_bad_input():
    u = np.zeros((3, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="shape \\(3, Z, Y, X\\)"):
        log_jacobian(u[:2], ISO)
    with pytest.raises(ValueError, match="spacing must be three positive numbers"):
        log_jacobian(u, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be three positive numbers"):
        log_jacobian(u, (1.0, 1.0))
    with pytest.raises(ValueError, match="floor must be a number in \\(0, 1\\)"):
        log_jacobian(u, ISO, floor=0.0)
    with pytest.raises(ValueError, match="real"):
        log_jacobian(u.astype(np.complex64), ISO)


def test_jacobian_config_section():
    cfg = config_from_dict({"jacobian": {"floor": 0.01, "chunk": 32, "percentiles": [10, 90]}})
    assert cfg.jacobian == JacobianConfig(floor=0.01, chunk=32, percentiles=(10.0, 90.0))
    with pytest.raises(ConfigError, match="jacobian.floor"):
        config_from_dict({"jacobian": {"floor": 1.5}})
    with pytest.raises(ConfigError, match="jacobian.chunk"):
        config_from_dict({"jacobian": {"chunk": 4}})


# --- the stage --------------------------------------------------------------------------------

GEOM = Geometry((20, 18, 22), (1.5, 1.0, 1.25), (-12.0, 30.0, -7.5))


@pytest.fixture
def tiny_store(tmp_path):
    """A store with one patient: a displacement field and a baseline lung mask."""
    root = st.open_store(tmp_path / "cohort.zarr")
    group = st.patient_group(root, "P001")
    u = smooth_field(GEOM.shape, seed=8)
    z, y, x = grid(GEOM.shape, ISO)
    mask = ((z - 10) ** 2 / 49 + (y - 9) ** 2 / 36 + (x - 11) ** 2 / 64 <= 1).astype(np.uint8)
    st.write_image(group, "lung_mask", mask, GEOM, stage="segment", params={"v": 1},
                   input_hash="mask-hash", chunk=8)
    st.write_image(group, "displacement", u, GEOM, stage="register", params={"v": 1},
                   input_hash="field-hash", chunk=8)
    return tmp_path / "cohort.zarr", u, mask


def test_stage_writes_the_map_and_its_summary(tiny_store):
    path, u, mask = tiny_store
    cfg = JacobianConfig(chunk=8, percentiles=(10.0, 90.0))
    row = log_jacobian_patient(path, "P001", cfg)
    assert row["status"] == "done" and row["patient_id"] == "P001"

    group = st.patient_group(st.open_store(path, "r"), "P001", create=False)
    assert st.output_state(group, "log_jacobian") == "complete"
    image = st.read_image(group, "log_jacobian")
    assert image.geometry == GEOM
    assert image.array.dtype == np.float32 and image.array.chunks == (8, 8, 8)
    full = log_jacobian(u, GEOM.spacing)
    np.testing.assert_allclose(full, sitk_log_jacobian(u, GEOM.spacing), rtol=0, atol=1e-5)
    # stored rounded to 2^-12: within half a step of the full-precision map
    assert image.meta["quantisation"] == {"step": 2.0**-12, "max_abs_error": 2.0**-13}
    assert np.abs(image.array[...] - full).max() <= 2.0**-13
    expected = st.quantise(full, 2.0**-12)
    np.testing.assert_array_equal(image.array[...], expected)

    summary = image.meta["summary"]
    mean, (median, p10, p90) = _expected_summary(expected, mask, (10, 90))
    assert summary["mean"] == pytest.approx(mean, rel=1e-12)
    assert (summary["median"], summary["p10"], summary["p90"]) == pytest.approx((median, p10, p90))
    assert summary["voxels"] == mask.sum() and summary["folded"] == 0
    assert {k: row[k] for k in summary} == summary
    assert image.meta["stage"] == "jacobian"
    assert image.meta["params"]["floor"] == cfg.floor

    again = log_jacobian_patient(path, "P001", cfg)
    assert again["status"] == "skipped"
    assert {k: again[k] for k in summary} == summary
    changed = log_jacobian_patient(path, "P001", JacobianConfig(chunk=8, floor=1e-3))
    assert changed["status"] == "done"


def test_stage_reruns_when_the_field_changes(tiny_store):
    path, u, _ = tiny_store
    cfg = JacobianConfig(chunk=8)
    assert log_jacobian_patient(path, "P001", cfg, scheduler="synchronous")["status"] == "done"
    group = st.patient_group(st.open_store(path), "P001")
    st.write_image(group, "displacement", u * 0, GEOM, stage="register", params={"v": 1},
                   input_hash="another-field", chunk=8)
    row = log_jacobian_patient(path, "P001", cfg)
    assert row["status"] == "done" and row["mean"] == 0.0


def test_stage_names_the_patient_and_the_fix(tiny_store):
    path, u, _ = tiny_store
    group = st.patient_group(st.open_store(path), "P002")
    with pytest.raises(IncompleteOutputError, match="patient P002: .*displacement.*registration"):
        log_jacobian_patient(path, "P002")
    other = Geometry(GEOM.shape, GEOM.spacing, (0.0, 0.0, 0.0))
    st.write_image(group, "displacement", u, GEOM, stage="register", params={},
                   input_hash="h", chunk=8)
    st.write_image(group, "lung_mask", np.ones(GEOM.shape, np.uint8), other, stage="segment",
                   params={}, input_hash="h", chunk=8)
    with pytest.raises(ValueError, match="patient P002: displacement grid .* baseline lung_mask"):
        log_jacobian_patient(path, "P002")


def test_a_run_killed_before_the_summary_is_redone(tiny_store, monkeypatch):
    path, _, _ = tiny_store
    cfg = JacobianConfig(chunk=8)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sscflow.methods.jacobian.stage.summarize", killed)
    with pytest.raises(KeyboardInterrupt):
        log_jacobian_patient(path, "P001", cfg)
    monkeypatch.undo()
    group = st.patient_group(st.open_store(path), "P001")
    assert st.output_state(group, "log_jacobian") == "incomplete"  # no summary: not done
    assert group["log_jacobian"].attrs["sscflow"]["summary"] is None
    row = log_jacobian_patient(path, "P001", cfg)
    assert row["status"] == "done" and row["voxels"] > 0
    assert log_jacobian_patient(path, "P001", cfg)["status"] == "skipped"
