"""Log-Jacobian maps: sscflow against SimpleITK, and a field larger than memory, Zarr to Zarr.

Default (in memory, one process): a smooth random 3 x N^3 float32 field (N = 256), then
  baseline: SimpleITK DisplacementFieldJacobianDeterminant on the field as an ITK float32 vector
            image (made once, not timed), followed by np.log of the determinant
  sscflow:  sscflow.methods.jacobian.log_jacobian on the numpy field (numba kernel, all cores)
alternating runs, median of --repeats each. The first sscflow call (JIT compile or cache load) is
timed apart and excluded. Prints the largest difference to SimpleITK (float64 input), the
memory-bandwidth bound (bytes that must move / measured copy bandwidth), the dask blockwise path
for reference, and the time ratio sscflow / SimpleITK last.

--out-of-core: writes a smooth 3 x 768 x 512 x 512 float32 displacement (2.4 GB; --shape 1024 512
512 gives 3.2 GB) and a lung mask into a temporary store under /tmp, runs the stage
(log_jacobian_patient: Zarr -> Zarr, then the summary inside the mask) in a fresh child process,
checks a slab of the streamed map against the in-memory result, and prints the child's peak RSS
(resource.getrusage ru_maxrss); the store is deleted afterwards.

    python benchmarks/jacobian.py [--size 256] [--repeats 7]
    python benchmarks/jacobian.py --out-of-core [--shape 768 512 512] [--chunk 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = 6  # smooth random field: a sum of separable sine modes per component


def field_modes(seed: int, amplitude_mm: float):
    """Random (amplitude, frequencies, phases) of MODES separable modes per component."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(-1, 1, (3, MODES)) * amplitude_mm / np.sqrt(MODES)
    freq = rng.integers(1, 4, (3, MODES, 3))
    phase = rng.uniform(0, 2 * np.pi, (3, MODES, 3))
    return amp, freq, phase


def smooth_block(modes, shape, start=(0, 0, 0), stop=None) -> np.ndarray:
    """The field on voxels [start, stop) of a ``shape`` grid: (3, z, y, x) float32, mm."""
    amp, freq, phase = modes
    stop = stop or shape
    axes = [np.arange(a, b) / n for a, b, n in zip(start, stop, shape, strict=True)]
    out = np.zeros((3, *(b - a for a, b in zip(start, stop, strict=True))), np.float32)
    for k in range(3):
        for m in range(MODES):
            s = [np.sin(2 * np.pi * freq[k, m, a] * axes[a] + phase[k, m, a]).astype(np.float32)
                 for a in range(3)]
            out[k] += np.float32(amp[k, m]) * (s[0][:, None, None] * s[1][None, :, None]
                                                * s[2][None, None, :])
    return out


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by np.copyto on a large array, best of ``repeats``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def in_memory(size: int, repeats: int) -> None:
    import SimpleITK as sitk

    from sscflow.core.geometry import Geometry, to_itk
    from sscflow.methods.jacobian import log_jacobian

    spacing = (1.0, 1.0, 1.0)
    shape = (size,) * 3
    u = smooth_block(field_modes(0, 6.0 * size / 256), shape)  # gradients as at 256^3
    itk_field = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(u[::-1], 0, -1)),
                                       isVector=True)  # float32 vectors, as sscflow's input
    itk_field.SetSpacing(spacing[::-1])

    def run_sitk():
        det = sitk.DisplacementFieldJacobianDeterminant(itk_field)
        return np.log(sitk.GetArrayViewFromImage(det))

    first = _timed(lambda: log_jacobian(u, spacing))
    t_ours, t_itk = [], []
    for _ in range(repeats):  # alternating, so background load hits both alike
        t_ours.append(_timed(lambda: log_jacobian(u, spacing)))
        t_itk.append(_timed(run_sitk))
    ours, itk = statistics.median(t_ours), statistics.median(t_itk)

    out = log_jacobian(u, spacing)
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(
        to_itk(u, Geometry(shape, spacing, (0.0, 0.0, 0.0)))))
    if det.min() <= 0:
        raise SystemExit("the benchmark field folds; lower its amplitude")
    diff = float(np.abs(out - np.log(det)).max())
    diff32 = float(np.abs(out - run_sitk()).max())

    import dask.array as da

    lazy = log_jacobian(da.from_array(u, chunks=(3, 64, 64, 64)), spacing)
    lazy.compute(scheduler="threads")  # warm (the serial kernel's first call)
    t_dask = statistics.median(_timed(lambda: lazy.compute(scheduler="threads"))
                               for _ in range(3))

    nbytes = u.nbytes + out.nbytes  # read the field once, write the map once
    bandwidth = copy_bandwidth()
    bound = nbytes / bandwidth
    n = f"{size}^3"
    print(f"field 3 x {n} float32 ({u.nbytes / 1e6:.0f} MB), log_jacobian range "
          f"[{out.min():.3f}, {out.max():.3f}]")
    print(f"first sscflow call (numba JIT compile or cache load, excluded): {first:.2f} s")
    print(f"max |sscflow - log(SimpleITK)|: {diff:.2e} (float64 ITK input), "
          f"{diff32:.2e} (float32 ITK input, as timed)")
    print(f"memory-bandwidth bound: {nbytes / 1e6:.0f} MB to move / copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (np.copyto, read+write) = {bound:.3f} s; "
          f"sscflow at {ours / bound:.1f}x the bound")
    print(f"sscflow dask path (64^3 blocks, threads): {t_dask:.3f} s")
    print(f"runs: sscflow {', '.join(f'{t:.3f}' for t in t_ours)}; "
          f"SimpleITK {', '.join(f'{t:.3f}' for t in t_itk)}")
    print(f"log_jacobian {n}: sscflow {ours:.3f} s, SimpleITK {itk:.3f} s, ratio {ours / itk:.2f}")


def out_of_core(shape, chunk: int, keep: bool) -> None:
    import dask.array as da

    from sscflow.core import store as st
    from sscflow.core.geometry import Geometry

    tmp = Path(tempfile.mkdtemp(prefix="sscflow-jacobian-", dir="/tmp"))
    path = tmp / "cohort.zarr"
    try:
        geometry = Geometry(tuple(shape), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        modes = field_modes(1, 6.0)
        c = chunk

        def field(block_info=None):
            loc = block_info[None]["array-location"][1:]
            return smooth_block(modes, tuple(shape), [a for a, _ in loc], [b for _, b in loc])

        def lungs(block_info=None):
            loc = block_info[None]["array-location"]
            z, y, x = np.meshgrid(*[(np.arange(a, b) + 0.5) / n - 0.5
                                    for (a, b), n in zip(loc, shape, strict=True)],
                                  indexing="ij", sparse=True)
            return ((z / 0.45) ** 2 + (y / 0.35) ** 2 + (np.abs(x) - 0.2) ** 2 / 0.15**2
                    <= 1).astype(np.uint8)

        u = da.map_blocks(field, chunks=((3,), *[_chunks(n, c) for n in shape]),
                          dtype=np.float32)
        mask = da.map_blocks(lungs, chunks=tuple(_chunks(n, c) for n in shape), dtype=np.uint8)
        t = time.perf_counter()
        group = st.patient_group(st.open_store(path), "BIG")
        st.write_image(group, "lung_mask", mask, geometry, stage="segment", params={},
                       input_hash="synthetic", chunk=c)
        st.write_image(group, "displacement", u, geometry, stage="register", params={},
                       input_hash="synthetic", chunk=c)
        made = time.perf_counter() - t
        stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"input: 3 x {' x '.join(map(str, shape))} float32 ({u.nbytes / 1e9:.1f} GB, "
              f"{stored / 1e9:.2f} GB on disk) written in {made:.0f} s (not timed below)")

        code = ("import json, resource, sys, time\n"
                "from sscflow.config import JacobianConfig\n"
                "from sscflow.methods.jacobian import log_jacobian_patient\n"
                "t = time.perf_counter()\n"
                f"row = log_jacobian_patient({str(path)!r}, 'BIG', JacobianConfig(chunk={c}))\n"
                "row['wall_s'] = time.perf_counter() - t\n"
                "row['peak_rss_kb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "print(json.dumps(row))\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the stage failed:\n{proc.stderr}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        _check_slab(st, path, geometry)
        peak = row["peak_rss_kb"] * 1024
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"stage: {row['wall_s']:.1f} s, lung mask {row['voxels']} voxels, mean log_jac "
              f"{row['mean']:.4f}, median {row['median']:.4f}, folded {row['folded']}")
        print(f"this process (writing the input) peak RSS {own / 1e9:.2f} GB")
        print(f"out-of-core log_jacobian 3 x {' x '.join(map(str, shape))} float32 "
              f"({u.nbytes / 1e9:.1f} GB) Zarr -> Zarr, chunk {c}: peak RSS "
              f"{peak / 1e9:.2f} GB (limit 2 GB), {row['wall_s']:.0f} s")
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_slab(st, path, geometry) -> None:
    """The streamed map equals the in-memory result on a slab of slices (edges included)."""
    from sscflow.methods.jacobian import log_jacobian

    group = st.patient_group(st.open_store(path, "r"), "BIG", create=False)
    z0, z1 = 100, 140
    u = st.read_image(group, "displacement").array[:, z0 - 1 : z1 + 1]
    stored = st.read_image(group, "log_jacobian").array[z0:z1]
    expected = log_jacobian(u, geometry.spacing)[1:-1]
    diff = float(np.abs(stored - expected).max())
    print(f"streamed map vs in-memory on slices {z0}..{z1 - 1}: max |diff| {diff:.1e}")
    if diff > 0:
        raise SystemExit("the streamed map differs from the in-memory one")


def _chunks(n: int, c: int) -> tuple[int, ...]:
    return (c,) * (n // c) + ((n % c,) if n % c else ())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="in-memory field edge, voxels")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out-of-core", action="store_true", help="Zarr -> Zarr peak-memory run")
    ap.add_argument("--shape", type=int, nargs=3, default=[768, 512, 512])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the out-of-core store")
    args = ap.parse_args()
    if args.out_of_core:
        out_of_core(args.shape, args.chunk, args.keep)
    else:
        in_memory(args.size, args.repeats)


if __name__ == "__main__":
    main()
