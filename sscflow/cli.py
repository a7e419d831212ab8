"""The ``sscflow`` command: a thin layer over the library, one command per stage.

Expected failures print one line (``error: ...``) and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sscflow.errors import SscflowError

app = typer.Typer(
    name="sscflow",
    help="Longitudinal chest CT to lung-shrinkage (log-Jacobian) maps, as a resumable Dask "
    "dataflow. Run 'sscflow demo' to see it work on a synthetic cohort.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no "<bool>" type placeholders beside flags
)


class _Command(typer.core.TyperCommand):
    """Usage lines name the arguments in capitals (``sscflow ingest [OPTIONS] MANIFEST``)
    instead of typer's ``{manifest}``."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name).upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _command(**kw):
    return app.command(cls=_Command, **kw)
console = Console(stderr=True, soft_wrap=True)  # errors stay one greppable line
out = Console(soft_wrap=True)
_state = {"debug": False}

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config (see configs/); defaults when omitted."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help="Address of an existing Dask scheduler (tcp://host:8786)."),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=1, help="Local worker processes (LocalCluster).")
]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="When another run holds the store's lease, wait for it "
                 "instead of stopping."),
]  # fmt: skip
KeyOpt = Annotated[
    Path | None,
    typer.Option("--key", help="The key file 'sscflow discover' wrote (its private side links "
                 "the cohort's keyed references back to the export); default: discover.key."),
]  # fmt: skip


def _version(value: bool):
    if value:
        from sscflow import __version__

        out.print(f"sscflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
):
    _state["debug"] = debug


def _config(path: Path | None, scheduler: str | None = None, workers: int | None = None):
    from sscflow.config import Config, load_config

    cfg = load_config(path) if path else Config()
    if scheduler:
        cfg.cluster.scheduler = scheduler
    if workers:
        cfg.cluster.n_workers = workers
    return cfg


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
        transient=False,
    )


@_command()
def synth(
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, help="Number of patients.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")],
    spacing: Annotated[
        float, typer.Option("--spacing", min=0.5, max=6.0, help="Voxel size in mm (isotropic).")
    ] = 2.5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same files.")] = 0,
    noise: Annotated[float, typer.Option("--noise", min=0.0, help="Scanner noise std, HU.")] = 20.0,
    ribs: Annotated[bool, typer.Option("--ribs/--no-ribs", help="Draw ribs and spine.")] = True,
    same_grid: Annotated[bool, typer.Option(
        "--same-grid", help="Write both scans of a patient on the generator's grid, the patient "
        "unmoved (by default each scan has its own grid, field of view, direction, slice "
        "thickness and patient position, as real acquisitions do).")] = False,
    timepoints: Annotated[int, typer.Option(
        "--timepoints", min=2, max=12, help="Scans per patient. 2 (the default): a baseline and "
        "a follow-up, manifest.csv one row per patient. 3 or more: scans t0, t1, ... with the "
        "disease progressing over the months, manifest.csv one row per scan (patient_id, "
        "timepoint, scan, months, PFTs, visual, age, sex), and the exact truth of every pair "
        "of scans (a, b), a < b: truth/<pid>/ for (0, 1), truth/<pid>/pairs/<a>-<b>/ for the "
        "others, listed in truth/pairs.csv.")] = 2,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
):
    """Make a synthetic longitudinal chest CT cohort whose truth is known.

    Writes images (NIfTI, MHA and DICOM series, mixed across patients), manifest.csv, and truth/
    (true displacement fields, true log-Jacobian maps, lung masks, planted labels). Each scan
    is its own acquisition (grid, field of view, direction, slices of 0.9-1.8x the spacing or
    thick, table shift and a small rotation for the follow-up) unless --same-grid.

    Example: sscflow synth --patients 24 --out cohort/ --spacing 2.5 --seed 0
    """
    manifest = _synth(patients, out_dir, spacing, seed, noise, ribs,
                      _config(None, scheduler, workers), acquisitions=not same_grid,
                      timepoints=timepoints)  # fmt: skip
    out.print(f"wrote {patients} patients; manifest: {manifest}")


@contextmanager
def _lease(store, wait: bool, command: str):
    """The store's lease for the block (sscflow.flow.lease): one run per store. Another live run's
    lease stops this one at once (LeaseHeldError, exit 1) unless ``wait``."""
    from sscflow.flow.lease import hold

    def say(message):
        console.print(message, highlight=False)

    with hold(str(store), wait=wait, command=command, on_message=say) as lease:
        yield lease


@contextmanager
def _client(cfg, client=None):
    """The given client, or a new one from the config that closes on exit."""
    if client is not None:
        yield client
        return
    from contextlib import ExitStack

    from sscflow.flow.cluster import dashboard_note, dask_client

    with ExitStack() as stack:
        with _workers_deaf():  # only while the worker processes start
            new = stack.enter_context(dask_client(cfg.cluster))
        console.print(f"dashboard: {new.dashboard_link}"
                      f"{dashboard_note(cfg.cluster, new.dashboard_link)}", highlight=False)
        yield new


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run: unwinds like KeyboardInterrupt (closing the cluster and
    releasing the lease on the way out); ``code`` is the exit status, 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.code = 128 + signum


@contextmanager
def _workers_deaf():
    """Local worker processes started in the block ignore SIGINT and SIGTERM (a disposition
    kept across their exec): Ctrl-C reaches the whole process group, and only this process
    should act on it, closing the workers itself, without their tracebacks."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = {k: signal.signal(k, signal.SIG_IGN) for k in kinds}
    try:
        yield
    finally:
        for k, handler in before.items():
            if signal.getsignal(k) == signal.SIG_IGN:  # not yet restored by an inner block
                signal.signal(k, handler)


@contextmanager
def _interruptible():
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block; a second one while it
    unwinds ends the process at once (the lease then goes stale and is taken over)."""
    import os
    import signal

    kinds = (signal.SIGINT, signal.SIGTERM)
    state = {"hit": None}

    def handler(signum, frame):
        if state["hit"] is not None:
            os._exit(128 + state["hit"])
        state["hit"] = signum
        _quiet_dask()
        raise Interrupted(signum)

    before = {k: signal.signal(k, handler) for k in kinds}
    try:
        yield
    finally:
        for k, old in before.items():
            signal.signal(k, old)


def _quiet_dask():
    """Dask's own lines about cancelled tasks and lost workers, expected while a run is
    stopped on purpose, stay out of the console (``--debug`` keeps them)."""
    import logging

    if not _state["debug"]:
        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _outputs_in_store(store) -> tuple[int, int]:
    """(complete, incomplete) outputs under the store's patients and template: what an
    interrupted run kept, and what it was writing (discarded; a rerun redoes it)."""
    from sscflow.core import store as st

    try:
        root = st.open_store(str(store), mode="r")
    except (OSError, ValueError, KeyError):
        return 0, 0
    groups = [root[f"{st.PATIENTS}/{pid}"] for pid in st.patient_ids(root)]
    if st.TEMPLATE in root:
        groups.append(root[st.TEMPLATE])
    states = [st.output_state(g, name) for g in groups for name, _ in st.subgroups(g)
              if name != st.PAIRS]  # fmt: skip
    return states.count("complete"), states.count("incomplete")


def _say_interrupted(store, exc: Interrupted):
    kept, partial = _outputs_in_store(store)
    console.print(f"interrupted: {kept} outputs kept, {partial} in progress discarded; run the "
                  "same command to resume", highlight=False)
    sys.exit(exc.code)


def _synth(patients, out_dir, spacing, seed, noise, ribs, cfg, client=None, acquisitions=True,
           timepoints=2):  # fmt: skip
    from sscflow.synth import synthesize_cohort

    with _client(cfg, client) as client, _progress() as bar:
        task = bar.add_task("synth", total=patients, last="")

        def progress(done, total, pid):
            bar.update(task, completed=done, last=pid)

        return synthesize_cohort(
            patients,
            out_dir,
            spacing=spacing,
            seed=seed,
            client=client,
            progress=progress,
            ribs=ribs,
            noise_hu=noise,
            acquisitions=acquisitions,
            timepoints=timepoints,
        )


@_command()
def ingest(
    manifest: Annotated[
        Path, typer.Argument(help="Manifest CSV (patient_id, baseline, followup, ...).")
    ],
    store: Annotated[str, typer.Option("--store", "-s", help="Zarr store to write (created).")],
    spacing: Annotated[
        float | None, typer.Option("--spacing", help="Canonical voxel size in mm (default 1).")
    ] = None,
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    wait: WaitOpt = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Read every scan again, even those that look unchanged "
                     "(after editing a file in place without changing its size or time)."),
    ] = False,
    key: KeyOpt = None,
):
    """Ingest every manifest patient into a Zarr store: the canonical grid (identity
    direction, isotropic --spacing mm, default 1), int16 HU, lung masks.

    Unchanged inputs are skipped: a scan counts as unchanged when its files' names, sizes and
    modification times and its header are (no pixel is read to decide); --force reads every
    scan again. A bad patient (a missing or unreadable scan, or a manifest
    row with a bad value) fails alone and the command exits 1 with a summary. Writes the same
    status records as 'sscflow run' (see 'sscflow status').

    A manifest 'sscflow discover' wrote needs its private side: --key (or discover.key).

    Example: sscflow ingest cohort/manifest.csv --store cohort.zarr --spacing 1.0
    """
    cfg = _config(config, scheduler, workers)
    if spacing is not None:
        cfg.ingest.spacing_mm = spacing
        cfg.ingest.validate("ingest")
    cfg.manifest, cfg.store = manifest, store  # where the key file may not lie
    private = _private_side(key, cfg)
    with _lease(store, wait, f"sscflow ingest {manifest}"):
        results = _ingest(manifest, store, cfg, force=force, key=private)
    _ingest_summary(results, store)


def _ingest(manifest_path, store, cfg, client=None, force=False, key=None):
    from sscflow.cohort import read_manifest
    from sscflow.core import store as st
    from sscflow.flow.pipeline import ingest_record, rejected_record
    from sscflow.flow.status import STATUS_GROUP, write_status
    from sscflow.methods.ingest import PatientResult, ingest_cohort

    manifest = read_manifest(manifest_path, lenient=True, key=key, pairs=cfg.pairs)
    rejected = []
    for row in manifest.rejected:  # bad rows fail alone, as in 'sscflow run'
        rec = rejected_record(row)
        rejected.append(PatientResult(rec["patient_id"], "failed", rec["message"]))
        console.print(f"[red]failed[/red] {rec['patient_id']}: {rec['message']}",
                      highlight=False)  # fmt: skip
    root = st.open_store(str(store))
    root.require_group(STATUS_GROUP)

    def record(result):
        if _state["debug"] and result.traceback:
            console.print(f"traceback of ingest {result.patient_id}:\n{result.traceback}",
                          highlight=False, markup=False)  # fmt: skip
        write_status(root, ingest_record(result))

    if not manifest.patients:
        return rejected
    with _client(cfg, client) as client, _progress() as bar:
        task = bar.add_task("ingest", total=len(manifest), last="")

        def progress(result, done, total):
            bar.update(task, completed=done, last=f"{result.patient_id} {result.status}")
            record(result)
            if result.status == "failed":
                bar.console.print(f"[red]failed[/red] {result.message}", highlight=False)

        return rejected + ingest_cohort(
            manifest, str(store), cfg.ingest, cfg.segment, client=client, progress=progress,
            force=force,
        )


def _ingest_summary(results, store):
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    mb = sum(r.input_bytes for r in results) / 1e6
    out.print(
        f"ingest: {counts['done']} written, {counts['skipped']} unchanged (skipped), "
        f"{counts['failed']} failed; {mb:.1f} MB of input; store: {store}"
    )
    failed = [r for r in results if r.status == "failed"]
    if failed:
        table = Table("patient", "reason", title="failed patients")
        for r in failed:
            table.add_row(r.patient_id, r.message)
        console.print(table)
        raise SscflowError(f"{len(failed)} of {len(results)} patients failed to ingest (see above)")


@_command()
def discover(
    dicom_root: Annotated[Path, typer.Argument(help="The DICOM export (any folder layout).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Cohort folder to write.")],
    key: Annotated[Path | None, typer.Option(
        "--key", help="Pseudonym key file (created, or reused for stable pseudonyms; it also "
        "keeps the link back to the export); outside the cohort and store. Default: "
        "discover.key of the config.")] = None,
    pft: Annotated[
        Path | None, typer.Option("--pft", help="PFT CSV: patient_id, date, fvc, dlco, tlc, kco.")
    ] = None,
    timepoints: Annotated[str | None, typer.Option(
        "--timepoints", help="Which CTs per patient: first_last (the paper's pair), first_second, "
        "or all (a long manifest, one row per CT). Default: discover.timepoints of the config "
        "(first_last).")] = None,
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
):
    """Turn a DICOM export into a cohort: manifest.csv, excluded.csv, flowchart.png/.json.

    Reads headers only, in parallel on Dask; keeps axial, unenhanced, supine, inspiratory thin
    CT series, the best per study, and per patient the oldest and most recent such CT with a
    PFT within 90 days (rules: the config's discover section). Patient IDs become pseudonyms.

    Example: sscflow discover /data/export --out cohort/ --pft pft.csv --key ~/keys/cohort.key
    (every CT of each patient, as a long manifest: add --timepoints all)
    """
    import typing
    from dataclasses import replace

    from sscflow.discover.run import check_inputs
    from sscflow.discover.run import discover as discover_cohort
    from sscflow.discover.settings import DiscoverConfig

    cfg = _config(config, scheduler, workers)
    if timepoints is not None:
        choices = typing.get_args(typing.get_type_hints(DiscoverConfig)["timepoints"])
        if timepoints not in choices:
            raise SscflowError(f"--timepoints must be {', '.join(choices[:-1])} or {choices[-1]}, "
                               f"got {timepoints!r}")  # fmt: skip
        cfg = replace(cfg, discover=replace(cfg.discover, timepoints=timepoints))
    key = key or cfg.discover.key
    if key is None:
        raise SscflowError("give the key file: --key ~/sscflow-keys/cohort.key (or discover.key "
                           "in the config); it is created if it does not exist")  # fmt: skip
    # the arguments and files are checked before a cluster starts or a bar is drawn
    inputs = check_inputs(dicom_root, out_dir, key=key, cfg=cfg.discover, pft=pft,
                          store=cfg.store)  # fmt: skip
    with _client(cfg) as client, _progress() as bar:
        task = bar.add_task("headers", total=None, last="")

        def progress(done, total):
            bar.update(task, completed=done, total=total, last="files")

        res = discover_cohort(dicom_root, out_dir, key=key, cfg=cfg.discover, pft=pft,
                              store=cfg.store, client=client, progress=progress,
                              inputs=inputs)  # fmt: skip
    f = res.files
    out.print(f"{f['found']} files: {f['dicom']} DICOM images read, {f['not_dicom']} not DICOM, "
              f"{f['unreadable']} unreadable, {f['without_series']} without a series (skipped); "
              f"{res.seconds:.1f} s")  # fmt: skip
    out.print(f"{res.n_series} series, {res.n_studies} studies, {res.n_patients} patients; "
              f"{res.n_included} patients included")  # fmt: skip
    if res.rules:
        top = sorted(res.rules.items(), key=lambda kv: (-kv[1], kv[0]))
        out.print("left out (excluded.csv rows by rule): "
                  + ", ".join(f"{rule} {n}" for rule, n in top))  # fmt: skip
    for line in group_warnings(res.warnings):
        console.print(f"[yellow]warning[/yellow]: {line}", highlight=False)
    out.print(f"manifest: {res.manifest or '(none: no patient met the rules)'}")
    out.print(f"excluded: {res.excluded}; flowchart: {res.flowchart_png}; key: {res.key}")
    if res.manifest is None:
        raise SscflowError("no patient met the selection rules; see excluded.csv and the "
                           "flowchart for the reasons")  # fmt: skip


@_command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config naming the manifest and the store.")],
    scheduler: SchedulerOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Redo every output, even those that are current "
                           "(and read every scan again, also one edited in place).")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate the manifest and print the plan; run nothing."),
    ] = False,
    workers: WorkersOpt = None,
    cluster: Annotated[
        str | None,
        typer.Option("--cluster", help="Without --scheduler: 'local' (a LocalCluster) or "
                     "'kubernetes' (a DaskCluster made from the config's cluster.kubernetes)."),
    ] = None,
    rebuild_template: Annotated[
        bool,
        typer.Option("--rebuild-template", help="Build the template again (it is otherwise "
                     "kept, whatever patients are added or removed); redoes the template-space "
                     "maps and what follows, nothing upstream."),
    ] = False,
    wait: WaitOpt = False,
    key: KeyOpt = None,
):
    """Run every stage for every manifest patient: ingest (scans and lung masks), ILD extent,
    registration, log-Jacobian, template space, QA pages; then for the cohort: group means,
    cohort table and figures, the classifiers and the report (results/report/index.html).

    A rerun skips what is current and says so; a bad patient (a bad manifest row, a missing or
    unreadable scan, a failed registration) fails alone and the command then exits 1 listing
    the failures. --dry-run says which patients will fail and why, without running. A folder
    named truth/ beside the manifest (a synthetic cohort)
    adds errors against the truth to the registration QA. The template, once built, is kept
    (--rebuild-template to build it again). One run per store: a second run on a store in use
    stops at once naming the holder (or waits, with --wait).

    Example: sscflow run configs/cohort.yaml --scheduler tcp://10.0.0.5:8786
    (or --cluster kubernetes)
    """
    from sscflow.cohort import read_manifest

    cfg = _config(config, scheduler, workers)
    if cluster is not None:
        if cluster not in ("local", "kubernetes"):
            raise SscflowError(f"--cluster must be 'local' or 'kubernetes', got {cluster!r}")
        cfg.cluster.kind = cluster
    if cfg.manifest is None or cfg.store is None:
        raise SscflowError(f"config {config}: 'manifest' and 'store' must both be set for a run")
    t0 = time.perf_counter()
    manifest = read_manifest(cfg.manifest, check_files=dry_run, lenient=True,
                             key=_private_side(key, cfg), pairs=cfg.pairs)  # fmt: skip
    if dry_run:
        _dry_run(cfg, manifest, force, t0)
        return
    synthetic = cfg.manifest.parent  # sscflow synth writes truth/ beside its manifest
    truth_dir = synthetic if (synthetic / "truth").is_dir() else None
    try:
        with _interruptible(), _lease(cfg.store, wait, f"sscflow run {config}") as lease:
            summary = _run(cfg, manifest, force=force, truth_dir=truth_dir,
                           rebuild_template=rebuild_template, lease=lease)  # fmt: skip
    except Interrupted as exc:
        _say_interrupted(cfg.store, exc)
    _run_report(summary)


def _dry_run(cfg, manifest, force, t0):
    from sscflow.flow.pipeline import plan_run

    plan = plan_run(manifest, cfg, force=force)
    counts = plan.count()
    seconds = time.perf_counter() - t0
    bad = len(manifest.rejected)  # rejected patients, with all their rows
    units = [p.patient_id for p in manifest.patients]
    total = count_patients(units, more=bad)
    if bad and not len(manifest):
        out.print(f"manifest {cfg.manifest}: every one of its {total} will fail at ingest:")
        _print_rejected(manifest)
        raise SscflowError(f"all {total} will fail (see above); 'sscflow run' would run "
                           "nothing: fix the manifest")  # fmt: skip
    if bad:
        out.print(f"manifest {cfg.manifest}: {total}; {bad} will fail at ingest, the other "
                  f"{count_patients(units)} will run:")  # fmt: skip
        _print_rejected(manifest)
    else:
        out.print(f"manifest {cfg.manifest}: {total}, valid, every scan exists")
    out.print(f"store: {cfg.store}; results: {cfg.results or 'results/ beside the store'}")
    out.print(f"plan: {len(plan.tasks)} tasks (" + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"), key token {plan.token}; built in {seconds:.2f} s; nothing was run")
    if bad:
        raise SscflowError(f"{bad} of {total} will fail (see above); 'sscflow run' would run "
                           "the others and exit 1")


def _print_rejected(manifest):
    from sscflow.flow.pipeline import rejected_record

    t = Table("patient", "stage", "reason", title="patients that will fail")
    for row in manifest.rejected:
        rec = rejected_record(row)
        t.add_row(rec["patient_id"], "ingest", rec["message"])
    out.print(t)


def _run(cfg, manifest, *, force=False, truth_dir=None, client=None, rebuild_template=False,
         lease=None):  # fmt: skip
    from sscflow.flow.pipeline import run
    from sscflow.stages import PATIENT, STAGES

    n = len(manifest) + len(manifest.rejected)
    with _client(cfg, client) as client, _progress() as bar:
        tasks = {s.name: bar.add_task(s.name.replace("_", " "), last="",
                                      total=n if s.scope == PATIENT else 1)
                 for s in STAGES}  # fmt: skip
        skipped: dict[str, int] = {}

        def on_record(rec):
            stage, status = rec["stage"], rec["status"]
            if status == "skipped":
                skipped[stage] = skipped.get(stage, 0) + 1
            note = f"{rec['patient_id'] or ''} {status}".strip()
            if skipped.get(stage):
                note += f" ({skipped[stage]} unchanged, skipped)"
            bar.update(tasks[stage], advance=1, last=note)
            if status == "failed":
                bar.console.print(f"[red]failed[/red] {stage}: {rec['message']}", highlight=False)
                if _state["debug"] and rec.get("traceback"):
                    bar.console.print(f"traceback of {stage} {rec['patient_id'] or '(cohort)'}:"
                                      f"\n{rec['traceback']}", highlight=False, markup=False)

        return run(cfg, manifest, client=client, force=force, truth_dir=truth_dir,
                   on_record=on_record, rebuild_template=rebuild_template,
                   lease=lease)  # fmt: skip


def _run_report(summary):
    for stage, c in summary.counts.items():
        done, skipped, failed = (c.get(k, 0) for k in ("done", "skipped", "failed"))
        out.print(f"{stage}: {done} done, {skipped} unchanged (skipped), {failed} failed, "
                  f"{c.get('upstream_failed', 0)} upstream failed")  # fmt: skip
    tpl = summary.cohort.get("template", {})
    if tpl.get("action") == "reused":
        added, removed = tpl.get("added"), tpl.get("removed") or 0
        if added is None:  # a template file
            changes = "; rebuild it with --rebuild-template"
        elif added or removed:
            changes = (f"; {added} of this run's patients were not in the cohort it was built "
                       f"from, {removed} of that cohort are not in this run; rebuild it with "
                       "--rebuild-template")  # fmt: skip
        else:
            changes = ", built from this run's patients"
        out.print(f"template: reused as it is ({tpl.get('provenance')}){changes}")
    elif tpl.get("action") in ("built", "rebuilt"):
        out.print(f"template: {tpl['action']} because {tpl.get('reason')}: "
                  f"{tpl.get('provenance')}")  # fmt: skip
    gm = summary.cohort.get("group_means", {})
    if gm.get("status") in ("done", "skipped"):
        left = gm.get("left_out", 0)
        out.print(f"group means: {gm.get('path')} ({gm.get('patients')} patients"
                  + (f", {left} left out" if left else "") + ")")  # fmt: skip
        out.print(f"cohort table: {gm.get('table')}")
        if gm.get("zones"):
            out.print(f"zone table: {gm.get('zones')}")
        out.print(f"figure: {gm.get('figure')}")
    clf = summary.cohort.get("classifier", {})
    for target in ("functional", "morphologic"):
        if clf.get(f"{target}_status") in ("done", "skipped"):
            n, major = clf.get(f"{target}_n_test"), clf.get(f"{target}_majority_accuracy")
            line = f"classifier ({target}): test accuracy {clf.get(f'{target}_accuracy'):.2f}"
            if n is not None:
                line += f" on {n} test patients (majority class: {major:.2f})"
                if n < 20:
                    line += "; warning: fewer than 20 test patients, this means little"
            out.print(line)
        elif clf.get(f"{target}_reason"):
            out.print(f"classifier ({target}) not trained: {clf[f'{target}_reason']}")
    rep = summary.cohort.get("report", {})
    if rep.get("status") in ("done", "skipped"):
        out.print(f"report: {rep.get('path')}")
    if any("GPU" in w for w in summary.where.values()):  # where each stage ran, with GPUs
        out.print("ran on: " + ", ".join(
            f"{stage} " + " + ".join(f"{n} {kind}" for kind, n in sorted(w.items()))
            for stage, w in summary.where.items()))  # fmt: skip
    out.print(f"store: {summary.store}; {summary.seconds:.1f} s")
    for name, rec in summary.cohort.items():
        if rec.get("status") in ("failed", "upstream_failed"):
            console.print(f"[red]{name} {rec['status']}[/red]: {rec['message']}", highlight=False)
    for line in group_warnings(summary.warnings):
        console.print(f"[yellow]warning[/yellow]: {line}", highlight=False)
    if summary.failed:
        t = Table("patient", "stage", "reason", title="failed patients")
        for rec in summary.failed:
            t.add_row(rec["patient_id"], rec["stage"], rec["message"])
        console.print(t)
    if not summary.ok:
        n = len(summary.failed)
        raise SscflowError(
            f"{n} patient{'s' if n != 1 else ''} failed (see above); fix the input and rerun: "
            "finished work is kept" if n else "a cohort stage failed (see above)"
        )


StatusFormat = Annotated[
    str,
    typer.Option("--format", "-f", help="table (for people), csv (one row per patient and "
                 "stage) or json (for scripts and dashboards; README, 'sscflow status --format "
                 "json')."),
]
STATUS_JSON_VERSION = 1  # bump when the JSON of 'sscflow status --format json' changes


def count_patients(units, more: int = 0) -> str:
    """How many patients ``units`` (pair unit ids: ``P1``, ``P1/pairs/1-2``) are, with ``more``
    patients besides; their pairs too when a patient has more than one.

    >>> count_patients(["A", "B"]), count_patients(["A", "A/pairs/1-2", "A/pairs/0-2"], more=1)
    ('2 patients', '2 patients (3 pairs)')
    """
    from sscflow.cohort import parse_unit

    units = list(units)
    n = len({parse_unit(u)[0] for u in units}) + more
    text = f"{n} patient{'s' if n != 1 else ''}"
    return text + (f" ({len(units)} pairs)" if len(units) + more != n else "")


def group_warnings(lines: list[str]) -> list[str]:
    """One line per kind of warning, with the patients it concerns, sorted, instead of one
    line per patient: ``slices thicker than 2.5 mm; registered, but detail along z is lost:
    3 patients — SYN001, SYN002, SYN003``. The kind is a warning's text without its
    ``patient ID:`` and its parenthesised figures (each patient's own). A patient with three
    scans or more warns once per pair (``P1``, ``P1/pairs/1-2``): counted once, its pairs too.

    >>> group_warnings(["patient B: thick (4 mm)", "patient A: thick (5 mm)", "odd"])
    ['thick: 2 patients — A, B', 'odd']
    >>> group_warnings(["patient A: thick", "patient A/pairs/1-2: thick", "patient B: thick"])
    ['thick: 2 patients (3 pairs) — A, A/pairs/1-2, B']
    """
    import re

    kinds: dict[str, list[str]] = {}
    for line in lines:
        m = re.match(r"patient (\S+): (.*)$", line, re.S)
        pid, text = (m.group(1), m.group(2)) if m else (None, line)
        kind = re.sub(r"\s*\([^()]*\)", "", text).strip()
        kinds.setdefault(kind, [])
        if pid is not None:
            kinds[kind].append(pid)
    grouped = []
    for kind, pids in kinds.items():
        ids = sorted(set(pids))
        if ids:
            grouped.append(f"{kind}: {count_patients(ids)} — {', '.join(ids)}")
        else:
            grouped.append(kind)
    return grouped


@_command()
def status(
    store: Annotated[str, typer.Argument(help="The cohort store (a .zarr folder).")],
    all_: Annotated[
        bool, typer.Option("--all", help="List every patient, not only unfinished ones.")
    ] = False,
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="The cohort's current manifest (default: the one the "
                     "store's last run recorded)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="A run config: its manifest is the current one."),
    ] = None,
    fmt: StatusFormat = "table",
):
    """Print per-patient, per-stage state: done, failed (with the reason, once, at the stage
    where it happened), upstream_failed (a later stage of a patient that failed) or pending.

    Patients of the store that are not in the manifest (removed from it: their outputs are
    kept, but the cohort outputs leave them out) are listed as "not in the manifest". The
    manifest is --manifest, else the one of --config, else the one the last run recorded.
    Also shows how the template was made and who holds the store's lease. Reads only.
    Into a pipe or a file the table is never cut; --format csv or json print every patient.

    Example: sscflow status demo/cohort.zarr --manifest demo/synthetic/manifest.csv
    """
    from sscflow.flow.lease import read_holder
    from sscflow.flow.pipeline import store_status
    from sscflow.flow.status import manifest_patients
    from sscflow.methods.template import describe_provenance, template_provenance
    from sscflow.stages import PATIENT, STAGES

    if fmt not in ("table", "csv", "json"):
        raise SscflowError(f"--format must be table, csv or json, got {fmt!r}")
    state = store_status(store)
    cohort = state.pop(None)
    stages = [s.name for s in STAGES if s.scope == PATIENT]
    if manifest is None and config is not None:
        manifest = _config(config).manifest
    if manifest is not None:
        from sscflow.cohort import read_manifest

        members = [p.patient_id for p in read_manifest(manifest, scans=False).patients]
    else:
        members = manifest_patients(store)
    removed = [] if members is None else sorted(set(state) - set(members))
    for pid in members or ():
        if pid not in state:  # in the manifest, never run
            state[pid] = {name: {"status": "pending", "message": ""} for name in stages}
    counts = {name: {} for name in stages}
    for pid, row in state.items():
        if pid in removed:
            continue
        for name in stages:
            k = row[name]["status"]
            counts[name][k] = counts[name].get(k, 0) + 1
    holder = read_holder(store)
    template = describe_provenance(template_provenance(store))
    if fmt == "json":
        _status_json(store, state, cohort, removed, counts, template, holder)
        return
    if fmt == "csv":
        _status_csv(state, cohort, removed)
        return
    show = out if out.is_terminal else Console(soft_wrap=True, width=100_000)  # never cut
    title = f"{store}: {count_patients(u for u in state if u not in removed)}"
    if removed:
        title += f" (and {count_patients(removed)} not in the manifest)"
    table = Table("stage", "done", "failed", "upstream failed", "pending", title=title)
    for name in stages:
        c = counts[name]
        table.add_row(name, *[str(c.get(k, 0)) for k in ("done", "failed", "upstream_failed",
                                                      "pending")])  # fmt: skip
    for s, rec in cohort.items():
        states = ("done", "failed", "upstream_failed", "pending")
        table.add_row(s + " (cohort)", *["1" if rec["status"] == k else "0" for k in states])
    show.print(table)
    show.print(f"template: {template}")
    show.print(f"lease: held by {holder.describe()}" if holder else "lease: free (no run)")
    if removed:
        show.print(f"not in the manifest ({len(removed)}; outputs kept, left out of the cohort "
                   f"outputs): {', '.join(removed)}")  # fmt: skip
    rows = [(pid, row) for pid, row in sorted(state.items())
            if all_ or pid in removed or any(r["status"] != "done" for r in row.values())]
    if rows:
        t = Table("patient", *stages, "reason")
        for pid, row in rows:
            reason = "; ".join(f"{s}: {r['message']}" for s, r in row.items()
                               if r["status"] == "failed" and r["message"])  # fmt: skip
            if pid in removed:
                t.add_row(pid, *["not in the manifest"] * len(stages), reason)
            else:
                t.add_row(pid, *[row[name]["status"] for name in stages], reason)
        show.print(t)


def _status_json(store, state, cohort, removed, counts, template, holder):
    """The JSON contract of ``sscflow status --format json`` (README, "Status for scripts")."""
    import json

    doc = {
        "version": STATUS_JSON_VERSION,
        "store": str(store),
        "patients": {pid: {s: {"status": r["status"], "message": r["message"]}
                           for s, r in row.items()}
                     for pid, row in sorted(state.items()) if pid not in removed},
        "not_in_manifest": list(removed),
        "counts": counts,
        "cohort": {s: {"status": r["status"], "message": r.get("message", "")}
                   for s, r in cohort.items()},
        "template": template,
        "lease": None if holder is None else {
            "host": holder.host, "pid": holder.pid, "command": holder.command,
            "started": holder.started, "heartbeat": holder.heartbeat},
    }  # fmt: skip
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")


def _status_csv(state, cohort, removed):
    """One row per patient and stage (cohort stages with an empty patient_id)."""
    import csv

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["patient_id", "stage", "status", "message"])
    for pid, row in sorted(state.items()):
        for s, r in row.items():
            w.writerow([pid, s, "not_in_manifest" if pid in removed else r["status"],
                        r["message"]])  # fmt: skip
    for s, r in cohort.items():
        w.writerow(["", s, r["status"], r.get("message", "")])


@_command()
def report(
    store: Annotated[str, typer.Argument(help="The cohort store (a .zarr folder).")],
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Results folder (default: results/ beside the store)."),
    ] = None,
):
    """Write the cohort report, RESULTS/report/index.html: self-contained, readable offline.

    Tables 1 and 2, correlations with PFT change, classifier metrics beside the ILD-extent
    baseline, group-mean maps, box plots, ROC curves and failed patients. `sscflow run` writes
    it as its last stage; this command rewrites it from what is there.

    Example: sscflow report demo/cohort.zarr
    """
    from sscflow.flow.pipeline import default_results, store_status
    from sscflow.views.report import write_report

    try:
        path = write_report(store, results or default_results(store), store_status(store))
    except SscflowError:
        raise
    except Exception as exc:  # the page now says it failed; say why in one line
        if _state["debug"]:
            raise
        raise SscflowError(f"the report could not be written ({type(exc).__name__}: {exc}); "
                           "the page says so; rerun with --debug for the traceback") from None
    out.print(f"report: {path}")


@_command()
def export(
    store: Annotated[str, typer.Argument(help="The cohort store (a .zarr folder).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (created).")],
    patients: Annotated[
        list[str] | None,
        typer.Option("--patients", "-p", help="Patient ids to export (repeat, or give one "
                     "option per id); every patient when omitted."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="nifti (.nii.gz), nrrd, mha, or dicom (the "
                          "baseline CT series, the lung mask as SEG, the log-Jacobian map as a "
                          "Parametric Map; needs the dicom extra).")
    ] = "nifti",
    nan_value: Annotated[
        float | None, typer.Option("--nan-value", help="Write this number instead of NaN (not "
                                   "measured) into the log-Jacobian maps, for viewers that cannot "
                                   "show NaN; each map's _measured mask says where it is.")
    ] = None,
):
    """Export images for ITK-SNAP, 3D Slicer, ANTs and napari: per patient the baseline,
    follow-up, follow-up warped onto the baseline, lung masks, log-Jacobian maps (native and
    template space) and the displacement field as an ITK vector warp; the template and the
    group means; each file with its real geometry. --format dicom writes per patient a
    pseudonymised CT series of the baseline, the lung mask as DICOM SEG and the log-Jacobian
    map as a DICOM Parametric Map, for OHIF, 3D Slicer and Orthanc.

    Beside each log-Jacobian map, <map>_measured (1 where measured): ITK's NIfTI reader
    (ITK-SNAP, 3D Slicer) reads NaN as 0; --format nrrd or mha keep NaN, --nan-value picks a fill.

    Example: sscflow export demo/cohort.zarr --out exported/ --patients SYN001 --format nifti
    """
    from sscflow.views.export import export_store

    with _progress() as bar:
        task = bar.add_task("export", total=len(patients) if patients else None, last="")

        def progress(pid, done, total):
            bar.update(task, completed=done, total=total, last=pid)

        result = export_store(store, out_dir, patients=patients, fmt=fmt, progress=progress,
                              nan_value=nan_value)
    n = sum(len(v) for v in result["patients"].values()) + len(result["template"])
    out.print(f"exported {n} files for {len(result['patients'])} patients (and the template) "
              f"to {out_dir}")


@_command()
def predict(
    store: Annotated[str, typer.Argument(help="A store whose patients reached template space.")],
    model: Annotated[Path, typer.Option("--model", help="A trained model folder "
                                        "(results/classifier/<target>).")],  # fmt: skip
    output: Annotated[Path, typer.Option("--out", "-o", help="CSV to write.")] = Path(
        "predictions.csv"
    ),
):
    """Apply a trained classifier to every patient of a store that has a template-space map.

    Example: sscflow predict new.zarr --model demo/results/classifier/functional --out p.csv
    """
    from sscflow.core import store as st
    from sscflow.methods.classify.prediction import predict as predict_patients

    MAP = "log_jacobian_template"

    root = st.open_store(store, mode="r")
    ids = [p for p in st.patient_ids(root)
           if st.output_state(root[f"{st.PATIENTS}/{p}"], MAP) == "complete"]  # fmt: skip
    if not ids:
        raise SscflowError(f"{store}: no patient has a {MAP} map; run 'sscflow run' first")
    try:
        table = predict_patients(store, ids, model)
    except (ValueError, FileNotFoundError) as exc:  # a wrong template or model folder
        raise SscflowError(str(exc)) from None
    sets = _model_sets(model)
    table["model_set"] = [sets.get(p, "new") for p in table["patient_id"]]
    table["in_training_set"] = table["model_set"] == "train"
    table.to_csv(output, index=False)
    n = table["model_set"].value_counts().to_dict()
    out.print(f"{len(table)} patients predicted; {int(table['prediction'].sum())} predicted "
              f"worsening; written to {output}")  # fmt: skip
    out.print(f"of them, {n.get('train', 0)} were in the model's training set, "
              f"{n.get('validation', 0)} in its validation set, {n.get('test', 0)} in its test "
              f"set and {n.get('new', 0)} are new to it (column model_set)")  # fmt: skip
    trained = table.loc[table["in_training_set"], "patient_id"].tolist()
    if trained:
        out.print("in the training set: " + ", ".join(trained))


def _model_sets(model: Path) -> dict[str, str]:
    """{patient id: "train" | "validation" | "test"} from a model folder's split.json."""
    import json

    path = Path(model) / "split.json"
    if not path.is_file():
        return {}
    split = json.loads(path.read_text(encoding="utf-8"))
    return {str(p): name for name in ("train", "validation", "test")
            for p in split.get(name, [])}  # fmt: skip


@_command()
def demo(
    patients: Annotated[
        int | None, typer.Option("--patients", "-n", min=1, help="Synthetic patients.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo"),
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every output.")] = False,
):
    """Make a synthetic cohort and run the whole method on it with the demo settings.

    Writes OUT/synthetic (images, manifest, truth), OUT/cohort.zarr (every stage's output,
    group_means included) and OUT/results (patients.csv, figures/), and checks the lung masks and
    the registration against the synthetic truth. Rerunning resumes.

    Example: sscflow demo --patients 12 --out demo/
    """
    from sscflow.cohort import read_manifest

    t0 = time.perf_counter()
    cfg = _config(config, None, workers) if config else _demo_config(workers)
    s = cfg.synth
    n = patients or s.patients
    cfg.store = str(out_dir / "cohort.zarr")
    cfg.results = out_dir / "results"
    synthetic = out_dir / "synthetic"
    try:
        with _interruptible(), _lease(cfg.store, False, "sscflow demo") as lease, \
                _client(cfg) as client:  # one cluster
            if not force and _synthetic_is_current(synthetic, n, s):
                cfg.manifest = synthetic / "manifest.csv"
                out.print(f"synthetic cohort {synthetic}: unchanged, not made again")
            else:
                cfg.manifest = _synth(n, synthetic, s.spacing_mm, s.seed, s.noise_hu, s.ribs,
                                      cfg, client, acquisitions=s.acquisitions)  # fmt: skip
            manifest = read_manifest(cfg.manifest, pairs=cfg.pairs)
            summary = _run(cfg, manifest, force=force, truth_dir=synthetic, client=client,
                           lease=lease)  # fmt: skip
    except Interrupted as exc:
        _say_interrupted(cfg.store, exc)
    try:
        _run_report(summary)
    finally:
        _demo_report(synthetic, cfg.store, [p.patient_id for p in manifest.patients])
        minutes, seconds = divmod(round(time.perf_counter() - t0), 60)
        out.print(f"demo: {n} patients in {minutes}:{seconds:02d} (min:s)")


def _synthetic_is_current(folder: Path, n: int, s) -> bool:
    """Whether ``folder`` holds a synthetic cohort made with these settings by this generator
    (its truth/cohort.json says so and its manifest exists): a demo rerun then makes none."""
    import json

    from sscflow.synth.cohort import GENERATOR_VERSION

    try:
        made = json.loads((folder / "truth" / "cohort.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = {"generator_version": GENERATOR_VERSION, "n": n, "seed": s.seed,
            "spacing": s.spacing_mm, "ribs": s.ribs, "noise_hu": s.noise_hu,
            "acquisitions": s.acquisitions}  # fmt: skip
    return ((folder / "manifest.csv").is_file() and made.get("timepoints", 2) == 2
            and all(made.get(k) == v for k, v in want.items()))  # fmt: skip


def _demo_config(workers):
    default = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    from sscflow.config import Config, load_config

    cfg = load_config(default) if default.is_file() else Config()
    if workers:
        cfg.cluster.n_workers = workers
    return cfg


def _demo_report(synthetic: Path, store: str, patient_ids):
    import pandas as pd

    from sscflow.methods.quality import lung_mask_dice

    scores = lung_mask_dice(store, synthetic, patient_ids)
    if scores:
        vals = sorted(scores.values())
        out.print(
            f"lung masks vs synthetic truth: Dice median {vals[len(vals) // 2]:.3f}, "
            f"min {vals[0]:.3f} over {len(vals)} patients"
        )
    table = Path(store).parent / "results" / "patients.csv"
    if table.is_file():
        t = pd.read_csv(table)
        if "reg_truth_mean_error_mm" in t and t["reg_truth_mean_error_mm"].notna().any():
            e = t["reg_truth_mean_error_mm"].dropna()
            out.print(
                "registration vs synthetic truth: mean displacement error median "
                f"{e.median():.2f} mm, max {e.max():.2f} mm over {len(e)} patients"
            )
    out.print(f"results: {store} (open with zarr.open_group or xarray); inputs: {synthetic}")


@_command()
def validate(
    path: Annotated[Path, typer.Argument(help="A config (.yaml) or a manifest (.csv).")],
    key: KeyOpt = None,
    full: Annotated[
        bool, typer.Option("--full", help="Print the whole effective config, defaults included.")
    ] = False,
):
    """Check a config or a manifest and print what was understood; exit 1 listing every problem.

    For a config, prints the settings that differ from the defaults (--full: every setting);
    its problems come all at once, each with its line and column; then the manifest it
    names is checked exactly as 'sscflow run' will (every row, every scan path), and each
    problem is listed once, with its line and column.

    Example: sscflow validate configs/cohort.yaml
    """
    from sscflow.cohort import read_manifest
    from sscflow.config import Config

    cfg = Config()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        from sscflow.config import load_config

        cfg = load_config(path)
        settings = cfg.to_dict() if full else cfg.changed()
        what = "" if full else (" (settings that differ from the defaults; --full for all)"
                                if settings else "; every setting is the default")
        out.print(f"config {path} is valid{what}" + (":" if settings else ""), highlight=False)
        if settings:
            out.print(yaml.safe_dump(settings, sort_keys=False).rstrip(), highlight=False)
        if cfg.manifest is None:
            out.print("(the config names no manifest; 'sscflow run' needs one)")
            return
        path = cfg.manifest
        if not path.is_file():
            raise SscflowError(f"config {cfg.source}: the manifest it names, {path}, does not "
                               "exist; 'sscflow run' would stop (fix 'manifest')")  # fmt: skip
    cfg.manifest = path
    private = _private_side(key, cfg)
    lenient = read_manifest(path, check_files=True, lenient=True, key=private,
                            pairs=cfg.pairs)
    if lenient.rejected:  # every problem once, with its line and column (the error's list)
        try:
            read_manifest(path, check_files=True, key=private, pairs=cfg.pairs)
        except SscflowError as exc:
            bad, total = len(lenient.rejected), len(lenient) + len(lenient.rejected)
            rest = "'sscflow run' runs the others" if bad < total else "none would run"
            raise SscflowError(f"{exc}\n{bad} of {total} patients would fail at ingest; "
                               f"{rest}") from None  # fmt: skip
    manifest = read_manifest(path, check_files=True, key=private, pairs=cfg.pairs)
    table = manifest.table()
    out.print(f"manifest {path} is valid: {len(manifest)} patients, every scan path exists")
    for col in ("visual", "functional"):
        if col in table:
            counts = table[col].fillna("no label").value_counts().to_dict()
            out.print(f"  {col}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for line in group_warnings(_edge_warnings(manifest)):
        console.print(f"[yellow]warning[/yellow]: {line}", highlight=False)


def _edge_warnings(manifest) -> list[str]:
    """A line per scan whose first or last slice shows lung (its two end slices read)."""
    from sscflow.methods.edges import edge_warning, lungs_at_edges

    lines = []
    for patient in manifest.patients:
        for which, label in (("baseline", "baseline"), ("followup", "follow-up")):
            path, uid = patient.scan(which)
            try:
                parts = lungs_at_edges(path, uid)
            except (RuntimeError, OSError, ValueError):
                continue  # ingest reads the scan whole and says what is wrong with it
            if parts:
                lines.append(f"patient {patient.patient_id}: {edge_warning(label, parts)}")
    return lines


def _private_side(key, cfg):
    """The key file (--key, else discover.key) opened for a discovered cohort's private side."""
    from sscflow.discover.pseudonym import open_private_side

    return open_private_side(key or cfg.discover.key, manifest=cfg.manifest, store=cfg.store)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sscflow`` command."""
    try:
        app(args=argv, prog_name="sscflow")
    except SscflowError as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume (finished work is kept)")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
