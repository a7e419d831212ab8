"""Patients with three scans: adding a timepoint to a done cohort, and what a third scan costs.

In this one process, on a synthetic cohort made by ``sscflow synth --timepoints 3`` (not timed),
on a LocalCluster of ``--workers`` one-thread workers (started and warmed up once, not timed):
  two-scan run:  the cohort's timepoints 0 and 1 only (a long manifest), into a fresh store;
  added run:     the same store, timepoint 2 added: only the new pairs (1 -> 2 and 0 -> 2 with
                 the default ``pairs: both``) should run, the pair 0 -> 1 and the template kept;
  three-scan run: the whole 3-timepoint manifest into another fresh store (the cost of a third
                 scan from scratch, against the two-scan run).
Then, against the synthetic truth (``truth/pairs.csv``): each pair's mean log-Jacobian per year
(relative error), the consistency of the consecutive pairs with the first -> last one
(``composition_mean_mm`` of ``results/pairs.csv``), and the whole-lung zone means.

Prints the registrations each run executed, the wall times, and last the time ratio added run /
two-scan run (the issue's target: 0.6 or less).

    python benchmarks/timepoints.py [--patients 12] [--spacing 4.0] [--seed 0] [--workers 2]
        [--keep DIR] [--pairs both|consecutive|first_last] [--accuracy-only]
        [--option torch.detrend_mm=6]

``--accuracy-only`` makes the three-scan run alone (no timing ratios): the accuracy figures at a
spacing where three runs would take too long (2 mm; the default ingest spacing is 1 mm).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--spacing", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--pairs", choices=("both", "consecutive", "first_last"), default="both",
                    help="the config's pairs rule (both: the default)")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="the three-scan run alone, and its accuracy against the truth")
    ap.add_argument("--option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a registration setting for every run, e.g. torch.detrend_mm=6 "
                         "(the config's registration.torch.detrend_mm; the value as JSON)")
    args = ap.parse_args()
    registration: dict = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        section, dot, name = key.rpartition(".")
        if not (sep and name):
            ap.error(f"--option {item}: give SECTION.KEY=VALUE, e.g. torch.detrend_mm=6")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        (registration.setdefault(section, {}) if dot else registration)[name] = parsed

    import numpy as np
    import pandas as pd

    from sscflow.cohort import read_manifest
    from sscflow.config import ClusterConfig, config_from_dict
    from sscflow.flow.cluster import dask_client
    from sscflow.flow.pipeline import run
    from sscflow.synth import synthesize_cohort

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="sscflow-timepoints-"))
    tmp.mkdir(parents=True, exist_ok=True)
    manifest = synthesize_cohort(args.patients, tmp / "synthetic", spacing=args.spacing,
                                 seed=args.seed,
                                 timepoints=3)  # fmt: skip
    with open(manifest, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    two = manifest.with_name("two_timepoints.csv")
    with open(two, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["timepoint"] in ("0", "1"))

    def config(path, store):
        return config_from_dict({"manifest": str(path), "store": str(tmp / store),
                                 "pairs": args.pairs,
                                 "results": str(tmp / f"{store}-results"),
                                 "ingest": {"spacing_mm": args.spacing},
                                 "registration": registration,
                                 "segment": {"min_lung_ml": 5.0}})  # fmt: skip

    print(f"cohort: {args.patients} synthetic patients x 3 scans at {args.spacing:g} mm "
          f"(sscflow synth --timepoints 3, seed {args.seed}), {args.workers} one-thread workers, "
          f"pairs: {args.pairs}" + "".join(f", --option {o}" for o in args.option))
    seconds, counts = {}, {}
    cluster = ClusterConfig(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0")
    with dask_client(cluster) as client:
        client.run(lambda: None)
        runs = (("two-scan run", two, "cohort.zarr"), ("added run", manifest, "cohort.zarr"),
                ("three-scan run", manifest, "three.zarr"))
        for name, path, store in runs[2:] if args.accuracy_only else runs:
            cfg = config(path, store)
            m = read_manifest(path, pairs=cfg.pairs)
            spent: dict[str, float] = {}

            def tally(rec, spent=spent):
                spent[rec["stage"]] = spent.get(rec["stage"], 0.0) + float(rec.get("seconds") or 0)

            t0 = time.perf_counter()
            summary = run(cfg, m, client=client, truth_dir=manifest.parent, on_record=tally)
            seconds[name] = time.perf_counter() - t0
            if not summary.ok:
                raise SystemExit(f"the {name} failed: {summary.failed or summary.cohort}")
            counts[name] = summary.counts.get("registration", {})
            print(f"{name}: {seconds[name]:.1f} s, registrations {counts[name]}, template "
                  f"{summary.cohort.get('template', {}).get('status')}")
            print("  task seconds by stage (summed over units): " + ", ".join(
                f"{k} {v:.0f}" for k, v in spent.items() if v >= 0.5))

    truth = pd.read_csv(manifest.parent / "truth" / "pairs.csv")
    got = pd.read_csv(tmp / "three.zarr-results" / "pairs.csv")
    both = got.merge(truth, on=["patient_id", "t0", "t1"], suffixes=("", "_truth"))
    big = both["logjac_per_year_truth"].abs() >= 0.01  # a relative error needs a change to be
    rel = ((both["logjac_per_year"] - both["logjac_per_year_truth"]).abs()
           / both["logjac_per_year_truth"].abs())[big]  # fmt: skip
    err = (both["logjac_mean"] - both["mean_logjac"]).abs()
    print(f"pairs: {len(both)}; |mean log-J - truth| mean {err.mean():.4f}, max {err.max():.4f}")
    print(f"per-year rate, pairs with |truth| >= 0.01/year ({int(big.sum())}): relative error "
          f"median {rel.median():.1%}, max {rel.max():.1%}")
    comp = got["composition_mean_mm"].dropna()
    print(f"composition inconsistency (consecutive vs first -> last, inside the lungs): mean "
          f"{comp.mean():.3f} mm, max {comp.max():.3f} mm over {len(comp)} patients")
    zones = pd.read_csv(tmp / "three.zarr-results" / "zones.csv")
    whole = zones[zones["zone"] == "whole"].merge(truth, on=["patient_id", "t0", "t1"])
    z_err = (whole["logjac_mean"] - whole["mean_logjac"]).abs()
    print(f"whole-lung zone mean vs truth: mean |error| {z_err.mean():.4f}, max "
          f"{np.nanmax(z_err):.4f}")
    print(zone_errors(zones, manifest.parent))
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.accuracy_only:
        return
    base = seconds["two-scan run"]
    print(f"three-scan / two-scan run time: {seconds['three-scan run'] / base:.2f} "
          "(target <= 2.2)")
    print(f"time ratio added run / two-scan run: {seconds['added run'] / base:.2f}")


def zone_errors(zones, synthetic) -> str:
    """Every pair's registered zone means (``zones.csv``) against the same zones cut on the
    truth (true lung, true map, the truth's own grid): a line for all, one per zone."""
    import pandas as pd

    from sscflow.methods.zones import ZONES, zone_codes, zone_stats
    from sscflow.synth import read_truth

    rows = []
    for (pid, t0, t1), got in zones.groupby(["patient_id", "t0", "t1"]):
        unit = pid if (t0, t1) == (0, 1) else f"{pid}/pairs/{t0}-{t1}"
        truth = read_truth(synthetic, unit)
        codes, _ = zone_codes(truth.lung, truth.geometry)
        want = {r["zone"]: r["logjac_mean"]
                for r in zone_stats(codes, truth.log_jacobian, truth.geometry)}  # fmt: skip
        mean = got.set_index("zone")["logjac_mean"]
        rows += [(zone, float(mean[zone]) - want[zone]) for zone in ZONES]
    e = pd.DataFrame(rows, columns=["zone", "error"])
    by, size = e.groupby("zone", sort=False)["error"], e["error"].abs()
    return (f"zone means vs truth ({len(e)} pair-zones): mean |error| {size.mean():.4f}, max "
            f"{size.max():.4f}, within 0.01: {(size <= 0.01).mean():.0%} (target: all)\n"
            "  by zone, mean error / max |error|: " + ", ".join(
                f"{z} {m:+.4f} / {a:.4f}" for z, m, a in zip(
                    by.mean().index, by.mean(), by.apply(lambda v: v.abs().max()),
                    strict=True)))  # fmt: skip


if __name__ == "__main__":
    main()
