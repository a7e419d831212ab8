"""Scaling of ``sscflow run``: one worker against two, and a projection to cohort scale.

Makes a small synthetic cohort (not timed), then in this one process:
  1 worker:  ``sscflow.flow.pipeline.run`` on a LocalCluster of one worker process with one thread,
             into a fresh store;
  2 workers: the same on a LocalCluster of two one-thread worker processes, into another fresh
             store (the cluster is started by ``sscflow.flow.cluster.dask_client``, as ``sscflow
             run`` does; its start-up and a warm-up of every worker are not timed).
From the one-worker run's records it takes the median seconds per patient of each patient stage
and the seconds of each cohort stage; splits group means and classifier into a start-up and a
cost per patient (``cohort_slopes``); measures the scheduler overhead per task (2000 no-op
tasks, ``benchmarks/dataflow.py``'s ``scheduler_overhead``); and prints a projection of the wall
time for 200, 2,000 and 20,000 patients at 1 mm on 8, 32 and 128 CPU workers, and with 1, 4 and
16 GPU workers for the registrations, with its assumptions above the table. The scaling ratio
(time with 1 worker / time with 2 workers; 2.0 is ideal on 2 cores) is printed last.

    python benchmarks/scale.py [--patients 8] [--spacing 4.0] [--gpu-speedup 20]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/dataflow.py

PATIENTS = (200, 2_000, 20_000)
CPU_WORKERS = (8, 32, 128)
GPU_WORKERS = (1, 4, 16)
# No GPU speed-up of the registration stages was measured in this repository (benchmarks/
# registration_gpu.py checks a 10 s target on an H100 but records no CPU/GPU ratio): assumed.
ASSUMED_GPU_SPEEDUP = 20.0


def project(
    patient_s: dict[str, float],
    cohort_fixed_s: dict[str, float],
    cohort_per_patient_s: dict[str, float],
    *,
    patients: int,
    cpu_workers: int,
    gpu_workers: int = 0,
    gpu_stages: tuple[str, ...] = (),
    gpu_speedup: float = 1.0,
    voxel_factor: float = 1.0,
    overhead_per_task_s: float = 0.0,
    tasks_per_patient: int = 0,
    cohort_tasks: int = 0,
) -> dict[str, float]:
    """Projected wall time (seconds) of one run, split into its parts.

    Parameters
    ----------
    patient_s : seconds per patient of each patient stage, at the measured grid
    cohort_fixed_s : seconds per run of each cohort stage that does not grow with patients
    cohort_per_patient_s : seconds per patient of each cohort stage that grows with patients
    patients, cpu_workers, gpu_workers : the cohort and the cluster (one core per CPU worker)
    gpu_stages : the patient stages that run on the GPU workers when there are any
    gpu_speedup : a GPU worker does a ``gpu_stages`` stage this many times faster than a CPU one
    voxel_factor : every stage cost is multiplied by this (voxel count target / measured)
    overhead_per_task_s, tasks_per_patient, cohort_tasks : scheduler cost, paid serially

    Returns
    -------
    dict with ``cpu`` (the patient stages on CPU workers), ``gpu`` (those on GPU workers),
    ``patients`` (the patient stages: CPU and GPU pools overlap, so the larger of the two),
    ``cohort`` (cohort stages, serial), ``overhead`` (scheduler) and ``total``.

    Examples
    --------
    >>> p = project({"a": 1.0, "b": 2.0}, {"t": 5.0}, {"c": 0.5}, patients=10, cpu_workers=4)
    >>> p["patients"], p["cohort"], p["total"]
    (9.0, 10.0, 19.0)
    """
    on_gpu = set(gpu_stages) if gpu_workers else set()
    cpu_each = voxel_factor * sum(s for k, s in patient_s.items() if k not in on_gpu)
    gpu_each = voxel_factor * sum(s for k, s in patient_s.items() if k in on_gpu) / gpu_speedup
    # ideal parallelism across patients, limited by the workers: ceil(patients / workers) rounds
    cpu = math.ceil(patients / cpu_workers) * cpu_each
    gpu = math.ceil(patients / gpu_workers) * gpu_each if on_gpu else 0.0
    cohort = voxel_factor * (
        sum(cohort_fixed_s.values()) + patients * sum(cohort_per_patient_s.values())
    )
    overhead = overhead_per_task_s * (tasks_per_patient * patients + cohort_tasks)
    part = max(cpu, gpu)
    return {"cpu": cpu, "gpu": gpu, "patients": part, "cohort": cohort, "overhead": overhead,
            "total": part + cohort + overhead}  # fmt: skip


def _hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def timed_run(cfg, manifest, n_workers: int):
    """``sscflow.flow.pipeline.run`` on a fresh n-worker LocalCluster.

    Returns (seconds, RunSummary, the task records, scheduler overhead per task in seconds; the
    last measured on the one-worker cluster only, else None).
    """
    import cloudpickle
    import dataflow

    from sscflow.config import ClusterConfig
    from sscflow.flow.cluster import dask_client
    from sscflow.flow.pipeline import run

    cloudpickle.register_pickle_by_value(dataflow)  # workers do not have benchmarks/ on their path
    cluster = ClusterConfig(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0")
    records: list[dict] = []
    with dask_client(cluster) as client:
        client.wait_for_workers(n_workers)
        client.run(dataflow.warm_up)  # imports, numba and torch start-up, on every worker
        t0 = time.perf_counter()
        summary = run(cfg, manifest, client=client, on_record=records.append)
        seconds = time.perf_counter() - t0
        per_task = dataflow.scheduler_overhead(client) if n_workers == 1 else None
    return seconds, summary, records, per_task


def cohort_slopes(cfg, ids: list[str]) -> dict[str, float]:
    """Seconds per patient of the cohort stages that grow with the cohort, apart from their
    start-up, measured in this process on one thread after the timed runs.

    ``group_means``: the stage re-run on half the patients and on all of them (best of two
    each); the slope between the two. ``classifier``: one training step of the model on the
    template grid (batch of ``batch_size``, best of three after a warm-up), per map, times the
    epochs and the two targets: every patient trained in every epoch (an upper bound; the
    validation and test maps only go forward).
    """
    import dask
    import torch

    from sscflow.core import store as st
    from sscflow.methods.classify import build_model
    from sscflow.methods.groups import cohort_table, group_means

    store, n = str(cfg.store), len(ids)
    table = cohort_table(store, ids)
    half = max(1, n // 2)
    best: dict[int, float] = {}
    with dask.config.set(scheduler="synchronous"):
        for m in (half, n, half, n):
            t0 = time.perf_counter()
            group_means(store, table.iloc[:m])
            best[m] = min(best.get(m, math.inf), time.perf_counter() - t0)
    gm = (best[n] - best[half]) / (n - half) if n > half else best[n] / n

    c = cfg.classifier
    shape = st.open_store(store, mode="r")[f"patients/{ids[0]}/log_jacobian_template/0"].shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a one-thread worker
    try:
        torch.manual_seed(0)
        model = build_model(c, tuple(shape))
        optimiser = torch.optim.Adam(model.parameters(), lr=c.learning_rate)
        x = torch.randn(c.batch_size, 1, *shape)
        y = torch.arange(c.batch_size) % 2
        steps = []
        for _ in range(4):
            t0 = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
            steps.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    per_map = min(steps[1:]) / c.batch_size
    return {"group_means": max(gm, 0.0), "classifier": 2 * c.epochs * per_map}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--spacing", type=float, default=4.0, help="synthetic and ingest spacing, mm")
    ap.add_argument("--target-spacing", type=float, default=1.0, help="projected grid, mm")
    ap.add_argument("--gpu-speedup", type=float, default=None,
                    help="GPU worker vs one CPU core on the registration stages, measured "
                         f"(default {ASSUMED_GPU_SPEEDUP:g}: assumed, not measured)")  # fmt: skip
    args = ap.parse_args()
    assumed = args.gpu_speedup is None
    speedup = ASSUMED_GPU_SPEEDUP if assumed else args.gpu_speedup

    import dataflow

    from sscflow.flow.pipeline import plan_run
    from sscflow.stages import COHORT, PATIENT, STAGES

    PATIENT_STAGES = [s.name for s in STAGES if s.scope == PATIENT]  # noqa: N806
    COHORT_STAGES = [s.name for s in STAGES if s.scope == COHORT]  # noqa: N806

    with tempfile.TemporaryDirectory(prefix="sscflow-bench-scale-") as tmp:
        manifest, config = dataflow.small_cohort(Path(tmp), args.patients, args.spacing)

        cfg1 = config("one.zarr")
        # the cohort table, group means, figure and report run in this (the client) process:
        # pay their imports before the first timed run, not inside it
        dataflow.warm_up()
        t1, s1, records, per_task = timed_run(cfg1, manifest, 1)
        t2, s2, _, _ = timed_run(config("two.zarr"), manifest, 2)
        slopes = cohort_slopes(cfg1, [p.patient_id for p in manifest.patients])

    # what the measured run did, per stage
    done = [r for r in records if r["status"] == "done"]
    patient_s = {s: statistics.median([r["seconds"] for r in done if r["stage"] == s])
                 for s in PATIENT_STAGES if any(r["stage"] == s for r in done)}  # fmt: skip
    cohort_s = {r["stage"]: r["seconds"] for r in done if r["stage"] in COHORT_STAGES}
    # the stages that read or train on every patient's map: a start-up plus a cost per patient
    cohort_fixed = {k: max(0.0, v - args.patients * slopes.get(k, 0.0))
                    for k, v in cohort_s.items()}  # fmt: skip
    cohort_per_patient = slopes
    plan = plan_run(manifest, cfg1, gpu=True)
    tasks_per_patient = sum(t.patient_id is not None for t in plan.tasks) // args.patients
    cohort_tasks = sum(t.patient_id is None for t in plan.tasks) + 1  # + the classifier task
    gpu_stages = tuple(dict.fromkeys(t.stage for t in plan.tasks if t.gpu and t.patient_id))
    factor = (args.spacing / args.target_spacing) ** 3
    common = dict(voxel_factor=factor, overhead_per_task_s=per_task,
                  tasks_per_patient=tasks_per_patient, cohort_tasks=cohort_tasks)  # fmt: skip

    print(f"cohort: {args.patients} synthetic patients at {args.spacing} mm")
    for n, t, s in ((1, t1, s1), (2, t2, s2)):
        print(f"sscflow run on {n} worker(s) x 1 thread: {t:.2f} s (ok={s.ok})")
    print("median seconds per patient (1 worker): "
          + ", ".join(f"{k} {v:.2f}" for k, v in patient_s.items()))  # fmt: skip
    print("cohort stages, seconds (1 worker): "
          + ", ".join(f"{k} {v:.2f}" for k, v in cohort_s.items()))  # fmt: skip
    print("of which per patient (measured apart, see cohort_slopes): "
          + ", ".join(f"{k} {v:.3f}" for k, v in slopes.items())
          + "; the rest is each stage's start-up")  # fmt: skip
    clf = s1.cohort.get("classifier", {})
    if any(clf.get(f"{t}_status") not in ("done", "skipped")
           for t in ("functional", "morphologic")):  # fmt: skip
        print(
            "note: a classifier was not trained in the run (fewer than 6 labelled patients "
            "or one class); its cost per patient comes from the timed training step alone"
        )
    print(f"scheduler overhead per task (2000 no-op tasks): {per_task * 1e3:.2f} ms")
    print()
    print(f"Projection of one run at {args.target_spacing:g} mm. Assumptions:")
    print(
        f"- every stage's cost grows with the voxel count: x{factor:.4g} = "
        f"({args.spacing:g} mm / {args.target_spacing:g} mm)^3, from the medians above"
    )
    print(
        "- patient stages: ideal parallelism across patients, limited by the workers "
        "(ceil(patients / workers) rounds of one patient's stages, one core per worker)"
    )
    print("- cohort stages serial, after the patients: each its start-up (the run's time less "
          "the cost per patient) plus, for " + " and ".join(cohort_per_patient)
          + ", a cost per patient; the classifier on one CPU core")  # fmt: skip
    print(f"- scheduler overhead serial: {per_task * 1e3:.2f} ms x ({tasks_per_patient} tasks "
          f"per patient + {cohort_tasks} cohort tasks)")  # fmt: skip
    print(
        f"- GPU columns: {', '.join(gpu_stages)} on the GPU workers, {speedup:g}x faster "
        "than one CPU core"
        + (" (assumed, not measured)" if assumed else " (given)")
        + f"; the other stages on {CPU_WORKERS[1]} CPU workers; the two pools overlap"
    )
    print("- not modelled: memory, storage and network bandwidth, stragglers, failures")
    head = [f"{w} CPU" for w in CPU_WORKERS] + [f"{CPU_WORKERS[1]} CPU+{g} GPU"
                                                 for g in GPU_WORKERS]  # fmt: skip
    print(f"{'patients':>9} {'serial part':>14} " + " ".join(f"{h:>14}" for h in head))
    for n in PATIENTS:
        one = project(patient_s, cohort_fixed, cohort_per_patient, patients=n, cpu_workers=1,
                      **common)  # fmt: skip
        cells = [project(patient_s, cohort_fixed, cohort_per_patient, patients=n, cpu_workers=w,
                         **common)["total"] for w in CPU_WORKERS]  # fmt: skip
        cells += [project(patient_s, cohort_fixed, cohort_per_patient, patients=n,
                          cpu_workers=CPU_WORKERS[1], gpu_workers=g, gpu_stages=gpu_stages,
                          gpu_speedup=speedup, **common)["total"]
                  for g in GPU_WORKERS]  # fmt: skip
        serial = _hours(one["cohort"] + one["overhead"])
        print(f"{n:>9} {serial:>14} " + " ".join(f"{_hours(c):>14}" for c in cells))
    print()
    print(
        f"scaling {args.patients} patients at {args.spacing} mm: 1 worker {t1:.1f} s, "
        f"2 workers {t2:.1f} s, ratio {t1 / t2:.2f}"
    )


if __name__ == "__main__":
    main()
