"""Every GPU figure of issue 23 in one run: registration, cohort throughput, classifier, store.

On a machine with CUDA (about 5 minutes on one H200 with 16 cores), at 1 mm on the real CT
``../shared/data/lung1_image.nrrd``:

1. registration: ``benchmarks/registration.py``'s "planted, moved" pair (a planted shrinkage,
   the patient rotated and moved, another grid and direction), ``register`` with the torch
   backend: the first call (the process's warm-up), then timed calls split into the initial
   alignment, the follow-up's resampling and blur, and the optimisation (the rest); the same
   pair with the resampling on the host (SimpleITK, the path before issue 23) for comparison;
   accuracy against the planted truth;
2. the GPU's busy share during one registration: the union of the CUDA kernels' and copies'
   times over the wall time (``torch.profiler``, no extra package), and ``nvidia-smi``'s
   utilisation sampled every 50 ms when the command exists;
3. a cohort through ``sscflow run`` (every stage, from NRRD files to the report; a subprocess
   with the machine's default cluster): ``--cohort`` patients, each the real CT and the planted,
   moved follow-up (an NRRD on its acquisition grid); pairs per hour of wall time, cluster
   start and cohort stages included;
4. the classifier's streamed / in-memory ratio (``benchmarks/classifier.py``, a subprocess);
5. the store per patient from that run: bytes on disk per baseline voxel, and 10,000 patients.

Without CUDA it runs the same code at 2 mm (``--spacing``), with a smaller cohort and
classifier (``--reduced``), on the CPU; the torch path of ``register`` is then forced onto the
CPU device (``resample_on_device=True``) so that it is exercised.

The output goes to stdout and, when the environment variable OUT names a folder, to
``$OUT/gpu.txt``. Nothing is downloaded. The last line is the key ratio: the 1 mm pair's time
with everything on the device over the time with the resampling on the host.

    python benchmarks/gpu.py [--spacing 1] [--cohort 6] [--repeats 2] [--reduced]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/registration.py

TARGET_PAIR_S = 3.0


class Report:
    """Prints to stdout and appends to ``$OUT/gpu.txt`` when OUT is set."""

    def __init__(self):
        out = os.environ.get("OUT")
        self.file = None
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(out) / "gpu.txt", "w", encoding="utf-8")  # noqa: SIM115

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            if self.file is not None:
                self.file.write(line + "\n")
                self.file.flush()


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


class SmiSampler:
    """``nvidia-smi``'s GPU utilisation (%) every 50 ms in a background process, when the
    command exists (None otherwise)."""

    def __init__(self):
        self.values: list[float] = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", visible,
             "-lms", "50"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.values.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return statistics.mean(self.values) / 100.0 if self.values else None


def kernel_share(run, cuda: bool) -> float | None:
    """The union of the CUDA kernels' and copies' time over the wall time of ``run()``, by
    ``torch.profiler`` (None without CUDA)."""
    if not cuda:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _sync(cuda)
        t0 = time.perf_counter()
        run()
        _sync(cuda)
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)  # fmt: skip
    busy, end = 0.0, None
    for a, b in spans:  # the union of intervals (us)
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e6 / wall


def registration_section(say, spacing: float, repeats: int, cuda: bool) -> dict:
    """Section 1 and 2: the real-CT pair; returns its figures and the pair (for the cohort)."""
    import torch
    from registration import DATA, make_pairs

    from sscflow.config import RegistrationConfig
    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian, truth_errors
    from sscflow.methods.segment import segment_lungs

    t = time.perf_counter()
    hu, g, lung, pairs = make_pairs(spacing, ["planted, moved"])
    pair, fu, fg = pairs["planted, moved"]
    fu = np.asarray(fu, np.float32)
    mmask = segment_lungs(fu, fg.spacing).mask
    say(f"real CT {DATA.name} at {spacing:g} mm: baseline {hu.shape}, follow-up {fu.shape} "
        f"(rotated 15 deg, moved, another grid); made in {time.perf_counter() - t:.0f} s")
    opts = RegistrationConfig(backend="torch").options("torch")
    device = "cuda" if cuda else "cpu"
    opts["device"] = device

    def once(on_device):
        _sync(cuda)
        t0 = time.perf_counter()
        u, info = register(hu, fu, mask=lung, moving_mask=mmask, fixed_geometry=g,
                           moving_geometry=fg, backend="torch", return_info=True,
                           resample_on_device=on_device, **opts)  # fmt: skip
        _sync(cuda)
        return u, info, time.perf_counter() - t0

    # on CUDA the default (None) is the device path; on CPU it is forced, to exercise it
    on_device = None if cuda else True
    _, info, cold = once(on_device)
    say(f"first registration (this process's warm-up {info['warm_up_seconds']:.1f} s "
        f"included): {cold:.1f} s, device {info['device']}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    smi = SmiSampler() if cuda else None
    for _ in range(repeats):
        u, info, seconds = once(on_device)
        runs.append((seconds, info))
    smi_share = smi.stop() if smi is not None else None
    peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if cuda else "")  # fmt: skip
    seconds, info = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    align = info["initial_alignment"]["seconds"]
    resample = info["resample_seconds"]
    optimise = seconds - align - resample - info["warm_up_seconds"]
    e = truth_errors(u, g.spacing, pair.displacement, pair.log_jacobian, lung, pair.region)
    lj = log_jacobian(u, g.spacing)[lung]
    say(f"registration, {spacing:g} mm real CT on {info['device']}: "
        f"{', '.join(f'{s:.2f}' for s, _ in runs)} s (median {seconds:.2f} s): alignment "
        f"{align:.2f} s ({align / seconds:.0%}), resampling and blur {resample:.2f} s "
        f"({resample / seconds:.0%}), optimisation and composition {optimise:.2f} s "
        f"({optimise / seconds:.0%}){peak}",
        f"  accuracy: mean error {e['mean_error_mm']:.3f} mm, p95 {e['p95_error_mm']:.3f} mm, "
        f"region {e['region_logjac']:+.3f} vs truth {e['region_logjac_truth']:+.3f} (error "
        f"{e['region_logjac_error']:+.3f}), folded {e['folded_voxels']}, p99 |logjac| "
        f"{np.percentile(np.abs(lj), 99):.4f}")  # fmt: skip
    share = kernel_share(lambda: once(on_device), cuda)
    if cuda:
        say(f"GPU busy during a registration: kernels and copies {share:.0%} of the wall time "
            f"(torch.profiler)" + (f"; nvidia-smi utilisation {smi_share:.0%} (mean of "
                                   f"{len(smi.values)} samples)" if smi_share is not None
                                   else "; nvidia-smi not found"))  # fmt: skip
    else:
        say("no CUDA device: GPU busy share not measured")
    _, info_host, host = once(False)
    say(f"same pair, resampling and blur on the host (SimpleITK, scipy): {host:.2f} s "
        f"(resampling and blur {info_host['resample_seconds']:.2f} s)")
    return {"seconds": seconds, "host": host, "pair": pair, "device": info["device"]}


def cohort_section(say, pair, spacing: float, patients: int, reduced: bool, cuda: bool,
                   workdir: Path) -> Path | None:  # fmt: skip
    """Section 3: ``sscflow run`` of ``patients`` pairs; returns the store (None on failure)."""
    import SimpleITK as sitk
    import yaml
    from registration import DATA

    from sscflow.core.geometry import to_itk

    folder = workdir / "cohort"
    folder.mkdir(parents=True, exist_ok=True)
    follow = folder / "followup.nrrd"
    image = to_itk(np.rint(pair.followup).astype(np.int16), pair.followup_geometry)
    sitk.WriteImage(image, str(follow), useCompression=True)
    rows = [f"P{i:03d},{DATA},{follow.name}" for i in range(patients)]
    (folder / "manifest.csv").write_text("patient_id,baseline,followup\n" + "\n".join(rows) + "\n",
        encoding="utf-8")
    cores = len(os.sched_getaffinity(0))
    cluster = {"n_workers": 1 if reduced else max(1, cores // 2),
               "threads_per_worker": 2, "dashboard_address": ":0"}
    config = {"manifest": "manifest.csv", "store": "cohort.zarr", "results": "results",
              "cluster": cluster, "ingest": {"spacing_mm": spacing}}  # fmt: skip
    if reduced:
        small = {"torch": {"levels_mm": [4.0 * spacing, 2.0 * spacing], "iterations": [10, 5],
                           "affine_iterations": [20, 10]}}  # fmt: skip
        config["registration"] = small
        config["template"] = {"registration": small}
    (folder / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    say(f"cohort: {patients} patients (the real CT and its planted, moved follow-up), "
        f"{spacing:g} mm, cluster {cluster['n_workers']} CPU workers x "
        f"{cluster['threads_per_worker']} threads (+ the GPU workers the machine's defaults "
        f"start), {cores} cores")  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sscflow.cli", "run", str(folder / "run.yaml")],
                         capture_output=True, text=True, cwd=folder, timeout=1500,
                         env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    wall = time.perf_counter() - t0
    tail = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()][-12:]
    say(*[f"  | {line}" for line in tail])
    if res.returncode != 0:
        say(f"sscflow run failed (exit {res.returncode}) after {wall:.0f} s")
        return None
    say(f"cohort through every stage (sscflow run, NRRD to report): {patients} pairs in "
        f"{wall:.0f} s: {patients / wall * 3600:.0f} pairs per hour (target >= 600)")
    return folder / "cohort.zarr"


def classifier_section(say, reduced: bool) -> float | None:
    """Section 4: ``benchmarks/classifier.py`` in a subprocess; its streamed / in-memory ratio."""
    args = ["--patients", "8", "--size", "32", "--epochs", "1"] if reduced else []
    res = subprocess.run([sys.executable, str(HERE / "classifier.py"), *args],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    text = res.stdout + res.stderr
    say(*[f"  | {line}" for line in text.splitlines() if line.strip()][-6:])
    m = re.search(r"ratio streamed / in memory ([0-9.]+)", text)
    if res.returncode != 0 or m is None:
        say(f"classifier benchmark failed (exit {res.returncode})")
        return None
    ratio = float(m.group(1))
    say(f"classifier streamed / in memory: {ratio:.2f} (target >= 0.9)")
    return ratio


def store_section(say, store: Path) -> float | None:
    """Section 5: bytes on disk per baseline voxel, per patient of the cohort's store."""
    from sscflow.core import store as st

    root = st.open_store(store)
    per_voxel, sizes = [], []
    patients = sorted(p.name for p in (store / st.PATIENTS).iterdir() if p.is_dir())
    for pid in patients:
        folder = store / st.PATIENTS / pid
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        voxels = int(np.prod(st.read_image(st.patient_group(root, pid, create=False),
                                           "baseline").geometry.shape))  # fmt: skip
        sizes.append(size)
        per_voxel.append(size / voxels)
    if not patients:
        return None
    b = statistics.mean(per_voxel)
    mb = statistics.mean(sizes) / 1e6
    say(f"store per patient: {mb:.1f} MB, {b:.2f} bytes per baseline voxel (target <= 4); "
        f"10,000 patients: {mb * 1e4 / 1e6:.2f} TB")
    return b


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=None, help="mm; 1 with CUDA, else 2")
    ap.add_argument("--cohort", type=int, default=None, help="pairs; 6 with CUDA, else 1")
    ap.add_argument("--repeats", type=int, default=2, help="timed registrations")
    ap.add_argument("--reduced", action="store_true", help="small cohort and classifier "
                    "settings (the default without CUDA)")  # fmt: skip
    ap.add_argument("--skip", default="", help="sections to skip: cohort,classifier")
    ap.add_argument("--workdir", default=None, help="kept when given (default: a temporary one)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    reduced = args.reduced or not cuda
    spacing = args.spacing or (1.0 if cuda else 2.0)
    patients = args.cohort or (6 if cuda else 1)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    say = Report()
    t_all = time.perf_counter()
    name = torch.cuda.get_device_name() if cuda else "no CUDA device: reduced form on the CPU"
    say(f"benchmarks/gpu.py: {name}; torch {torch.__version__}; "
        f"{len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d %H:%M')}")
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sscflow-bench-gpu-")
        workdir = Path(tmp.name)
    try:
        reg = registration_section(say, spacing, max(1, args.repeats), cuda)
        store = None
        if "cohort" not in skip:
            store = cohort_section(say, reg["pair"], spacing, patients, reduced, cuda, workdir)
        if "classifier" not in skip:
            classifier_section(say, reduced)
        if store is not None:
            store_section(say, store)
        say(f"total {time.perf_counter() - t_all:.0f} s")
        ratio = reg["seconds"] / reg["host"]
        say(f"registration {spacing:g} mm real CT on {reg['device']}: {reg['seconds']:.2f} s "
            f"(target {TARGET_PAIR_S:g} s on one GPU), resampling on the host "
            f"{reg['host']:.2f} s, ratio device path / host path {ratio:.2f}")  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
