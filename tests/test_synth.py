"""Tests of sscflow.synth against known answers and independent references.

References: scipy's Spearman rho, the functional-worsening rule recomputed here, SimpleITK
resampling with the stored field, a numpy finite-difference Jacobian, closed-form divergence of
the planted velocity, pydicom, and a plain threshold segmenter.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.stats import spearmanr

from sscflow.core.geometry import Geometry, from_itk, inside
from sscflow.core.imageio import read_volume
from sscflow.synth import (
    Truth,
    deform,
    plan_cohort,
    read_truth,
    synthesize_cohort,
    synthesize_patient,
)
from sscflow.synth.cohort import simulate
from sscflow.synth.phantom import grid_geometry

SEED = 0


@pytest.fixture(scope="module")
def plan212():
    return plan_cohort(212, seed=SEED)


@pytest.fixture(scope="module")
def plan24():
    return plan_cohort(24, seed=SEED)


def _first(plan, visual, fmt=None):
    rows = plan[(plan["visual"] == visual) & ((plan["format"] == fmt) if fmt else True)]
    return rows.iloc[0]


# ------------------------------------------------------------------------------------ plan


def test_plan_reproduces_paper_group_sizes(plan212):
    assert plan212["visual"].value_counts().to_dict() == {
        "worsened": 73,
        "stable": 132,
        "improved": 7,
    }
    assert int((plan212["functional"] == "worsening").sum()) == 91
    assert plan212["patient_id"].tolist()[:2] == ["SYN001", "SYN002"]
    assert plan212["patient_id"].is_unique


def test_plan_spearman_rhos_match_paper(plan212):
    m = plan212["planned_mean_logjac"]
    for name, target in (("fvc", 0.38), ("dlco", 0.42), ("tlc", 0.35), ("kco", 0.20)):
        delta = plan212[f"{name}_followup"] - plan212[f"{name}_baseline"]
        rho = spearmanr(m, delta).statistic
        assert abs(rho - target) < 0.07, (name, rho)


def test_plan_functional_label_follows_rule_on_written_values(plan212):
    tol = 1e-6
    fvc_decline = plan212["fvc_baseline"] - plan212["fvc_followup"]
    dlco_decline = plan212["dlco_baseline"] - plan212["dlco_followup"]
    rule = (fvc_decline >= 10 - tol) | (dlco_decline >= 15 - tol)
    assert ((plan212["functional"] == "worsening") == rule).all()
    for col in [c for c in plan212.columns if c.endswith(("_baseline", "_followup"))]:
        assert (plan212[col] == plan212[col].round(1)).all()
        assert (plan212[col] > 0).all()


def test_plan_demographics_and_worsened_shrink_more(plan212):
    assert 45 < plan212["age"].mean() < 65
    assert plan212["age"].between(18, 85).all()
    assert 0.7 < (plan212["sex"] == "F").mean() < 0.9
    assert plan212["interval_months"].between(9, 36).all()
    by_group = plan212.groupby("visual")["planned_mean_logjac"].mean()
    assert by_group["worsened"] < by_group["stable"] - 0.02 < by_group["improved"]
    worse = plan212[plan212["visual"] == "worsened"]
    assert (worse["regional_strength"] < 0).all()
    assert (worse["density_change_hu"].between(100, 400)).all()
    assert (plan212.loc[plan212["visual"] == "improved", "regional_strength"] > 0).all()
    assert (plan212.loc[plan212["visual"] == "stable", "regional_strength"] == 0).all()


def test_plan_is_deterministic(plan212):
    pd.testing.assert_frame_equal(plan212, plan_cohort(212, seed=SEED))
    other = plan_cohort(212, seed=SEED + 1)
    assert not np.allclose(other["fvc_followup"], plan212["fvc_followup"])


def test_plan_small_cohorts_are_proportional_and_mix_formats():
    assert plan_cohort(1)["visual"].tolist() == ["stable"]
    p = plan_cohort(24)
    assert p["visual"].value_counts().to_dict() == {"stable": 15, "worsened": 8, "improved": 1}
    assert int((p["functional"] == "worsening").sum()) == 10  # round(91 / 212 * 24)
    assert p["format"].tolist()[:4] == ["nifti", "mha", "dicom", "nifti"]


def test_patient_geometry_draws_do_not_depend_on_cohort_size(plan24):
    small = plan_cohort(5, seed=SEED)
    cols = ["sink_sigma_mm_r", "sink_fy_l", "rotation_deg", "translation_x_mm"]
    pd.testing.assert_frame_equal(small[cols], plan24[cols].iloc[:5])


@pytest.mark.parametrize("n", [0, -3])
def test_plan_rejects_empty_cohort(n):
    with pytest.raises(ValueError, match="n_patients must be at least 1"):
        plan_cohort(n)


# ------------------------------------------------------------------------------ deformation


def test_velocity_has_gaussian_divergence():
    sink = deform.Sink((0.0, 0.0, 0.0), 20.0, -0.3)
    rng = np.random.default_rng(1)
    pts = rng.uniform(-60, 60, (50, 3))
    h = 1e-3
    div = np.zeros(len(pts))
    for k in range(3):
        e = np.zeros(3)
        e[k] = h
        div += deform.velocity(pts + e, [sink])[:, k] - deform.velocity(pts - e, [sink])[:, k]
    div /= 2 * h
    r2 = (pts**2).sum(axis=1)
    np.testing.assert_allclose(div, -0.3 * np.exp(-r2 / (2 * 20.0**2)), atol=1e-6)


def test_flow_backward_inverts_forward():
    sinks = [deform.Sink((0.0, 10.0, -20.0), 18.0, -0.45), deform.Sink((5.0, 0.0, 40.0), 25.0, 0.3)]
    pts = np.random.default_rng(2).uniform(-80, 80, (200, 3))
    back = deform.flow(deform.flow(pts, sinks), sinks, backward=True)
    np.testing.assert_allclose(back, pts, atol=1e-3)


def test_global_matrix_has_planned_determinant():
    m = deform.global_matrix(-0.1, (0.3, 0.4, 0.5), 2.0)
    assert np.log(np.linalg.det(m)) == pytest.approx(-0.1, abs=1e-12)


def _numpy_log_jacobian(u, spacing):
    """Independent reference: central differences on the interior."""
    grads = [np.gradient(u[k], *spacing) for k in range(3)]
    jac = np.empty(u.shape[1:] + (3, 3))
    for k in range(3):
        for j in range(3):
            jac[..., k, j] = grads[k][j] + (1.0 if k == j else 0.0)
    return np.log(np.linalg.det(jac))


@pytest.mark.parametrize("visual", ["worsened", "improved", "stable"])
def test_realised_fields_match_plan(plan24, visual):
    """Fields only, very coarse grid: the planted statistics hold for the realised field."""
    row = _first(plan24, visual)
    sim = simulate(row, 6.0, SEED, images=False)
    lj = sim.deformation.log_jacobian
    assert np.isfinite(lj).all()
    assert sim.deformation.min_det > 0
    assert float(lj[sim.lung].mean()) == pytest.approx(row["planned_mean_logjac"], abs=1e-5)
    inner = (slice(1, -1),) * 3
    ref = _numpy_log_jacobian(sim.deformation.displacement.astype(np.float64), (6.0,) * 3)
    np.testing.assert_allclose(lj[inner], ref[inner], atol=1e-4)
    if visual == "stable":
        assert not sim.region.any()
        # pure affine: the same log-Jacobian everywhere but on the faces, where ITK
        # repeats the edge value (half the difference)
        assert np.ptp(lj[inner]) < 1e-4
    else:
        assert sim.region.sum() * sim.geometry.voxel_volume_ml > 20
        if visual == "worsened":
            assert -0.45 <= lj[sim.region].min() <= -0.15
            assert lj[sim.region].mean() < lj[sim.lung & ~sim.region].mean() - 0.05
        else:
            assert 0.05 <= lj[sim.region].max() <= 0.35
    assert sim.record["inverse_error_mm"] < 0.05


def test_realised_extremes_do_not_depend_on_spacing(plan24):
    row = _first(plan24, "worsened")
    coarse = simulate(row, 6.0, SEED, images=False).record
    fine = simulate(row, 4.0, SEED, images=False).record
    assert coarse["realised_extreme_logjac"] == pytest.approx(
        fine["realised_extreme_logjac"], abs=0.02
    )
    assert coarse["lung_volume_ml"] == pytest.approx(fine["lung_volume_ml"], rel=0.03)


# ---------------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def baseline_25(plan24):
    """One worsened patient at 2.5 mm with noise (images in memory)."""
    return simulate(_first(plan24, "worsened"), 2.5, SEED)


def _threshold_segmenter(hu):
    """A plain reference segmenter: below -400 HU inside the body, minus the airway tree (the
    air component reaching the top slice, grown by a voxel), two largest components, holes
    filled slice by slice."""
    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500])
    lumen, _ = ndimage.label((hu < -900) & body)
    tree = np.isin(lumen, np.unique(lumen[-1][lumen[-1] > 0]))
    candidates = (hu < -400) & body & ~ndimage.binary_dilation(tree)
    labels, _ = ndimage.label(candidates)
    keep = np.argsort(np.bincount(labels.ravel())[1:])[-2:] + 1
    return np.stack([ndimage.binary_fill_holes(s) for s in np.isin(labels, keep)])


def test_threshold_segmenter_reaches_dice_095(baseline_25):
    seg = _threshold_segmenter(baseline_25.baseline)
    truth = baseline_25.lung
    dice = 2 * (seg & truth).sum() / (seg.sum() + truth.sum())
    assert dice >= 0.95


def test_phantom_anatomy_invariants(baseline_25):
    hu, lung = baseline_25.baseline, baseline_25.lung
    Z, Y, X = hu.shape
    # two lungs that touch neither each other nor the edges of the scan
    labels, n = ndimage.label(lung)
    assert n == 2
    assert not (lung[0].any() or lung[-1].any() or lung[:, 0].any() or lung[:, -1].any())
    # the lungs are clear of the body surface
    outside = hu < -900
    outside_air = ndimage.binary_dilation(
        np.isin(ndimage.label(outside)[0], [ndimage.label(outside)[0][0, 0, 0]]), iterations=3
    )
    assert not (outside_air & lung).any()
    # baseline lung parenchyma is below -400 HU (median), tissue around 40 HU
    assert np.median(hu[lung]) < -750
    # right lung (x < 0, low index) is larger than the left
    right, left = (lung[:, :, : X // 2]).sum(), (lung[:, :, X // 2 :]).sum()
    assert right > left
    # the airway tree reaches the top slice in the midline and enters both lungs
    lumen = hu < -900
    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500])
    lab, _ = ndimage.label(lumen & body)
    top = np.unique(lab[-1][lab[-1] > 0])
    assert len(top) == 1
    tree = lab == top[0]
    xs = np.nonzero(tree[-1])[1]
    assert abs(xs.mean() - (X - 1) / 2) * 2.5 < 15
    near_lung = ndimage.binary_dilation(lung, iterations=2)
    assert (tree & near_lung)[:, :, : X // 2].any() and (tree & near_lung)[:, :, X // 2 :].any()
    assert not (tree & lung).any()  # airway lumen is not lung


# -------------------------------------------------------------------------- written files


@pytest.fixture(scope="module")
def written(tmp_path_factory, plan24):
    """A worsened patient (MHA) and an improved one without noise, 4 mm."""
    out = tmp_path_factory.mktemp("synth")
    recs = {}
    for visual in ("worsened", "improved"):
        row = _first(plan24, visual)
        recs[visual] = synthesize_patient(row, out, spacing=4.0, seed=SEED, fmt="mha", noise_hu=0.0)
    return out, recs


def _warp_back(out, rec):
    """The baseline and the follow-up read on the truth's grid through physical space: the
    follow-up file (its own grid) at x + u(x) through the stored field (SimpleITK), the
    baseline file at x; and where x + u(x) lies inside the follow-up's field of view."""
    base = read_volume(out / rec["baseline"])
    follow = read_volume(out / rec["followup"])
    field = sitk.ReadImage(str(out / "truth" / rec["patient_id"] / "displacement.mha"))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    back = sitk.Resample(sitk.Cast(follow, sitk.sitkFloat32), field, tx, sitk.sitkBSpline, -1024.0)
    ref = sitk.Resample(sitk.Cast(base, sitk.sitkFloat32), field, sitk.Transform(),
                        sitk.sitkBSpline, -1024.0)  # fmt: skip
    g = Geometry.of(field)
    axes = [g.origin[k] + np.arange(n) * g.spacing[k] for k, n in enumerate(g.shape)]
    u = from_itk(field)[0]
    pts = np.stack(np.meshgrid(*axes, indexing="ij")) + u
    fov = Geometry.of(follow)
    seen = (inside(pts, fov, margin_mm=max(fov.spacing))
            & inside(pts - u, Geometry.of(base), margin_mm=max(base.GetSpacing())))
    return sitk.GetArrayFromImage(ref).astype(float), sitk.GetArrayFromImage(back), seen


@pytest.mark.parametrize("visual", ["worsened", "improved"])
def test_followup_is_baseline_warped_by_true_field(written, visual):
    out, recs = written
    rec = recs[visual]
    base, back, seen = _warp_back(out, rec)
    truth = read_truth(out, rec["patient_id"])
    region = truth.region.astype(bool)
    # compare where x + u(x) falls inside the follow-up scan, in the body, outside the change
    inside_fov = seen
    changed = ndimage.binary_dilation(region, iterations=6)
    mask = inside_fov & (base > -500) & ~changed
    diff = back - base
    # two acquisitions (own grids, thick slices averaged), each resampled once more here
    assert np.median(np.abs(diff[mask])) < 10.0
    assert np.corrcoef(back[mask], base[mask])[0, 1] > 0.98
    # inside the planted region the follow-up differs by about the planted density change
    planted = rec["density_change_mean_hu"]
    assert abs(planted) > 10
    assert diff[region].mean() == pytest.approx(planted, rel=0.3)


def test_each_scan_is_its_own_acquisition(written, tmp_path, plan24):
    """Baseline and follow-up come on different grids (shape, origin, spacing), the follow-up's
    patient moved (its field is not the same-grid one), as real pairs do; --same-grid (the
    ``acquisitions=False`` of the library) restores one identical grid."""
    out, recs = written
    for rec in recs.values():
        b = Geometry.of(read_volume(out / rec["baseline"]))
        f = Geometry.of(read_volume(out / rec["followup"]))
        assert b.shape != f.shape and b.origin != f.origin and b.spacing != f.spacing
        assert 0.0 < rec["followup_rotation_deg"] <= 5.0
        assert abs(rec["followup_shift_z_mm"]) <= 60.0
        assert rec["followup_slice_mm"] >= 0.9 * 4.0 - 1e-6
    row = _first(plan24, "worsened")
    same = synthesize_patient(row, tmp_path, spacing=4.0, seed=SEED, fmt="mha", noise_hu=0.0,
                              acquisitions=False)  # fmt: skip
    b = Geometry.of(read_volume(tmp_path / same["baseline"]))
    f = Geometry.of(read_volume(tmp_path / same["followup"]))
    assert b == f == grid_geometry(4.0)


def test_truth_files_read_back(written, plan24):
    out, recs = written
    rec = recs["worsened"]
    truth = read_truth(out, rec["patient_id"])
    assert isinstance(truth, Truth)
    g = truth.geometry
    assert g == grid_geometry(4.0)
    assert g.is_canonical and g.spacing == (4.0, 4.0, 4.0) and all(abs(o) > 1 for o in g.origin)
    assert truth.displacement.shape == (3, *g.shape) and truth.displacement.dtype == np.float32
    assert truth.log_jacobian.dtype == np.float32
    for mask in (truth.lung, truth.region):
        assert mask.dtype == bool and mask.shape == g.shape
    # the follow-up's lung truth lies on the follow-up's own grid (its acquisition)
    assert truth.lung_followup.dtype == bool
    assert truth.lung_followup.shape == truth.followup_geometry.shape
    lung = truth.lung.astype(bool)
    assert truth.log_jacobian[lung].mean() == pytest.approx(rec["planned_mean_logjac"], abs=1e-5)
    # independent reference: SimpleITK on the stored field agrees with the stored log-Jacobian
    field = sitk.ReadImage(str(out / "truth" / rec["patient_id"] / "displacement.mha"))
    det = sitk.GetArrayFromImage(
        sitk.DisplacementFieldJacobianDeterminant(sitk.Cast(field, sitk.sitkVectorFloat64))
    )
    assert det.min() > 0
    # the stored field holds the follow-up's rigid move (up to ~100 mm): float32 rounding of
    # its finite differences, not of the truth, sets this tolerance
    np.testing.assert_allclose(np.log(det), truth.log_jacobian, atol=2e-3)
    # the follow-up lung truth is the lung seen through the field: volume ratio = exp(mean lj)
    ratio = (truth.lung_followup.sum() * truth.followup_geometry.voxel_volume_ml) / (
        truth.lung.sum() * truth.geometry.voxel_volume_ml)  # each on its own grid
    assert ratio == pytest.approx(np.exp(truth.log_jacobian[lung]).mean(), rel=0.02)


def test_read_truth_names_missing_patient(written):
    out, _ = written
    with pytest.raises(FileNotFoundError, match="SYN999"):
        read_truth(out, "SYN999")


# ------------------------------------------------------------------------------- cohorts


@pytest.fixture(scope="module")
def cohort3(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort3")
    calls = []
    manifest = synthesize_cohort(
        3, out, spacing=6.0, seed=SEED, progress=lambda *a: calls.append(a)
    )
    return out, manifest, calls


def test_cohort_layout_formats_and_progress(cohort3):
    out, manifest, calls = cohort3
    assert manifest == out / "manifest.csv"
    frame = pd.read_csv(manifest)
    assert list(frame.columns) == [
        "patient_id", "baseline", "followup", "fvc_baseline", "fvc_followup",
        "dlco_baseline", "dlco_followup", "tlc_baseline", "tlc_followup", "kco_baseline",
        "kco_followup", "visual", "interval_months", "age", "sex",
    ]  # fmt: skip
    assert frame["baseline"].tolist() == [
        "images/SYN001/baseline.nii.gz",
        "images/SYN002/baseline.mha",
        "images/SYN003/baseline",
    ]
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    for col in ("baseline", "followup"):
        for rel in frame[col]:
            image = read_volume(out / rel)
            assert image.GetPixelID() == sitk.sitkInt16
            # each scan its own acquisition: pixels 0.86-1.14 x 6 mm, slices 0.9-1.8 x or 12
            sx, sy, sz = image.GetSpacing()
            assert sx == sy and 0.86 * 6 - 1e-6 <= sx <= 1.14 * 6 + 1e-6
            assert 0.9 * 6 - 1e-6 <= sz <= 1.8 * 6 + 1e-6 or sz == pytest.approx(12.0)
    truth = pd.read_csv(out / "truth" / "truth.csv")
    assert truth["patient_id"].tolist() == ["SYN001", "SYN002", "SYN003"]
    np.testing.assert_allclose(
        truth["realised_mean_logjac"], truth["planned_mean_logjac"], atol=1e-5
    )
    for pid in truth["patient_id"]:
        for name in ("displacement", "log_jacobian", "lung", "lung_followup", "region"):
            assert (out / "truth" / pid / f"{name}.mha").is_file()
    import json

    summary = json.loads((out / "truth" / "cohort.json").read_text(encoding="utf-8"))
    assert summary["n"] == 3 and summary["seed"] == SEED and summary["spacing"] == 6.0
    assert summary["counts"]["format"] == {"nifti": 1, "mha": 1, "dicom": 1}


def test_dicom_series_is_readable_and_anonymous(cohort3):
    pydicom = pytest.importorskip("pydicom")
    out, _, _ = cohort3
    folder = out / "images" / "SYN003" / "followup"
    files = sorted(folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.PatientID == "SYN003"
    assert str(ds.PatientName) == "SYNTHETIC^SYN003"
    assert ds.get("PatientBirthDate", "") == ""
    assert ds.Modality == "CT"
    assert ds.pixel_array.dtype == np.int16
    dicom = read_volume(folder)
    assert len(files) == dicom.GetSize()[2]
    # the series reads back on the grid it was written on (its own acquisition)
    rec = pd.read_csv(out / "truth" / "truth.csv").set_index("patient_id").loc["SYN003"]
    assert "x".join(str(n) for n in dicom.GetSize()[::-1]) == rec["followup_shape"]
    assert dicom.GetSpacing()[2] == pytest.approx(rec["followup_slice_mm"], abs=1e-3)


def _digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_bytes(tmp_path, plan24):
    row = plan24.iloc[1]  # an MHA patient
    a = synthesize_patient(row, tmp_path / "a", spacing=6.0, seed=SEED, fmt="nifti")
    b = synthesize_patient(row, tmp_path / "b", spacing=6.0, seed=SEED, fmt="nifti")
    assert a == b
    for rel in (a["baseline"], a["followup"], "truth/SYN002"):
        assert _digest(tmp_path / "a" / rel) == _digest(tmp_path / "b" / rel), rel
    synthesize_patient(row, tmp_path / "c", spacing=6.0, seed=SEED + 1, fmt="nifti")
    assert _digest(tmp_path / "c" / a["baseline"]) != _digest(tmp_path / "a" / a["baseline"])


def test_dicom_pixels_and_uids_are_deterministic(tmp_path, plan24):
    pydicom = pytest.importorskip("pydicom")
    row = plan24.iloc[2]
    for name in ("a", "b"):
        synthesize_patient(row, tmp_path / name, spacing=6.0, seed=SEED, fmt="dicom")
    for fa in sorted((tmp_path / "a" / "images" / "SYN003" / "baseline").glob("*.dcm")):
        da = pydicom.dcmread(fa)
        db = pydicom.dcmread(str(fa).replace(f"{tmp_path}/a", f"{tmp_path}/b"))
        assert da.SOPInstanceUID == db.SOPInstanceUID
        assert da.SeriesInstanceUID == db.SeriesInstanceUID
        assert da.PixelData == db.PixelData


def test_dicom_bytes_are_identical(tmp_path, plan24):
    row = plan24.iloc[2]
    for name in ("a", "b"):
        synthesize_patient(row, tmp_path / name, spacing=6.0, seed=SEED, fmt="dicom")
    rel = Path("images/SYN003/baseline")
    assert _digest(tmp_path / "a" / rel) == _digest(tmp_path / "b" / rel)


def test_cohort_with_dask_client_matches_serial(tmp_path, cohort3):
    distributed = pytest.importorskip("distributed")
    serial_out, _, _ = cohort3
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ) as client:
        seen = []
        manifest = synthesize_cohort(
            3, tmp_path, spacing=6.0, seed=SEED, client=client,
            progress=lambda done, total, pid: seen.append((done, total, pid)),
        )  # fmt: skip
    assert sorted(s[2] for s in seen) == ["SYN001", "SYN002", "SYN003"]
    assert [s[0] for s in seen] == [1, 2, 3]
    assert manifest.read_bytes() == (serial_out / "manifest.csv").read_bytes()
    assert (tmp_path / "truth" / "truth.csv").read_bytes() == (
        serial_out / "truth" / "truth.csv"
    ).read_bytes()
    rel = "images/SYN002/followup.mha"
    assert _digest(tmp_path / rel) == _digest(serial_out / rel)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_patients": 0}, "n_patients must be a whole number >= 1"),
        ({"spacing": 0.0}, r"spacing must be in \(0, 6\] mm"),
        ({"spacing": -1.0}, r"spacing must be in \(0, 6\] mm"),
        ({"spacing": 6.5}, r"spacing must be in \(0, 6\] mm"),
    ],
)
def test_cohort_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"n_patients": 2, "spacing": 2.5} | kwargs
    with pytest.raises(ValueError, match=match):
        synthesize_cohort(args.pop("n_patients"), tmp_path, **args)
    assert not (tmp_path / "manifest.csv").exists()


def test_synthesize_patient_rejects_unknown_format(tmp_path, plan24):
    with pytest.raises(ValueError, match="fmt must be one of nifti, mha, dicom"):
        synthesize_patient(plan24.iloc[0], tmp_path, spacing=6.0, seed=SEED, fmt="png")


def test_import_does_not_load_torch():
    code = "import sys, sscflow.synth; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_one_millimetre_patient(tmp_path, plan24):
    row = _first(plan24, "worsened")
    sim = simulate(row, 1.0, SEED, images=False)
    assert sim.geometry.shape == (300, 280, 360)
    assert float(sim.deformation.log_jacobian[sim.lung].mean()) == pytest.approx(
        row["planned_mean_logjac"], abs=1e-5
    )
    coarse = simulate(row, 4.0, SEED, images=False).record
    assert sim.record["realised_extreme_logjac"] == pytest.approx(
        coarse["realised_extreme_logjac"], abs=0.02
    )
