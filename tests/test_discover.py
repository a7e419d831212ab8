"""sscflow discover on a synthetic DICOM export with every case the selection rules handle.

The export (tests/discover_tree.py) has seven PatientIDs; the answers below were worked out by
hand from how the tree is built (dates, kernels, thicknesses, PFT dates), not from discover.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from discover_tree import SOFT, Export, patient, study

from sscflow.cohort import read_manifest
from sscflow.config import config_from_dict
from sscflow.core.imageio import read_volume
from sscflow.discover.headers import read_header
from sscflow.discover.pft import PFTTableError
from sscflow.discover.pseudonym import KeyFileError, PseudonymKey
from sscflow.discover.run import discover
from sscflow.discover.settings import DiscoverConfig
from sscflow.discover.synthetic import stack_positions
from sscflow.errors import InputImageError, SscflowError

CFG = DiscoverConfig(min_extent_mm=20.0)  # the test stacks are 20 mm long
PIDS = {k: f"PID-{k}-900{i}" for i, k in enumerate("ABCDEXF", start=1)}

PFT_CSV = """patient_id,date,fvc,dlco,tlc,kco
PID-A-9001,2019-01-20,80,60,85,75
PID-A-9001,2019-03-01,99,99,99,99
PID-A-9001,2020-02-10,78,58,84,74
PID-A-9001,2021-05-01,68.5,50,80,
PID-B-9002,2018-04-01,90,70,95,80
PID-B-9002,2019-07-15,85,52,90,70
PID-B-9002,2020-12-01,80,50,88,69
PID-C-9003,2020-01-05,70,50,80,70
PID-D-9004,2017-01-03,70,50,80,70
PID-D-9004,2018-03-03,70,50,80,70
PID-E-9005,2019-01-02,70,50,80,70
PID-E-9005,2020-01-02,70,50,80,70
PID-F-9007,2019-01-01,70,50,80,70
PID-F-9007,2019-01-11,70,50,80,70
"""


def build_export(root: Path) -> Export:
    ex = Export(root)
    a = patient(PIDS["A"], birth="19600315", sex="F")
    s = study("A1", "20190110")  # one folder holds every series of the study
    ex.series(
        "A1-loc",
        "exp/a1",
        patient=a,
        study=s,
        n=2,
        extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    )
    ex.series("A1-thick", "exp/a1", patient=a, study=s, n=5, spacing=5.0, kernel=SOFT)
    ex.series("A1-thin-lung", "exp/a1", patient=a, study=s, number=3)
    ex.series("A1-thin-soft", "exp/a1", patient=a, study=s, kernel=SOFT, number=4)
    ex.series("A1-dose", "exp/a1", patient=a, study=s, n=1, extra={"Modality": "SR"})
    s = study("A2", "20200201")
    ex.series("A2-thin-lung", "exp/a2", patient=a, study=s)
    ex.series("A2-expi", "exp/a2", patient=a, study=s, description="Thorax EXPI 1.0 B60f")
    s = study("A3", "20210315")
    ex.series("A3-thin-soft", "exp/a3", patient=a, study=s, kernel=SOFT)
    ex.series(
        "A3-contrast", "exp/a3", patient=a, study=s, extra={"ContrastBolusAgent": "IOMERON 350"}
    )

    b = patient(PIDS["B"], sex="M", age="071Y")
    s = study("B1", "20180501")
    ex.series("B1-thin-lung", "exp/b1", patient=b, study=s, duplicate=(7,))
    ex.series("B1-thin-soft", "exp/b1", patient=b, study=s, kernel=SOFT)
    ex.series("B1-cut", "exp/b1", patient=b, study=s)
    cut = sorted((root / "exp/b1").glob("B1-cut-010.dcm"))[0]
    cut.write_bytes(cut.read_bytes()[:-10])  # pixel data cut short
    s = study("B2", "20190601")
    ex.series("B2-thin-lung", "exp/b2", patient=b, study=s, drop=(10,))
    ex.series("B2-lung-125", "exp/b2", patient=b, study=s, thickness=1.25)
    ex.series("B2-thin-soft", "exp/b2", patient=b, study=s, kernel=SOFT)
    s = study("B3", "20200701")
    ex.series("B3-thin-lung", "exp/b3", patient=b, study=s)

    c = patient(PIDS["C"])
    s = study("C1", "20200101")
    ex.series("C1-thin-lung", "exp/c1/s1", patient=c, study=s)
    ex.series("C1-prone", "exp/c1/s2", patient=c, study=s, extra={"PatientPosition": "HFP"})

    d = patient(PIDS["D"])
    ex.series("D1-thin-lung", "exp/d1", patient=d, study=study("D1", "20170101"))
    s = study("D2", "20180301")
    ex.series("D2-tilt", "exp/d2", patient=d, study=s, shear=(0.0, 0.2, 0.0))
    ex.series("D2-thick", "exp/d2", patient=d, study=s, n=5, spacing=5.0)
    ex.series("D2-short", "exp/d2", patient=d, study=s, n=8)
    ex.series(
        "D2-coronal",
        "exp/d2",
        patient=d,
        study=s,
        orientation=(1, 0, 0, 0, 0, -1),
        positions=stack_positions(21, 1.0, normal=(0, 1, 0)),
    )

    e = patient(PIDS["E"])
    ex.series("E1-thin-lung", "exp/e1", patient=e, study=study("E1", "20190101"))
    s = study("E2", "20200101")
    ex.series("E2-thin-lung", "exp/e2", patient=e, study=s)
    ex.series("E2-other", "exp/e2", patient=patient(PIDS["X"]), study=s)  # conflicting ID

    f = patient(PIDS["F"])
    ex.series("F1-thin-lung", "exp/f1", patient=f, study=study("F1", "20190101"))
    ex.series("F2-thin-lung", "exp/f2", patient=f, study=study("F2", "20190111"))

    (root / "exp/README.txt").write_text("exported by PACS\n", encoding="utf-8")
    one = sorted((root / "exp/a2").glob("*.dcm"))[0]
    (root / "exp/broken.dcm").write_bytes(one.read_bytes()[:300])  # cut inside the header
    return ex


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, client):
    """The export, discovered on the Dask cluster, then again without it (idempotence)."""
    work = tmp_path_factory.mktemp("discover")
    ex = build_export(work / "dicom")
    (work / "pft.csv").write_text(PFT_CSV, encoding="utf-8")
    key = work / "keys" / "cohort.key"
    res = discover(ex.root, work / "cohort", key=key, cfg=CFG, pft=work / "pft.csv", client=client)
    first = {
        n: (work / "cohort" / n).read_bytes()
        for n in ("manifest.csv", "excluded.csv", "flowchart.json", "flowchart.png")
    }
    again = discover(ex.root, work / "cohort", key=key, cfg=CFG, pft=work / "pft.csv")
    return work, ex, res, first, again


def _links(key: Path) -> dict:
    return json.loads(key.read_text(encoding="utf-8"))["links"]


def _private(key: Path) -> tuple[dict, dict]:
    """(keyed series UID -> original, file reference -> path) from the key's private side."""
    doc = json.loads(key.read_text(encoding="utf-8"))
    return {k: v["series_uid"] for k, v in doc["series"].items()}, doc["files"]


def _resolved_manifest(path: Path, key: Path) -> pd.DataFrame:
    """manifest.csv with its key: references and keyed UIDs resolved through the key file
    (folders relative to the cohort, as the hand-worked answers give them)."""
    m = pd.read_csv(path, dtype=str, keep_default_na=False)
    series = json.loads(key.read_text(encoding="utf-8"))["series"]
    for which in ("baseline", "followup"):
        assert m[which].str.startswith("key:").all()
        assert (m[which] == "key:" + m[f"{which}_series_uid"]).all()
        link = [series[ref[4:]] for ref in m[which]]
        m[which] = [Path(os.path.relpath(k["folder"], path.parent)).as_posix() for k in link]
        m[f"{which}_series_uid"] = [k["series_uid"] for k in link]
    return m


def test_manifest_is_the_hand_worked_answer(cohort):
    work, ex, res, _, _ = cohort
    m = _resolved_manifest(work / "cohort" / "manifest.csv", work / "keys" / "cohort.key")
    links = _links(work / "keys" / "cohort.key")
    m["pid"] = m["patient_id"].map(links)
    got = m.set_index("pid").drop(columns="patient_id").to_dict("index")
    u = ex.uids
    assert got == {
        PIDS["A"]: {
            "baseline": "../dicom/exp/a1",
            "followup": "../dicom/exp/a3",
            "baseline_series_uid": u["A1-thin-lung"],
            "followup_series_uid": u["A3-thin-soft"],
            "fvc_baseline": "80",
            "fvc_followup": "68.5",
            "dlco_baseline": "60",
            "dlco_followup": "50",
            "tlc_baseline": "85",
            "tlc_followup": "80",
            "kco_baseline": "75",
            "kco_followup": "",
            "interval_months": "26.1",
            "age": "58",
            "sex": "F",
        },  # 795 days
        PIDS["B"]: {
            "baseline": "../dicom/exp/b1",
            "followup": "../dicom/exp/b2",
            "baseline_series_uid": u["B1-thin-soft"],
            "followup_series_uid": u["B2-lung-125"],
            "fvc_baseline": "90",
            "fvc_followup": "85",
            "dlco_baseline": "70",
            "dlco_followup": "52",
            "tlc_baseline": "95",
            "tlc_followup": "90",
            "kco_baseline": "80",
            "kco_followup": "70",
            "interval_months": "13.0",
            "age": "71",
            "sex": "M",
        },  # 396 days
    }
    assert res.n_included == 2 and res.manifest == work / "cohort" / "manifest.csv"


def test_every_exclusion_has_its_rule(cohort):
    work, ex, _, _, _ = cohort
    x = pd.read_csv(work / "cohort" / "excluded.csv", dtype=str, keep_default_na=False)
    original, file_of = _private(work / "keys" / "cohort.key")
    assert not set(x.series_uid) & set(ex.uids.values())  # keyed UIDs only
    x["series_uid"] = [original.get(u, u) for u in x.series_uid]
    x["file"] = [file_of.get(f, f) for f in x.file]
    name = {uid: n for n, uid in ex.uids.items()}
    series = {name[r.series_uid]: r.rule for r in x[x.level == "series"].itertuples()}
    assert series == {
        "A1-loc": "localizer",
        "A1-thick": "thick_slices",
        "A1-dose": "not_ct",
        "A1-thin-soft": "lower_rank",
        "A2-expi": "expiratory",
        "A3-contrast": "contrast",
        "A2-thin-lung": "study_not_used",
        "B1-thin-lung": "duplicate_position",
        "B1-cut": "truncated_file",
        "B2-thin-lung": "missing_slice",
        "B2-thin-soft": "lower_rank",
        "B3-thin-lung": "study_not_used",
        "C1-thin-lung": "study_not_used",
        "C1-prone": "not_supine",
        "D1-thin-lung": "study_not_used",
        "D2-tilt": "gantry_tilt",
        "D2-thick": "thick_slices",
        "D2-short": "too_short",
        "D2-coronal": "not_axial",
        "E1-thin-lung": "study_not_used",
        "E2-thin-lung": "study_not_used",
        "E2-other": "study_not_used",
        "F1-thin-lung": "study_not_used",
        "F2-thin-lung": "study_not_used",
    }
    detail = dict(zip(x.series_uid, x.detail, strict=False))
    assert "gap of 2.00 mm" in detail[ex.uids["B2-thin-lung"]]
    assert "1 slice missing" in detail[ex.uids["B2-thin-lung"]]
    links = {v: k for k, v in _links(work / "keys" / "cohort.key").items()}
    studies = {(r.patient_id, r.study): r.rule for r in x[x.level == "study"].itertuples()}
    a, b, c, d = (links[PIDS[k]] for k in "ABCD")
    e, f = links[PIDS["E"]], links[PIDS["F"]]
    assert studies == {
        (a, "2/3"): "not_selected",
        (b, "3/3"): "no_pft",
        (c, "1/1"): "patient_excluded",
        (d, "1/2"): "patient_excluded",
        (d, "2/2"): "no_eligible_series",
        (e, "1/2"): "patient_excluded",
        ("", ""): "conflicting_patient_ids",
        (f, "1/2"): "patient_excluded",
        (f, "2/2"): "patient_excluded",
    }
    patients = {r.patient_id: r.rule for r in x[x.level == "patient"].itertuples()}
    assert patients == {
        c: "fewer_than_two_cts",
        d: "fewer_than_two_cts",
        e: "fewer_than_two_cts",
        links[PIDS["X"]]: "fewer_than_two_cts",
        f: "interval_too_short",
    }
    files = {r.file: r.rule for r in x[x.level == "file"].itertuples()}
    assert files == {"exp/README.txt": "not_dicom", "exp/broken.dcm": "unreadable"}


def test_flowchart_counts(cohort):
    work, _, res, _, _ = cohort
    doc = json.loads((work / "cohort" / "flowchart.json").read_text(encoding="utf-8"))
    n_files = sum(1 for p in (work / "dicom").rglob("*") if p.is_file())
    assert doc["files"] == {
        "found": n_files,
        "dicom": n_files - 2,
        "not_dicom": 1,
        "unreadable": 1,
        "without_series": 0,
    }
    steps = {s["step"]: s for s in doc["steps"]}
    counts = {k: (s["patients"], s["studies"], s["series"]) for k, s in steps.items()}
    assert counts == {
        "export": (7, 13, 28),
        "series": (6, 11, 13),
        "pft": (6, 10, 10),
        "included": (2, 4, 4),
    }
    assert steps["series"]["excluded"] == {
        "series": {
            "localizer": 1,
            "thick_slices": 2,
            "not_ct": 1,
            "expiratory": 1,
            "contrast": 1,
            "duplicate_position": 1,
            "truncated_file": 1,
            "missing_slice": 1,
            "not_supine": 1,
            "gantry_tilt": 1,
            "too_short": 1,
            "not_axial": 1,
            "study_not_used": 2,  # E2's two series: their study has conflicting PatientIDs
        },
        "studies": {"conflicting_patient_ids": 1, "no_eligible_series": 1},
    }
    # A1 and B2 each hold a second eligible series that ranks below the chosen one
    assert steps["pft"]["excluded"] == {"series": {"lower_rank": 2}, "studies": {"no_pft": 1}}
    assert steps["included"]["excluded"] == {
        "studies": {"not_selected": 1, "patient_excluded": 5},
        "patients": {"fewer_than_two_cts": 4, "interval_too_short": 1},
    }
    # every drop has a box: each step's counts are the previous step's less its exclusions
    # (from the pft step on, one series per study)
    order = ["export", "series", "pft", "included"]
    for prev, step in itertools.pairwise(order):
        ex = steps[step]["excluded"]
        for level in ("studies", "series"):
            dropped = sum(ex.get(level, {}).values())
            if level == "series" and step != "series":
                dropped += sum(ex.get("studies", {}).values())
            assert steps[prev][level] - dropped == steps[step][level], (step, level)
    assert (work / "cohort" / "flowchart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_idempotent_and_pseudonyms_stable(cohort):
    work, _, res, first, again = cohort
    for name, data in first.items():  # the serial rerun writes the same bytes as the Dask run
        assert (work / "cohort" / name).read_bytes() == data, name
    key = work / "keys" / "cohort.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    doc = json.loads(key.read_text(encoding="utf-8"))
    assert set(doc["links"].values()) == set(PIDS.values())
    secret = bytes.fromhex(doc["secret"])
    for pseudo, pid in doc["links"].items():  # the keyed hash, computed independently
        assert pseudo == "P" + hmac.new(secret, pid.encode(), hashlib.sha256).hexdigest()[:12]
    m = (work / "cohort" / "manifest.csv").read_text(encoding="utf-8")
    assert "PID-" not in m and "9001" not in m and "Name^" not in m
    # no dates, intervals only (the keyed UIDs, 2.25 + 39 random digits, may hold "2019")
    undated = re.sub(r"(key:)?2\.25\.\d+", "", m)
    assert "2019" not in undated and "2021" not in undated


def test_a_new_key_gives_new_pseudonyms_and_the_sequence_scheme(cohort, tmp_path):
    work, ex, _, first, _ = cohort
    cfg = DiscoverConfig(min_extent_mm=20.0, pseudonym="sequence")
    discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=cfg, pft=work / "pft.csv")
    m = pd.read_csv(tmp_path / "c" / "manifest.csv", dtype=str)
    assert all(p.startswith("P0") and len(p) == 5 for p in m.patient_id)
    links = json.loads((tmp_path / "k.key").read_text(encoding="utf-8"))["links"]
    assert sorted(links) == [f"P{i:04d}" for i in range(1, 8)]
    with pytest.raises(KeyFileError, match="holds 'sequence' pseudonyms"):
        discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=CFG, pft=work / "pft.csv")


def test_ingest_selects_the_series_by_uid_in_a_mixed_folder_and_refuses_gaps_and_tilt(cohort):
    _, ex, _, _, _ = cohort
    img = read_volume(ex.folders["A1-thin-lung"], series_uid=ex.uids["A1-thin-lung"])
    assert img.GetSize() == (4, 4, 21)
    assert np.allclose(img.GetSpacing(), (1.0, 1.0, 1.0))
    assert np.allclose(img.GetOrigin(), (-2.0, -2.0, -100.0))
    with pytest.raises(InputImageError, match="holds 5 DICOM series"):
        read_volume(ex.folders["A1-thin-lung"])
    # the messages reach the store's status records: no folder, no UID
    for name, rule in (("B2-thin-lung", "missing slice: a gap of 2.00 mm"),
                       ("D2-tilt", "gantry tilt"), ("B1-thin-lung", "duplicated slice position")):
        uid = ex.uids[name]
        with pytest.raises(InputImageError, match=rf"^DICOM series refused: {rule}") as err:
            read_volume(ex.folders[name], series_uid=uid)
        assert uid not in str(err.value) and str(ex.root) not in str(err.value)


def test_without_pft_requirement_and_first_second(cohort, tmp_path):
    work, ex, _, _, _ = cohort
    cfg = DiscoverConfig(min_extent_mm=20.0, require_pft=False, timepoints="first_second")
    res = discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=cfg)
    m = _resolved_manifest(tmp_path / "c" / "manifest.csv", tmp_path / "k.key")
    links = json.loads((tmp_path / "k.key").read_text(encoding="utf-8"))["links"]
    got = {links[r.patient_id]: (r.followup_series_uid, r.fvc_baseline) for r in m.itertuples()}
    assert got == {
        PIDS["A"]: (ex.uids["A2-thin-lung"], ""),
        PIDS["B"]: (ex.uids["B2-lung-125"], ""),
    }
    assert res.n_included == 2


def test_timepoints_all_writes_every_ct_as_a_long_manifest(cohort, tmp_path):
    """A has three eligible CTs with a PFT near each (2019-01-10, 2020-02-01, 2021-03-15), B two
    (B3 has no PFT within 90 days): the long form lists them all, with months since the first
    CT and the PFT near each; sscflow run reads it as a three-scan and a two-scan patient."""
    work, ex, _, _, _ = cohort
    cfg = DiscoverConfig(min_extent_mm=20.0, timepoints="all")
    res = discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=cfg, pft=work / "pft.csv")
    path = tmp_path / "c" / "manifest.csv"
    m = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(m.columns) == ["patient_id", "timepoint", "scan", "series_uid", "months", "fvc",
                               "dlco", "tlc", "kco", "visual", "age", "sex"]  # fmt: skip
    series = json.loads((tmp_path / "k.key").read_text(encoding="utf-8"))["series"]
    links = _links(tmp_path / "k.key")
    assert (m["scan"] == "key:" + m["series_uid"]).all()
    got = {(links[r.patient_id], r.timepoint): (series[r.series_uid]["series_uid"], r.months,
                                                 r.fvc, r.dlco, r.tlc, r.kco, r.age, r.sex)
           for r in m.itertuples()}  # fmt: skip
    u = ex.uids
    assert got == {
        (PIDS["A"], "0"): (u["A1-thin-lung"], "0.0", "80", "60", "85", "75", "58", "F"),
        (PIDS["A"], "1"): (u["A2-thin-lung"], "12.7", "78", "58", "84", "74", "58", "F"),  # 387 d
        (PIDS["A"], "2"): (u["A3-thin-soft"], "26.1", "68.5", "50", "80", "", "58", "F"),  # 795 d
        (PIDS["B"], "0"): (u["B1-thin-soft"], "0.0", "90", "70", "95", "80", "71", "M"),
        (PIDS["B"], "1"): (u["B2-lung-125"], "13.0", "85", "52", "90", "70", "71", "M"),
    }
    assert (m["visual"] == "").all()
    doc = json.loads((tmp_path / "c" / "flowchart.json").read_text(encoding="utf-8"))
    included = {s["step"]: s for s in doc["steps"]}["included"]
    assert (included["patients"], included["studies"], included["series"]) == (2, 5, 5)
    assert included["excluded"]["studies"] == {"patient_excluded": 5}  # no eligible CT left out
    assert "every CT" in included["label"] and res.n_included == 2
    pkey = PseudonymKey.open(tmp_path / "k.key", scheme=None)
    man = read_manifest(path, key=pkey)
    pairs = {(links[p.subject_id], p.t0, p.t1) for p in man.patients}  # default pairs: both
    assert man.long and pairs == {(PIDS["A"], 0, 1), (PIDS["A"], 1, 2), (PIDS["A"], 0, 2),
                                  (PIDS["B"], 0, 1)}  # fmt: skip


@pytest.mark.parametrize(
    "csv, match",
    [
        ("patient,date,fvc\nX,2020-01-01,80\n", r"missing column 'patient_id'"),
        (
            "patient_id,date,fvc\nX,01/02/2020,80\n",
            r"line 2, column date: '01/02/2020' is not an ISO",
        ),
        ("patient_id,date,fvc\nX,2020-01-01,abc\n", r"line 2, column fvc: 'abc' is not a number"),
        ("patient_id,date,weight\nX,2020-01-01,80\n", r"none of the PFT value columns"),
    ],
)
def test_bad_pft_table_is_a_clear_error(cohort, tmp_path, csv, match):
    _, ex, _, _, _ = cohort
    (tmp_path / "pft.csv").write_text(csv, encoding="utf-8")
    with pytest.raises(PFTTableError, match=match):
        discover(ex.root, tmp_path / "c", key=tmp_path / "k", cfg=CFG, pft=tmp_path / "pft.csv")


def test_key_file_refused_inside_the_cohort_or_store_or_open_to_others(cohort, tmp_path):
    work, ex, _, _, _ = cohort
    pft = work / "pft.csv"
    with pytest.raises(KeyFileError, match="inside"):
        discover(ex.root, tmp_path / "c", key=tmp_path / "c" / "k.key", cfg=CFG, pft=pft)
    with pytest.raises(KeyFileError, match="inside"):
        discover(
            ex.root,
            tmp_path / "c",
            key=tmp_path / "s.zarr" / "k",
            cfg=CFG,
            pft=pft,
            store=tmp_path / "s.zarr",
        )
    open_key = tmp_path / "open.key"
    open_key.write_text("{}", encoding="utf-8")
    open_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        discover(ex.root, tmp_path / "c", key=open_key, cfg=CFG, pft=pft)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nowhere", tmp_path / "c", key=tmp_path / "k.key", cfg=CFG, pft=pft)
    with pytest.raises(FileNotFoundError, match="PFT table"):
        discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=CFG, pft=tmp_path / "no")
    with pytest.raises(SscflowError, match="no --pft table was given"):
        discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=CFG)
    assert not (tmp_path / "c").exists()  # nothing written before the inputs are checked


def test_discover_config_section():
    cfg = config_from_dict(
        {
            "discover": {
                "max_slice_thickness_mm": 3,
                "extra_lung_kernels": ["MYSHARP"],
                "pft_columns": {"fvc": "FVC_pct"},
            }
        }
    )
    d = cfg.discover
    assert d.max_slice_thickness_mm == 3.0 and d.pft_columns.fvc == "FVC_pct"
    assert d.is_lung_kernel("mysharp") and d.is_lung_kernel("B70f") and d.is_lung_kernel("LUNG")
    assert not d.is_lung_kernel("B30f") and not d.is_lung_kernel("STANDARD")
    with pytest.raises(ValueError, match=r"discover.lung_kernels\[0\]"):
        config_from_dict({"discover": {"lung_kernels": ["(unclosed"]}})
    with pytest.raises(ValueError, match="discover.timepoints"):
        config_from_dict({"discover": {"timepoints": "every"}})
    assert config_from_dict({"discover": {"timepoints": "all"}}).discover.timepoints == "all"


def test_header_reader_never_reads_pixels_and_flags_truncation(cohort):
    _, ex, _, _, _ = cohort
    good = read_header(str(sorted(ex.folders["A2-thin-lung"].glob("*.dcm"))[0]))
    assert good.status == "ok" and good.tags["_pixel"] == "ok"
    assert "PixelData" not in good.tags
    cut = read_header(str(ex.folders["B1-cut"] / "B1-cut-010.dcm"))
    assert cut.status == "ok" and cut.tags["_pixel"] == "truncated"
    broken = read_header(str(ex.root / "exp/broken.dcm"))
    assert broken.status == "unreadable"


def test_cli_discover(cohort, tmp_path):
    from typer.testing import CliRunner

    from sscflow.cli import app

    work, ex, _, _, _ = cohort
    cfg = tmp_path / "d.yaml"
    cfg.write_text(
        "discover:\n  min_extent_mm: 20\ncluster:\n  n_workers: 1\n  dashboard_address: ':0'\n",
            encoding="utf-8")
    res = CliRunner().invoke(
        app,
        [
            "discover",
            str(ex.root),
            "--out",
            str(tmp_path / "c"),
            "--pft",
            str(work / "pft.csv"),
            "--config",
            str(cfg),
            "--key",
            str(work / "keys" / "cohort.key"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "2 patients included" in res.output
    here, there = (
        pd.read_csv(p / "manifest.csv").drop(columns=["baseline", "followup"])
        for p in (tmp_path / "c", work / "cohort")
    )  # same key: same pseudonyms
    pd.testing.assert_frame_equal(here, there)
    assert os.path.exists(tmp_path / "c" / "flowchart.png")
    # --timepoints all: the long manifest, patient A's three CTs and B's two
    args = ["discover", str(ex.root), "--out", str(tmp_path / "long"), "--pft",
            str(work / "pft.csv"), "--config", str(cfg), "--key", str(work / "keys" / "cohort.key")]
    res = CliRunner().invoke(app, [*args, "--timepoints", "all"])
    assert res.exit_code == 0, res.output
    long = pd.read_csv(tmp_path / "long" / "manifest.csv")
    assert sorted(long.groupby("patient_id").size()) == [2, 3]
    res = CliRunner().invoke(app, [*args, "--timepoints", "every"])
    assert res.exit_code != 0 and "--timepoints must be first_last, first_second or all" in (
        str(res.exception))  # fmt: skip


def test_header_fast_path_agrees_with_pydicom_dcmread(cohort, tmp_path, monkeypatch):
    """The element-parser path gives the same record as pydicom's full reader, for explicit
    VR files (pydicom-written), implicit VR files (written by SimpleITK / GDCM) and bad ones."""
    import SimpleITK as sitk

    import sscflow.discover.headers as headers
    from sscflow.core.imageio import write_dicom_series

    _, ex, _, _, _ = cohort
    img = sitk.GetImageFromArray(np.zeros((3, 4, 4), np.int16))
    gdcm = write_dicom_series(
        img,
        tmp_path / "gdcm",
        patient_id="X",
        patient_name="Y^Z",
        series_uid="1.2.3.4",
        study_uid="1.2.3.5",
        birth_date="19500101",
    )
    files = [str(p) for p in sorted(ex.root.rglob("*")) if p.is_file()] + gdcm
    fast = [read_header(f) for f in files]
    assert {r.status for r in fast} == {"ok", "not_dicom", "unreadable"}
    monkeypatch.setattr(headers, "_elements", lambda fh: None)
    assert [read_header(f) for f in files] == fast
    assert fast[-1].tags["PatientBirthDate"] == "19500101" and fast[-1].tags["Rows"] == 4.0
