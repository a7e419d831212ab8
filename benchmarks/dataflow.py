"""The cost of the dataflow: ``sscflow run`` against a plain sequential loop of the same stages.

Makes a small synthetic cohort (not timed), then in this one process:
  baseline: a Python loop calling the same stage functions one patient after another
            (ingest_patient, extent_patient, register_patient, log_jacobian_patient,
            build_template, to_template_patient, then the cohort table, group means, figure,
            classifier and report), into its own store;
  sscflow:  ``sscflow.flow.pipeline.run`` on a one-worker, one-thread in-process LocalCluster (the
            same compute resources), into another store: futures, retries, run records, metrics
            events, progress callbacks, cohort table and figure included.
Both use the same threads for the array work. Also prints the scheduler overhead per task (many
no-op tasks through the same cluster) and the dry-run plan of a 10,000-patient manifest (time and
peak memory, in a subprocess). The time ratio sscflow / loop is printed last.

    python benchmarks/dataflow.py [--patients 4] [--spacing 4.0]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ONE_THREAD = {"torch": {"threads": 1}, "sitk": {"threads": 1}}  # the registration sections


def small_cohort(tmp: Path, patients: int, spacing: float, **settings):
    """A synthetic cohort in ``tmp/synthetic`` (seed 0, not timed) and a config maker:
    ``(manifest, config)`` where ``config(name)`` gives a Config whose store is ``tmp/name``,
    ingest at ``spacing`` and ``settings`` as further config sections."""
    from sscflow.cohort import read_manifest
    from sscflow.config import config_from_dict
    from sscflow.synth import synthesize_cohort

    manifest_path = synthesize_cohort(patients, tmp / "synthetic", spacing=spacing, seed=0)

    def config(name):
        return config_from_dict({"manifest": str(manifest_path), "store": str(tmp / name),
                                 "results": str(tmp / f"{name}-results"),
                                 "ingest": {"spacing_mm": spacing},
                                 "segment": {"min_lung_ml": 5.0}, **settings})  # fmt: skip

    return read_manifest(manifest_path), config


def sequential_loop(cfg, manifest) -> None:
    """The bare loop users would write around the same stage functions."""
    from sscflow.flow.pipeline import store_status
    from sscflow.methods.analysis import classify_cohort
    from sscflow.methods.extent import extent_patient
    from sscflow.methods.groups import cohort_table, group_means, write_cohort_table
    from sscflow.methods.ingest import ingest_patient
    from sscflow.methods.jacobian.stage import log_jacobian_patient
    from sscflow.methods.registration.stage import register_patient
    from sscflow.methods.template import build_template, to_template_patient
    from sscflow.views.figures import plot_group_means
    from sscflow.views.report import write_report

    store = str(cfg.store)
    ids = [p.patient_id for p in manifest.patients]
    for p in manifest.patients:
        ingest_patient(p, store, cfg.ingest, cfg.segment)
        extent_patient(store, p.patient_id, scheduler="synchronous")
        register_patient(store, p.patient_id, cfg.registration)
        log_jacobian_patient(store, p.patient_id, cfg.jacobian, scheduler="synchronous")
    build_template(store, ids, cfg.template)
    for pid in ids:
        to_template_patient(store, pid, cfg.template)
    table = cohort_table(store, ids)
    write_cohort_table(table, cfg.results)
    group_means(store, table)
    plot_group_means(store, Path(cfg.results) / "figures" / "group_means_sagittal.png")
    classify_cohort(store, cfg.results, cfg.classifier)
    write_report(store, cfg.results, store_status(store))


PLAN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    from sscflow.cohort import read_manifest
    from sscflow.config import load_config
    from sscflow.flow.pipeline import plan_run
    cfg = load_config(sys.argv[1])
    plan = plan_run(read_manifest(cfg.manifest, check_files=True), cfg)
    dt = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork + exec
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    rss = int(hwm.split()[1]) / 1024
    print(f"{len(plan.tasks)} {dt:.3f} {rss:.0f}")
    """
)


def dry_run_10k(folder: Path) -> tuple[int, float, float]:
    """Validate a 10,000-patient manifest and plan it, in a fresh process (imports included)."""
    scan = folder / "scan.nii.gz"
    scan.write_bytes(b"placeholder")
    manifest = folder / "manifest10k.csv"
    with open(manifest, "w", encoding="utf-8") as fh:
        fh.write("patient_id,baseline,followup,fvc_baseline,fvc_followup,visual\n")
        for i in range(10_000):
            fh.write(f"P{i:05d},scan.nii.gz,scan.nii.gz,80,{70 + i % 15},stable\n")
    cfg = folder / "plan10k.yaml"
    cfg.write_text(f"manifest: {manifest}\nstore: {folder / 'never.zarr'}\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, str(cfg)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    n, dt, rss = out.stdout.split()
    return int(n), float(dt), float(rss)


def warm_up() -> None:
    """Pay one-time costs (numba compilation, torch and plotting imports) before timing."""
    import numpy as np

    import sscflow.methods.groups  # noqa: F401
    import sscflow.views.figures  # noqa: F401
    from sscflow.methods.jacobian import log_jacobian
    from sscflow.methods.registration import register

    log_jacobian(np.zeros((3, 8, 8, 8), np.float32), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    a = rng.normal(-700, 100, (24, 24, 24)).astype(np.float32)
    register(a, a, (4.0, 4.0, 4.0), backend="torch", levels_mm=(4.0,), iterations=(2,),
             affine_iterations=(2,), threads=1)  # fmt: skip


def scheduler_overhead(client, n: int = 2000) -> float:
    """Seconds per no-op task submitted and gathered through ``client``."""
    from distributed import wait

    def noop(i):
        return i

    client.gather(client.map(noop, range(50), pure=False))  # warm up
    t0 = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    wait(futures)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=4.0, help="synthetic and ingest spacing, mm")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from sscflow.flow.pipeline import run

    with tempfile.TemporaryDirectory(prefix="sscflow-bench-") as tmp:
        tmp = Path(tmp)
        manifest, config = small_cohort(tmp, args.patients, args.spacing,
                                        registration=ONE_THREAD,
                                        template={"registration": ONE_THREAD})  # fmt: skip

        cfg_loop, cfg_run = config("loop.zarr"), config("run.zarr")
        warm_up()
        t0 = time.perf_counter()
        sequential_loop(cfg_loop, manifest)
        t_loop = time.perf_counter() - t0

        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                               dashboard_address="127.0.0.1:0")  # fmt: skip
        with cluster, Client(cluster) as client:
            t0 = time.perf_counter()
            summary = run(cfg_run, manifest, client=client)
            t_run = time.perf_counter() - t0
            per_task = scheduler_overhead(client)
        n_tasks = sum(sum(c.values()) for c in summary.counts.values())
        tasks, t_plan, rss_plan = dry_run_10k(tmp)

    print(f"cohort: {args.patients} synthetic patients at {args.spacing} mm, 1 worker thread")
    print(f"plain sequential loop of the stage functions: {t_loop:.2f} s")
    print(f"sscflow run (LocalCluster, 1 worker, {n_tasks} tasks + cohort stage): {t_run:.2f} s "
          f"(ok={summary.ok})")  # fmt: skip
    print(f"scheduler overhead per task (2000 no-op tasks): {per_task * 1e3:.2f} ms")
    print(f"dry run of a 10,000-patient manifest: {tasks} tasks planned in {t_plan:.2f} s "
          f"(imports and manifest validation included), peak RSS {rss_plan:.0f} MB")  # fmt: skip
    print(f"peak RSS of this benchmark process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")  # fmt: skip
    print(f"time ratio sscflow run / sequential loop: {t_run / t_loop:.3f}")


if __name__ == "__main__":
    main()
