"""From an identified DICOM export to the report: ``sscflow discover`` then ``sscflow run``.

A small synthetic cohort (6 mm grid) is written as a DICOM export whose headers carry a fake
name, PatientID, birth date, accession number, institution, referring physician and study dates
per patient; each study folder mixes the CT series with a soft-kernel copy and a localizer.
Both commands run as a user runs them (subprocesses); then every byte they wrote, and their
output, is searched for every identifier (the search of test_deidentify.py, which opens Zarr
metadata, zip, gzip, data URIs and PNG text).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_deidentify import _date_forms, _zarr_text, file_blobs

from sscflow.core.imageio import deterministic_uid, read_volume
from sscflow.discover.pseudonym import PseudonymKey
from sscflow.discover.synthetic import image_slices, write_slices

SPACING = 6.0
PEOPLE = [  # (PatientID, name, birth date, accession, baseline date, follow-up date or None)
    ("PID-48213957", "Vorquelt^Ysbandrine", "19520714", "ACC-60419273", "20180305", "20200917"),
    ("PID-70394821", "Prandwisk^Ulmethra", "19491102", "ACC-38205716", "20170822", "20190611"),
    ("PID-15839402", "Gwendoliq^Tharvesk", "19580127", "ACC-94720358", "20190430", None),
]
QUICK = {"torch": {"levels_mm": [12.0], "iterations": [10], "affine_iterations": [20]},
         "sitk": {"levels_mm": [12.0], "iterations": [10], "affine_iterations": 20}}
INSTITUTION, PHYSICIAN = "Clinique Wqbzntr", "Hjalmvork^Esquiddle"


def _needles():
    out = []
    for pid, name, birth, acc, d0, d1 in PEOPLE:
        out += [pid, pid[4:], name, *name.split("^"), acc, acc[4:]]
        for d in (birth, d0, d1):
            out += _date_forms(d) if d else []
    return out + [INSTITUTION, INSTITUTION.split()[1], PHYSICIAN, *PHYSICIAN.split("^")]


def _find(blobs):
    forms = [(f, f.lower().encode()) for f in _needles()]
    return [f"{w}: {f!r}" for w, blob in blobs for f, b in forms if b in blob.lower()]


def _export(work: Path) -> tuple[Path, Path]:
    """The synthetic cohort as an identified DICOM export, and a dated PFT table."""
    from sscflow.synth import synthesize_cohort

    manifest = synthesize_cohort(len(PEOPLE), work / "synthetic", spacing=SPACING, seed=0)
    with open(manifest, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    pft = [["patient_id", "date", "fvc", "dlco", "tlc", "kco"]]
    root = work / "export"
    for i, (row, (pid, name, birth, acc, d0, d1)) in enumerate(zip(rows, PEOPLE, strict=True)):
        header = {
            "PatientID": pid,
            "PatientName": name,
            "PatientBirthDate": birth,
            "PatientSex": row["sex"],
            "AccessionNumber": acc,
            "InstitutionName": INSTITUTION,
            "ReferringPhysicianName": PHYSICIAN,
            "SliceThickness": f"{SPACING:g}",
            "OtherPatientIDs": pid + "-B",
        }
        for which, day in (("baseline", d0), ("followup", d1)):
            if day is None:
                continue
            study = deterministic_uid("e2e", pid, which)
            h = {**header, "StudyDate": day, "SeriesDate": day, "AcquisitionDate": day}
            folder = root / f"{i:03d}" / which  # every series of the study in one folder
            px, pos, ori, ps = image_slices(read_volume(manifest.parent / row[which]))
            for kernel, number in (("B60f", 2), ("B30f", 3)):
                write_slices(
                    folder,
                    px,
                    pos,
                    orientation=ori,
                    pixel_spacing=ps,
                    header={**h, "ConvolutionKernel": kernel, "SeriesNumber": number},
                    series_uid=deterministic_uid("e2e", pid, which, kernel),
                    study_uid=study,
                )
            write_slices(
                folder,
                [np.zeros((8, 8), np.int16)] * 2,
                pos[:2],
                header={**h, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
                series_uid=deterministic_uid("e2e", pid, which, "loc"),
                study_uid=study,
            )
            iso = f"{day[:4]}-{day[4:6]}-{day[6:]}"
            pft.append(
                [
                    pid,
                    iso,
                    row[f"fvc_{which}"],
                    row[f"dlco_{which}"],
                    row[f"tlc_{which}"],
                    row[f"kco_{which}"],
                ]
            )
    with open(work / "pft.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(pft)
    return root, work / "pft.csv"


def _sscflow(*args, cwd, env):
    return subprocess.run(
        [sys.executable, "-m", "sscflow.cli", "--debug", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        env=env,
        timeout=900,
    )


@pytest.mark.slow
def test_discover_then_run_and_no_identifier_reaches_any_output(tmp_path):
    root, pft = _export(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    config = {
        "store": str(out / "cohort.zarr"),
        "results": str(out / "results"),
        "manifest": str(out / "cohort" / "manifest.csv"),
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "ingest": {"spacing_mm": SPACING},
        "segment": {"min_lung_ml": 5.0},
        "classifier": {"epochs": 2, "loader_workers": 0},
        "registration": QUICK,  # registration quality is not what this test checks
        "template": {"registration": QUICK},
        "discover": {"max_slice_thickness_mm": SPACING, "min_extent_mm": 60.0},
    }
    cfg = out / "run.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    (out / "tmp").mkdir()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "TMPDIR": str(out / "tmp")}
    key = tmp_path / "keys" / "cohort.key"
    logs = out / "logs"
    logs.mkdir()
    d = _sscflow(
        "discover",
        str(root),
        "--out",
        str(out / "cohort"),
        "--pft",
        str(pft),
        "--key",
        str(key),
        "--config",
        str(cfg),
        cwd=out,
        env=env,
    )
    (logs / "discover.txt").write_text(d.stdout + d.stderr, encoding="utf-8")
    assert d.returncode == 0, d.stdout[-2000:] + d.stderr[-3000:]
    assert "2 patients included" in d.stdout

    # the key file: the one place IDs are kept
    links = json.loads(key.read_text(encoding="utf-8"))["links"]
    manifest = list(csv.DictReader((out / "cohort" / "manifest.csv").read_text(encoding="utf-8")
                                   .splitlines()))
    assert sorted(links[r["patient_id"]] for r in manifest) == sorted([PEOPLE[0][0], PEOPLE[1][0]])
    private = PseudonymKey.open(key, scheme=None)
    for r in manifest:  # the chosen series, by its keyed UID: no original UID in the cohort
        original = deterministic_uid("e2e", links[r["patient_id"]], "baseline", "B60f")
        assert r["baseline_series_uid"] == private.uid(original) != original
    excluded = (out / "cohort" / "excluded.csv").read_text(encoding="utf-8")
    x = list(csv.DictReader(excluded.splitlines()))
    assert {r["rule"] for r in x} == {
        "localizer",
        "lower_rank",
        "fewer_than_two_cts",
        "patient_excluded",
        "study_not_used",
    }

    r = _sscflow("run", str(cfg), "--key", str(key), cwd=out, env=env)
    (logs / "run.txt").write_text(r.stdout + r.stderr, encoding="utf-8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    store = out / "cohort.zarr"
    for row in manifest:
        pid = row["patient_id"]
        assert (store / "patients" / pid / "log_jacobian_template" / "zarr.json").is_file()
    assert (out / "results" / "report" / "index.html").is_file()

    blobs = list(file_blobs(out)) + _zarr_text(store)
    assert len(blobs) > 50
    assert _find(blobs) == []
    # the same search finds every identifier in the export, so finding none above can fail
    one = next((root / "000" / "baseline").glob("*.dcm")).read_bytes()
    assert {h.split(": ", 1)[1] for h in _find([("slice", one)])} >= {
        repr(PEOPLE[0][0]),
        repr(PEOPLE[0][1]),
        repr(PEOPLE[0][2]),
        repr(INSTITUTION),
    }
