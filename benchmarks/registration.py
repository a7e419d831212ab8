"""Registration on real CT with planted changes: sscflow (torch and SimpleITK backends) against
plain SimpleITK demons, same pairs, one process.

Data: the real chest CT ``../shared/data/lung1_image.nrrd`` (pyradiomics, 0.57 x 0.57 x 5 mm),
resampled to ``--spacing`` (2 mm) as ``sscflow ingest`` does, lungs by ``sscflow.methods.segment``.
Pairs (``sscflow.synth.planted``):

- ``planted``: a follow-up with posterior-basal shrinkage (about -0.24 mean log-Jacobian in the
  planted region), a 2 % global volume loss, a textured +150 HU density rise where the lung
  shrinks and 15 HU noise, on the baseline's grid;
- ``planted, moved``: the same follow-up imaged again with the patient rotated 15 degrees,
  moved 120 mm along the table and 30 mm in-plane, on a grid of 2.5 x 1.7 x 1.8 mm with an
  oblique, x-flipped direction and another field of view, then ingested (1 resampling);
- ``rigid``: no change at all, the patient rotated 20 degrees and moved, another grid;
- ``identity``: the scan and itself; ``identity + noise``: 20 HU noise added to one;
  ``regridded``: the same scan written on a 0.9 x 0.75 x 0.75 mm grid and ingested again.

Where a follow-up's grid reaches past the baseline's field of view (which cuts the lung
bases), it shows the baseline's edge continued (``planted.reacquire``'s default), not air.

Baseline: SimpleITK FastSymmetricForces demons, three levels (shrink 4, 2, 1), 100 iterations
per level, s.d. 1.5, no mask, on the whole ``planted`` pair (it needs one grid).

After an untimed warm-up (one-iteration registrations: PyTorch's import and first
allocations, paid once per worker), prints per pair and backend: time (and the initial
alignment's), mean / p95 displacement error inside the lungs, mean |log-Jacobian error|,
planted-region mean log-Jacobian vs truth, folded voxels, mean and p95 / p99 |log-Jacobian|;
then the issue's targets, and the time ratio
sscflow / demons on the ``planted`` pair last.

Each backend runs with its own defaults (its ``Options``, as ``sscflow run`` does), changed
only by ``--option``.

Usage: python benchmarks/registration.py [--spacing 2] [--backends torch,sitk]
       [--pairs planted,moved,rigid,identity,noise,regridded] [--option sitk.sigma_mm=6.0]
       [--no-baseline]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sscflow.core.geometry import Geometry, from_itk, to_itk
from sscflow.methods.ingest import to_canonical
from sscflow.methods.registration import options_class, register
from sscflow.methods.registration.common import log_jacobian, n_threads, truth_errors
from sscflow.methods.segment import segment_lungs
from sscflow.synth import planted

PAIRS = {"planted": "planted", "moved": "planted, moved", "rigid": "rigid",
         "identity": "identity", "noise": "identity + noise", "regridded": "regridded"}
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lung1_image.nrrd"


def demons_baseline(fixed, moving, spacing):
    """The plain SimpleITK baseline: 3-level FastSymmetricForces demons, no mask."""
    grid = Geometry(fixed.shape, spacing, (0.0, 0.0, 0.0))
    f = to_itk(fixed.astype(np.float32), grid)
    m = to_itk(moving.astype(np.float32), grid)
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
    return from_itk(field)[0]


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="utf-8") as fh:
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
    out = func()
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return out, seconds, max(peak[0], _rss_mib()) - start


def make_pairs(spacing: float, names) -> tuple:
    """The baseline (HU, geometry, lungs) and the pairs: name -> (Pair, follow-up HU, grid)."""
    hu, g = to_canonical(sitk.ReadImage(str(DATA)), spacing)
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    c = np.asarray(g.origin) + np.asarray(g.shape) * np.asarray(g.spacing) / 2
    noise = planted._noise
    pairs = {}
    if {"planted", "planted, moved"} & set(names):
        p = planted.plant_change(hu, g, lung, noise_hu=0.0)
        pairs["planted"] = (p, p.followup + noise(np.random.default_rng(5), hu.shape, 15.0), g)
        r = planted.rotation(15.0, (0.3, 1.0, 0.5))
        off = c - r @ c + np.array([120.0, 30.0, -25.0])
        d = np.diag([-1.0, 1.0, 1.0]) @ planted.rotation(5.0, (1, 0, 0))[::-1, ::-1]
        grid = planted.acquisition_grid(lung, g, spacing=(2.5, 1.7, 1.8), margin_mm=(20, 35),
                                        direction=d, matrix=r, offset=off)  # fmt: skip
        q = planted.reacquire(p, matrix=r, offset=off, grid=grid, noise_hu=15.0)
        pairs["planted, moved"] = (q, *to_canonical(to_itk(q.followup, grid), spacing))
    if {"rigid", "identity", "identity + noise", "regridded"} & set(names):  # unchanged pairs
        z = planted.plant_change(hu, g, lung, region_logjac=0.0, global_log_volume=0.0,
                                 density_hu=0.0, noise_hu=0.0)  # fmt: skip
    if "rigid" in names:
        r = planted.rotation(20.0, (1.0, 0.2, 0.1))
        off = c - r @ c + np.array([-60.0, 20.0, 35.0])
        grid = planted.acquisition_grid(lung, g, spacing=(1.25, 1.4, 1.4), margin_mm=(30, 30),
                                        matrix=r, offset=off)  # fmt: skip
        q = planted.reacquire(z, matrix=r, offset=off, grid=grid)
        pairs["rigid"] = (q, *to_canonical(to_itk(q.followup, grid), spacing))
    if "identity" in names:
        pairs["identity"] = (z, hu.astype(np.float32), g)
    if "identity + noise" in names:
        pairs["identity + noise"] = (z, hu + noise(np.random.default_rng(7), hu.shape, 20.0), g)
    if "regridded" in names:
        grid = planted.acquisition_grid(lung, g, spacing=(0.9, 0.75, 0.75), margin_mm=(25, 25))
        q = planted.reacquire(z, grid=grid)
        pairs["regridded"] = (q, *to_canonical(to_itk(q.followup, grid), spacing))
    return hu.astype(np.float32), g, lung, {n: pairs[n] for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--backends", default="torch,sitk",
                    help="sscflow backends, in order; the first one's time makes the ratio")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"any of {', '.join(PAIRS)}")
    ap.add_argument("--threads", type=int, default=0, help="every method; 0 = all cores")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip plain SimpleITK demons (and the ratio): minutes at 1 mm")
    ap.add_argument("--option", action="append", default=[], metavar="[BACKEND.]KEY=VALUE",
                    help="a setting over a backend's own defaults (repeatable): KEY for "
                         "every backend that has it, e.g. velocity_sigma_mm=6, or sitk.sigma_mm=6")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    options = {b: {} for b in backends}
    for item in args.option:
        key, _, value = item.partition("=")
        which, _, name = key.rpartition(".")
        owners = [b for b in backends if (not which or b == which)
                  and name in {f.name for f in dataclasses.fields(options_class(b))}]  # fmt: skip
        if not owners:
            ap.error(f"--option {item}: no backend of {backends} has a setting {name!r}")
        for b in owners:
            options[b][name] = json.loads(value)
    keys = [k.strip() for k in args.pairs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PAIRS]
    if unknown:
        ap.error(f"unknown pair(s) {unknown}; choose from {', '.join(PAIRS)}")
    names = [PAIRS[k] for k in keys]
    threads = n_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    t0 = time.perf_counter()
    hu, g, lung, pairs = make_pairs(args.spacing, names)
    print(f"real CT {DATA.name} at {args.spacing:g} mm: {hu.shape}, lungs "
          f"{lung.sum() * np.prod(g.spacing) / 1000:.0f} mL, {threads} threads; pairs made in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip

    # One untimed, one-iteration registration first: a Dask worker pays PyTorch's import and
    # first allocations once, not per patient (a cold first registration here: +3 to 6 s).
    t0 = time.perf_counter()
    for backend in backends:
        register(hu, hu, mask=lung, fixed_geometry=g, moving_geometry=g, backend=backend,
                 iterations=(1,) * 3, threads=args.threads)  # fmt: skip
    print(f"warm-up (a one-iteration registration per backend, untimed below): "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

    times = {}
    for name, (pair, fu, fg) in pairs.items():
        mmask = segment_lungs(np.asarray(fu), fg.spacing).mask
        for backend in backends:
            run = functools.partial(register, hu, np.asarray(fu, np.float32), mask=lung,
                                    moving_mask=mmask, fixed_geometry=g, moving_geometry=fg,
                                    backend=backend, return_info=True,
                                    **{"threads": args.threads, **options[backend]})
            (u, info), seconds, peak = measure(run)
            times[(name, backend)] = seconds
            e = truth_errors(u, g.spacing, pair.displacement, pair.log_jacobian, lung,
                             pair.region if pair.region.any() else None)  # fmt: skip
            lj = log_jacobian(u, g.spacing)[lung]
            a = info["initial_alignment"]
            region = (f", region {e['region_logjac']:+.3f} vs truth "
                      f"{e['region_logjac_truth']:+.3f} (error {e['region_logjac_error']:+.3f})"
                      if "region_logjac" in e else "")  # fmt: skip
            print(f"{name} [{backend}]: {seconds:.1f} s (alignment {a['seconds']:.2f} s, "
                  f"{a['rotation_deg']:.1f} deg), mean error {e['mean_error_mm']:.3f} mm, p95 "
                  f"{e['p95_error_mm']:.3f} mm, |logjac error| {e['logjac_mae']:.4f}{region}, "
                  f"folded {e['folded_voxels']}, logjac mean {lj.mean():+.4f}, p95 |logjac| "
                  f"{np.percentile(np.abs(lj), 95):.4f}, p99 {np.percentile(np.abs(lj), 99):.4f}"
                  f", mean |u| {np.sqrt((u ** 2).sum(0))[lung].mean():.3f} mm, peak memory "
                  f"+{peak:.0f} MiB", flush=True)  # fmt: skip
            if a["seconds"] and seconds:
                print(f"  initial alignment: {a['seconds'] / seconds:.1%} of the registration "
                      f"(the follow-up's resampling onto the baseline grid and the common blur "
                      f"after it: {info['resample_seconds'] / seconds:.1%})")  # fmt: skip
    if "planted" in pairs and not args.no_baseline:
        pair, fu, _ = pairs["planted"]
        u, base, peak = measure(lambda: demons_baseline(hu, fu, g.spacing))
        e = truth_errors(u, g.spacing, pair.displacement, pair.log_jacobian, lung, pair.region)
        print(f"planted [SimpleITK demons]: {base:.1f} s, mean error {e['mean_error_mm']:.3f} mm,"
              f" p95 {e['p95_error_mm']:.3f} mm, |logjac error| {e['logjac_mae']:.4f}, region "
              f"{e['region_logjac']:+.3f} vs truth {e['region_logjac_truth']:+.3f}, folded "
              f"{e['folded_voxels']}, peak memory +{peak:.0f} MiB")  # fmt: skip
        print("targets: planted pairs mean <= 0.3 mm, p95 <= 0.8 mm, |logjac error| <= 0.02, "
              "region within 0.02, folded 0; rigid |mean logjac| <= 0.005, p95 |logjac| <= "
              "0.02; identity mean |u| < 0.05 mm, p99 |logjac| < 0.01 (noise: < 0.02); "
              "ratio <= 0.33, alignment <= 10%")  # fmt: skip
        ours = times.get(("planted", backends[0]))
        if ours is not None:
            print(f"registration {hu.shape[0]}x{hu.shape[1]}x{hu.shape[2]} at {args.spacing:g} "
                  f"mm, real CT: sscflow {backends[0]} {ours:.1f} s, SimpleITK demons "
                  f"{base:.1f} s, ratio {ours / base:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
