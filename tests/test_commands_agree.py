"""validate, --dry-run, ingest and status agree on bad input; config problems come all at once;
a report works for a cohort where every patient failed, and a failed report says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import SimpleITK as sitk
import yaml
from helpers import mini_chest_image

from sscflow.cohort import read_manifest
from sscflow.config import IngestConfig, SegmentConfig, load_config
from sscflow.core import store as st
from sscflow.errors import ConfigError
from sscflow.flow.pipeline import ingest_record, store_status
from sscflow.flow.status import STATUS_GROUP, write_status
from sscflow.methods.ingest import ingest_patient


def sscflow(*args):
    return subprocess.run([sys.executable, "-m", "sscflow.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", timeout=600,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "250"})


def test_every_config_problem_at_once_with_line_and_column(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  n_workerz: 2\n  retries: -1\ningest:\n  spacing_mm: fast\n"
                   "registration:\n  backend: nope\nbogus: 1\n", encoding="utf-8")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "has 5 problems" in text
    for where, what in (("line 2, column 3", "unknown key 'cluster.n_workerz'"),
                        ("line 3, column 3", "cluster.retries must be >= 0"),
                        ("line 5, column 3", "'ingest.spacing_mm' must be a number"),
                        ("line 7, column 3", "registration.backend must be one of"),
                        ("line 8, column 1", "unknown key 'bogus'")):  # fmt: skip
        assert f"{where}: {what}" in text, text
    # in the file's order
    assert text.index("line 2,") < text.index("line 3,") < text.index("line 8,")


@pytest.fixture
def bad_rows(tmp_path):
    """P1 is a small valid CT; 'P 2' has an invalid id; P3's follow-up does not exist."""
    sitk.WriteImage(mini_chest_image(), str(tmp_path / "ct.nii.gz"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,baseline,followup\nP1,ct.nii.gz,ct.nii.gz\n"
                        "P 2,ct.nii.gz,ct.nii.gz\nP3,ct.nii.gz,gone.nii.gz\n",
                            encoding="utf-8")  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "manifest": "manifest.csv", "store": "s.zarr",
        "cluster": {"n_workers": 1, "dashboard_address": ":0"},
        "ingest": {"spacing_mm": 3.0}, "segment": {"min_lung_ml": 1.0}}),
            encoding="utf-8")  # fmt: skip
    return tmp_path, manifest, config


def test_validate_dry_run_and_ingest_agree_on_bad_rows(bad_rows):
    folder, manifest, config = bad_rows
    checks = {"validate": sscflow("validate", str(config)),
              "dry-run": sscflow("run", str(config), "--dry-run")}  # fmt: skip
    for name, res in checks.items():
        text = " ".join((res.stdout + res.stderr).split())
        assert res.returncode == 1, (name, text)
        assert "Traceback" not in text
        assert "line 3 (patient P 2), column patient_id" in text, (name, text)
        assert "gone.nii.gz does not exist" in text, (name, text)
        assert "P1" not in text.split("patients that will fail")[-1].split("error")[0], name
    assert "2 will fail at ingest, the other 1 patient will run" in checks["dry-run"].stdout
    ingest = sscflow("ingest", str(manifest), "--store", str(folder / "s.zarr"), "--spacing",
                     "3", "--workers", "1", "--config", str(config))  # fmt: skip
    assert ingest.returncode == 1, ingest.stderr
    assert "1 written" in ingest.stdout or "ingest: 1 written" in ingest.stdout, ingest.stdout
    assert "2 of 3 patients failed to ingest" in ingest.stderr
    assert "line 3" in ingest.stderr and "gone.nii.gz does not exist" in " ".join(
        ingest.stderr.split())
    status = sscflow("status", str(folder / "s.zarr"), "--all")
    assert status.returncode == 0, status.stderr
    p3 = next(x for x in status.stdout.splitlines() if "P3" in x)
    assert p3.split("│")[2].strip() == "failed" and "gone.nii.gz" in p3  # not 'pending'
    p1 = next(x for x in status.stdout.splitlines() if "P1" in x)
    assert p1.split("│")[2].strip() == "done"
    assert (folder / "s.zarr/patients/P1/lung_mask/zarr.json").read_text(encoding="utf-8").count(
        '"image-label"') == 1  # napari opens the mask as labels


def test_validate_config_whose_manifest_is_missing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("manifest: nowhere.csv\nstore: s.zarr\n", encoding="utf-8")
    res = sscflow("validate", str(config))
    assert res.returncode == 1
    assert "nowhere.csv, does not exist" in " ".join(res.stderr.split())


def test_report_for_a_cohort_where_every_patient_failed(bad_rows):
    from sscflow.views.report import write_report

    folder, manifest, config = bad_rows
    manifest.write_text("patient_id,baseline,followup\nP3,ct.nii.gz,gone.nii.gz\n",
        encoding="utf-8")
    store = str(folder / "s.zarr")
    root = st.open_store(store)
    root.require_group(STATUS_GROUP)
    for p in read_manifest(manifest).patients:  # what 'sscflow ingest' does, in this process
        result = ingest_patient(p, store, IngestConfig(spacing_mm=3.0), SegmentConfig())
        assert result.status == "failed"
        write_status(root, ingest_record(result))
    page = write_report(store, folder / "results", store_status(store)).read_text(encoding="utf-8")
    assert "No patient has a log-Jacobian map" in page and "P3" in page
    assert "gone.nii.gz" in page and not re.search(r"\bnan\b", page.lower())
    # a report that fails leaves a page that says so, not the previous one
    with pytest.raises(FileNotFoundError):
        write_report(str(folder / "absent.zarr"), folder / "results", {})
    page = (folder / "results/report/index.html").read_text(encoding="utf-8")
    assert "report: failed" in page and "absent.zarr" in page


def test_an_empty_dicom_folder_is_one_clear_error_without_itk_noise(tmp_path):
    code = ("from sscflow.core.imageio import read_volume\n"
            f"try:\n    read_volume({str(tmp_path)!r})\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8",
                         timeout=120)  # fmt: skip
    assert "InputImageError" in res.stdout and "holds no DICOM series" in res.stdout
    assert "GDCMSeriesFileNames" not in res.stderr and "WARNING" not in res.stderr, res.stderr
