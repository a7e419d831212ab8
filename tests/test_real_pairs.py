"""Real CT pairs acquired differently, end to end through ``sscflow run`` (issue 12).

From ../shared/data/lung1_image.nrrd (a real chest CT, 0.57 x 0.57 x 5 mm):

- REAL1: the scan, and a follow-up with a planted posterior-basal shrinkage and density rise,
  imaged again with the patient rotated 12 degrees and moved 80 mm along the table, on a grid of
  other spacing, direction and field of view (an .mha file);
- REAL2: a follow-up whose field of view misses the upper 45 % of the lungs: it must fail alone,
  saying how much of the lung the follow-up covers;
- REAL3: no change at all (the scan plus 15 HU noise), the follow-up's range stopping 40 mm
  above the lowest lung slice, air past the cut on the same grid (as a tool that writes a short
  scan onto a larger grid leaves it);
- REAL4: REAL1's planted change on the baseline's grid, the follow-up stopping 40 mm below the
  apices, the scanner's padding value (-3024 HU) past the cut.

The run must register REAL1 through physical space (its truth is known), leave NaN in the map
only where the follow-up did not image x + u(x), record coverage and slice thickness, warn about
the 5 mm slices once, and exit 1 naming REAL2.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from sscflow.core import store as st
from sscflow.core.geometry import Geometry, grid_points, inside, to_itk
from sscflow.methods.ingest import to_canonical
from sscflow.methods.registration.common import truth_errors
from sscflow.methods.segment import segment_lungs
from sscflow.synth import planted

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"
SPACING = 3.0
CUTS = {}  # the cut follow-ups' truth: what each imaged, and the planted pair (None: no change)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")]  # fmt: skip


def _write(array, geometry: Geometry, path: Path) -> None:
    image = to_itk(np.rint(array).astype(np.int16), geometry)
    sitk.WriteImage(image, str(path), useCompression=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realpairs")
    hu, g = to_canonical(sitk.ReadImage(str(DATA)), SPACING)  # what ingest will store
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    pair = planted.plant_change(hu, g, lung, noise_hu=0.0, sigma_mm=25.0)
    c = np.asarray(g.origin) + np.asarray(g.shape) * np.asarray(g.spacing) / 2
    r = planted.rotation(12.0, (0.2, 1.0, 0.6))
    off = c - r @ c + np.array([80.0, 20.0, -15.0])
    d = planted.rotation(4.0, (1.0, 0.0, 0.0))[::-1, ::-1]
    grid = planted.acquisition_grid(lung, g, spacing=(2.0, 1.6, 1.6), margin_mm=(15, 25),
                                    direction=d, matrix=r, offset=off)  # fmt: skip
    moved = planted.reacquire(pair, matrix=r, offset=off, grid=grid, noise_hu=15.0)
    _write(moved.followup, grid, folder / "real1_followup.mha")
    # REAL2: the same follow-up, its field of view cut below the upper 45 % of the lungs
    z = np.argwhere(lung)[:, 0]
    zcut = g.origin[0] + (z.min() + 0.55 * (z.max() - z.min())) * g.spacing[0]
    cut = planted.acquisition_grid(lung, g, spacing=(2.0, 1.6, 1.6), margin_mm=(15, 25))
    keep = int((zcut - cut.origin[0]) / cut.spacing[0])
    cut = Geometry((keep, *cut.shape[1:]), cut.spacing, cut.origin, cut.direction)
    _write(planted.render_on(pair.followup, g, cut), cut, folder / "real2_followup.nii.gz")
    noise = planted._noise(np.random.default_rng(3), hu.shape, 15.0)
    fu3, g3, seen3 = planted.cut_view(hu + noise, g, lung, side="base", short_mm=40.0,
                                      fill="air")  # fmt: skip
    _write(fu3, g3, folder / "real3_followup.nii.gz")
    fu4, g4, seen4 = planted.cut_view(pair.followup + noise, g, lung, side="apex",
                                      short_mm=40.0, fill="padding")  # fmt: skip
    _write(fu4, g4, folder / "real4_followup.nii.gz")
    (folder / "manifest.csv").write_text(
        "patient_id,baseline,followup\n"
        f"REAL1,{DATA},real1_followup.mha\n"
        f"REAL2,{DATA},real2_followup.nii.gz\n"
        f"REAL3,{DATA},real3_followup.nii.gz\n"
        f"REAL4,{DATA},real4_followup.nii.gz\n", encoding="utf-8")
    config = {
        "manifest": "manifest.csv", "store": "cohort.zarr", "results": "results",
        "cluster": {"n_workers": 1, "threads_per_worker": 2, "dashboard_address": ":0"},
        "ingest": {"spacing_mm": SPACING},
        "template": {"registration": {"torch": {"levels_mm": [6.0], "iterations": [10]},
                                      "sitk": {"levels_mm": [6.0], "iterations": [10]}}},
    }  # fmt: skip
    (folder / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "sscflow.cli", "run", str(folder / "run.yaml")],
                         capture_output=True, text=True, encoding="utf-8", timeout=1500,
                         env={**os.environ, "COLUMNS": "250", "PYTHONIOENCODING": "utf-8"})
    CUTS.update(REAL3=(seen3, None), REAL4=(seen4, pair))
    return folder, res, moved, g


def test_pair_on_other_grids_is_registered_in_physical_space(run):
    folder, res, truth, g = run
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    group = st.patient_group(st.open_store(folder / "cohort.zarr", mode="r"), "REAL1",
                             create=False)  # fmt: skip
    disp = st.read_image(group, "displacement")
    base = st.read_image(group, "baseline")
    follow = st.read_image(group, "followup")
    assert base.geometry.shape != follow.geometry.shape  # two grids, as ingested
    assert disp.geometry == base.geometry == g
    qa = disp.meta["qa"]
    assert qa["initial_alignment"]["rotation_deg"] == pytest.approx(12.0, abs=4.0)
    assert qa["lung_coverage"] > 0.97
    assert qa["slice_thickness_mm"] == {"baseline": 5.0, "followup": 2.0}
    lung = np.asarray(st.read_image(group, "lung_mask").array[...]).astype(bool)
    e = truth_errors(np.asarray(disp.array[...]), g.spacing, truth.displacement,
                     truth.log_jacobian, lung, truth.region)  # fmt: skip
    # 3 mm grid, a 12-degree rotation and a real scan: looser than the 2 mm benchmark's targets
    assert e["mean_error_mm"] < 0.6 and e["p95_error_mm"] < 1.5, e
    assert abs(e["region_logjac_error"]) < 0.06 and e["folded_voxels"] == 0, e
    assert qa["ncc_after"] > qa["ncc_before"]
    # the map is NaN exactly where the follow-up did not image x + u(x)
    lj = np.asarray(st.read_image(group, "log_jacobian").array[...])
    cov = np.asarray(st.read_image(group, "coverage").array[...]).astype(bool)
    np.testing.assert_array_equal(np.isnan(lj), ~cov)
    summary = st.read_image(group, "log_jacobian").meta["summary"]
    assert summary["voxels"] + summary["unmeasured"] == int(lung.sum())
    assert summary["mean"] == pytest.approx(float(np.nanmean(lj[lung])), abs=1e-6)
    # thick slices: one warning line for the patient, in the run summary
    # the summary groups warnings by kind: one line for the thick slices, naming REAL1
    thick = [line for line in out.splitlines() if "slices thicker than 2.5 mm" in line]
    assert len(thick) == 1 and "REAL1" in thick[0], out
    # and its 5 mm baseline against a 2 mm follow-up, neither thickness known from a header
    # (NRRD, MHA): named as not matched, on a line of its own kind
    flat = " ".join(out.split())
    m = re.search(r"so they were not matched; .*? Thick slices: \d+ patients? — ([A-Z0-9, ]+)",
                  flat)
    assert m and "REAL1" in m.group(1).split(", "), flat


def test_follow_up_missing_the_apex_fails_alone_with_its_coverage(run):
    folder, res, _, _ = run
    out = " ".join((res.stdout + res.stderr).split())
    assert "REAL2" in out and "of the baseline lung" in out and "min_lung_coverage" in out, out
    root = st.open_store(folder / "cohort.zarr", mode="r")
    assert st.output_state(st.patient_group(root, "REAL2", create=False),
                           "displacement") == "absent"  # fmt: skip
    assert st.output_state(st.patient_group(root, "REAL1", create=False),
                           "log_jacobian_template") == "complete"  # fmt: skip


@pytest.mark.parametrize("pid, part", [("REAL3", "base"), ("REAL4", "apex")])
def test_a_follow_up_cut_short_leaves_nan_where_it_imaged_nothing(run, pid, part):
    """Issue 22's targets for a cut follow-up: p99 |log-J| <= 0.02 in the measured lung, >= 90 %
    of the lung the follow-up did not image NaN, <= 5 % of the lung imaged by both (more than
    10 mm from the cut) NaN; and the planted shrinkage found where it was planted."""
    folder, _, _, g = run
    seen, pair = CUTS[pid]
    group = st.patient_group(st.open_store(folder / "cohort.zarr", mode="r"), pid, create=False)
    follow = st.read_image(group, "followup")
    found = Geometry.from_dict(follow.meta["source"]["imaged"])  # ingest found the cut (z)
    assert (found.shape[0], found.origin[0]) == (seen.shape[0], pytest.approx(seen.origin[0]))
    qa = st.read_image(group, "displacement").meta["qa"]
    lung = np.asarray(st.read_image(group, "lung_mask").array[...]).astype(bool)
    lj = np.asarray(st.read_image(group, "log_jacobian").array[...])
    pts = grid_points(g)
    unimaged = lung & ~inside(pts, seen)  # no motion: x itself is the follow-up's point
    far = lung & inside(pts, seen, margin_mm=10.0)
    assert unimaged.sum() * g.voxel_volume_ml > 100  # the cut is real: over 100 mL of lung
    assert np.isnan(lj[unimaged]).mean() >= 0.90
    assert np.isnan(lj[far]).mean() <= 0.05
    # the cut holds most of it; lung1 shows lung in its own bottom slice, so the grid's end
    # (within fov_margin_mm) is an edge of what was imaged too: "apex, base" for REAL4
    assert qa["unmeasured_where"].split(", ")[0] == part, qa["unmeasured_where"]
    assert max(qa["unmeasured_parts_ml"], key=qa["unmeasured_parts_ml"].get) == part
    assert qa["unmeasured_lung_ml"] >= 0.9 * unimaged.sum() * g.voxel_volume_ml
    measured = lung & np.isfinite(lj)
    if pair is None:  # no change: nothing to see in the measured lung
        # issue 22's 0.02 is met at 2 mm (benchmarks/registration.py --pairs cut: 0.007-0.008);
        # this run is at 3 mm: measured 0.0200
        assert np.percentile(np.abs(lj[measured]), 99) <= 0.025
    else:  # the planted shrinkage, posterior-basal, far from the apex cut
        u = np.asarray(st.read_image(group, "displacement").array[...])
        e = truth_errors(u, g.spacing, pair.displacement, pair.log_jacobian, measured,
                         pair.region & measured)  # fmt: skip
        # 3 mm and a density rise where it shrinks (issue 22 item 2): measured 0.030; REAL1,
        # the same change moved and regridded, allows 0.06
        assert abs(e["region_logjac_error"]) < 0.045 and e["folded_voxels"] == 0, e


TARGET_SPACING = 2.0  # issue 12's targets are at 2 mm (at 3 mm: regridded p99 0.013)


@pytest.fixture(scope="module")
def scan():
    """The real CT as ingest stores it at 2 mm, with its lungs, and a change-free pair."""
    hu, g = to_canonical(sitk.ReadImage(str(DATA)), TARGET_SPACING)
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    still = planted.plant_change(hu, g, lung, region_logjac=0.0, global_log_volume=0.0,
                                 density_hu=0.0, noise_hu=0.0)  # fmt: skip
    return hu.astype(np.float32), g, lung, still


def _register_copy(scan, follow_up, grid):
    """Register a follow-up file's data (ingested as ``sscflow ingest`` would) to the scan."""
    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian

    hu, g, lung, _ = scan
    fu, fg = to_canonical(to_itk(follow_up, grid), TARGET_SPACING)
    mmask = segment_lungs(fu, fg.spacing).mask
    u = register(hu, fu.astype(np.float32), mask=lung, moving_mask=mmask, fixed_geometry=g,
                 moving_geometry=fg)  # fmt: skip
    return u, log_jacobian(u, g.spacing)[lung]


def test_the_scan_written_on_another_grid_registers_to_itself(scan):
    """Issue 12's identity target: the same data as a file on another grid (0.9 x 0.75 x 0.75
    mm, another field of view) gives mean |u| < 0.05 mm and p99 |log-Jacobian| < 0.01."""
    hu, g, lung, still = scan
    grid = planted.acquisition_grid(lung, g, spacing=(0.9, 0.75, 0.75), margin_mm=(25, 25))
    u, lj = _register_copy(scan, planted.reacquire(still, grid=grid).followup, grid)
    mean_u = float(np.sqrt((u ** 2).sum(0))[lung].mean())
    assert mean_u < 0.05, mean_u
    assert np.percentile(np.abs(lj), 99) < 0.01, np.percentile(np.abs(lj), 99)


def test_a_rigidly_moved_copy_shows_no_volume_change(scan):
    """Issue 12's rigid target: rotated 20 degrees, moved, on another grid: mean log-Jacobian
    in the lungs within 0.005 of 0 and p95 |log-Jacobian| <= 0.02; the field is the motion."""
    hu, g, lung, still = scan
    c = np.asarray(g.origin) + np.asarray(g.shape) * np.asarray(g.spacing) / 2
    r = planted.rotation(20.0, (1.0, 0.2, 0.1))
    off = c - r @ c + np.array([-60.0, 20.0, 35.0])
    grid = planted.acquisition_grid(lung, g, spacing=(1.25, 1.4, 1.4), margin_mm=(30, 30),
                                    matrix=r, offset=off)  # fmt: skip
    moved = planted.reacquire(still, matrix=r, offset=off, grid=grid)
    u, lj = _register_copy(scan, moved.followup, grid)
    assert abs(float(lj.mean())) <= 0.005, lj.mean()
    assert np.percentile(np.abs(lj), 95) <= 0.02, np.percentile(np.abs(lj), 95)
    err = np.sqrt(((u - moved.displacement) ** 2).sum(0))[lung]
    assert err.mean() < 0.3 and np.percentile(err, 95) < 0.8, (err.mean(), np.percentile(err, 95))


@pytest.mark.parametrize("rise_hu, cysts, least", [(180.0, 0.0, 0.90), (450.0, 0.10, 0.80)])
def test_shrinkage_under_growing_dense_disease_is_read(scan, rise_hu, cysts, least):
    """Issue 22 item 2: posterior-basal shrinkage under a textured density rise (honeycomb
    cysts at +450 HU) on real CT at 2 mm, default settings. The share of the planted region's
    shrinkage read: at least ``least``, issue 22's 90 % and 80 %. A seed of its own, not the
    benchmark's. Measured 0.96 and 0.83; with ``quality_sigma_mm`` 0 (before it was the
    default) 0.94 and 0.69, and with ``detrend_mm`` 0 too (the intensities alone) 0.88 and
    0.49."""
    from sscflow.methods.registration import register

    hu, g, lung, _ = scan
    pair = planted.plant_disease(hu, g, lung, rise_hu=rise_hu, cysts=cysts, seed=31)
    u = register(hu, pair.followup.astype(np.float32), mask=lung, fixed_geometry=g,
                 moving_geometry=g)  # fmt: skip
    e = truth_errors(u, g.spacing, pair.displacement, pair.log_jacobian, lung, pair.region)
    assert e["folded_voxels"] == 0, e
    assert e["region_logjac"] / e["region_logjac_truth"] >= least, e


def test_dense_disease_does_not_pull_the_field_off_the_truth(scan):
    """Why dense disease was under-read (benchmarks/NOTES.md, "The match quality's pull"): the
    follow-up of +450 HU posterior-basal disease with cysts (truth -0.26), pulled back through
    the true field, is in register but for the new texture and cysts; registered from there,
    local NCC^2 alone moved the region by +0.055 (the windows at the dense zone's edge read the
    follow-up from outside it, where it matches better). With the quality's pull taken out
    (``quality_sigma_mm``, default 5, where the follow-up's density changed) the field stays
    within 0.02; without it, it drifts by more than 0.04. Measured on this seed: +0.009 and
    +0.047."""
    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian
    from sscflow.synth import deform

    hu, g, lung, _ = scan
    pair = planted.plant_disease(hu, g, lung, rise_hu=450.0, cysts=0.10, seed=32)
    back = deform.warp(pair.followup, pair.displacement, g, order=3).astype(np.float32)
    drift = {}
    for sigma in (5.0, 0.0):
        u = register(hu, back, mask=lung, fixed_geometry=g, moving_geometry=g, backend="torch",
                     quality_sigma_mm=sigma)  # fmt: skip
        drift[sigma] = float(log_jacobian(u, g.spacing)[pair.region].mean())
    assert abs(drift[5.0]) <= 0.02 and drift[0.0] >= 0.04, drift


@pytest.mark.parametrize("blurred, sigma_mm", [("baseline", (2.5, 0.0, 0.0)),
                                               ("followup", (0.0, 1.2, 1.2))])  # fmt: skip
def test_a_blurrier_scan_reads_no_change_in_the_rind(scan, blurred, sigma_mm):
    """No change, one scan blurrier than the other (thicker slices: 2.5 mm more along z; a
    softer kernel: 1.2 mm in-plane), 10 HU noise on the follow-up, real CT at 2 mm. Without
    ``match_resolution`` the outline of the blurrier scan reads as change: subpleural rind
    -0.009 / +0.013, core +0.007 / -0.014 (measured; the test asserts at least 0.006 in the
    rind). With it, both scans' blur measured on their lung outlines and the sharper blurred
    to the other: rind and core within 0.004 of 0 (measured within 0.0017)."""
    from scipy import ndimage

    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian
    from sscflow.methods.zones import zone_codes, zone_stats

    hu, g, lung, _ = scan
    soft = ndimage.gaussian_filter(hu, [s / sp for s, sp in zip(sigma_mm, g.spacing,
                                                               strict=True)])  # fmt: skip
    base, follow = (soft, hu) if blurred == "baseline" else (hu, soft)
    follow = follow + np.random.default_rng(5).normal(0.0, 10.0, hu.shape).astype(np.float32)
    masks = [segment_lungs(a, g.spacing).mask for a in (base, follow)]
    codes, _ = zone_codes(masks[0], g)
    read = {}
    for match in (False, True):
        u, info = register(base, follow, mask=masks[0], moving_mask=masks[1], fixed_geometry=g,
                           moving_geometry=g, match_resolution=match,
                           return_info=True)  # fmt: skip
        zones = {r["zone"]: r["logjac_mean"]
                 for r in zone_stats(codes, log_jacobian(u, g.spacing), g)}  # fmt: skip
        read[match] = (zones["rind"], zones["core"], info["resolution"])
    assert abs(read[False][0]) >= 0.006, read  # the case is hard without the matching
    rind, core, resolution = read[True]
    assert abs(rind) <= 0.004 and abs(core) <= 0.004, read
    side = "blur_followup_mm" if blurred == "baseline" else "blur_baseline_mm"
    assert max(resolution[side]) > 0.5, resolution  # the sharper scan was the one blurred


def test_a_uniformly_shrunk_copy_reads_alike_in_the_rind_and_the_core():
    """The real CT at 4 mm seen 2 % smaller (log-Jacobian -0.0606 everywhere, about the lungs'
    centroid), 10 HU noise; both scans block means of a twice finer copy, so that neither is
    interpolated more than the other by the test. The affine stage finds the scale; the
    follow-up's resampling onto the baseline grid then samples it at fractions of a voxel that
    grow from the centre to the outline, blurring the outline more. Without
    ``match_interpolation`` that reads as expansion of the subpleural rind and shrinkage of the
    core; with it (the baseline filtered as the follow-up was) the two halve (at 2 mm the same
    case reads rind +0.0018 without, +0.0014 with: the blur is a fraction of 2 mm voxels)."""
    from scipy import ndimage

    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian
    from sscflow.methods.zones import zone_codes, zone_stats

    hu, g = to_canonical(sitk.ReadImage(str(DATA)), 4.0)
    hu = hu.astype(np.float32)
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    scale = 0.98
    centre = np.argwhere(lung).mean(axis=0)  # voxel index
    fine = np.indices(tuple(2 * n for n in hu.shape), dtype=np.float32)

    def seen(s: float) -> np.ndarray:  # the anatomy scaled by s, as a scanner's block means
        at = [centre[k] + ((fine[k] + 0.5) / 2 - 0.5 - centre[k]) / s for k in range(3)]
        v = ndimage.map_coordinates(hu, at, order=3, mode="nearest")
        return v.reshape(hu.shape[0], 2, hu.shape[1], 2, hu.shape[2], 2).mean(axis=(1, 3, 5))

    rng = np.random.default_rng(7)
    base, follow = (seen(s) + rng.normal(0.0, 10.0, hu.shape) for s in (1.0, scale))
    masks = [segment_lungs(a, g.spacing).mask for a in (base, follow)]
    codes, _ = zone_codes(masks[0], g)
    truth = 3 * np.log(scale)
    read = {}
    for match in (False, True):
        u, info = register(base.astype(np.float32), follow.astype(np.float32), mask=masks[0],
                           moving_mask=masks[1], fixed_geometry=g, moving_geometry=g,
                           match_interpolation=match, return_info=True)  # fmt: skip
        zones = {r["zone"]: r["logjac_mean"] - truth
                 for r in zone_stats(codes, log_jacobian(u, g.spacing), g)}  # fmt: skip
        read[match] = (zones["rind"], zones["core"], info["interpolation_matched"])
    # measured: without, rind +0.0136 and core -0.0131; with, +0.0068 and -0.0060
    (rind0, core0, matched0), (rind1, core1, matched1) = read[False], read[True]
    assert rind0 >= 0.010 and core0 <= -0.010, read  # the case is hard without it
    assert (rind1 - core1) <= 0.6 * (rind0 - core0), read
    assert abs(rind1) <= 0.009 and abs(core1) <= 0.008, read
    assert matched1 and not matched0


@pytest.fixture(scope="module")
def lateral_sink(scan):
    """A lateral sink of s.d. 10 mm (truth -0.26) with a +60 HU texture, planted in the scan."""
    hu, g, lung, _ = scan
    return planted.plant_disease(hu, g, lung, place="lateral", sigma_mm=10.0, rise_hu=60.0,
                                 seed=61)  # fmt: skip


def test_a_narrow_sink_is_not_spread_out(scan, lateral_sink):
    """Issue 22 (other places and sizes): a lateral sink of s.d. 10 mm (a region of about 12 mm
    radius, truth -0.26) with a +60 HU texture, on real CT at 2 mm, its own seed. With
    ``adaptive_logj`` 0.01 the smoothing narrows where the change is strong; off (0, the
    default) the 8 mm smoothing spreads the shrinkage over its reach. Measured: 0.73 read
    with it, 0.64 without."""
    from sscflow.methods.registration import register

    hu, g, lung, _ = scan
    pair = lateral_sink
    read = {}
    for logj in (0.01, 0.0):
        u = register(hu, pair.followup.astype(np.float32), mask=lung, fixed_geometry=g,
                     moving_geometry=g, backend="torch", adaptive_logj=logj)  # fmt: skip
        e = truth_errors(u, g.spacing, pair.displacement, pair.log_jacobian, lung, pair.region)
        assert e["folded_voxels"] == 0, e
        read[logj] = e["region_logjac"] / e["region_logjac_truth"]
    assert read[0.01] >= 0.70 and read[0.01] - read[0.0] >= 0.06, read


def test_a_narrow_sink_is_the_similaritys_optimum(scan, lateral_sink):
    """Why a narrow sink is under-read (issue 22, benchmarks/NOTES.md "Why narrow sinks stop
    short"): not because the similarity prefers a shallower one. The follow-up of the lateral
    sigma-10 mm sink (+60 HU texture) pulled back through the true field is in register but
    for the texture, the noise and two interpolations; registered from there with the
    defaults, the field stays: its mean log-J over the sink's region is within 0.01 of 0
    (4% of the truth -0.26; measured +0.0003, where the pair read from identity gives 0.64 of
    the truth), and the lung's p99 |log-J| stays below the no-change target 0.01 (0.0074).
    Measured failing: without the detrend (``detrend_mm`` 0) the texture pulls the field,
    +0.016 and p99 0.0104; with a finer regulariser (``velocity_sigma_mm`` 4,
    ``gradient_sigma_mm`` 2) p99 0.0232."""
    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian
    from sscflow.synth import deform

    hu, g, lung, _ = scan
    pair = lateral_sink
    back = deform.warp(pair.followup, pair.displacement, g, order=3).astype(np.float32)
    lj = log_jacobian(register(hu, back, mask=lung, fixed_geometry=g, moving_geometry=g,
                               backend="torch"), g.spacing)  # fmt: skip
    drift = float(lj[pair.region].mean())
    p99 = float(np.percentile(np.abs(lj[lung]), 99))
    assert abs(drift) <= 0.01 and p99 < 0.01, (drift, p99)
