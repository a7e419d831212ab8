"""Patients with more than two scans: the long manifest, the pairs it gives, where their outputs
live in the store, and which pair the cohort statistics use.

The known answers are written by hand from the manifest rows (what each pair's clinical values
must be), not taken from sscflow's output.
"""

from __future__ import annotations

import math

import pytest
import zarr

from sscflow.cohort import ManifestError, primary_units, read_manifest
from sscflow.core import store as st
from sscflow.methods.trajectories import chains, pair_table

HEADER = "patient_id,timepoint,scan,months,fvc,dlco,visual,age,sex\n"


def _long(tmp_path, rows: str, name="long.csv"):
    for scan in ("a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"):
        (tmp_path / scan).write_bytes(b"")
    path = tmp_path / name
    path.write_text(HEADER + rows, encoding="utf-8")
    return path


THREE = ("P1,0,a.nii.gz,0,90,60,,61,F\n"
         "P1,1,b.nii.gz,12,85,55,stable,61,F\n"
         "P1,2,c.nii.gz,30,75,40,worsened,62,F\n")  # fmt: skip


def test_a_long_manifest_gives_consecutive_and_first_last_pairs_with_their_values(tmp_path):
    m = read_manifest(_long(tmp_path, THREE + "P2,0,a.nii.gz,0,,,,50,M\nP2,1,d.nii.gz,6,,,"
                                              "improved,50,M\n"))  # fmt: skip
    assert m.long
    units = {p.patient_id: p for p in m.patients}
    assert list(units) == ["P1", "P1/pairs/1-2", "P1/pairs/0-2", "P2"]
    p12, p02 = units["P1/pairs/1-2"], units["P1/pairs/0-2"]
    assert (p12.subject_id, p12.t0, p12.t1) == ("P1", 1, 2)
    assert p12.baseline.name == "b.nii.gz" and p12.followup.name == "c.nii.gz"
    # values of the pair's own two scans; its interval is the difference of their months
    assert p12.clinical["fvc_baseline"] == 85 and p12.clinical["fvc_followup"] == 75
    assert p12.clinical["interval_months"] == 18 and p12.clinical["visual"] == "worsened"
    assert p02.clinical["interval_months"] == 30 and p02.clinical["dlco_followup"] == 40
    assert p02.clinical["visual"] == "worsened"  # stable, then worsened
    assert units["P1"].clinical["visual"] == "stable"
    assert p02.functional == "worsening" and units["P1"].functional == "stable"  # FVC -15; -5, -5
    assert units["P2"].clinical["visual"] == "improved" and units["P2"].subject is None
    assert [p.patient_id for p in m.primary] == ["P1/pairs/0-2", "P2"]
    assert [p.patient_id for p in m.patients if p.primary] == ["P1/pairs/0-2", "P2"]
    assert m.subjects == ["P1", "P2"]
    # the same manifest with other pair rules
    modes = {mode: [p.patient_id for p in read_manifest(m.path, pairs=mode).patients]
             for mode in ("consecutive", "first_last")}  # fmt: skip
    assert modes == {"consecutive": ["P1", "P1/pairs/1-2", "P2"],
                     "first_last": ["P1/pairs/0-2", "P2"]}  # fmt: skip


def test_rows_may_come_in_any_order(tmp_path):
    rows = THREE.splitlines(keepends=True)
    m = read_manifest(_long(tmp_path, "".join(reversed(rows))))
    assert [p.patient_id for p in m.patients] == ["P1", "P1/pairs/1-2", "P1/pairs/0-2"]
    assert m.patients[0].baseline.name == "a.nii.gz"


@pytest.mark.parametrize("rows, expected", [
    ("P1,0,a.nii.gz,0,,,,,\nP1,2,b.nii.gz,6,,,,,\n", "timepoints are 0, 2"),
    ("P1,0,a.nii.gz,0,,,,,\nP1,0,b.nii.gz,6,,,,,\n", "0 is also on line 2"),
    ("P1,0,a.nii.gz,0,,,,,\n", "only one scan"),
    ("P1,0,a.nii.gz,0,,,,,\nP1,1,b.nii.gz,0,,,,,\n", "must start at 0"),
    ("P1,0,a.nii.gz,3,,,,,\nP1,1,b.nii.gz,9,,,,,\n", "must start at 0"),
    ("P1,0,a.nii.gz,0,,,,,\nP1,1,b.nii.gz,,,,,,\n", "given for some"),
    ("P1,x,a.nii.gz,0,,,,,\nP1,1,b.nii.gz,6,,,,,\n", "'x' must be a whole number"),
    ("P1,0,a.nii.gz,0,,,,,\nP1,1,,6,,,,,\n", "column scan: empty"),
    ("P1,0,a.nii.gz,0,,,,,\nP1,1,b.nii.gz,6,,,worse,,\n", "unknown label 'worse'"),
    ("P 1,0,a.nii.gz,0,,,,,\nP 1,1,b.nii.gz,6,,,,,\n", "must be 1-64 letters"),
])  # fmt: skip
def test_a_bad_patient_is_refused_with_its_line_and_column(tmp_path, rows, expected):
    path = _long(tmp_path, rows)
    with pytest.raises(ManifestError, match="line ") as err:
        read_manifest(path)
    assert expected in str(err.value)
    # lenient: the patient is rejected whole, the good one still runs
    good = "Q1,0,a.nii.gz,0,,,,,\nQ1,1,b.nii.gz,6,,,,,\n"
    m = read_manifest(_long(tmp_path, rows + good, "mixed.csv"), lenient=True)
    assert [p.patient_id for p in m.patients] == ["Q1"]
    assert len(m.rejected) == 1 and expected in m.rejected[0].message


def test_the_long_form_refuses_wide_columns_and_unknown_pair_rules(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("patient_id,timepoint,scan,fvc_baseline\nP1,0,a,80\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="unknown column: fvc_baseline .*long form"):
        read_manifest(path)
    with pytest.raises(ValueError, match="pairs must be one of"):
        read_manifest(_long(tmp_path, THREE), pairs="all")


def test_a_wide_manifest_reads_as_before(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    path = tmp_path / "wide.csv"
    path.write_text("patient_id,baseline,followup,interval_months\nP1,a.nii.gz,a.nii.gz,12\n",
                    encoding="utf-8")  # fmt: skip
    m = read_manifest(path, pairs="first_last")
    assert not m.long and [(p.patient_id, p.t0, p.t1) for p in m.patients] == [("P1", 0, 1)]
    assert "subject" not in m.table().columns


def test_the_store_lists_every_pair_as_a_unit(tmp_path):
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for unit in ("P1", "P1/pairs/1-2", "P1/pairs/0-2", "P3/pairs/0-2"):
        st.patient_group(root, unit).attrs["sscflow"] = {"clinical": {}}
    st.patient_group(root, "P2")  # ingest failed before writing anything: still a patient
    # P3 has no pair 0 -> 1 (first_last): its group only holds the pairs
    assert st.patient_ids(root) == ["P1", "P1/pairs/0-2", "P1/pairs/1-2", "P2", "P3/pairs/0-2"]
    assert primary_units(st.patient_ids(root)) == ["P1/pairs/0-2", "P2", "P3/pairs/0-2"]


def test_chains_need_every_consecutive_pair_and_the_direct_one():
    assert chains(["A", "A/pairs/1-2", "A/pairs/2-3", "A/pairs/0-3"]) == {
        "A": {"direct": "A/pairs/0-3", "steps": ["A", "A/pairs/1-2", "A/pairs/2-3"]}}
    assert chains(["A", "A/pairs/0-3", "A/pairs/2-3"]) == {}  # 1 -> 2 missing
    assert chains(["A", "A/pairs/1-2"]) == {}  # consecutive only: nothing to compare


def test_the_pair_table_has_one_row_per_pair_and_rates_per_year():
    import pandas as pd

    cohort = pd.DataFrame([
        {"patient_id": "P1", "interval_months": 12.0, "logjac_mean": -0.05, "delta_fvc": -4.0},
        {"patient_id": "P1/pairs/1-2", "interval_months": 6.0, "logjac_mean": -0.03,
         "delta_fvc": -3.0},
        {"patient_id": "P1/pairs/0-2", "interval_months": 18.0, "logjac_mean": -0.08,
         "delta_fvc": -7.0},
    ])  # fmt: skip
    table = pair_table(cohort, {"P1": {"direct": "P1/pairs/0-2", "mean_mm": 0.25}})
    assert list(zip(table["t0"], table["t1"], strict=True)) == [(0, 1), (0, 2), (1, 2)]
    assert set(table["patient_id"]) == {"P1"}
    row = table.set_index(["t0", "t1"])
    assert row.loc[(1, 2), "logjac_per_year"] == pytest.approx(-0.06)
    assert row.loc[(0, 2), "delta_fvc_per_year"] == pytest.approx(-7.0 * 12 / 18)
    assert row.loc[(0, 2), "composition_mean_mm"] == 0.25
    assert math.isnan(row.loc[(0, 1), "composition_mean_mm"])



def test_a_patient_trajectory_is_drawn_from_three_timepoints_not_from_one_pair(tmp_path):
    import pandas as pd

    from sscflow.methods.trajectories import trajectory_points
    from sscflow.views.figures import plot_patient_trajectory

    pairs = pd.DataFrame([
        {"patient_id": "P1", "t0": 0, "t1": 1, "months": 12.0, "logjac_mean": -0.05,
         "fvc_baseline": 90.0, "fvc_followup": 85.0, "dlco_baseline": 60.0,
         "dlco_followup": 55.0},
        {"patient_id": "P1", "t0": 1, "t1": 2, "months": 6.0, "logjac_mean": -0.03,
         "fvc_baseline": 85.0, "fvc_followup": 80.0, "dlco_baseline": 55.0,
         "dlco_followup": 50.0},
        {"patient_id": "P1", "t0": 0, "t1": 2, "months": 18.0, "logjac_mean": -0.08,
         "fvc_baseline": 90.0, "fvc_followup": 80.0, "dlco_baseline": 60.0,
         "dlco_followup": 50.0},
    ])  # fmt: skip
    points = trajectory_points(pairs)
    assert list(points["months"]) == [0.0, 12.0, 18.0]
    assert list(points["logjac_cumulative"]) == pytest.approx([0.0, -0.05, -0.08])
    assert list(points["dlco"]) == [60.0, 55.0, 50.0]
    path = plot_patient_trajectory(points, tmp_path / "P1.png", title="P1")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    # one pair (two timepoints) is no trajectory: nothing drawn
    assert plot_patient_trajectory(points.iloc[:2], tmp_path / "two.png") is None
    assert not (tmp_path / "two.png").exists()


def test_a_scan_two_pairs_share_is_read_and_segmented_once(tmp_path, monkeypatch):
    """Timepoint 1 is the follow-up of 0 -> 1 and the baseline of 1 -> 2: the second pair copies
    the stored scan and its masks (same voxels, same input hash, ``reused_from``) instead of
    reading and segmenting the file again; once 0 -> 1 and 1 -> 2 are in, 0 -> 2 reads nothing."""
    import numpy as np
    from helpers import MINI_SEGMENT
    from test_ingest import INGEST, chest, write_scan

    import sscflow.methods.ingest
    from sscflow.config import Config
    from sscflow.flow.pipeline import execute
    from sscflow.stages import Context

    write_scan(chest(), tmp_path / "a.nii.gz")
    write_scan(chest(lung_z_radius=26.0), tmp_path / "b.nii.gz")
    write_scan(chest(lung_z_radius=24.0), tmp_path / "c.nii.gz")
    path = tmp_path / "long.csv"
    path.write_text(HEADER + THREE, encoding="utf-8")
    units = {p.patient_id: p for p in read_manifest(path).patients}
    store = tmp_path / "c.zarr"
    ctx = Context(str(store), str(tmp_path / "results"),
                  Config(store=str(store), ingest=INGEST, segment=MINI_SEGMENT))  # fmt: skip

    def both(unit):
        ingest = execute("ingest", ctx, units[unit], None, [])
        segment = execute("segment", ctx, units[unit], None, [ingest])
        assert (ingest["status"], segment["status"]) == ("done", "done"), (ingest, segment)
        return st.patient_group(st.open_store(str(store)), unit, create=False)

    def same(a, name_a, b, name_b):
        x, y = st.read_image(a, name_a), st.read_image(b, name_b)
        assert (x.meta["input_hash"], x.meta["params"]) == (y.meta["input_hash"],
                                                            y.meta["params"])  # fmt: skip
        assert x.geometry == y.geometry
        np.testing.assert_array_equal(np.asarray(x.array[...]), np.asarray(y.array[...]))

    first = both("P1")
    second = both("P1/pairs/1-2")
    for name, other in (("baseline", "followup"), ("lung_mask", "followup_lung_mask"),
                        ("lung_labels", "followup_lung_labels")):  # fmt: skip
        same(second, name, first, other)
        assert second[name].attrs["sscflow"]["reused_from"] == "P1", name
    assert "reused_from" not in second["followup"].attrs["sscflow"]  # c: read from its file
    assert second["lung_mask"].attrs["sscflow"]["of"] == "baseline"

    def no_work(*args, **kw):
        raise AssertionError("a scan was read, resampled or segmented again")

    for name in ("read_volume", "to_canonical", "segment_lungs"):
        monkeypatch.setattr(sscflow.methods.ingest, name, no_work)
    third = both("P1/pairs/0-2")
    same(third, "baseline", first, "baseline")
    same(third, "followup", second, "followup")
    same(third, "followup_lung_mask", second, "followup_lung_mask")
    # and a rerun of a pair whose outputs are current skips, as before
    again = execute("ingest", ctx, units["P1/pairs/0-2"], None, [])
    assert again["status"] == "skipped", again

# --- end to end: a synthetic cohort with three scans per patient, against its truth -----------

E2E_SPACING = 4.0
E2E_PATIENTS = 4


@pytest.fixture(scope="module")
def three_scans(tmp_path_factory, client):
    """A 3-timepoint synthetic cohort run twice: first with its timepoints 0 and 1 only (a done
    two-scan cohort), then with timepoint 2 added. Returns (folder, first summary, second
    summary, config)."""
    import csv

    import yaml

    from sscflow.config import load_config
    from sscflow.flow.pipeline import run
    from sscflow.synth import synthesize_cohort

    folder = tmp_path_factory.mktemp("timepoints")
    manifest = synthesize_cohort(E2E_PATIENTS, folder / "synthetic", spacing=E2E_SPACING, seed=0,
                                 client=client, timepoints=3)  # fmt: skip
    with open(manifest, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    first = manifest.parent / "two.csv"
    with open(first, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["timepoint"] in ("0", "1"))
    settings = {"store": str(folder / "cohort.zarr"), "results": str(folder / "results"),
                "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
                "ingest": {"spacing_mm": E2E_SPACING}, "segment": {"min_lung_ml": 5.0}}
    summaries = []
    for path in (first, manifest):
        cfg_path = folder / f"{path.stem}.yaml"
        cfg_path.write_text(yaml.safe_dump({**settings, "manifest": str(path)}), encoding="utf-8")
        cfg = load_config(cfg_path)
        summaries.append(run(cfg, read_manifest(path, pairs=cfg.pairs), client=client,
                             truth_dir=manifest.parent))  # fmt: skip
    return folder, summaries[0], summaries[1], cfg


@pytest.mark.slow
def test_adding_a_timepoint_registers_only_the_new_pairs(three_scans):
    import contextlib
    import io

    from sscflow.cli import _run_report

    _, first, second, _ = three_scans
    assert first.ok and second.ok, (first.failed, second.failed)
    assert first.counts["registration"] == {"done": E2E_PATIENTS}
    # the pair 0 -> 1 is where it was: skipped; 1 -> 2 and 0 -> 2 are new
    assert second.counts["registration"] == {"skipped": E2E_PATIENTS, "done": 2 * E2E_PATIENTS}
    assert second.counts["template"] == {"skipped": 1}  # the template stays
    # ... and says that no patient came or went (each one's first -> last pair moved)
    assert (second.cohort["template"]["added"], second.cohort["template"]["removed"]) == (0, 0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _run_report(second)
    line = next(x for x in printed.getvalue().splitlines() if x.startswith("template: reused"))
    assert line.endswith(", built from this run's patients"), line
    # the new first -> last pair 0 -> 2 has the same baseline scan as 0 -> 1: its template field
    # is taken from there, not registered again; the pair 1 -> 2 has no template-space map
    assert second.counts["to_template"] == {"done": E2E_PATIENTS, "skipped": 2 * E2E_PATIENTS}
    # every page is (re)drawn in the second run: the pair 0 -> 1's page now shows the trajectory
    assert first.counts["qa"] == {"done": E2E_PATIENTS}
    assert second.counts["qa"] == {"done": 3 * E2E_PATIENTS}


@pytest.mark.slow
def test_each_qa_page_of_a_three_scan_patient_shows_its_trajectory(three_scans):
    import base64

    from sscflow.stages.pairs import patient_figure
    from sscflow.views.qa import page_path

    folder, _, _, _ = three_scans
    results = folder / "results"
    for pid in sorted({u.split("/")[0] for u in st.patient_ids(
            st.open_store(str(folder / "cohort.zarr"), mode="r"))}):  # fmt: skip
        png = patient_figure(results, pid)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", pid
        data = base64.b64encode(png.read_bytes()).decode()
        for unit in (pid, f"{pid}/pairs/1-2", f"{pid}/pairs/0-2"):
            page = page_path(results, unit).read_text(encoding="utf-8")
            assert "Trajectory" in page and data in page, unit


@pytest.mark.slow
def test_status_counts_patients_and_their_pairs(three_scans):
    import contextlib
    import io

    from sscflow.cli import status

    folder, _, _, _ = three_scans
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status(str(folder / "cohort.zarr"), all_=False, manifest=None, config=None)
    assert f"cohort.zarr: {E2E_PATIENTS} patients ({3 * E2E_PATIENTS} pairs)" in (
        printed.getvalue()), printed.getvalue()


@pytest.mark.slow
def test_every_pair_is_in_the_store_and_the_tables(three_scans):
    import pandas as pd

    folder, _, _, _ = three_scans
    root = st.open_store(str(folder / "cohort.zarr"), mode="r")
    pids = sorted({u.split("/")[0] for u in st.patient_ids(root)})
    assert len(pids) == E2E_PATIENTS
    for pid in pids:
        for unit in (pid, f"{pid}/pairs/1-2", f"{pid}/pairs/0-2"):
            group = root[f"patients/{unit}"]
            for name in ("displacement", "coverage", "log_jacobian", "zones"):
                assert st.output_state(group, name) == "complete", (unit, name)
    pairs = pd.read_csv(folder / "results" / "pairs.csv")
    assert len(pairs) == 3 * E2E_PATIENTS
    assert set(map(tuple, pairs[["t0", "t1"]].values)) == {(0, 1), (1, 2), (0, 2)}
    zones = pd.read_csv(folder / "results" / "zones.csv")
    whole = zones[zones["zone"] == "whole"]
    assert len(whole) == 3 * E2E_PATIENTS and set(whole["patient_id"]) == set(pids)
    for pid in pids:
        field = dict(root[f"patients/{pid}/pairs/0-2/log_jacobian_template"].attrs["sscflow"])
        assert field["qa"]["reused_from"] == pid
        assert "log_jacobian_template" not in root[f"patients/{pid}/pairs/1-2"]
    # sscflow status: every pair's every stage done (a pair with no template-space map too)
    from sscflow.flow.pipeline import store_status

    state = store_status(str(folder / "cohort.zarr"))
    state.pop(None)
    assert len(state) == 3 * E2E_PATIENTS
    assert {s["status"] for row in state.values() for s in row.values()} == {"done"}
    # the cohort table: one row per patient, its first -> last pair
    cohort = pd.read_csv(folder / "results" / "patients.csv")
    assert sorted(cohort["patient_id"]) == pids
    assert set(zip(cohort["t0"], cohort["t1"], strict=True)) == {(0, 2)}
