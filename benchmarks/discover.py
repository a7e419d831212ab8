"""Header indexing speed of ``sscflow discover`` against a plain single-process pydicom loop.

Generates a DICOM export of small files (not timed): patients with two studies each, four
series per study (localizer, thick soft, thin lung, thin soft), 16x16-pixel CT slices with full
headers. Then, in this one process, over the same files:
  baseline: for every file, pydicom.dcmread(path, stop_before_pixels=True), one process
  sscflow:  discover() on a LocalCluster (--workers worker processes): listing, headers in
            Dask tasks, every series check, selection, pseudonyms and all outputs; and, for
            reference, discover's header reader alone in this process
Each is timed --repeats times, alternating (the best of each kept). Prints files per second for
each (the cluster's start-up is reported, not counted) and the ratio sscflow / baseline last.

    python benchmarks/discover.py [--files 20000] [--workers 2] [--slices 50] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_export(root: Path, n_files: int, slices: int) -> int:
    """Write whole patients, at least ``n_files`` files; returns how many were written."""
    from sscflow.core.imageio import deterministic_uid
    from sscflow.discover.synthetic import stack_positions, write_slices

    px = np.full((16, 16), -800, np.int16)
    layout = [
        ("loc", 1, 1.0, "B30f", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        ("thick", max(2, slices // 5), 5.0, "B30f", None),
        ("lung", slices, 1.0, "B60f", None),
        ("soft", slices, 1.0, "B30f", None),
    ]
    per_patient = 2 * sum(n for _, n, _, _, _ in layout)
    patients = -(-n_files // per_patient)  # whole patients: at least n_files files
    for p in range(1, patients + 1):
        pid = f"BENCH{p:06d}"
        for s, date in enumerate(("20190115", "20210620")):
            study = deterministic_uid("bench", pid, s)
            for name, n, spacing, kernel, image_type in layout:
                header = {
                    "PatientID": pid,
                    "PatientName": f"Bench^{p}",
                    "StudyDate": date,
                    "PatientBirthDate": "19600101",
                    "PatientSex": "F",
                    "ConvolutionKernel": kernel,
                    "SliceThickness": f"{spacing:g}",
                    "SeriesDescription": f"Thorax {name}",
                    "AccessionNumber": f"A{p}{s}",
                }
                if image_type:
                    header["ImageType"] = image_type
                uid = deterministic_uid("bench", pid, s, name)
                write_slices(
                    root / pid / f"study{s}",
                    [px] * n,
                    stack_positions(n, spacing),
                    header=header,
                    series_uid=uid,
                    study_uid=study,
                )
    return patients * per_patient


def pydicom_loop(files) -> float:
    import pydicom

    t0 = time.perf_counter()
    for f in files:
        pydicom.dcmread(f, stop_before_pixels=True)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000, help="files in the generated export")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--slices", type=int, default=50, help="slices per thin series")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (best kept)")
    args = ap.parse_args(argv)

    from sscflow.config import ClusterConfig
    from sscflow.discover.headers import iter_files, read_headers
    from sscflow.discover.run import discover
    from sscflow.discover.settings import DiscoverConfig
    from sscflow.flow.cluster import dask_client

    with tempfile.TemporaryDirectory(prefix="sscflow-discover-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        n = make_export(tmp / "export", args.files, args.slices)
        print(f"generated {n} files in {time.perf_counter() - t0:.1f} s (not timed)", flush=True)
        files = list(iter_files(tmp / "export"))
        pydicom_loop(files[:200])  # warm the imports
        cfg = DiscoverConfig(min_extent_mm=float(args.slices - 1) * 0.9, require_pft=False)
        t0 = time.perf_counter()
        with dask_client(
            ClusterConfig(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0")
        ) as client:
            startup = time.perf_counter() - t0
            client.run(lambda: __import__("pydicom"))
            ours, base = [], []
            for k in range(args.repeats):  # alternate, so both see the same machine load
                base.append(pydicom_loop(files))
                t1 = time.perf_counter()
                res = discover(
                    tmp / "export",
                    tmp / f"cohort{k}",
                    key=tmp / "bench.key",
                    cfg=cfg,
                    client=client,
                )
                ours.append(time.perf_counter() - t1)
                print(
                    f"run {k + 1}: pydicom loop {base[-1]:.1f} s, discover {ours[-1]:.1f} s",
                    flush=True,
                )
        ours, base = min(ours), min(base)  # best of the repeats, each
        t1 = time.perf_counter()
        read_headers(files)  # discover's reader alone, in this one process: no Dask
        serial = time.perf_counter() - t1
        assert res.files["dicom"] == n and res.n_included == res.n_patients, res
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items())
        print(f"discover steps: {steps}")
        print(f"cluster start-up: {startup:.1f} s ({args.workers} workers, not counted)")
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"machine: {os.cpu_count()} cores, load average {load} (other work shares them)")
        print(
            f"discover ({args.workers} workers, every step and output): {ours:.1f} s, "
            f"{n / ours:,.0f} files/s; {res.n_series} series, {res.n_included} patients"
        )
        print(
            f"pydicom loop (1 process, stop_before_pixels): {base:.1f} s, {n / base:,.0f} files/s"
        )
        print(
            f"discover's header reader alone (1 process, no Dask): {serial:.1f} s, "
            f"{n / serial:,.0f} files/s"
        )
        print(
            f"projection, 100,000 files at these rates: discover {100000 / (n / ours) / 60:.1f} "
            f"min, pydicom loop {100000 / (n / base) / 60:.1f} min"
            + (" (measured, not projected)" if n >= 100000 else "")
        )
        print(
            f"discover {n} files: {n / ours:,.0f} files/s vs pydicom loop {n / base:,.0f} "
            f"files/s, ratio {(n / ours) / (n / base):.2f}"
        )


if __name__ == "__main__":
    main()
