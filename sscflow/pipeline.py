"""The cohort dataflow: every stage for every patient as Dask futures, resumable, fault-isolated.

Per patient (one future per patient per stage, stable keys, retries from the config)::

    ingest ──▶ registration ──▶ jacobian ──┐
       │ └──▶ extent (ILD density)         ├──▶ to_template ──▶ (cohort) group means, table,
       └──(all patients)──▶ template ──────┘       figure ──▶ classifier ──▶ report

Decisions:

- Every task returns a record (a plain dict) and never raises for a patient's bad data: the stage
  functions' errors become ``status: failed`` with the reason, and the patient's later stages
  become ``upstream_failed`` without running. A task that dies with its worker is retried
  (``cluster.retries``); if it still fails the patient fails alone in the same way.
- Skipping is the stages' own: each output records the hash of its inputs and its parameters;
  an unchanged output is skipped (``status: skipped``) and an upstream change changes the hash of
  everything downstream. ``force`` redoes every output.
- Outputs are complete only when their completion mark is written, last (see ``sscflow.store``),
  so a killed client or worker never leaves an output that a rerun would take as done.
- Only the client writes the run records ``STORE/status/<patient_id>`` (one writer, no races):
  what ``sscflow status`` shows, beside what the outputs themselves say.
- The graph grows with patients, not voxels: a handful of tasks per patient plus one template
  task; array work happens inside the tasks.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sscflow import store as st
from sscflow.cohort import Manifest, Patient
from sscflow.config import Config
from sscflow.errors import SscflowError

log = logging.getLogger(__name__)

PATIENT_STAGES = ("ingest", "extent", "registration", "jacobian", "to_template", "qa")
COHORT_STAGES = ("template", "group_means", "classifier", "report")
STAGES = ("ingest", "extent", "registration", "jacobian", "template", "to_template", "qa",
          "group_means", "classifier", "report")  # fmt: skip
# what each patient stage leaves in patients/<id> when it is done
OUTPUTS = {
    "ingest": ("baseline", "followup", "lung_mask", "followup_lung_mask"),
    "extent": (),  # an attribute of the patient group, checked apart
    "registration": ("displacement",),
    "jacobian": ("log_jacobian",),
    "to_template": ("template_displacement", "log_jacobian_template"),
    "qa": (),  # a page in the results folder, recorded in the patient group's qa_page
}
STATUS_GROUP = "status"
FAILED = ("failed", "upstream_failed")


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


def plan_run(manifest: Manifest, cfg: Config, *, gpu: bool = False, force: bool = False,
             rebuild_template: bool = False) -> Plan:  # fmt: skip
    """The task list for every patient of ``manifest`` (no cluster needed; cheap for 10,000).

    Keys are stable: ``<stage>-<patient_id>-<token>``, where the token is a hash of the store and
    of the settings, so the same run submitted twice names the same tasks.
    """
    extra = ("rebuild-template",) if rebuild_template else ()
    token = st.hash_values(cfg.store, cfg.to_dict(), force, *extra)[:10]
    tasks: list[Task] = []
    ingests = []
    for p in manifest.patients:
        pid = p.patient_id
        k_in = f"ingest-{pid}-{token}"
        ingests.append(k_in)
        tasks.append(Task(k_in, "ingest", pid))
        tasks.append(Task(f"extent-{pid}-{token}", "extent", pid, (k_in,)))
        tasks.append(Task(f"registration-{pid}-{token}", "registration", pid, (k_in,), gpu))
        tasks.append(
            Task(f"jacobian-{pid}-{token}", "jacobian", pid, (f"registration-{pid}-{token}",))
        )
    k_tpl = f"template-{token}"
    tasks.append(Task(k_tpl, "template", None, tuple(ingests), gpu))
    for p in manifest.patients:
        pid = p.patient_id
        tasks.append(
            Task(f"to_template-{pid}-{token}", "to_template", pid,
                 (f"jacobian-{pid}-{token}", k_tpl), gpu)  # fmt: skip
        )
        tasks.append(Task(f"qa-{pid}-{token}", "qa", pid,
                          (f"ingest-{pid}-{token}", f"to_template-{pid}-{token}")))
    return Plan(tasks, list(manifest.patients), token)


# --- the task functions (run on workers; each returns a record and never raises for bad data)


def _record(stage, pid, status, seconds=0.0, message="", **extra) -> dict:
    from sscflow.cluster import worker_kind

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
    out.pop("patient_id", None)
    return _record(stage, pid, status, seconds, "", **_small(out))


def _small(d: dict) -> dict:
    """The scalar figures of a stage's result (what the run summary and table need)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _upstream_failed(stage, pid, *upstream) -> dict | None:
    """An ``upstream_failed`` record naming the stage where the failure happened (its reason
    is that stage's record's, given once there)."""
    for up in upstream:
        if up["status"] == "failed":
            where = up["stage"] if up["patient_id"] is not None else f"{up['stage']} (cohort)"
            return _record(stage, pid, "upstream_failed", message=f"{where} failed",
                           failed_stage=up.get("failed_stage", up["stage"]))  # fmt: skip
        if up["status"] == "upstream_failed":
            return _record(stage, pid, "upstream_failed", message=up["message"],
                           failed_stage=up.get("failed_stage"))  # fmt: skip
    return None


def _worker_scheduler() -> str:
    """Blockwise work inside a task: one thread on a one-thread worker, else threads."""
    from sscflow.registration.common import n_threads

    return "synchronous" if n_threads() <= 1 else "threads"


def run_ingest(patient: Patient, store: str, cfg: Config, force: bool) -> dict:
    from sscflow.ingest import ingest_patient

    r = ingest_patient(patient, store, cfg.ingest, cfg.segment, force=force)
    return ingest_record(r)


def ingest_record(r) -> dict:
    """The run record of an ``ingest_patient`` result (``sscflow ingest`` writes the same)."""
    extra = {"traceback": r.traceback} if getattr(r, "traceback", "") else {}
    return _record("ingest", r.patient_id, r.status, r.seconds, r.message,
                   lung_volume_ml=r.lung_volume_ml.get("baseline"), **extra)  # fmt: skip


def rejected_record(row) -> dict:
    """The ingest record of a manifest row that cannot run (a ``cohort.Rejected``)."""
    pid = row.patient_id if row.valid_id else f"line {row.line}"
    return _record("ingest", pid, "failed", 0.0, row.message)


def run_qa(up_ingest: dict, up: dict, store: str, results: str, force: bool) -> dict:
    pid = up_ingest["patient_id"]
    if (skip := _upstream_failed("qa", pid, up_ingest)) is not None:
        return skip
    from sscflow.qa import qa_patient

    return _guard("qa", pid, lambda: qa_patient(store, pid, results, force=force))


def run_extent(up: dict, store: str, cfg: Config, force: bool) -> dict:
    pid = up["patient_id"]
    if (skip := _upstream_failed("extent", pid, up)) is not None:
        return skip
    from sscflow.extent import extent_patient

    return _guard("extent", pid, lambda: extent_patient(
        store, pid, force=force, scheduler=_worker_scheduler()))  # fmt: skip


def run_classifier(store: str, results: str, cfg: Config, force: bool,
                   patient_ids: list[str] | None = None) -> dict:  # fmt: skip
    """Both classifiers and the ILD-extent baseline (on a GPU worker when there is one), from
    ``patient_ids`` (the manifest's patients; the whole store when None)."""
    from sscflow.analysis import classify_cohort

    def go():
        out = classify_cohort(store, results, cfg.classifier, force=force,
                              patient_ids=patient_ids)  # fmt: skip
        statuses = {t: r["status"] for t, r in out.items()}
        status = "skipped" if all(v == "skipped" for v in statuses.values()) else "done"
        flat = {f"{t}_status": v for t, v in statuses.items()}
        for t, r in out.items():
            if r.get("cnn"):
                cnn = r["cnn"]
                flat[f"{t}_accuracy"] = cnn.get("accuracy")
                flat[f"{t}_n_test"] = n = int(cnn.get("n") or 0)
                pos = int(cnn.get("tp", 0)) + int(cnn.get("fn", 0))
                flat[f"{t}_majority_accuracy"] = max(pos, n - pos) / n if n else None
            if r.get("reason"):
                flat[f"{t}_reason"] = r["reason"]
        return {"status": status, **flat}

    return _guard("classifier", None, go)


def run_registration(up: dict, store: str, cfg: Config, force: bool, truth_dir) -> dict:
    pid = up["patient_id"]
    if (skip := _upstream_failed("registration", pid, up)) is not None:
        return skip
    from sscflow.registration.stage import register_patient

    def go():
        out = register_patient(store, pid, cfg.registration, truth_dir=truth_dir, force=force)
        out["warning"] = "; ".join(out.pop("warnings", None) or []) or None
        truth = out.pop("truth", None) or {}
        out.update({f"truth_{k}": v for k, v in truth.items()})
        return out

    return _guard("registration", pid, go)


def run_jacobian(up: dict, store: str, cfg: Config, force: bool) -> dict:
    pid = up["patient_id"]
    if (skip := _upstream_failed("jacobian", pid, up)) is not None:
        return skip
    from sscflow.jacobian.stage import log_jacobian_patient

    return _guard("jacobian", pid, lambda: log_jacobian_patient(
        store, pid, cfg.jacobian, scheduler=_worker_scheduler(), force=force))  # fmt: skip


def run_template(ups: list[dict], store: str, cfg: Config, force: bool,
                 rebuild: bool = False) -> dict:  # fmt: skip
    ids = [u["patient_id"] for u in ups if u["status"] not in FAILED]
    if not ids and cfg.template.image is None:
        return _record("template", None, "upstream_failed",
                       message="no patient was ingested; nothing to build a template from")
    from sscflow.template import build_template

    def go():
        from sscflow.template import describe_provenance

        out = build_template(store, ids, cfg.template, force=force, rebuild=rebuild)
        out["template_patient"] = out.pop("patient_id", None)  # the record's id is the cohort's
        out.pop("patients_used", None)
        left = out.pop("left_out", None) or []
        prov = out.pop("provenance", None) or {}
        return {**out, "left_out": len(left), "provenance": describe_provenance(prov),
                "generation": prov.get("generation")}  # fmt: skip

    return _guard("template", None, go)


def run_to_template(up: dict, tpl: dict, store: str, cfg: Config, force: bool) -> dict:
    pid = up["patient_id"]
    if (skip := _upstream_failed("to_template", pid, up, tpl)) is not None:
        return skip
    from sscflow.template import to_template_patient

    def go():
        out = to_template_patient(store, pid, cfg.template, force=force)
        qa = out.pop("qa", None) or {}
        out.update({k: v for k, v in qa.items() if k not in out})
        return out

    return _guard("to_template", pid, go)


# --- the client side


def has_gpu_workers(client) -> bool:
    """True when a worker of the cluster offers a ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers.values())


def _wants_gpu(cfg: Config) -> bool:
    from sscflow.registration import resolve_backend

    try:
        return resolve_backend(cfg.registration.backend) == "torch"
    except SscflowError:
        return False


def run(
    cfg: Config,
    manifest: Manifest,
    *,
    client,
    force: bool = False,
    truth_dir=None,
    on_record: Callable[[dict], None] | None = None,
    rebuild_template: bool = False,
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

    The manifest's patient ids are recorded in the store (:func:`manifest_patients`): the
    cohort outputs (group means, table, classifier, report) use only them; a patient removed
    from the manifest keeps its outputs in the store.

    Returns
    -------
    RunSummary: counts per stage and status, failed patients with reasons, cohort-stage records.
    A failure is a result, not a raise; callers decide the exit status from ``summary.ok``.
    """
    from distributed import as_completed

    from sscflow.metrics import TOPIC, scheduler_plugin

    t0 = time.perf_counter()
    store = str(cfg.store)
    results_dir = Path(cfg.results) if cfg.results else default_results(store)
    root = st.open_store(store)  # create the root once, before workers race to it
    st.require_group(root, st.PATIENTS)
    record_manifest(root, manifest)
    client.register_plugin(scheduler_plugin())
    client.log_event(TOPIC, {"run": "started"})
    _write_run_record(root, cfg, manifest, truth_dir, client)

    from sscflow.cluster import placement

    place = placement(client)
    gpu = _wants_gpu(cfg) and place.gpu_workers > 0
    if _wants_gpu(cfg) and not gpu:
        log.warning("no Dask worker offers a GPU resource: the torch registration runs on CPU")
    elif place.gpu_workers:
        log.info("placement: %s", place.describe())
    plan = plan_run(manifest, cfg, gpu=gpu, force=force, rebuild_template=rebuild_template)
    patients = {p.patient_id: p for p in plan.patients}
    retries = cfg.cluster.retries
    futures: dict[str, object] = {}

    def submit(task: Task, fn, *args):
        res = place.resources(task.gpu)
        kw = {"resources": res} if res else {}
        futures[task.key] = client.submit(fn, *args, key=task.key, retries=retries, pure=False,
                                          **kw)  # fmt: skip

    for task in plan.tasks:
        deps = [futures[k] for k in task.depends]
        if task.stage == "ingest":
            submit(task, run_ingest, patients[task.patient_id], store, cfg, force)
        elif task.stage == "extent":
            submit(task, run_extent, deps[0], store, cfg, force)
        elif task.stage == "registration":
            submit(task, run_registration, deps[0], store, cfg, force, truth_dir)
        elif task.stage == "jacobian":
            submit(task, run_jacobian, deps[0], store, cfg, force)
        elif task.stage == "template":
            submit(task, run_template, deps, store, cfg, force, rebuild_template)
        elif task.stage == "to_template":
            submit(task, run_to_template, deps[0], deps[1], store, cfg, force)
        elif task.stage == "qa":
            submit(task, run_qa, deps[0], deps[1], store, str(results_dir), force)

    by_key = {t.key: t for t in plan.tasks}
    summary = RunSummary(store, results_dir)
    failed_at: dict[str, str] = {}
    records: dict[tuple[str, str | None], dict] = {}
    for row in manifest.rejected:  # bad manifest rows fail alone, at ingest
        rec = rejected_record(row)
        _account(summary, rec, failed_at)
        if row.valid_id and row.patient_id not in patients:
            _write_status(root, rec)
        if on_record:
            on_record(rec)
    for fut in as_completed(list(futures.values())):
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
        _account(summary, rec, failed_at)
        records[(rec["stage"], rec["patient_id"])] = rec
        client.log_event(TOPIC, {k: rec.get(k) for k in ("stage", "status", "seconds", "where")})
        _write_status(root, rec)
        if on_record:
            on_record(rec)
    futures.clear()

    def finish(rec):
        _account(summary, rec, failed_at)
        client.log_event(TOPIC, {k: rec.get(k) for k in ("stage", "status", "seconds", "where")})
        _write_status(root, rec)
        if on_record:
            on_record(rec)

    rec = _cohort_outputs(cfg, store, results_dir, plan, records, force)
    finish(rec)
    if rec["status"] in FAILED:
        finish(_record("classifier", None, "upstream_failed", message="no group means"))
    else:
        res = place.resources(True)  # the classifier trains on a GPU whenever there is one
        kw = {"resources": res} if res else {}
        in_store = set(st.patient_ids(root))
        ids = [p.patient_id for p in plan.patients if p.patient_id in in_store]
        fut = client.submit(run_classifier, store, str(results_dir), cfg, force, ids,
                            key=f"classifier-{plan.token}", pure=False, retries=retries, **kw)
        try:
            finish(fut.result())
        except Exception as exc:  # the task died on every retry
            finish(_record("classifier", None, "failed", 0.0, f"{type(exc).__name__}: {exc}"))
        fut.release()
    finish(_report(store, results_dir, force))
    summary.seconds = time.perf_counter() - t0
    client.log_event(TOPIC, {"run": "finished" if summary.ok else "finished_with_failures"})
    return summary


def _report(store, results_dir, force: bool = False) -> dict:
    """Write the report unless everything it shows is unchanged and the page exists."""
    t0 = time.perf_counter()
    marker = Path(results_dir) / "report" / ".sscflow-inputs"
    try:
        from sscflow.report import report_key, write_report

        key = report_key(store, results_dir)
        page = Path(results_dir) / "report" / "index.html"
        if (not force and page.is_file() and marker.is_file()
                and marker.read_text() == key):  # fmt: skip
            return _record("report", None, "skipped", time.perf_counter() - t0, "",
                           path=str(page))  # fmt: skip
        marker.unlink(missing_ok=True)
        path = write_report(store, results_dir)
        marker.write_text(key)
    except Exception as exc:
        return _record("report", None, "failed", time.perf_counter() - t0,
                       f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return _record("report", None, "done", time.perf_counter() - t0, "", path=str(path))


def default_results(store: str) -> Path:
    """``results`` beside a local store (``demo/cohort.zarr`` -> ``demo/results``)."""
    if st.is_url(store):
        return Path("results")
    return Path(store).resolve().parent / "results"


def _account(summary: RunSummary, rec: dict, failed_at: dict) -> None:
    stage, status, pid = rec["stage"], rec["status"], rec["patient_id"]
    counts = summary.counts.setdefault(stage, {})
    counts[status] = counts.get(status, 0) + 1
    if rec.get("warning"):
        summary.warnings.append(rec["warning"])
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


def manifest_patients(store) -> list[str] | None:
    """The patient ids of the manifest of the store's last run (None before any run)."""
    root = store if hasattr(store, "attrs") else st.open_store(store, mode="r")
    if STATUS_GROUP not in root:
        return None
    record = dict(root[STATUS_GROUP].attrs.get("manifest", {}) or {})
    return [str(p) for p in record["patients"]] if "patients" in record else None


def _write_status(root, rec: dict) -> None:
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
    group.attrs["stages"] = stages


def _cohort_outputs(cfg, store, results_dir, plan, records, force) -> dict:
    """Group means, the cohort table and the figure, from the patients that finished."""
    t0 = time.perf_counter()
    ids = [p.patient_id for p in plan.patients]
    finished = ("done", "skipped")
    done = [p for p in ids if records.get(("to_template", p), {}).get("status") in finished]
    left_out = [pid for pid in ids if pid not in done]
    if not done:
        return _record("group_means", None, "upstream_failed", time.perf_counter() - t0,
                       "no patient reached template space", left_out=len(left_out))  # fmt: skip
    try:
        from sscflow.figures import plot_group_means
        from sscflow.groups import cohort_table, group_means, write_cohort_table

        table = cohort_table(store, ids)
        table_path = write_cohort_table(table, results_dir)
        labels = [c for c in ("patient_id", "functional", "visual") if c in table]
        root = st.open_store(store)
        key = st.hash_values([_upstream_meta(root, pid) for pid in done],
                             table[labels].astype(str).values.tolist())  # fmt: skip
        figure = results_dir / "figures" / "group_means_sagittal.png"
        current = (not force and "group_means" in root
                   and root["group_means"].attrs.get("sscflow_input_hash") == key
                   and figure.exists())  # fmt: skip
        if current:
            counts = dict(root["group_means"].attrs.get("sscflow_counts", {}))
            status = "skipped"
        else:
            gm = group_means(store, table.loc[table["patient_id"].isin(done)],
                             left_out=left_out)
            counts = {k: v for k, v in gm.items() if k.endswith("count") or k == "counts"}
            plot_group_means(store, figure)
            g = st.open_store(store)["group_means"]
            g.attrs.update({"sscflow_counts": st._jsonable(counts), "sscflow_input_hash": key})
            status = "done"
    except Exception as exc:
        return _record("group_means", None, "failed", time.perf_counter() - t0,
                       f"{type(exc).__name__}: {exc}", left_out=len(left_out),
                       traceback=traceback.format_exc())  # fmt: skip
    return _record("group_means", None, status, time.perf_counter() - t0, "",
                   patients=len(done), left_out=len(left_out), table=str(table_path),
                   figure=str(figure), path=f"{store}/group_means", counts=counts)  # fmt: skip


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
        "config_yaml": yaml.safe_dump(_names_only(cfg.to_dict()), sort_keys=False),
        "config_source": _file_name(cfg.source),
        "manifest": _file_name(manifest.path),
        "manifest_sha256": st.hash_input(manifest.path) if Path(manifest.path).is_file() else None,
        "patients": len(manifest.patients) + len(manifest.rejected),
        "truth_dir": _file_name(truth_dir) if truth_dir else None,
        "cluster": cluster,
        "rejected": [{"line": r.line, "patient_id": r.patient_id, "message": r.message}
                     for r in manifest.rejected],  # bad rows: no status record of their own
    }


def _upstream_meta(root, pid):
    meta = dict(root[f"{st.PATIENTS}/{pid}/log_jacobian_template"].attrs["sscflow"])
    return [pid, meta.get("input_hash"), meta.get("params")]


# --- state of a store (sscflow status)


def store_status(store: str) -> dict:
    """Per patient and stage: ``{"status": done|failed|upstream_failed|pending, "message"}``.

    The latest run's record is used when there is one; otherwise an output that is complete
    counts as done. Also returns the cohort stages under the key ``None``.
    """
    root = st.open_store(store, mode="r")
    in_store = set(st.patient_ids(root))
    ids = set(in_store)
    records = {}
    if STATUS_GROUP in root:
        for name, group in root[STATUS_GROUP].groups():
            records[name] = dict(group.attrs.get("stages", {}))
    ids |= {n for n in records if n != "_cohort"}
    out: dict = {}
    for pid in sorted(ids):
        group = root[f"{st.PATIENTS}/{pid}"] if pid in in_store else None
        row = {}
        for stage in PATIENT_STAGES:
            rec = records.get(pid, {}).get(stage)
            if stage == "extent":
                complete = group is not None and "extent" in group.attrs
            elif stage == "qa":
                complete = group is not None and "qa_page" in group.attrs
            else:
                complete = group is not None and all(
                    st.output_state(group, name) == "complete" for name in OUTPUTS[stage]
                )
            if rec and rec["status"] in FAILED:
                row[stage] = {"status": rec["status"], "message": rec.get("message", "")}
            elif complete:
                row[stage] = {"status": "done", "message": ""}
            else:
                row[stage] = {"status": "pending", "message": ""}
        out[pid] = row
    cohort = {}
    template_done = (
        "template" in root and st.output_state(root["template"], "lung_mask") == "complete"
    )
    gm_done = "group_means" in root and "sscflow_input_hash" in root["group_means"].attrs
    done_cohort = {"template": template_done, "group_means": gm_done}
    for stage in COHORT_STAGES:
        done = done_cohort.get(stage, False)
        rec = records.get("_cohort", {}).get(stage)
        if rec and rec["status"] in FAILED:
            cohort[stage] = {"status": rec["status"], "message": rec.get("message", "")}
        elif rec and stage not in done_cohort:  # outputs outside the store: the record says
            cohort[stage] = {"status": "done", "message": ""}
        else:
            cohort[stage] = {"status": "done" if done else "pending", "message": ""}
    out[None] = cohort
    return out


