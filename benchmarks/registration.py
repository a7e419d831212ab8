"""Registration on CPU: sscflow's default backend vs plain SimpleITK demons, same pair, one process.

Baseline (issue 4, section 5): SimpleITK FastSymmetricForcesDemonsRegistrationFilter, three
levels (shrink 4, 2, 1), 100 iterations per level, standard deviation 1.5, no mask, on the
whole volume.

Data: one worsening patient of a synthetic cohort at 2 mm (about 150 x 140 x 180 voxels), made
once under ``--workdir``. Prints time, accuracy against the true field inside the baseline lung
(mean / p95 displacement error, mean |log-Jacobian error|, planted-region mean log-Jacobian vs
truth, folded voxels) and peak memory (the process's resident memory above its level at the
start of each run, sampled every 10 ms, so numpy, ITK and torch buffers all count), then the
time ratio last.

Usage: python benchmarks/registration.py [--workdir /tmp/sscflow-bench-reg] [--patient SYN006]
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from sscflow.config import RegistrationConfig
from sscflow.geometry import field_from_sitk, to_numpy, to_sitk
from sscflow.imageio import read_volume
from sscflow.registration import register, resolve_backend
from sscflow.registration.common import n_threads, truth_errors
from sscflow.synth import read_truth, synthesize_cohort


def demons_baseline(fixed, moving, spacing):
    """The plain SimpleITK baseline: 3-level FastSymmetricForces demons, no mask."""
    f = to_sitk(fixed.astype(np.float32), spacing)
    m = to_sitk(moving.astype(np.float32), spacing)
    field = None
    for shrink in (4, 2, 1):
        fl = sitk.Shrink(f, [shrink] * 3) if shrink > 1 else f
        ml = sitk.Shrink(m, [shrink] * 3) if shrink > 1 else m
        if field is None:
            field = sitk.Image(fl.GetSize(), sitk.sitkVectorFloat64, 3)
            field.CopyInformation(fl)
        else:
            field = sitk.Resample(field, fl, sitk.Transform(), sitk.sitkLinear, 0.0)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(100)
        demons.SetStandardDeviations(1.5)
        field = demons.Execute(fl, ml, field)
    return field_from_sitk(field)


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(func):
    """(result, seconds, peak RSS above the starting RSS in MiB, sampled every 10 ms)."""
    gc.collect()
    start = _rss_mib()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_mib())

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    u = func()
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return u, seconds, max(peak[0], _rss_mib()) - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/sscflow-bench-reg")
    ap.add_argument("--patient", default=None, help="default: the first worsened patient")
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=0, help="both methods; 0 = all cores")
    args = ap.parse_args(argv)
    out = Path(args.workdir)
    if not (out / "manifest.csv").is_file():
        synthesize_cohort(8, out, spacing=args.spacing, seed=3)
    man = pd.read_csv(out / "manifest.csv").set_index("patient_id")
    truth_table = pd.read_csv(out / "truth" / "truth.csv").set_index("patient_id")
    pid = args.patient or truth_table.index[truth_table["visual"] == "worsened"][0]
    fixed, _ = to_numpy(read_volume(out / man.loc[pid, "baseline"]))
    moving, _ = to_numpy(read_volume(out / man.loc[pid, "followup"]))
    truth = read_truth(out, pid)
    sp = truth.geometry.spacing
    fixed = fixed.astype(np.float32)
    moving = moving.astype(np.float32)
    cfg = RegistrationConfig(threads=args.threads)
    backend = resolve_backend(cfg.backend)
    threads = n_threads(cfg.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    print(f"pair {pid} ({truth_table.loc[pid, 'visual']}, density change "
          f"{truth_table.loc[pid, 'density_change_hu']:+.0f} HU) {fixed.shape} at {sp[0]:g} mm, "
          f"{threads} threads")  # fmt: skip

    runs = {}
    runs["SimpleITK demons"] = measure(lambda: demons_baseline(fixed, moving, sp))
    runs[f"sscflow {backend}"] = measure(
        lambda: register(
            fixed, moving, sp, mask=truth.lung, backend=backend, **cfg.options(backend)
        ),  # fmt: skip
    )
    for name, (u, seconds, peak) in runs.items():
        e = truth_errors(u, sp, truth.displacement, truth.log_jacobian, truth.lung, truth.region)
        region = (
            f"region logjac {e['region_logjac']:+.3f} vs truth {e['region_logjac_truth']:+.3f}"
            if "region_logjac" in e
            else "no region"
        )
        print(f"{name}: {seconds:.1f} s, mean error {e['mean_error_mm']:.2f} mm, "
              f"p95 {e['p95_error_mm']:.2f} mm, |logjac error| {e['logjac_mae']:.4f}, "
              f"{region}, folded {e['folded_voxels']}, peak memory +{peak:.0f} MiB")  # fmt: skip
    base = runs["SimpleITK demons"][1]
    ours = runs[f"sscflow {backend}"][1]
    print(f"registration {fixed.shape[0]}x{fixed.shape[1]}x{fixed.shape[2]} at {sp[0]:g} mm: "
          f"sscflow {backend} {ours:.1f} s, SimpleITK demons {base:.1f} s, "
          f"ratio {ours / base:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
