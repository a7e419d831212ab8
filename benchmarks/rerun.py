"""What a no-op rerun costs: ``sscflow.flow.pipeline.run`` of a synthetic cohort, then the same run
again with nothing changed, and what the skip decision costs per patient.

Makes a synthetic cohort of ``--patients`` patients at ``--spacing`` mm (not timed), runs it once
on a one-worker, one-thread in-process LocalCluster (the first run, timed), then again (the
no-op rerun: every stage skips). The skip decision per patient is timed apart, in this process,
through the function a worker runs (``sscflow.flow.pipeline.execute``) for each patient stage. Also
plans a 10,000-patient manifest in a fresh process (time, peak RSS). The ratio rerun / first run
is printed last (target <= 0.05 at 40 patients at 2.5 mm).

    python benchmarks/rerun.py [--patients 40] [--spacing 2.5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from dataflow import ONE_THREAD, dry_run_10k, small_cohort, warm_up


def skip_decision_per_patient(cfg, manifest) -> float:
    """Seconds per patient for every patient stage to decide it has nothing to do."""
    from sscflow.flow.pipeline import execute
    from sscflow.stages import PATIENT, STAGES, Context

    ctx = Context(str(cfg.store), str(cfg.results), cfg)
    t0 = time.perf_counter()
    for p in manifest.patients:
        ups: dict[str, dict] = {}
        for stage in STAGES:
            if stage.scope != PATIENT:
                continue
            rec = execute(stage.name, ctx, p, None, [ups[a] for a in stage.after if a in ups])
            assert rec["status"] == "skipped", rec
            ups[stage.name] = rec
    return (time.perf_counter() - t0) / len(manifest.patients)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--spacing", type=float, default=2.5, help="synthetic and ingest spacing, mm")
    ap.add_argument("--keep", type=Path, default=None, help="copy the store and results here")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from sscflow.flow.pipeline import run

    with tempfile.TemporaryDirectory(prefix="sscflow-rerun-") as tmp:
        tmp = Path(tmp)
        manifest, config = small_cohort(tmp, args.patients, args.spacing,
                                        registration=ONE_THREAD,
                                        template={"registration": ONE_THREAD})  # fmt: skip
        cfg = config("run.zarr")
        warm_up()
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                               dashboard_address="127.0.0.1:0")  # fmt: skip
        with cluster, Client(cluster) as client:
            t0 = time.perf_counter()
            first = run(cfg, manifest, client=client)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = run(cfg, manifest, client=client)
            t_again = time.perf_counter() - t0
        per_patient = skip_decision_per_patient(cfg, manifest)
        not_skipped = {s: c for s, c in again.counts.items() if set(c) != {"skipped"}}
        tasks, t_plan, rss_plan = dry_run_10k(tmp)
        if args.keep is not None:
            shutil.copytree(tmp / "run.zarr", args.keep / "run.zarr", dirs_exist_ok=True)
            shutil.copytree(tmp / "run.zarr-results", args.keep / "results", dirs_exist_ok=True)

    print(f"cohort: {args.patients} synthetic patients at {args.spacing} mm, 1 worker thread")
    print(f"first run: {t_first:.2f} s (ok={first.ok})")
    print(f"no-op rerun: {t_again:.2f} s (ok={again.ok}; stages not all skipped: "
          f"{not_skipped or 'none'})")  # fmt: skip
    print(f"skip decision per patient (every patient stage, in-process): "
          f"{per_patient * 1e3:.1f} ms")  # fmt: skip
    print(f"plan of a 10,000-patient manifest: {tasks} tasks in {t_plan:.2f} s (imports and "
          f"manifest validation included), peak RSS {rss_plan:.0f} MB")  # fmt: skip
    print(f"time ratio no-op rerun / first run: {t_again / t_first:.3f}")


if __name__ == "__main__":
    main()
