"""Classifier training throughput: maps streamed from the Zarr store vs the same tensors in memory.

Writes a synthetic store (``--patients`` maps of ``--size``^3 float32 in a template lung mask,
Blosc-zstd chunks as the pipeline stores them) in a temporary folder, then trains the same model
(``ClassifierConfig`` defaults: channels 8, 16, 32) with the same batch size, in one process:

  streamed:  as ``train`` does: every map read once from the store (MapDataset, ``--workers``
             loader processes), masked and shrunk to the classifier's resolution, written to
             the on-disk cache (timed apart: "preparation"); the epochs read that cache
             (CachedDataset + make_loader): held in RAM when it fits (hold_in_ram), else
             streamed by ``--workers`` prefetching processes
  in memory: a TensorDataset of the same items, already loaded (not timed), no workers

One warm-up epoch each, then ``--epochs`` timed epochs alternating streamed / in memory; the
throughput is patients / median epoch time. Also printed: the ratio for a whole training of
the default 30 epochs with the preparation counted. With CUDA, one in-memory epoch on GPU vs
CPU and a streamed epoch on GPU are timed too. Prints the ratio streamed / in memory last
(target >= 0.9).

    python benchmarks/classifier.py [--patients 64] [--size 96] [--workers N] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sscflow.config import ClassifierConfig
from sscflow.core import store as st
from sscflow.core.geometry import Geometry


def make_store(path: Path, patients: int, size: int) -> list[int]:
    """A store with a template lung mask and ``patients`` maps; returns the 0/1 labels."""
    root = st.open_store(path)
    shape = (size,) * 3
    geometry = Geometry(shape, (2.0,) * 3, (0.0,) * 3)
    c = np.meshgrid(*[(np.arange(size) - (size - 1) / 2) / (size / 2) for _ in range(3)],
                    indexing="ij")  # fmt: skip
    mask = ((c[0] / 0.95) ** 2 + (c[1] / 0.8) ** 2 + (c[2] / 0.9) ** 2 <= 1).astype(np.uint8)
    blob = (c[0] - 0.5) ** 2 + (c[1] - 0.4) ** 2 + (c[2] + 0.4) ** 2 <= 0.2**2
    st.write_image(root.require_group("template"), "lung_mask", mask, geometry, stage="bench",
                   params={}, input_hash="bench")  # fmt: skip
    rng = np.random.default_rng(0)
    labels = []
    for i in range(patients):
        m = rng.normal(0, 0.05, shape).astype(np.float32)
        labels.append(i % 2)
        if labels[-1]:
            m[blob] -= 0.3
        st.write_image(st.patient_group(root, f"P{i:03d}"), "log_jacobian_template", m,
                       geometry, stage="bench", params={}, input_hash="bench")  # fmt: skip
    return labels


def main(argv=None):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from sscflow.methods.classify import MapDataset, build_model, make_loader
    from sscflow.methods.classify.data import CachedDataset, hold_in_ram, write_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=64)
    # 96^3: smaller than any real template grid (the 2.5 mm demo's is 120 x 112 x 144); at 48^3
    # an in-memory epoch is so cheap (~0.5 ms a volume) that the loader's fixed costs dominate
    ap.add_argument("--size", type=int, default=96)
    # loader processes: the config's default (2), but one core left to the training threads
    ap.add_argument("--workers", type=int,
                    default=max(1, min(ClassifierConfig().loader_workers,
                                       (os.cpu_count() or 2) - 1)))  # fmt: skip
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    config = ClassifierConfig(batch_size=args.batch_size, loader_workers=args.workers)

    with tempfile.TemporaryDirectory(prefix="sscflow-bench-clf-") as tmp:
        path = Path(tmp) / "cohort.zarr"
        t = time.perf_counter()
        labels = make_store(path, args.patients, args.size)
        ids = [f"P{i:03d}" for i in range(args.patients)]
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        mb = args.patients * args.size**3 * 4 / 2**20
        print(f"store: {args.patients} patients x {args.size}^3 float32 = {mb:.0f} MiB "
              f"({disk / 2**20:.0f} MiB on disk), written in {time.perf_counter() - t:.1f} s; "
              f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
              f"loader workers {args.workers}")  # fmt: skip

        source = MapDataset(path, ids, labels, shrink=config.input_shrink)
        shape = source.item_shape
        t = time.perf_counter()
        cache = write_cache(source, Path(tmp) / "items.npy", workers=args.workers,
                            batch_size=args.batch_size)  # fmt: skip
        prepare = time.perf_counter() - t
        print(f"preparation (as train does): every map read once from the store, masked, "
              f"shrunk x{config.input_shrink} to {shape}, written to the on-disk cache: "
              f"{prepare:.2f} s")  # fmt: skip
        dataset = hold_in_ram({"all": CachedDataset(cache, range(len(ids)), labels)})["all"]
        held = "held in RAM" if dataset.memory is not None else "streamed from the cache file"
        print(f"items {held} (as train does)")
        streamed = make_loader(dataset, args.batch_size, True, 0, args.workers)
        x_all = torch.stack([source[i][0] for i in range(len(ids))])
        y_all = torch.tensor(labels, dtype=torch.int64)
        in_memory = DataLoader(TensorDataset(x_all, y_all), batch_size=args.batch_size,
                               shuffle=True,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip

        def run_epoch(model, optimiser, loader, device="cpu") -> float:
            model.train()
            t0 = time.perf_counter()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimiser.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimiser.step()
            if device != "cpu":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def fresh(device="cpu"):
            torch.manual_seed(0)
            model = build_model(config, shape).to(device)
            return model, torch.optim.Adam(model.parameters(), lr=config.learning_rate)

        runs = {"streamed": (fresh(), streamed), "in memory": (fresh(), in_memory)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for name, (mo, loader) in runs.items():
            w = run_epoch(*mo, loader)
            print(f"warm-up epoch {name}: {w:.2f} s")
        for _ in range(args.epochs):
            for name, (mo, loader) in runs.items():
                times[name].append(run_epoch(*mo, loader))
        rate = {}
        for name in runs:
            med = statistics.median(times[name])
            rate[name] = args.patients / med
            print(f"{name}: {rate[name]:.1f} volumes/s (median epoch {med:.2f} s, epochs "
                  f"{', '.join(f'{s:.2f}' for s in times[name])} s)")  # fmt: skip

        if torch.cuda.is_available():
            gpu = fresh("cuda")
            run_epoch(*gpu, in_memory, "cuda")  # warm-up: context, kernels
            g = run_epoch(*gpu, in_memory, "cuda")
            c = statistics.median(times["in memory"])
            print(f"one in-memory epoch: GPU ({torch.cuda.get_device_name()}) {g:.3f} s, "
                  f"CPU {c:.3f} s, GPU / CPU {g / c:.3f}")  # fmt: skip
            # the stage's own path on a GPU worker: loader processes feed pinned batches
            to_gpu = make_loader(dataset, args.batch_size, True, 0, args.workers,
                                 pin_memory=True)  # fmt: skip
            run_epoch(*gpu, to_gpu, "cuda")
            gs = statistics.median(run_epoch(*gpu, to_gpu, "cuda") for _ in range(args.epochs))
            print(f"GPU epoch streamed from Zarr: {gs:.3f} s ({args.patients / gs:.1f} "
                  f"volumes/s), streamed / in memory on GPU {g / gs:.2f}")  # fmt: skip
            del to_gpu
        else:
            print("no CUDA device: GPU epoch not timed")
        del streamed
        ratio = rate["streamed"] / rate["in memory"]
        n = config.epochs
        whole = (n * args.patients / rate["in memory"]) / (prepare + n * args.patients
                                                          / rate["streamed"])  # fmt: skip
        print(f"a whole training of {n} epochs, preparation included: streamed / in memory "
              f"{whole:.2f}")  # fmt: skip
        print(f"training throughput {args.patients} x {args.size}^3: streamed "
              f"{rate['streamed']:.1f} volumes/s, in memory {rate['in memory']:.1f} volumes/s, "
              f"ratio streamed / in memory {ratio:.2f} (target >= 0.9)")  # fmt: skip


if __name__ == "__main__":
    main()
