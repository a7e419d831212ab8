"""The ``sscflow`` command: a thin layer over the library, one command per stage.

Expected failures print one line (``error: ...``) and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
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
)
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


@app.command()
def synth(
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, help="Number of patients.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")],
    spacing: Annotated[
        float, typer.Option("--spacing", min=0.5, max=6.0, help="Voxel size in mm (isotropic).")
    ] = 2.5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same files.")] = 0,
    noise: Annotated[float, typer.Option("--noise", min=0.0, help="Scanner noise std, HU.")] = 20.0,
    ribs: Annotated[bool, typer.Option("--ribs/--no-ribs", help="Draw ribs and spine.")] = True,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
):
    """Make a synthetic longitudinal chest CT cohort whose truth is known.

    Writes images (NIfTI, MHA and DICOM series, mixed across patients), manifest.csv, and truth/
    (true displacement fields, true log-Jacobian maps, lung masks, planted labels).

    Example: sscflow synth --patients 24 --out cohort/ --spacing 2.5 --seed 0
    """
    manifest = _synth(
        patients, out_dir, spacing, seed, noise, ribs, _config(None, scheduler, workers)
    )
    out.print(f"wrote {patients} patients; manifest: {manifest}")


@contextmanager
def _client(cfg, client=None):
    """The given client, or a new one from the config that closes on exit."""
    if client is not None:
        yield client
        return
    from sscflow.cluster import dask_client

    with dask_client(cfg.cluster) as new:
        console.print(f"dashboard: {new.dashboard_link}")
        yield new


def _synth(patients, out_dir, spacing, seed, noise, ribs, cfg, client=None):
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
        )


@app.command()
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
):
    """Ingest every manifest patient into a Zarr store: canonical 1 mm grid, int16 HU, lung masks.

    Unchanged inputs are skipped; a bad patient fails alone and the command exits 1 with a summary.

    Example: sscflow ingest cohort/manifest.csv --store cohort.zarr --spacing 1.0
    """
    cfg = _config(config, scheduler, workers)
    if spacing is not None:
        cfg.ingest.spacing_mm = spacing
        cfg.ingest.validate("ingest")
    results = _ingest(manifest, store, cfg)
    _ingest_summary(results, store)


def _ingest(manifest_path, store, cfg, client=None):
    from sscflow.cohort import read_manifest
    from sscflow.ingest import ingest_cohort

    manifest = read_manifest(manifest_path)
    with _client(cfg, client) as client, _progress() as bar:
        task = bar.add_task("ingest", total=len(manifest), last="")

        def progress(result, done, total):
            bar.update(task, completed=done, last=f"{result.patient_id} {result.status}")
            if result.status == "failed":
                bar.console.print(f"[red]failed[/red] {result.message}")

        return ingest_cohort(
            manifest, str(store), cfg.ingest, cfg.segment, client=client, progress=progress
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


@app.command()
def demo(
    patients: Annotated[
        int, typer.Option("--patients", "-n", min=1, help="Synthetic patients.")
    ] = 24,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo"),
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
):
    """Make a synthetic cohort and run it through sscflow with the demo settings.

    Writes OUT/synthetic (images, manifest, truth) and OUT/cohort.zarr, then checks the lung masks
    against the synthetic truth.

    Example: sscflow demo --patients 24 --out demo/
    """
    cfg = _config(config, None, workers) if config else _demo_config(workers)
    s = cfg.synth
    store = str(out_dir / "cohort.zarr")
    with _client(cfg) as client:  # one cluster for every stage
        manifest = _synth(
            patients, out_dir / "synthetic", s.spacing_mm, s.seed, s.noise_hu, s.ribs, cfg, client
        )
        results = _ingest(manifest, store, cfg, client)
    try:
        _ingest_summary(results, store)
    finally:
        _demo_report(out_dir / "synthetic", store, results)


def _demo_config(workers):
    default = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    from sscflow.config import Config, load_config

    cfg = load_config(default) if default.is_file() else Config()
    if workers:
        cfg.cluster.n_workers = workers
    return cfg


def _demo_report(synthetic: Path, store: str, results):
    from sscflow.quality import lung_mask_dice

    scores = lung_mask_dice(
        store, synthetic, [r.patient_id for r in results if r.status != "failed"]
    )
    if scores:
        vals = sorted(scores.values())
        out.print(
            f"lung masks vs synthetic truth: Dice median {vals[len(vals) // 2]:.3f}, "
            f"min {vals[0]:.3f} over {len(vals)} patients"
        )
    out.print(f"results: {store} (open with zarr.open_group or xarray); inputs: {synthetic}")


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A config (.yaml) or a manifest (.csv).")],
):
    """Check a config or a manifest and print what was understood; exit 1 listing every problem.

    Example: sscflow validate configs/cohort.yaml
    """
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        from sscflow.config import load_config

        cfg = load_config(path)
        out.print(f"config {path} is valid:")
        out.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return
    from sscflow.cohort import read_manifest

    manifest = read_manifest(path, check_files=True)
    table = manifest.table()
    out.print(f"manifest {path} is valid: {len(manifest)} patients, every scan path exists")
    for col in ("visual", "functional"):
        if col in table:
            counts = table[col].fillna("no label").value_counts().to_dict()
            out.print(f"  {col}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


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
