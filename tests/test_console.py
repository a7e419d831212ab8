"""What a user meets on the console: status into a pipe, quiet ports and validate, interrupts,
grouped warnings (issue 26). Real subprocesses, as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from sscflow.core import store as st
from sscflow.flow.status import STATUS_GROUP, write_status

LONG_ID = "P405417ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def sscflow(*args, env=None, **kw):
    """The command with stdout and stderr into pipes (not a terminal), no COLUMNS set."""
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "sscflow.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", timeout=600,
                          env={**environ, "PYTHONIOENCODING": "utf-8", **(env or {})}, **kw)


@pytest.fixture
def status_store(tmp_path):
    """A store whose status says: a patient with a long id failed registration."""
    path = str(tmp_path / "s.zarr")
    root = st.open_store(path)
    root.require_group(STATUS_GROUP)
    reason = "registration did not converge after 200 iterations (metric -0.12345)"
    for stage, status, message in (("ingest", "done", ""), ("extent", "done", ""),
                                   ("registration", "failed", reason)):  # fmt: skip
        write_status(root, {"patient_id": LONG_ID, "stage": stage, "status": status,
                             "message": message})  # fmt: skip
    return path, reason


def test_status_into_a_pipe_is_never_cut(status_store):
    path, reason = status_store
    res = sscflow("status", path)
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout, res.stdout
    for word in (LONG_ID, "registration", "to_template", "upstream failed", reason):
        assert word in res.stdout, (word, res.stdout)


def test_status_csv_and_json(status_store):
    path, reason = status_store
    rows = list(csv.DictReader(io.StringIO(sscflow("status", path, "--format", "csv").stdout)))
    reg = [r for r in rows if r["patient_id"] == LONG_ID and r["stage"] == "registration"]
    assert reg == [{"patient_id": LONG_ID, "stage": "registration", "status": "failed",
                    "message": reason}]  # fmt: skip
    assert {r["stage"] for r in rows if r["patient_id"] == ""} >= {"template", "report"}
    res = sscflow("status", path, "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["version"] == 1 and doc["store"] == path
    assert doc["patients"][LONG_ID]["registration"] == {"status": "failed", "message": reason}
    assert doc["patients"][LONG_ID]["ingest"]["status"] == "pending"  # no output in the store
    assert doc["counts"]["registration"] == {"failed": 1}
    assert doc["cohort"]["template"]["status"] == "pending" and doc["lease"] is None
    bad = sscflow("status", path, "--format", "xml")
    assert bad.returncode == 1 and "--format must be table, csv or json" in bad.stderr


def test_validate_config_prints_only_what_differs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  spacing_mm: 2.5\ncluster:\n  n_workers: 3\n", encoding="utf-8")
    res = sscflow("validate", str(cfg))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1:5] == ["cluster:", "  n_workers: 3", "ingest:", "  spacing_mm: 2.5"], lines
    assert len(lines) == 6 and "synth" not in res.stdout and "kubernetes" not in res.stdout
    full = sscflow("validate", str(cfg), "--full")
    assert full.returncode == 0 and "kubernetes:" in full.stdout and "synth:" in full.stdout
    assert len(full.stdout.splitlines()) > 50


def test_validate_prints_each_manifest_problem_once(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("patient_id,baseline,followup,visual\nP1,a.nii.gz,b.nii.gz,better\n",
        encoding="utf-8")
    res = sscflow("validate", str(m))
    text = res.stdout + res.stderr
    assert res.returncode == 1
    for problem in ("column visual: unknown label 'better'", "a.nii.gz does not exist",
                    "b.nii.gz does not exist"):  # fmt: skip
        assert text.count(problem) == 1, (problem, text)
    assert "1 of 1 patients would fail at ingest; none would run" in res.stderr


def test_validate_warns_when_an_end_slice_shows_lung(tmp_path):
    """The real CT's field of view cuts its lung bases and ends above the apices: one grouped
    warning per kind, naming the patients; a scan cut below the apices adds the top slice."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"
    if not data.is_file():
        pytest.skip(f"{data} is not there")
    image = sitk.ReadImage(str(data))
    sitk.WriteImage(image[:, :, :36], str(tmp_path / "short.nrrd"))
    (tmp_path / "m.csv").write_text("patient_id,baseline,followup\n"
                                    f"P1,{data},{data}\nP2,{data},short.nrrd\n",
                                    encoding="utf-8")  # fmt: skip
    res = sscflow("validate", str(tmp_path / "m.csv"))
    assert res.returncode == 0, res.stderr
    warned = [" ".join(line.split()) for line in res.stderr.split("warning: ")[1:]]
    assert len(warned) == 3, res.stderr
    assert "baseline: lung in the bottom slice; the scan may stop short of the lungs" in warned[0]
    assert warned[0].endswith("2 patients — P1, P2")
    assert warned[1].startswith("follow-up: lung in the bottom slice")
    assert warned[1].endswith("1 patient — P1")
    assert warned[2].startswith("follow-up: lung in the bottom and top slices")
    assert warned[2].endswith("1 patient — P2")


def test_a_taken_dashboard_port_is_one_quiet_line(tmp_path):
    """Another program holds the configured dashboard port: the command says which link it
    used, in one line, and neither distributed's UserWarning nor the nanny's kill warning."""
    import socket

    import yaml
    from helpers import mini_chest_image

    sitk.WriteImage(mini_chest_image(), str(tmp_path / "ct.nii.gz"))
    (tmp_path / "m.csv").write_text("patient_id,baseline,followup\nP1,ct.nii.gz,ct.nii.gz\n",
        encoding="utf-8")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"cluster": {"n_workers": 1,
                                                      "dashboard_address": f":{port}"},
                                          "segment": {"min_lung_ml": 1.0}}),
                                              encoding="utf-8")  # fmt: skip
        res = sscflow("ingest", str(tmp_path / "m.csv"), "--store", str(tmp_path / "s.zarr"),
                      "--spacing", "3", "--config", str(config))  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    for noise in ("UserWarning", "already in use", "warnings.warn", "still alive", "WARNING"):
        assert noise not in text, (noise, text)
    link = [line for line in res.stderr.splitlines() if line.startswith("dashboard: ")]
    assert len(link) == 1 and f"(port {port} is in use" in link[0], res.stderr
    assert f":{port}/" not in link[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_an_interrupted_run_stops_cleanly_and_says_what_was_kept(tmp_path, signum, code):
    """A real signal to the run's process group (as Ctrl-C sends) once the first outputs are
    written: no traceback, no Dask lines, the lease released, one line saying what was kept."""
    import time

    import yaml

    from sscflow.cli import _outputs_in_store
    from sscflow.flow.lease import read_holder

    made = sscflow("synth", "--patients", "3", "--out", str(tmp_path / "syn"), "--spacing", "4",
                   "--workers", "1")  # fmt: skip
    assert made.returncode == 0, made.stderr
    store = tmp_path / "s.zarr"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "manifest": str(tmp_path / "syn/manifest.csv"), "store": str(store),
        "cluster": {"n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
        "ingest": {"spacing_mm": 4.0}, "segment": {"min_lung_ml": 5.0}}),
            encoding="utf-8")  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen([sys.executable, "-m", "sscflow.cli", "run", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                            env={**environ, "PYTHONIOENCODING": "utf-8"},
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _outputs_in_store(store)[0] >= 2:
                break
        except Exception:  # a store being written: look again
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    text = stdout + stderr
    assert proc.returncode == code, text
    for noise in ("Traceback", "KeyboardInterrupt", "distributed.", "still alive", "WARNING"):
        assert noise not in text, (noise, text)
    kept, partial = _outputs_in_store(store)
    assert kept >= 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: {kept} outputs kept, ") and last.endswith(
        "in progress discarded; run the same command to resume"), stderr
    assert read_holder(str(store)) is None  # the lease was released


def test_warnings_are_grouped_by_kind():
    from sscflow.cli import group_warnings
    from sscflow.config import RegistrationConfig
    from sscflow.methods.registration.stage import thick_slice_warnings

    cfg = RegistrationConfig()
    lines = []
    for i in (3, 1, 2):  # unsorted, as they finish
        lines += thick_slice_warnings(f"SYN00{i}", {"slice_thickness_mm": {
            "baseline": 3.0 + i, "followup": 1.0}}, cfg)  # fmt: skip
    lines.append("patient SYN002: one lung found (the left): a pneumonectomy, or a collapsed lung?")
    assert len(lines) == 4
    assert group_warnings(lines) == [
        f"slices thicker than {cfg.thick_slice_mm:g} mm; registered, but detail along z is lost: "
        "3 patients — SYN001, SYN002, SYN003",
        "one lung found: a pneumonectomy, or a collapsed lung?: 1 patient — SYN002"]


def test_a_pair_whose_slices_differ_and_could_not_be_matched_is_named():
    """``match_slices: auto`` needs both scans' header thickness; where one is missing and the
    slice spacings differ (more than 0.5 mm and a quarter of the thinner), the run summary says
    the pair was not matched, one grouped line for all such patients."""
    import dataclasses

    from sscflow.cli import group_warnings
    from sscflow.config import RegistrationConfig
    from sscflow.methods.registration.stage import thick_slice_warnings

    cfg = RegistrationConfig(thick_slice_mm=10.0)  # the other warning out of the way

    def qa(base, follow, headers):
        return {"slice_thickness_mm": {"baseline": base, "followup": follow},
                "slice_thickness_from_headers_mm": dict(zip(("baseline", "followup"), headers,
                                                            strict=True))}  # fmt: skip

    unknown = (None, None)
    lines = thick_slice_warnings("P2", qa(5.0, 1.25, unknown), cfg)
    lines += thick_slice_warnings("P1", qa(1.0, 2.0, (1.0, None)), cfg)
    assert len(lines) == 2 and "baseline 5 mm, follow-up 1.25 mm" in lines[0], lines
    assert group_warnings(lines) == [
        "slice spacings differ and no DICOM header or NIfTI sidecar gives both thicknesses, so "
        "they were not matched; a difference in slice thickness reads as change at the lung "
        "bases, see README, Thick slices: 2 patients — P1, P2"]
    quiet = [qa(5.0, 1.25, (5.0, 1.25)),  # both thicknesses known: matched
             qa(1.25, 1.5, unknown),  # 0.25 mm apart
             qa(4.0, 4.8, unknown),  # 0.8 mm, but less than a quarter of 4 mm
             {"slice_thickness_mm": {"baseline": 5.0, "followup": 1.25}}]  # a record from before
    for record in quiet:
        assert thick_slice_warnings("P", record, cfg) == [], record
    for other in (dataclasses.replace(cfg, match_slices=False),
                  dataclasses.replace(cfg, match_slices=True),
                  dataclasses.replace(cfg, match_resolution=True)):  # fmt: skip
        assert thick_slice_warnings("P", qa(5.0, 1.25, unknown), other) == [], other


def test_discover_refuses_a_bad_pft_table_before_any_cluster_or_bar(tmp_path):
    """Argument and file checks come first: no Dask cluster, no 'headers 0/?' bar, one line."""
    (tmp_path / "export").mkdir()
    (tmp_path / "pft.csv").write_text("patient_id,date,weight\nX,2020-01-01,80\n", encoding="utf-8")
    res = sscflow("discover", str(tmp_path / "export"), "--out", str(tmp_path / "cohort"),
                  "--key", str(tmp_path / "k.key"), "--pft", str(tmp_path / "pft.csv"))
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "none of the PFT value columns" in text, text
    assert "headers" not in text and "dashboard" not in text, text
