"""What a user meets on the console: status into a pipe, quiet ports and validate, interrupts,
grouped warnings (issue 26). Real subprocesses, as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from sscflow import store as st
from sscflow.pipeline import STATUS_GROUP, _write_status

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
        _write_status(root, {"patient_id": LONG_ID, "stage": stage, "status": status,
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
