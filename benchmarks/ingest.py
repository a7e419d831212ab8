"""Ingest throughput against a plain SimpleITK read + resample + numpy save, and compression.

Makes a synthetic cohort (not timed), then in this one process:
  baseline: for every scan, SimpleITK read -> resample to the canonical grid -> np.save
  sscflow:  ingest_cohort (read, resample, lung mask, hashing, Zarr v3 + Blosc-zstd), serially,
            and on a 2-worker LocalCluster
Prints MB/s of input (file bytes, and decoded int16 voxels), the store's compression ratio
against raw int16, and the time ratio sscflow / baseline last.

    python benchmarks/ingest.py [--patients 6] [--spacing 1.25] [--ingest-spacing 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def baseline_ingest(manifest, out: Path, spacing: float) -> None:
    """What users script today: read, resample to an isotropic identity grid, save."""
    from sscflow.methods.ingest import canonical_grid

    out.mkdir(parents=True, exist_ok=True)
    for p in manifest.patients:
        for which in ("baseline", "followup"):
            path, uid = p.scan(which)
            if path.is_dir():
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(str(path))
            g = canonical_grid(image, spacing)
            ref = sitk.Image([int(v) for v in g.shape[::-1]], sitk.sitkUInt8)
            ref.SetSpacing(g.spacing[::-1])
            ref.SetOrigin(g.origin[::-1])
            res = sitk.Resample(
                sitk.Cast(image, sitk.sitkFloat32),
                ref,
                sitk.Transform(),
                sitk.sitkLinear,
                -1024.0,
                sitk.sitkFloat32,
            )
            arr = np.clip(np.rint(sitk.GetArrayFromImage(res)), -1024, 3071).astype(np.int16)
            np.save(out / f"{p.patient_id}_{which}.npy", arr)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--spacing", type=float, default=1.25, help="synthetic scan spacing, mm")
    ap.add_argument("--ingest-spacing", type=float, default=1.0, help="canonical grid, mm")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from sscflow.cohort import read_manifest
    from sscflow.config import ClusterConfig, IngestConfig, SegmentConfig
    from sscflow.core import store as st
    from sscflow.flow.cluster import dask_client
    from sscflow.methods.ingest import ingest_cohort
    from sscflow.synth import synthesize_cohort

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core each, like one worker
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        manifest = read_manifest(
            synthesize_cohort(args.patients, tmp / "cohort", spacing=args.spacing, seed=7)
        )
        print(
            f"synthetic cohort: {args.patients} patients at {args.spacing} mm "
            f"({time.perf_counter() - t:.1f} s, not timed below)"
        )
        input_bytes = sum(
            dir_bytes(p) if p.is_dir() else p.stat().st_size
            for q in manifest.patients
            for p in (q.baseline, q.followup)
        )
        ingest = IngestConfig(spacing_mm=args.ingest_spacing)

        base_t, ss_t = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            baseline_ingest(manifest, tmp / f"npy{r}", args.ingest_spacing)
            base_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            res = ingest_cohort(manifest, str(tmp / f"s{r}.zarr"), ingest, SegmentConfig())
            ss_t.append(time.perf_counter() - t)
            assert all(x.status == "done" for x in res), [x.message for x in res]
        with dask_client(ClusterConfig(n_workers=2, dashboard_address=":0")) as client:
            t = time.perf_counter()
            ingest_cohort(
                manifest, str(tmp / "cluster.zarr"), ingest, SegmentConfig(), client=client
            )
            cluster_t = time.perf_counter() - t

        root = st.open_store(tmp / "s0.zarr", mode="r")
        raw = stored = 0
        for pid in st.patient_ids(root):
            for which in ("baseline", "followup"):
                arr = root[f"patients/{pid}/{which}/0"]
                raw += int(np.prod(arr.shape)) * 2
                stored += dir_bytes(tmp / "s0.zarr" / "patients" / pid / which / "0")
        voxel_mb = raw / 1e6
        b, s = statistics.median(base_t), statistics.median(ss_t)
        mb = input_bytes / 1e6
        print(
            f"input: {mb:.1f} MB of files ({voxel_mb:.1f} MB as int16 on the "
            f"{args.ingest_spacing} mm grid)"
        )
        print(
            f"baseline SimpleITK read+resample+np.save: {b:.2f} s, {mb / b:.1f} MB/s "
            f"({voxel_mb / b:.1f} MB/s of voxels)"
        )
        print(
            f"sscflow ingest, 1 process (incl. lung masks, hashing, zstd): {s:.2f} s, "
            f"{mb / s:.1f} MB/s ({voxel_mb / s:.1f} MB/s of voxels)"
        )
        print(
            f"sscflow ingest, LocalCluster 2 workers: {cluster_t:.2f} s, {mb / cluster_t:.1f} MB/s"
        )
        print(f"store compression ratio (raw int16 / stored, CT volumes): {raw / stored:.2f}")
        print(
            f"ingest time ratio sscflow/baseline: 1 process {s / b:.2f}, "
            f"2 workers {cluster_t / b:.2f}"
        )


if __name__ == "__main__":
    main()
