"""What a store says about its runs: the records under ``STORE/status`` and, per patient and
stage, whether each is done, failed or pending (``sscflow status``, the report).

Below the pipeline and the stages: the stage table is passed in, so the report stage can read
the status of every stage without importing the table it belongs to.
"""

from __future__ import annotations

import time

from sscflow.core import store as st

STATUS_GROUP = "status"
PATIENT, COHORT = "patient", "cohort"  # a stage's scope
FINISHED = ("done", "skipped")  # the statuses of a record
FAILED = ("failed", "upstream_failed")


def manifest_patients(store) -> list[str] | None:
    """The patient ids of the manifest of the store's last run (None before any run)."""
    root = store if hasattr(store, "attrs") else st.open_store(store, mode="r")
    if STATUS_GROUP not in root:
        return None
    record = dict(root[STATUS_GROUP].attrs.get("manifest", {}) or {})
    return [str(p) for p in record["patients"]] if "patients" in record else None


def write_status(root, rec: dict) -> None:
    """The run record of one patient-stage (or cohort stage) under ``STORE/status``."""
    name = rec["patient_id"] or "_cohort"
    group = root[STATUS_GROUP].require_group(name)
    stages = dict(group.attrs.get("stages", {}))
    stages[rec["stage"]] = {
        "status": rec["status"],
        "message": rec.get("message", ""),
        "seconds": round(float(rec.get("seconds") or 0.0), 3),
        "worker": rec.get("worker"),
        "where": rec.get("where"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if rec.get("needed") is False:  # nothing to write for this unit (a stage's own decision)
        stages[rec["stage"]]["needed"] = False
    group.attrs["stages"] = stages


def store_status(store: str, stages: tuple) -> dict:
    """Per patient and stage: ``{"status": done|failed|upstream_failed|pending, "message"}``.

    ``stages`` is the stage table (``sscflow.stages.STAGES``: entries with ``name``, ``scope``
    and ``writes``). The latest run's record is used when it failed; otherwise a stage whose outputs
    (``Stage.writes``) are complete counts as done, and so does one whose record says it had
    nothing to write for that unit (``needed: false``: a long manifest's pair that is not the
    patient's first -> last one has no template-space map). Also returns the cohort stages under
    the key ``None``.
    """
    root = st.open_store(store, mode="r")
    in_store = set(st.patient_ids(root))
    records = {}
    if STATUS_GROUP in root:
        for name, group in st.unit_groups(root[STATUS_GROUP]):
            records[name] = dict(group.attrs.get("stages", {}))
    ids = in_store | {n for n in records if n != "_cohort"}

    def state(stage, group, rec: dict | None) -> dict:
        if rec and rec["status"] in FAILED:
            return {"status": rec["status"], "message": rec.get("message", "")}
        if rec and rec.get("needed") is False:  # the stage has nothing to write for this unit
            return {"status": "done", "message": rec.get("message", "")}
        done = group is not None and all(_written(group, w) for w in stage.writes)
        return {"status": "done" if done else "pending", "message": ""}

    out: dict = {}
    for pid in sorted(ids):
        group = root[f"{st.PATIENTS}/{pid}"] if pid in in_store else None
        out[pid] = {s.name: state(s, group, records.get(pid, {}).get(s.name))
                    for s in stages if s.scope == PATIENT}  # fmt: skip
    out[None] = {s.name: state(s, root, records.get("_cohort", {}).get(s.name))
                 for s in stages if s.scope == COHORT}  # fmt: skip
    return out


def _written(group, path: str) -> bool:
    """Whether a stage's output ``path`` (``@name``: an attribute of ``group``) is complete."""
    if path.startswith("@"):
        return path[1:] in group.attrs
    return st.stored_record(group, path) is not None
