"""The sscflow command as a user runs it: a real subprocess, exit codes and one-line errors."""

import os
import subprocess
import sys
import time

import pytest

COMMANDS = ["synth", "ingest", "run", "status", "report", "predict", "demo", "validate",
            "export", "discover"]


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sscflow.cli", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    res = run(command, "--help")
    assert res.returncode == 0
    assert "Example: sscflow " + command in " ".join(res.stdout.split())
    for placeholder in ("<bool>", "{", "}"):  # typer's type and required-argument marks
        assert placeholder not in res.stdout, (placeholder, res.stdout)


def test_version():
    res = run("--version")
    assert res.returncode == 0 and res.stdout.startswith("sscflow ")


def test_bad_config_is_one_line_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  n_workerz: 2\n", encoding="utf-8")
    res = run("validate", str(cfg))
    assert res.returncode == 1
    assert "unknown key 'cluster.n_workerz'" in res.stderr
    assert "Traceback" not in res.stderr
    debug = run("--debug", "validate", str(cfg))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_validate_manifest_lists_problems(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("patient_id,baseline,followup,visual\nP1,a.nii.gz,b.nii.gz,better\n",
        encoding="utf-8")
    res = run("validate", str(m))
    assert res.returncode == 1
    assert "line 2 (patient P1), column visual: unknown label 'better'" in res.stderr
    assert "does not exist" in res.stderr


def test_validate_good_config():
    res = run("validate", "configs/demo.yaml")
    assert res.returncode == 0, res.stderr
    assert "spacing_mm: 2.5" in res.stdout


def test_ingest_bad_patient_exits_nonzero_with_summary(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("patient_id,baseline,followup\nP1,missing.nii.gz,missing.nii.gz\n",
        encoding="utf-8")
    res = run("ingest", str(m), "--store", str(tmp_path / "s.zarr"), "--workers", "1")
    assert res.returncode == 1
    assert "1 of 1 patients failed" in res.stderr
    assert "missing.nii.gz does not exist" in " ".join(res.stderr.split())


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_skips(tmp_path):
    """The README's first command: every stage on a synthetic cohort; a rerun skips it all."""
    t0 = time.perf_counter()
    res = run("demo", "--patients", "3", "--out", str(tmp_path / "d"), "--workers", "2")
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    minutes, seconds = res.stdout.split("demo: 3 patients in ")[1].split(" (min:s)")[0].split(":")
    assert 0 < 60 * int(minutes) + int(seconds) <= wall + 1  # its own time, within the process's
    for stage in ("ingest", "registration", "jacobian", "to_template"):
        assert f"{stage}: 3 done, 0 unchanged (skipped), 0 failed" in res.stdout
    assert "group_means: 1 done" in res.stdout
    dice = float(res.stdout.split("Dice median ")[1].split(",")[0])
    assert dice >= 0.95
    error = float(res.stdout.split("displacement error median ")[1].split(" mm")[0])
    assert error < 1.0  # mm, against the synthetic truth
    assert (tmp_path / "d/cohort.zarr/patients/SYN003/log_jacobian_template/zarr.json").is_file()
    assert (tmp_path / "d/results/figures/group_means_sagittal.png").stat().st_size > 10_000
    assert "SYN002" in (tmp_path / "d/results/patients.csv").read_text(encoding="utf-8")
    page = (tmp_path / "d/results/report/index.html").read_text(encoding="utf-8")
    for section in ("Against the synthetic truth", "lung Dice", "mean_error_mm", "Provenance",
                    "manifest sha256", "Per-patient QA", "href='qa/SYN001.html'"):  # fmt: skip
        assert section in page, section
    assert (tmp_path / "d/results/report/qa/SYN003.html").is_file()
    assert (tmp_path / "d/results/figures/truth.svg").is_file()
    status = run("status", str(tmp_path / "d/cohort.zarr"))
    assert status.returncode == 0 and "3 patients" in status.stdout
    again = run("ingest", str(tmp_path / "d/synthetic/manifest.csv"), "--store",
                str(tmp_path / "d/cohort.zarr"), "--spacing", "2.5", "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert "0 written, 3 unchanged (skipped), 0 failed" in again.stdout
    rerun = run("demo", "--patients", "3", "--out", str(tmp_path / "d"), "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    for stage in ("ingest", "registration", "jacobian", "to_template"):
        assert f"{stage}: 0 done, 3 unchanged (skipped)" in rerun.stdout
    assert "group_means: 0 done, 1 unchanged (skipped)" in rerun.stdout
    # the rerun rewrites nothing: no new synthetic cohort, no new QA page, no new report
    assert "unchanged, not made again" in rerun.stdout
    assert "qa: 0 done, 3 unchanged (skipped)" in rerun.stdout
    assert "report: 0 done, 1 unchanged (skipped)" in rerun.stdout


def test_synth_command_writes_a_manifest(tmp_path):
    res = run("synth", "--patients", "1", "--out", str(tmp_path / "s"), "--spacing", "6",
              "--workers", "1")
    assert res.returncode == 0, res.stderr
    header = (tmp_path / "s/manifest.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("patient_id,baseline,followup,fvc_baseline")
