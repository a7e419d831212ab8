"""Cohorts that grow: a rerun after adding 10% more patients, against the first run.

In this one process:
  first run: ``sscflow.flow.pipeline.run`` of a synthetic cohort of ``--patients`` patients (made
             first, not timed) on a LocalCluster of ``--workers`` one-thread workers (started
             and warmed up once, not timed), into a fresh store: every stage, cohort stages
             (template, group means, table, figure, classifier, report) included;
  rerun:     the same manifest plus 10% more patients (``--added``, rounded up), same store and
             cluster: only the new patients' stages should run (the template is kept as it is),
             then the cohort stages.
Prints, per patient stage, the tasks executed (status done) and skipped by each run, whether the
rerun executed only the new patients' tasks, and the two wall times.

Then the cost of the cohort outputs that every rerun recomputes from the manifest's finished
patients: template-space maps written straight into a store (a template, one smooth noisy
log-Jacobian map per patient with labels; no registration), and for 200 / 1,000 / 2,000 of them
(``--sizes``): the cohort table, the streamed group means and the report, timed, with the
peak resident memory above the start (sampled every 5 ms). The default grid is small
(``--shape 40 48 48`` at 2.5 mm) so that it runs in a few minutes here; ``--shape 112 128 128``
is a whole chest at 2.5 mm (about 7 MB a map; 15 GB of maps for 2,000 patients).

The time ratio rerun / first run is printed last (target: 0.2 or less).

    python benchmarks/incremental.py [--patients 20] [--added 2] [--spacing 4.0] [--workers 2]
        [--sizes 200 1000 2000] [--shape 40 48 48] [--skip-run] [--skip-means]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/dataflow.py


def incremental_run(tmp: Path, patients: int, added: int, spacing: float, workers: int) -> dict:
    """Time a first run of ``patients`` and a rerun with ``added`` more; count their tasks."""
    from dataflow import small_cohort

    from sscflow.cohort import read_manifest
    from sscflow.config import ClusterConfig
    from sscflow.flow.cluster import dask_client
    from sscflow.flow.pipeline import run
    from sscflow.stages import PATIENT, STAGES

    PATIENT_STAGES = [s.name for s in STAGES if s.scope == PATIENT]  # noqa: N806

    full, config = small_cohort(tmp, patients + added, spacing)
    with open(full.path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    first_path = Path(full.path).with_name("manifest_first.csv")
    with open(first_path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:patients])
    first = read_manifest(first_path)
    new_ids = {p.patient_id for p in full.patients} - {p.patient_id for p in first.patients}
    cfg = config("cohort.zarr")
    truth = Path(full.path).parent
    records: dict[str, list] = {"first": [], "rerun": []}
    seconds = {}
    cluster = ClusterConfig(n_workers=workers, threads_per_worker=1, dashboard_address=":0")
    with dask_client(cluster) as client:
        client.run(lambda: None)  # every worker up before the clock starts
        for name, manifest in (("first", first), ("rerun", full)):
            t0 = time.perf_counter()
            summary = run(cfg, manifest, client=client, truth_dir=truth,
                          on_record=records[name].append)  # fmt: skip
            seconds[name] = time.perf_counter() - t0
            if not summary.ok:
                raise SystemExit(f"the {name} run failed: {summary.failed or summary.cohort}")
            seconds[f"{name}_template"] = summary.cohort.get("template", {})
    counts = {}
    for name, recs in records.items():
        for stage in PATIENT_STAGES:
            done = [r for r in recs if r["stage"] == stage and r["status"] == "done"]
            skipped = [r for r in recs if r["stage"] == stage and r["status"] == "skipped"]
            counts[(name, stage)] = (len(done), len(skipped))
    executed = [(r["stage"], r["patient_id"]) for r in records["rerun"]
                if r["patient_id"] is not None and r["status"] == "done"]  # fmt: skip
    return {"seconds": seconds, "counts": counts, "executed": executed, "new": sorted(new_ids),
            "stages": PATIENT_STAGES, "cohort": [r for r in records["rerun"]
                                                 if r["patient_id"] is None]}  # fmt: skip


# --- group means, cohort table, report for many patients (maps written straight into a store)


def write_maps(store: str, n: int, shape: tuple[int, int, int], spacing: float, seed: int = 0):
    """A template and ``n`` template-space maps (smooth pattern x per-patient scale + noise,
    0 outside the lungs), with functional and visual labels, in a fresh store."""
    import numpy as np
    from scipy import ndimage

    from sscflow.core import store as st
    from sscflow.core.geometry import Geometry

    rng = np.random.default_rng(seed)
    geom = Geometry(shape, (spacing,) * 3, tuple(-(s - 1) * spacing / 2 for s in shape))
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    lungs = (((zz / 0.8) ** 2 + (yy / 0.7) ** 2 + ((np.abs(xx) - 0.45) / 0.35) ** 2) <= 1.0)
    hu = np.where(lungs, -850, 40).astype(np.int16)
    root = st.open_store(store)
    tpl = st.require_group(root, st.TEMPLATE)
    for name, data in (("image", hu), ("lung_mask", lungs.astype(np.uint8))):
        st.write_image(tpl, name, data, geom, stage="template", params={}, input_hash="bench")
    pattern = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0).astype(np.float32)
    pattern *= 0.05 / float(pattern.std())
    shrink = (-0.08 * np.clip(-zz, 0, 1) * np.clip(yy, 0, 1)).astype(np.float32)  # basal-posterior
    visual = ("worsened", "stable", "improved")
    for i in range(n):
        pid = f"B{i:05d}"
        worse = bool(rng.random() < 0.43)
        values = pattern * rng.uniform(0.5, 1.5) + (shrink if worse else 0.0)
        values = values + rng.normal(0.0, 0.01, shape).astype(np.float32)
        values[~lungs] = 0.0
        group = st.patient_group(root, pid)
        fvc = float(rng.uniform(60, 100))
        group.attrs["sscflow"] = {
            "clinical": {"fvc_baseline": fvc, "fvc_followup": fvc - (12.0 if worse else 2.0),
                         "visual": visual[int(rng.integers(0, 3))]},
            "functional": "worsening" if worse else "stable",
        }  # fmt: skip
        st.write_image(group, "log_jacobian_template", values.astype(np.float32), geom,
                       stage="to_template", params={}, input_hash=pid,
                       extra={"qa": {"dice": 0.9}})  # fmt: skip
    return [f"B{i:05d}" for i in range(n)]


class PeakRSS:
    """Peak resident memory of this process above its value at ``__enter__`` (bytes)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def above(self) -> int:
        return self.peak - self.start


def cohort_outputs_cost(tmp: Path, sizes, shape, spacing) -> list[dict]:
    """For each size n: cohort table + group means + report of the first n patients."""
    from sscflow.core import store as st
    from sscflow.flow.pipeline import record_manifest
    from sscflow.methods.groups import cohort_table, group_means, write_cohort_table

    store = str(tmp / "maps.zarr")
    t0 = time.perf_counter()
    ids = write_maps(store, max(sizes), tuple(shape), spacing)
    print(f"wrote {len(ids)} maps of {shape[0]}x{shape[1]}x{shape[2]} at {spacing} mm in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    rows = []
    for n in [min(10, min(sizes)), *sizes]:  # the first, small, round warms up imports: dropped
        members = ids[:n]
        record_manifest(st.open_store(store), SimpleNamespace(
            path=f"bench-{n}.csv", patients=[SimpleNamespace(patient_id=p) for p in members]))
        results = tmp / f"results-{n}"
        row = {"n": n}
        with PeakRSS() as mem:
            t = time.perf_counter()
            table = cohort_table(store, members)
            write_cohort_table(table, results)
            row["table_s"] = time.perf_counter() - t
            t = time.perf_counter()
            gm = group_means(store, table)
            row["means_s"] = time.perf_counter() - t
            t = time.perf_counter()
            try:
                from sscflow.flow.pipeline import store_status
                from sscflow.views.report import write_report

                write_report(store, results, store_status(store), synthetic=True)
                row["report_s"] = time.perf_counter() - t
            except Exception as exc:  # the report is another module's: say why, keep going
                row["report_s"] = float("nan")
                row["report_error"] = f"{type(exc).__name__}: {exc}"[:200]
        assert gm["n_patients"] == n, gm
        row["peak_mb"] = mem.above / 2**20
        row["total_s"] = row["table_s"] + row["means_s"] + (
            0.0 if math.isnan(row["report_s"]) else row["report_s"])
        rows.append(row)
        print(f"  {n} patients done in {row['total_s']:.1f} s", flush=True)
    return rows[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=20, help="first run's cohort size")
    ap.add_argument("--added", type=int, default=None, help="patients added (default 10%%)")
    ap.add_argument("--spacing", type=float, default=4.0, help="synthetic and ingest mm")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 48, 48], help="map grid z y x")
    ap.add_argument("--map-spacing", type=float, default=2.5)
    ap.add_argument("--skip-run", action="store_true", help="only the group-means table")
    ap.add_argument("--skip-means", action="store_true", help="only the incremental run")
    args = ap.parse_args()
    added = args.added if args.added is not None else max(1, math.ceil(args.patients / 10))

    with tempfile.TemporaryDirectory(prefix="sscflow-incremental-") as tmp:
        tmp = Path(tmp)
        if not args.skip_means:
            print(f"cohort outputs from maps written straight into a store "
                  f"({args.shape[0]}x{args.shape[1]}x{args.shape[2]} at {args.map_spacing} mm):")
            rows = cohort_outputs_cost(tmp / "means", sorted(args.sizes), args.shape,
                                       args.map_spacing)  # fmt: skip
            print(f"{'patients':>9} {'table s':>8} {'means s':>8} {'report s':>9} "
                  f"{'total s':>8} {'ms/patient':>10} {'peak MB':>8}")  # fmt: skip
            for r in rows:
                print(f"{r['n']:>9} {r['table_s']:>8.2f} {r['means_s']:>8.2f} "
                      f"{r['report_s']:>9.2f} {r['total_s']:>8.2f} "
                      f"{1e3 * r['total_s'] / r['n']:>10.2f} {r['peak_mb']:>8.0f}")  # fmt: skip
                if r.get("report_error"):
                    print(f"          report failed: {r['report_error']}")
            lo, hi = rows[0], rows[-1]
            print(f"growth {lo['n']} -> {hi['n']} patients ({hi['n'] / lo['n']:.0f}x): time "
                  f"{hi['total_s'] / lo['total_s']:.1f}x, peak memory {hi['peak_mb']:.0f} MB "
                  f"(limit 2048 MB: {'within' if hi['peak_mb'] <= 2048 else 'OVER'})")
        if args.skip_run:
            return
        print(f"incremental run: {args.patients} synthetic patients at {args.spacing} mm, then "
              f"{added} more; {args.workers} one-thread workers", flush=True)  # fmt: skip
        res = incremental_run(tmp / "run", args.patients, added, args.spacing, args.workers)
        for stage in res["stages"]:
            d1, s1 = res["counts"][("first", stage)]
            d2, s2 = res["counts"][("rerun", stage)]
            print(f"  {stage:>12}: first run {d1} done, {s1} skipped; rerun {d2} done, "
                  f"{s2} skipped")  # fmt: skip
        for rec in res["cohort"]:
            print(f"  {rec['stage']:>12} (cohort): {rec['status']}")
        tpl = res["seconds"]["rerun_template"]
        print(f"template on the rerun: {tpl.get('action')} ({tpl.get('provenance')})")
        executed = res["executed"]
        only_new = all(pid in res["new"] for _, pid in executed)
        print(f"patient-stage tasks executed by the rerun: {len(executed)} "
              f"({len(res['stages'])} stages x {len(res['new'])} new patients = "
              f"{len(res['stages']) * len(res['new'])}); only the new patients': "
              f"{'yes' if only_new else 'NO'}")  # fmt: skip
        first, rerun = res["seconds"]["first"], res["seconds"]["rerun"]
        print(f"first run {first:.1f} s; rerun with {added} more patients {rerun:.1f} s")
        print(f"time ratio rerun / first run: {rerun / first:.3f}")


if __name__ == "__main__":
    main()
