"""Three timepoints of real CT with a planted change that progresses: every pair against its truth.

Data: the real chest CT ``../shared/data/lung1_image.nrrd`` resampled to ``--spacing`` (2 mm) as
``sscflow ingest`` does, lungs by ``sscflow.methods.segment``. A shrinkage is planted at
``--place`` (posterior-basal: where SSc-ILD shrinks) with a textured density rise of
``--rise-hu`` (+180 HU, mean over the region) as ``sscflow.synth.planted.plant_disease`` makes
it, no global volume change, and shown at three times: scan k images the first scan's anatomy
through ``exp(tau_k v)`` (``v`` the sinks' stationary velocity, ``tau_k`` = months_k / months_2,
months 0, ``--months`` (14) and 30) with the density rise ``tau_k`` times its full size, and its
own 15 HU noise. The flow of a stationary field composes exactly, so the truth of every pair
(a, b) is ``exp((tau_b - tau_a) v)`` itself, built directly (no pair's truth comes from
another's) and written as the synthetic cohort's truth files, which ``sscflow run`` compares
against (``reg_truth_*`` in the displacement's QA).

In this one process, on a LocalCluster of ``--workers`` one-thread workers (warmed up once,
not timed): the two-scan run (timepoints 0 and 1, a long manifest) into a fresh store, then the
added run (timepoint 2 added: 1 -> 2 and 0 -> 2 with the default ``pairs: both``). Then, per
pair: the mean displacement error (mm), the planted region's mean log-Jacobian against its
truth and so its per-year rate (months cancel: the relative error of the rate is the region's),
the whole-lung mean log-Jacobian per year, and the composition inconsistency of the consecutive
pairs against 0 -> 2 (``results/pairs.csv``). Prints last the time ratio added run / two-scan
run (the issue's target: 0.6 or less, stated for a 12-patient synthetic cohort).

    python benchmarks/timepoints_ct.py [--spacing 2.0] [--workers 2] [--months 14]
        [--place posterior-basal] [--rise-hu 180] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"
MONTHS_LAST = 30.0
REGION_LOGJAC = -0.24  # the planted region's mean log-Jacobian first -> last (the paper's size)
FVC = (86.0, 81.0, 73.0)  # % predicted at each scan (a worsening patient)
DLCO = (62.0, 57.0, 48.0)


def flow_field(g, axes, lung, centre, sinks, fraction: float):
    """``exp(fraction v)`` on the grid: the planted sinks scaled by ``fraction``, no global
    part (``sscflow.synth.deform.build_deformation`` with the planned mean = the local mean)."""
    from sscflow.synth import deform

    scaled = [replace(s, strength=s.strength * fraction) for s in sinks]
    first = deform.build_deformation(g, axes, lung, centre=centre, sinks=scaled, planned_mean=0.0)
    return deform.build_deformation(g, axes, lung, centre=centre, sinks=scaled,
                                    planned_mean=first.local_mean)  # fmt: skip


def make_series(folder: Path, spacing: float, months_1: float, place: str, rise_hu: float):
    """The three scans (NRRD), the long manifest and the truth of every pair in ``folder``."""
    from sscflow.core.geometry import to_itk
    from sscflow.methods.ingest import to_canonical
    from sscflow.methods.segment import segment_lungs
    from sscflow.synth import deform, planted, write_truth

    hu, g = to_canonical(sitk.ReadImage(str(DATA)), spacing)
    hu = hu.astype(np.float32)
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    p = planted.plant_disease(hu, g, lung, place=place, region_logjac=REGION_LOGJAC,
                              rise_hu=rise_hu, global_log_volume=0.0, noise_hu=0.0, seed=21)
    axes = [g.origin[k] + np.arange(n) * g.spacing[k] for k, n in enumerate(g.shape)]
    idx = np.argwhere(lung)
    centre = np.array([axes[k][idx[:, k]].mean() for k in range(3)])
    months = (0.0, float(months_1), MONTHS_LAST)
    taus = [m / MONTHS_LAST for m in months]
    fields = {}

    def field(fraction):
        key = round(fraction, 9)
        if key not in fields:
            fields[key] = flow_field(g, axes, lung, centre, list(p.sinks), fraction)
        return fields[key]

    rng = np.random.default_rng(22)
    lungs, regions, rows = [], [], []
    for k, tau in enumerate(taus):
        if k == 0:
            image, lung_k, region_k = hu.copy(), lung, p.region
        else:
            inverse = field(tau).inverse
            image = deform.warp(hu + np.float32(tau) * p.density, inverse, g, order=3)
            lung_k = deform.warp(lung.astype(np.float32), inverse, g) >= 0.5
            region_k = lung_k & (deform.warp(p.region.astype(np.float32), inverse, g) >= 0.5)
        image = image + rng.normal(0.0, 15.0, image.shape).astype(np.float32)
        path = folder / "images" / f"t{k}.nrrd"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(to_itk(np.round(image).astype(np.int16), g), str(path), True)
        lungs.append(lung_k)
        regions.append(region_k)
        rows.append({"patient_id": "CT001", "timepoint": k, "scan": f"images/t{k}.nrrd",
                     "months": f"{months[k]:g}", "fvc": FVC[k], "dlco": DLCO[k], "age": 60,
                     "sex": "F"})  # fmt: skip
    truth = {}
    for a, b in ((0, 1), (1, 2), (0, 2)):
        f = field(taus[b] - taus[a])
        unit = "CT001" if (a, b) == (0, 1) else f"CT001/pairs/{a}-{b}"
        write_truth(folder / "truth" / unit, g, f.displacement, f.log_jacobian, lungs[a],
                    regions[a], lungs[b], g)  # fmt: skip
        truth[(a, b)] = {"months": months[b] - months[a],
                         "lung": float(f.log_jacobian[lungs[a]].mean()),
                         "region": float(f.log_jacobian[regions[a]].mean())}  # fmt: skip
    manifest = folder / "manifest.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    two = folder / "two_timepoints.csv"
    with open(two, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:2])
    region_ml = p.region.sum() * np.prod(g.spacing) / 1000
    print(f"real CT {DATA.name} at {spacing:g} mm, grid {g.shape}; planted {place} shrinkage "
          f"(region {region_ml:.0f} mL, first -> last truth {truth[(0, 2)]['region']:+.3f}), "
          f"mean rise {p.density[p.region].mean():+.0f} HU at the last scan; months "
          f"{', '.join(f'{m:g}' for m in months)}", flush=True)  # fmt: skip
    return two, manifest, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--months", type=float, default=14.0, help="months of the middle scan")
    ap.add_argument("--place", default="posterior-basal")
    ap.add_argument("--rise-hu", type=float, default=180.0)
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    if not 0 < args.months < MONTHS_LAST:
        raise SystemExit(f"--months must lie between 0 and {MONTHS_LAST:g}")

    import pandas as pd

    from sscflow.cohort import read_manifest
    from sscflow.config import ClusterConfig, config_from_dict
    from sscflow.core import store as st
    from sscflow.flow.cluster import dask_client
    from sscflow.flow.pipeline import run

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="sscflow-timepoints-ct-"))
    tmp.mkdir(parents=True, exist_ok=True)
    two, manifest, truth = make_series(tmp / "series", args.spacing, args.months, args.place,
                                       args.rise_hu)  # fmt: skip
    cfg = config_from_dict({"manifest": str(manifest), "store": str(tmp / "cohort.zarr"),
                            "results": str(tmp / "results"),
                            "ingest": {"spacing_mm": args.spacing}})  # fmt: skip
    seconds = {}
    cluster = ClusterConfig(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0")
    with dask_client(cluster) as client:
        client.run(lambda: None)
        for name, path in (("two-scan run", two), ("added run", manifest)):
            spent: dict[str, float] = {}

            def tally(rec, spent=spent):
                spent[rec["stage"]] = spent.get(rec["stage"], 0.0) + float(rec.get("seconds") or 0)

            t0 = time.perf_counter()
            summary = run(cfg, read_manifest(path, pairs=cfg.pairs), client=client,
                          truth_dir=manifest.parent, on_record=tally)  # fmt: skip
            seconds[name] = time.perf_counter() - t0
            if not summary.ok:
                raise SystemExit(f"the {name} failed: {summary.failed or summary.cohort}")
            print(f"{name}: {seconds[name]:.1f} s, registrations "
                  f"{summary.counts.get('registration', {})}; task seconds by stage: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in spent.items() if v >= 0.5), flush=True)

    root = st.open_store(str(tmp / "cohort.zarr"), mode="r")
    pairs = pd.read_csv(tmp / "results" / "pairs.csv").set_index(["t0", "t1"])
    rel = []
    for (a, b), t in truth.items():
        unit = "CT001" if (a, b) == (0, 1) else f"CT001/pairs/{a}-{b}"
        qa = dict(root[f"patients/{unit}/displacement"].attrs["sscflow"])["qa"]["truth"]
        row = pairs.loc[(a, b)]
        per_year = 12.0 / t["months"]
        got, want = qa["region_logjac"] * per_year, qa["region_logjac_truth"] * per_year
        r_err = abs(qa["region_logjac_error"]) / abs(qa["region_logjac_truth"])
        rel.append(r_err)
        print(f"pair {a} -> {b} ({t['months']:g} months): displacement error mean "
              f"{qa['mean_error_mm']:.2f} mm, p95 {qa['p95_error_mm']:.2f} mm; region log-J "
              f"{qa['region_logjac']:+.4f} vs truth {qa['region_logjac_truth']:+.4f} (per year "
              f"{got:+.4f} vs {want:+.4f}, relative error {r_err:.1%}); whole-lung per year "
              f"{row['logjac_per_year']:+.4f} vs truth {t['lung'] * per_year:+.4f}")  # fmt: skip
    comp = pairs.loc[(0, 2), "composition_mean_mm"]
    print(f"composition inconsistency (0 -> 1 -> 2 against 0 -> 2, inside the lungs): "
          f"{comp:.3f} mm mean (target <= 0.5)")
    print(f"regional per-year rate, relative error: max {max(rel):.1%} over 3 pairs (target 5%)")
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = seconds["added run"] / seconds["two-scan run"]
    print(f"time ratio added run / two-scan run: {ratio:.2f}")


if __name__ == "__main__":
    main()
