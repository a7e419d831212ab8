"""The cohort dataflow: every stage for every patient as Dask futures, resumable, fault-isolated.

The stages and their order are declared once, in :data:`sscflow.stages.STAGES`; the plan, the
dispatch, ``sscflow status``, the progress bars and the run summary come from that table::

    ingest ──▶ segment ──▶ registration ──▶ jacobian ──┬──▶ zones (per lung zone) ──┐
                  │ └──▶ extent (ILD density)          │                           │
                  └──(all patients)──▶ template ───────┴──▶ to_template ───────────┴──▶ qa
    (cohort) group means, tables, figure ──▶ classifier ──▶ report

Decisions:

- Every task returns a record (a plain dict) and never raises for a patient's bad data: the stage
  functions' errors become ``status: failed`` with the reason, and the patient's later stages
  become ``upstream_failed`` without running. A task that dies with its worker is retried
  (``cluster.retries``); if it still fails the patient fails alone in the same way.
- Skipping is the stages' own: each output records the hash of its inputs and its parameters;
  an unchanged output is skipped (``status: skipped``) and an upstream change changes the hash of
  everything downstream. ``force`` redoes every output.
- Outputs are complete only when their completion mark is written, last (see
  ``sscflow.core.store``),
  so a killed client or worker never leaves an output that a rerun would take as done.
- Only the client writes the run records ``STORE/status/<patient_id>`` (one writer, no races):
  what ``sscflow status`` shows, beside what the outputs themselves say.
- The graph grows with patients, not voxels: a handful of tasks per patient plus one task per
  cohort stage; array work happens inside the tasks. A patient stage is submitted as soon as
  the tasks it follows are; a cohort stage once the client has every record it follows.
- The run holds the store's lease (``sscflow.flow.lease``): a run whose lease was taken over stops
  at the next task boundary (each task checks the lease before it writes; the client checks
  it before each record) and raises LeaseLostError naming the new holder.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sscflow.cohort import Manifest, Patient
from sscflow.config import Config
from sscflow.core import store as st
from sscflow.errors import LeaseLostError, SscflowError
from sscflow.flow import status
from sscflow.flow.lease import taken_by
from sscflow.flow.status import STATUS_GROUP, manifest_patients, write_status  # noqa: F401 (re-exported)
from sscflow.stages import BY_NAME, COHORT, FAILED, PATIENT, STAGES, Context, Stage
from sscflow.stages.base import torch_backend

log = logging.getLogger(__name__)

LOST = "lease_lost"  # a task that found the store's lease taken over: it wrote nothing


@dataclass(frozen=True)
class Task:
    """One planned future: ``stage`` for ``patient_id`` (None for a cohort stage)."""

    key: str
    stage: str
    patient_id: str | None
    depends: tuple[str, ...] = ()
    gpu: bool = False


@dataclass
class Plan:
    """The tasks of a run, in an order where every dependency comes first."""

    tasks: list[Task]
    patients: list[Patient]
    token: str

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tasks:
            out[t.stage] = out.get(t.stage, 0) + 1
        return out


@dataclass
class RunSummary:
    """What a run did: per-stage counts, failures with reasons, and where the results are."""

    store: str
    results: Path | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    cohort: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # one line per patient (thick slices)
    where: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> {GPU|CPU: tasks}

    @property
    def ok(self) -> bool:
        return not self.failed and all(
            r.get("status") not in FAILED for r in self.cohort.values()
        )


def task_key(stage: str, patient_id: str | None, token: str) -> str:
    """``<stage>-<patient_id>-<token>``, or ``<stage>-<token>`` for a cohort stage."""
    return f"{stage}-{token}" if patient_id is None else f"{stage}-{patient_id}-{token}"


def plan_run(manifest: Manifest, cfg: Config, *, gpu: bool = False, force: bool = False,
             rebuild_template: bool = False) -> Plan:  # fmt: skip
    """The task list for every patient of ``manifest`` (no cluster needed; cheap for 10,000),
    from :data:`sscflow.stages.STAGES`: one task per patient of a patient stage, one task of a
    cohort stage. Consecutive patient stages are listed patient by patient (so a patient's
    stages are submitted together), a cohort stage after them.

    Keys are stable: ``<stage>-<patient_id>-<token>``, where the token is a hash of the store and
    of the settings, so the same run submitted twice names the same tasks. ``gpu``: the cluster
    has GPU workers; the stages that want one (``Stage.gpu``) are placed there.
    """
    extra = ("rebuild-template",) if rebuild_template else ()
    token = st.hash_values(cfg.store, cfg.to_dict(), force, *extra)[:10]
    ids = [p.patient_id for p in manifest.patients]
    tasks: list[Task] = []

    # per stage, in the order of ``after``: a cohort stage's key, or a patient stage's name
    after = {s.name: [(task_key(n, None, token), None) if BY_NAME[n].scope == COHORT else
                      (None, n) for n in s.after] for s in STAGES}  # fmt: skip

    def deps(stage: Stage, pid: str | None) -> tuple[str, ...]:
        if pid is not None:  # 10,000 patients x 5 stages: the f-string inline
            return tuple(key or f"{name}-{pid}-{token}" for key, name in after[stage.name])
        out = []
        for key, name in after[stage.name]:
            out += [key] if key else [task_key(name, p, token) for p in ids]
        return tuple(out)

    on_gpu = {s.name: gpu and s.gpu(cfg) for s in STAGES}
    run_of: list[Stage] = []  # consecutive patient stages, listed patient by patient
    for stage in (*STAGES, None):
        if stage is not None and stage.scope == PATIENT:
            run_of.append(stage)
            continue
        for pid in ids:
            tasks += [Task(task_key(s.name, pid, token), s.name, pid, deps(s, pid),
                           on_gpu[s.name]) for s in run_of]  # fmt: skip
        run_of = []
        if stage is not None:
            tasks.append(Task(task_key(stage.name, None, token), stage.name, None,
                              deps(stage, None), on_gpu[stage.name]))  # fmt: skip
    return Plan(tasks, list(manifest.patients), token)


# --- the task (runs on a worker; returns a record and never raises for bad data)


def execute(stage_name: str, ctx: Context, patient: Patient | None, lease_token: str | None,
            ups: list[dict]) -> dict:  # fmt: skip
    """Run one stage for one patient (``patient`` None: the cohort) and return its record.

    Writes nothing when the store's lease is no longer ``lease_token`` (status ``lease_lost``);
    an upstream failure gives ``upstream_failed`` without running.
    """
    pid = patient.patient_id if patient is not None else None
    if lease_token is not None and (holder := taken_by(ctx.store, lease_token)) is not None:
        return _record(stage_name, pid, LOST, message=holder)
    stage = BY_NAME[stage_name]
    if (skip := _upstream_failed(stage, pid, ups)) is not None:
        return skip
    return _guard(stage_name, pid, lambda: in_task(stage.run, ctx, patient, ups))


def in_task(fn: Callable, *args):
    """``fn(*args)`` with any Dask computation inside it run in this worker
    (:func:`sscflow.stages.base.worker_scheduler`), never sent back to the cluster.

    Inside a task Dask's default scheduler is the worker's client: an array computed there
    (xarray's ``.values`` of a store opened lazily, say) became tasks queued behind the run's
    own, and the group-means figure took 22 s instead of 2 in a run with QA pages waiting."""
    import dask

    from sscflow.stages.base import worker_scheduler

    with dask.config.set(scheduler=worker_scheduler()):
        return fn(*args)


def _record(stage, pid, status, seconds=0.0, message="", **extra) -> dict:
    from sscflow.flow.cluster import worker_kind

    return {"stage": stage, "patient_id": pid, "status": status, "seconds": float(seconds),
            "message": message, "worker": _worker_address(), "where": worker_kind(),
            **extra}  # fmt: skip


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # in the client
        return None


def _guard(stage: str, pid: str | None, fn: Callable[[], dict]) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn()
    except SscflowError as exc:
        return _record(stage, pid, "failed", time.perf_counter() - t0, str(exc),
                       traceback=traceback.format_exc())  # fmt: skip
    except Exception as exc:  # an unexpected error still fails this patient alone
        return _record(stage, pid, "failed", time.perf_counter() - t0,
                       f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    status = out.pop("status", "done")
    seconds = out.pop("seconds", time.perf_counter() - t0)
    message = out.pop("message", "")
    out.pop("patient_id", None)
    return _record(stage, pid, status, seconds, message, **_small(out))


def _small(d: dict) -> dict:
    """The scalar figures of a stage's result (what the run summary and table need)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _upstream_failed(stage: Stage, pid: str | None, ups: list[dict]) -> dict | None:
    """An ``upstream_failed`` record naming the stage where the failure happened (its reason
    is that stage's record's, given once there), when a stage this one needs failed: for a
    patient stage, its patient's or a cohort stage's; for a cohort stage, a cohort stage's."""
    for up in ups:
        if up["stage"] not in stage.blocking or (pid is None and up["patient_id"] is not None):
            continue
        if up["status"] == "failed":
            where = up["stage"] if up["patient_id"] is not None else f"{up['stage']} (cohort)"
            return _record(stage.name, pid, "upstream_failed", message=f"{where} failed",
                           failed_stage=up.get("failed_stage", up["stage"]))  # fmt: skip
        if up["status"] == "upstream_failed":
            return _record(stage.name, pid, "upstream_failed", message=up["message"],
                           failed_stage=up.get("failed_stage"))  # fmt: skip
    return None


def ingest_record(r) -> dict:
    """The run record of an ``ingest_patient`` result (``sscflow ingest`` writes the same)."""
    extra = {"traceback": r.traceback} if getattr(r, "traceback", "") else {}
    return _record("ingest", r.patient_id, r.status, r.seconds, r.message,
                   lung_volume_ml=r.lung_volume_ml.get("baseline"), **extra)  # fmt: skip


def rejected_record(row) -> dict:
    """The ingest record of a manifest row that cannot run (a ``cohort.Rejected``)."""
    pid = row.patient_id if row.valid_id else f"line {row.line}"
    return _record("ingest", pid, "failed", 0.0, row.message)


# --- the client side


def run(
    cfg: Config,
    manifest: Manifest,
    *,
    client,
    force: bool = False,
    truth_dir=None,
    on_record: Callable[[dict], None] | None = None,
    rebuild_template: bool = False,
    lease=None,
) -> RunSummary:
    """Run every stage for every patient of ``manifest`` on ``client``'s cluster.

    Parameters
    ----------
    cfg : the run's config (``cfg.store`` must be set; ``cfg.results`` defaults to ``results``
        beside the store)
    manifest : the validated manifest
    client : a connected ``distributed.Client`` (LocalCluster, remote scheduler, Kubernetes)
    force : redo every output even when it is current
    truth_dir : a synthetic cohort's folder: registration QA then includes errors against truth
    on_record : called in the client with each finished task's record (progress bars)
    rebuild_template : build the template again even though the store has one (it is
        otherwise reused, whatever patients were added or removed); the template-space maps
        and everything downstream are then redone, nothing upstream
    lease : the store's ``sscflow.flow.lease.Lease`` this run holds: when another run takes it over
        the run stops at the next task boundary, writes nothing more and raises
        LeaseLostError naming the new holder

    The manifest's patient ids are recorded in the store (:func:`manifest_patients`): the
    cohort outputs (group means, table, classifier, report) use only them; a patient removed
    from the manifest keeps its outputs in the store.

    Returns
    -------
    RunSummary: counts per stage and status, failed patients with reasons, cohort-stage records.
    A failure is a result, not a raise; callers decide the exit status from ``summary.ok``.
    A lost lease raises LeaseLostError.
    """
    from distributed import as_completed

    from sscflow.flow.metrics import TOPIC, scheduler_plugin

    t0 = time.perf_counter()
    store = str(cfg.store)
    results_dir = Path(cfg.results) if cfg.results else default_results(store)
    root = st.open_store(store)  # create the root once, before workers race to it
    st.require_group(root, st.PATIENTS)
    record_manifest(root, manifest)
    client.register_plugin(scheduler_plugin())
    client.log_event(TOPIC, {"run": "started"})
    _write_run_record(root, cfg, manifest, truth_dir, client)

    from sscflow.flow.cluster import placement

    place = placement(client)
    gpu = place.gpu_workers > 0
    if torch_backend(cfg) and not gpu:
        log.warning("no Dask worker offers a GPU resource: the torch registration runs on CPU")
    elif place.gpu_workers:
        log.info("placement: %s", place.describe())
    plan = plan_run(manifest, cfg, gpu=gpu, force=force, rebuild_template=rebuild_template)
    by_key = {t.key: t for t in plan.tasks}
    patients = {p.patient_id: p for p in plan.patients}
    ctx = Context(store, str(results_dir), cfg, force, str(truth_dir) if truth_dir else None,
                  rebuild_template, STAGES)  # fmt: skip
    token = lease.token if lease is not None else None
    retries = cfg.cluster.retries
    futures: dict[str, object] = {}
    records: dict[str, dict] = {}  # by task key
    pending = deque(plan.tasks)
    running = as_completed()

    def ready(task: Task) -> bool:  # a cohort stage waits for the records it follows
        if task.patient_id is None:
            return all(k in records for k in task.depends)
        return all(k in records or k in futures for k in task.depends)

    def pump() -> None:
        while pending and ready(pending[0]):
            task = pending.popleft()
            ups = [records[k] if k in records else futures[k] for k in task.depends]
            res = place.resources(task.gpu)
            kw = {"resources": res} if res else {}
            fut = client.submit(execute, task.stage, ctx, patients.get(task.patient_id), token,
                                ups, key=task.key, retries=retries, pure=False, **kw)  # fmt: skip
            futures[task.key] = fut
            running.add(fut)

    def check_lease(rec: dict | None = None) -> None:
        if lease is None or (lease.check() and (rec or {}).get("status") != LOST):
            return
        client.cancel(list(futures.values()))
        who = (rec or {}).get("message") if (rec or {}).get("status") == LOST else None
        who = who or lease.new_holder() or "another run"
        raise LeaseLostError(f"store {store}: this run lost its lease to {who}; it stopped and "
                             "wrote nothing more (finished work is kept)")

    summary = RunSummary(store, results_dir)
    failed_at: dict[str, str] = {}

    def finish(rec: dict) -> None:
        _account(summary, rec, failed_at)
        client.log_event(TOPIC, {k: rec.get(k) for k in ("stage", "status", "seconds", "where")})
        write_status(root, rec)
        if on_record:
            on_record(rec)

    for row in manifest.rejected:  # bad manifest rows fail alone, at ingest
        rec = rejected_record(row)
        _account(summary, rec, failed_at)
        if row.valid_id and row.patient_id not in patients:
            write_status(root, rec)
        if on_record:
            on_record(rec)
    check_lease()
    pump()
    for fut in running:
        task = by_key[fut.key]
        try:
            rec = fut.result()
        except Exception as exc:  # the task died on every retry (worker lost, say)
            rec = _record(task.stage, task.patient_id, "failed", 0.0,
                          f"{type(exc).__name__}: {exc}", traceback="".join(
                              traceback.format_exception(exc)))  # fmt: skip
            if task.patient_id in failed_at and failed_at[task.patient_id] != task.stage:
                rec = _record(task.stage, task.patient_id, "upstream_failed", 0.0,
                              f"{failed_at[task.patient_id]} failed")  # fmt: skip
        fut.release()
        del futures[task.key]
        check_lease(rec)
        records[task.key] = rec
        finish(rec)
        pump()
    summary.seconds = time.perf_counter() - t0
    client.log_event(TOPIC, {"run": "finished" if summary.ok else "finished_with_failures"})
    return summary


def default_results(store: str) -> Path:
    """``results`` beside a local store (``demo/cohort.zarr`` -> ``demo/results``)."""
    if st.is_url(store):
        return Path("results")
    return Path(store).resolve().parent / "results"


def _account(summary: RunSummary, rec: dict, failed_at: dict) -> None:
    stage, status, pid = rec["stage"], rec["status"], rec["patient_id"]
    counts = summary.counts.setdefault(stage, {})
    counts[status] = counts.get(status, 0) + 1
    if rec.get("warning"):  # a stage's warnings, one per line
        summary.warnings.extend(str(rec["warning"]).splitlines())
    if rec.get("where") and status != "upstream_failed":
        where = summary.where.setdefault(stage, {})
        where[rec["where"]] = where.get(rec["where"], 0) + 1
    if pid is None:
        summary.cohort[stage] = rec
    elif status == "failed" and pid not in failed_at:
        failed_at[pid] = stage
        summary.failed.append(rec)


def _file_name(path) -> str:
    """A local path's last part (a URL is kept: it names a bucket, not a patient's folder)."""
    text = str(path)
    if "://" in text or ("/" not in text and "\\" not in text):
        return text
    return Path(text).name


def _names_only(value):
    """A config dict with every local path cut to its file name."""
    if isinstance(value, dict):
        return {k: _names_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_names_only(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value) and "://" not in value:
        return Path(value).name
    return value


def record_manifest(root, manifest: Manifest) -> None:
    """Record the run's manifest (its patient ids, path and a hash) in ``STORE/status``: the
    cohort outputs and ``sscflow report`` / ``status`` use it as the current cohort."""
    ids = [p.patient_id for p in manifest.patients]
    group = st.require_group(root, STATUS_GROUP)
    record = {"path": _file_name(getattr(manifest, "path", "") or ""), "patients": ids,
              "sha256": st.hash_values(ids),
              "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    old = dict(group.attrs.get("manifest", {}) or {})
    if old.get("sha256") != record["sha256"] or old.get("path") != record["path"]:
        group.attrs["manifest"] = record


def _deidentification(manifest) -> dict | None:
    """The de-identification method and its version when the manifest came from ``sscflow
    discover`` (its scans are keyed references), else None (a hand-written manifest)."""
    from sscflow.discover import DEIDENTIFICATION

    if not any(p.refs for p in manifest.patients):
        return None
    return {"method": DEIDENTIFICATION["method"], "version": DEIDENTIFICATION["version"],
            "codes": [list(c) for c in DEIDENTIFICATION["codes"]]}  # fmt: skip


def _write_run_record(root, cfg, manifest, truth_dir, client) -> None:
    """Provenance of this run (what the report's provenance section shows), under
    ``STORE/status`` attribute ``run``: version, start, config as YAML, manifest and its sha256,
    the synthetic truth folder if any and the cluster."""
    import yaml

    from sscflow import __version__

    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        cluster = f"{len(workers)} Dask workers at {client.scheduler.address}"
    except Exception:  # a cluster that cannot say is not a reason to stop
        cluster = "unknown"
    root[STATUS_GROUP].attrs["run"] = {
        "version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # file names only: the store carries no file paths (they can name patients or sites)
        # what differs from the defaults (the whole config is the defaults plus this), and a
        # hash of the whole, so two runs' settings compare at a glance
        "config_yaml": yaml.safe_dump(_names_only(cfg.changed()), sort_keys=False),
        "config_sha256": st.hash_values(_names_only(cfg.to_dict())),
        "config_source": _file_name(cfg.source),
        "manifest": _file_name(manifest.path),
        "manifest_sha256": st.hash_input(manifest.path) if Path(manifest.path).is_file() else None,
        "patients": len(manifest.patients) + len(manifest.rejected),
        "truth_dir": _file_name(truth_dir) if truth_dir else None,
        "cluster": cluster,
        # a discovered cohort (scans named by keyed references): how it was de-identified
        "deidentification": _deidentification(manifest),
        "rejected": [{"line": r.line, "patient_id": r.patient_id, "message": r.message}
                     for r in manifest.rejected],  # bad rows: no status record of their own
    }


# --- state of a store (sscflow status)


def store_status(store: str) -> dict:
    """:func:`sscflow.flow.status.store_status` for the stages of :data:`sscflow.stages.STAGES`."""
    return status.store_status(store, STAGES)
