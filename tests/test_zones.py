"""Lung zones in physical space (sscflow.methods.zones) against analytic answers.

Two box lungs on a 2 mm grid: every zone's volume is a product of box sides (thirds of 60 mm,
halves of 40 mm, a 10 mm rind), and planted constant log-Jacobians give exact zone means. The
same lungs on a grid stored the other way round (x and y reversed: a RAS-like direction) give
the same zones, since they are cut in physical space. The synthetic cohort's truth (planted
posterior-basal sinks) gives its most negative zone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sscflow.core import store as st
from sscflow.core.geometry import Geometry
from sscflow.methods.zones import (
    ZONES,
    per_year,
    zone_codes,
    zone_mask,
    zone_stats,
    zones_patient,
)

H = 2.0  # mm
SHAPE = (34, 24, 40)  # z, y, x
ORIGIN = (-40.0, -30.0, -50.0)
# each lung: 30 slices (60 mm) x 20 rows (40 mm) x 15 columns (30 mm); right lung at small x
Z, Y = slice(2, 32), slice(2, 22)
RIGHT_X, LEFT_X = slice(3, 18), slice(22, 37)
LUNG_ML = 60 * 40 * 30 / 1000.0  # 72 mL per lung


def boxes() -> tuple[np.ndarray, np.ndarray, Geometry]:
    labels = np.zeros(SHAPE, np.uint8)
    labels[Z, Y, RIGHT_X] = 1
    labels[Z, Y, LEFT_X] = 2
    return labels > 0, labels, Geometry(SHAPE, (H, H, H), ORIGIN)


def lower_dorsal_box() -> tuple[slice, slice]:
    """The lowest 20 mm (10 slices from the bottom: small z is inferior) and the posterior
    20 mm (large y is posterior) of the lungs: the analytic lower-dorsal zone."""
    return slice(2, 12), slice(12, 22)


def test_zone_volumes_are_the_boxes_volumes():
    lung, labels, g = boxes()
    codes, info = zone_codes(lung, g, labels, rind_mm=10.0)
    rows = {r["zone"]: r for r in zone_stats(codes, np.zeros(SHAPE, np.float32), g)}
    assert list(rows) == list(ZONES)
    core = (60 - 20) * (40 - 20) * (30 - 20) / 1000.0  # 10 mm off every face
    want = {"whole": 2 * LUNG_ML, "left": LUNG_ML, "right": LUNG_ML,
            "upper": 2 * LUNG_ML / 3, "middle": 2 * LUNG_ML / 3, "lower": 2 * LUNG_ML / 3,
            "ventral": LUNG_ML, "dorsal": LUNG_ML, "rind": 2 * (LUNG_ML - core),
            "core": 2 * core, "lower_dorsal": LUNG_ML / 3}  # fmt: skip
    for zone, ml in want.items():
        assert rows[zone]["volume_ml"] == pytest.approx(ml, abs=1e-9), zone
        assert rows[zone]["measured_fraction"] == 1.0
    assert info["sides"] == "labels"
    # the left lung is the box at large x (LPS: +x is the patient's left)
    left = zone_mask(codes, "left")
    assert left[Z, Y, LEFT_X].all() and not left[:, :, :20].any()
    ld = zone_mask(codes, "lower_dorsal")
    zs, ys = lower_dorsal_box()
    want_ld = np.zeros(SHAPE, bool)
    want_ld[zs, ys] = lung[zs, ys]
    assert np.array_equal(ld, want_ld)


def test_planted_log_jacobian_gives_exact_zone_means_and_measured_fractions():
    lung, labels, g = boxes()
    codes, _ = zone_codes(lung, g, labels)
    zs, ys = lower_dorsal_box()
    lj = np.zeros(SHAPE, np.float32)
    lj[zs, ys] = np.float32(-0.2)
    lj[~lung] = 7.0  # outside the lung: never counted
    lj[27:32, Y, LEFT_X] = np.nan  # the top 10 mm of the left lung not imaged at follow-up
    rows = {r["zone"]: r for r in zone_stats(codes, lj, g, months=18.0)}
    v = np.float32(-0.2).item()
    assert rows["lower_dorsal"]["logjac_mean"] == pytest.approx(v, abs=1e-12)
    assert rows["lower_dorsal"]["logjac_per_year"] == pytest.approx(v * 12 / 18, abs=1e-12)
    assert rows["lower"]["logjac_mean"] == pytest.approx(v / 2, abs=1e-12)  # half is dorsal
    n_lung, n_nan = 2 * 30 * 20 * 15, 5 * 20 * 15
    planted = 2 * 10 * 10 * 15
    # the dorsal half: a third of it planted, half of the unmeasured top in it
    assert rows["dorsal"]["logjac_mean"] == pytest.approx(v * planted / (n_lung - n_nan) * 2,
                                                          abs=1e-12)  # fmt: skip
    assert rows["ventral"]["logjac_mean"] == 0.0 and rows["upper"]["logjac_mean"] == 0.0
    assert rows["whole"]["logjac_mean"] == pytest.approx(v * planted / (n_lung - n_nan),
                                                         abs=1e-12)  # fmt: skip
    assert rows["whole"]["measured_fraction"] == pytest.approx(1 - n_nan / n_lung, abs=1e-15)
    assert rows["upper"]["measured_fraction"] == pytest.approx(0.75, abs=1e-15)
    assert rows["left"]["measured_fraction"] == pytest.approx(1 - n_nan / (n_lung / 2))
    assert rows["right"]["measured_fraction"] == 1.0

    # a map planted in the core only (deeper than 10 mm: 5 voxel layers from every face)
    core = np.zeros(SHAPE, np.float32)
    for xs in (RIGHT_X, LEFT_X):
        core[Z.start + 5:Z.stop - 5, Y.start + 5:Y.stop - 5, xs.start + 5:xs.stop - 5] = 0.1
    rows = {r["zone"]: r for r in zone_stats(codes, core, g)}
    assert rows["core"]["logjac_mean"] == pytest.approx(np.float32(0.1).item(), abs=1e-12)
    assert rows["rind"]["logjac_mean"] == 0.0
    assert math.isnan(rows["core"]["logjac_per_year"])  # no interval given


def test_zones_are_cut_in_physical_space_whatever_the_grid_direction():
    """The lungs stored with x and y reversed (direction diag(-1, -1, 1), origin at the other
    corner): the same physical voxels make the same zones, and the left lung is still +x."""
    lung, labels, g = boxes()
    lung[Z, Y, 18:22] = True  # a bridge: one component, so the physical midline decides
    codes, info = zone_codes(lung, g, None)
    assert info["sides"] == "midline"
    flipped = Geometry(SHAPE, g.spacing,
                       (g.origin[0], g.origin[1] + (SHAPE[1] - 1) * H,
                        g.origin[2] + (SHAPE[2] - 1) * H),
                       ((-1.0, 0, 0), (0, -1.0, 0), (0, 0, 1.0)))  # fmt: skip
    codes_f, info = zone_codes(lung[:, ::-1, ::-1], flipped, None)
    assert info["sides"] == "midline"
    assert info["midline_x_mm"] == pytest.approx(ORIGIN[2] + 19.5 * H)  # between the boxes
    assert np.array_equal(codes_f[:, ::-1, ::-1], codes)
    assert zone_mask(codes, "left")[Z, Y, 20:37].all() and not zone_mask(codes, "left")[
        :, :, :20].any()  # fmt: skip
    # two separate lungs, no labels: the components, whatever the direction
    lung, _, _ = boxes()
    codes, info = zone_codes(lung, g, None)
    codes_f, info_f = zone_codes(lung[:, ::-1, ::-1], flipped, None)
    assert info["sides"] == info_f["sides"] == "components"
    assert np.array_equal(codes_f[:, ::-1, ::-1], codes)
    assert zone_mask(codes, "left")[Z, Y, LEFT_X].all()


def test_labels_and_components_keep_a_lung_that_crosses_the_midline_whole():
    """A right lung reaching past the middle of the lungs' extent (a mediastinal shift): the
    labels keep it whole, and so do the components of the mask; the physical midline alone
    would cut it."""
    lung, labels, g = boxes()
    labels[Z, Y, 18:30] = 1  # the right lung grows to x index 29, the left shrinks
    labels[Z, Y, 30:37] = 2
    lung = labels > 0
    by_labels, info = zone_codes(lung, g, labels)
    assert info["sides"] == "labels"
    assert np.array_equal(zone_mask(by_labels, "right"), labels == 1)
    by_parts, info = zone_codes(lung, g, None)
    assert info["sides"] == "midline"  # the boxes touch at x 29 | 30: one component
    lung[:, :, 30] = False  # now two
    by_parts, info = zone_codes(lung, g, None)
    assert info["sides"] == "components"
    assert np.array_equal(zone_mask(by_parts, "right"), labels == 1)
    joined = labels > 0
    by_axis, info = zone_codes(joined, g, None)
    assert info["sides"] == "midline"
    assert not np.array_equal(zone_mask(by_axis, "right"), labels == 1)
    # one lung labelled (a pneumonectomy): the labels cannot tell sides apart; the axis does
    _, info = zone_codes(labels == 1, g, np.where(labels == 1, 1, 0).astype(np.uint8))
    assert info["sides"] == "midline"


def test_per_year_and_bad_input():
    assert per_year(-0.06, 24.0) == pytest.approx(-0.03)
    assert all(math.isnan(per_year(-0.06, m)) for m in (None, 0.0, -3.0, float("nan"), "x"))
    lung, labels, g = boxes()
    with pytest.raises(ValueError, match="empty"):
        zone_codes(np.zeros(SHAPE, bool), g)
    with pytest.raises(ValueError, match="rind_mm"):
        zone_codes(lung, g, rind_mm=0.0)


def test_the_stage_writes_its_zones_and_skips_when_current(tmp_path):
    """zones_patient on a store holding the boxes: the per-zone rows in the record, the codes
    as an image, the interval from the clinical record; a second call is skipped."""
    lung, labels, g = boxes()
    root = st.open_store(tmp_path / "c.zarr")
    group = st.patient_group(root, "P1")
    group.attrs["sscflow"] = {"clinical": {"interval_months": 6.0}, "functional": None}
    lj = np.where(lung, np.float32(-0.05), np.float32(np.nan)).astype(np.float32)
    for name, data in (("lung_mask", lung.astype(np.uint8)), ("lung_labels", labels),
                       ("log_jacobian", lj)):  # fmt: skip
        st.write_image(group, name, data, g, stage="test", params={}, input_hash=name)
    out = zones_patient(str(tmp_path / "c.zarr"), "P1")
    assert out["status"] == "done" and out["sides"] == "labels"
    rows = {r["zone"]: r for r in st.stored_record(group, "zones")["zones"]}
    assert rows["whole"]["logjac_mean"] == pytest.approx(np.float32(-0.05).item(), abs=1e-12)
    assert rows["whole"]["logjac_per_year"] == pytest.approx(-0.1, abs=1e-7)
    assert (rows["whole"]["t0"], rows["whole"]["t1"]) == (0, 1)
    assert np.array_equal(st.read_image(group, "zones").array[...] > 0, lung)
    assert zones_patient(str(tmp_path / "c.zarr"), "P1")["status"] == "skipped"
    assert zones_patient(str(tmp_path / "c.zarr"), "P1", rind_mm=6.0)["status"] == "done"


def test_synthetic_truth_shrinks_most_in_the_lower_dorsal_zone():
    """A worsened synthetic patient (planted sinks at both posterior bases): on its true lung
    and true log-Jacobian map the lower-dorsal zone is the most negative, and every zone that
    does not hold the sinks is at the global change (the affine part's constant log-det)."""
    from sscflow.synth.cohort import simulate
    from sscflow.synth.plan import plan_cohort

    plan = plan_cohort(6, seed=0)
    row = plan[plan["regional_strength"] < 0].iloc[0]
    sim = simulate(row, 4.0, 0, ribs=False, images=False)
    codes, info = zone_codes(sim.lung, sim.geometry, None)
    assert info["sides"] == "components"  # two separate lungs, no labels
    rows = {r["zone"]: r["logjac_mean"] for r in zone_stats(codes, sim.deformation.log_jacobian,
                                                             sim.geometry)}  # fmt: skip
    assert min(rows, key=rows.get) == "lower_dorsal", rows
    assert rows["lower_dorsal"] < rows["whole"] - 0.02, rows
    # the upper third is far from the sinks: its log-Jacobian is the global one
    assert rows["upper"] == pytest.approx(sim.deformation.log_volume, abs=0.005), rows


def _cohort_store(path) -> str:
    """Six patients with the box lungs: three worsening whose lower-dorsal zone shrank by
    0.1, 0.2 and 0.3 over 12, 24 and 6 months (-0.1, -0.1 and -0.6 per year), three stable
    (0, +0.01, -0.01 over 12 months); log-Jacobian 0 elsewhere."""
    lung, labels, g = boxes()
    zs, ys = lower_dorsal_box()
    root = st.open_store(path)
    plan = [("W1", "worsening", -0.1, 12.0), ("W2", "worsening", -0.2, 24.0),
            ("W3", "worsening", -0.3, 6.0), ("S1", "stable", 0.0, 12.0),
            ("S2", "stable", 0.01, 12.0), ("S3", "stable", -0.01, 12.0)]  # fmt: skip
    ct = np.where(lung, -850, 40).astype(np.int16)
    for pid, label, value, months in plan:
        group = st.patient_group(root, pid)
        group.attrs["sscflow"] = {"clinical": {"interval_months": months}, "functional": label}
        lj = np.zeros(SHAPE, np.float32)
        lj[zs, ys] = value
        for name, data in (("baseline", ct), ("lung_mask", lung.astype(np.uint8)),
                           ("lung_labels", labels), ("log_jacobian", lj)):  # fmt: skip
            summary = {"summary": {"mean": value / 6}}  # the jacobian stage's (a sixth planted)
            st.write_image(group, name, data, g, stage="test", params={}, input_hash=name,
                           extra=summary if name == "log_jacobian" else None)  # fmt: skip
        assert zones_patient(str(path), pid)["status"] == "done"
    return str(path)


def test_zone_table_group_means_report_and_qa_page(tmp_path):
    """The cohort's zones.csv has the contract's columns; the report's zone table gives each
    group's mean with its Student-t 95% CI and the Mann-Whitney test, per interval or per year
    as ``rate`` says; the QA page shows the zones."""
    import pandas as pd

    from sscflow.flow.pipeline import store_status
    from sscflow.methods.groups import cohort_table
    from sscflow.methods.zones import (
        TABLE_COLUMNS,
        write_zone_table,
        zone_group_means,
        zone_table,
    )
    from sscflow.views.qa import qa_patient
    from sscflow.views.report import write_report

    store = _cohort_store(tmp_path / "c.zarr")
    table = zone_table(store)
    path = write_zone_table(table, tmp_path / "results")
    read = pd.read_csv(path)
    assert tuple(read.columns) == TABLE_COLUMNS and len(read) == 6 * len(ZONES)
    ld = read[read["zone"] == "lower_dorsal"].set_index("patient_id")
    assert ld.loc["W2", "logjac_mean"] == pytest.approx(-0.2, abs=1e-6)
    assert ld.loc["W3", "logjac_per_year"] == pytest.approx(-0.6, abs=1e-6)

    labels = cohort_table(store)
    assert labels.set_index("patient_id").loc["W3", "logjac_per_year"] == pytest.approx(
        -0.3 / 6 * 12 / 6, rel=1e-12)
    means = zone_group_means(table, labels).set_index("zone")
    t = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom
    half = t * 0.1 / math.sqrt(3)  # s.d. of (-0.1, -0.2, -0.3) is 0.1
    row = means.loc["lower_dorsal"]
    assert row["worsening_mean"] == pytest.approx(-0.2, abs=1e-7)
    assert row["worsening_low"] == pytest.approx(-0.2 - half, abs=1e-7)
    assert row["worsening_high"] == pytest.approx(-0.2 + half, abs=1e-7)
    assert row["test"] == "Mann-Whitney U" and row["p"] == pytest.approx(0.1)  # 3 vs 3 apart
    assert means.loc["upper", "worsening_mean"] == 0.0
    per_year = zone_group_means(table, labels, column="logjac_per_year").set_index("zone")
    assert per_year.loc["lower_dorsal", "worsening_mean"] == pytest.approx(-0.8 / 3, abs=1e-7)

    page = write_report(store, tmp_path / "results", store_status(store)).read_text(
        encoding="utf-8")
    assert "Log-Jacobian by lung zone" in page and "Mann-Whitney U" in page
    assert "-0.2000 (-0.4484 to +0.0484)" in page
    assert "mean log-Jacobian over the interval between the scans" in page
    assert (tmp_path / "results/figures/zones.png").is_file()
    page = write_report(store, tmp_path / "results", store_status(store),
                        rate="per_year").read_text(encoding="utf-8")  # fmt: skip
    assert "mean log-Jacobian per year" in page and "-0.2667 (" in page

    assert qa_patient(store, "W1", tmp_path / "results")["status"] == "done"
    qa = (tmp_path / "results/report/qa/W1.html").read_text(encoding="utf-8")
    assert "Lung zones on the baseline" in qa and "segmentation labels" in qa


def test_a_trachea_left_in_the_mask_does_not_stretch_the_lung_height():
    """Lungs 48 mm high (24 slices) with a 4 x 4 mm tube running 12 mm above them (a trachea
    the segmentation kept: 0.7% of a slice's lung area): the thirds are still 16 mm each, the
    tube joins the upper third."""
    lung, labels, g = boxes()
    lung[26:, :, :] = False
    lung[26:32, 11:13, 19:21] = True
    codes, _ = zone_codes(lung, g, None)
    rows = {r["zone"]: r["volume_ml"] for r in zone_stats(codes, np.zeros(SHAPE), g)}
    third = 2 * 16 * 40 * 30 / 1000.0
    tube = 6 * 2 * 2 * H**3 / 1000.0
    assert rows["lower"] == pytest.approx(third, abs=1e-9)
    assert rows["middle"] == pytest.approx(third, abs=1e-9)
    assert rows["upper"] == pytest.approx(third + tube, abs=1e-9)
