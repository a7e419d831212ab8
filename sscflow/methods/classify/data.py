"""Labels and streamed inputs for the classifier.

Each item is read from the store when it is asked for (never the whole cohort at once): the
patient's ``log_jacobian_template`` times the template lung mask, non-finite values set to 0,
then averaged over blocks of ``input_shrink`` voxels (the classifier's resolution: log-Jacobian
maps are smooth at that scale). A :class:`MapDataset` holds the store's location, not an open
group; each process (the main one or a DataLoader worker) opens the store itself on first use.

Training reads every map once per epoch, so :func:`write_cache` first reads each map once from
the store and writes the items, at the classifier's resolution (``input_shrink**3`` times
smaller than the maps), to an on-disk ``.npy`` file beside the model, and the epochs stream
from it through a memory map (:class:`CachedDataset`): one read per batch instead of a Zarr
read, decompression, masking and shrinking per item. It is never in memory whole either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from sscflow.core import store as st

MAP = "log_jacobian_template"
MASK = "lung_mask"

# target -> (cohort table column, label values counted as 1, label values counted as 0)
TARGETS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "functional": ("functional", ("worsening",), ("stable",)),
    "morphologic": ("visual", ("worsened",), ("stable", "improved")),  # as in the paper
}


def targets(table: pd.DataFrame, target: str) -> pd.Series:
    """0/1 labels of one target, indexed by patient_id (int64, named ``target``).

    Parameters
    ----------
    table : a :func:`sscflow.methods.groups.cohort_table` (columns ``patient_id``, ``functional``,
        ``visual``).
    target : "functional" (``functional`` worsening = 1, stable = 0) or "morphologic"
        (``visual`` worsened = 1, stable or improved = 0, as in the paper).

    Patients without a label for this target (None, NaN, "") are left out of it.

    >>> t = pd.DataFrame({"patient_id": ["a", "b", "c"],
    ...                   "functional": ["stable", None, "worsening"],
    ...                   "visual": ["improved", "worsened", None]})
    >>> targets(t, "morphologic").to_dict()
    {'a': 0, 'b': 1}
    >>> targets(t, "functional").to_dict()
    {'a': 0, 'c': 1}
    """
    if target not in TARGETS:
        raise ValueError(
            f"classifier target {target!r} is unknown; use one of {', '.join(TARGETS)}"
        )
    column, positive, negative = TARGETS[target]
    missing = [c for c in ("patient_id", column) if c not in table.columns]
    if missing:
        raise ValueError(
            f"classifier target {target!r}: the table lacks column(s) {', '.join(missing)}; "
            "pass a cohort_table()"
        )
    ids = [str(p) for p in table["patient_id"]]
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise ValueError(f"classifier: patient(s) {', '.join(dup)} appear more than once")
    out: dict[str, int] = {}
    for pid, value in zip(ids, table[column], strict=True):
        if _missing(value):
            continue
        if str(value) in positive:
            out[pid] = 1
        elif str(value) in negative:
            out[pid] = 0
        else:
            raise ValueError(
                f"patient {pid}: {column} label {value!r} is unknown for target {target!r} "
                f"(use {', '.join(positive + negative)} or leave it empty)"
            )
    return pd.Series(out, dtype="int64", name=target).rename_axis("patient_id")


def _missing(value) -> bool:
    if value is None or value is pd.NA or value == "":
        return True
    return isinstance(value, float) and math.isnan(value)


def store_location(store) -> str | zarr.Group:
    """What a dataset keeps to reopen ``store`` in any process: a path or URL string, or (for a
    non-local zarr group, which must then be picklable for worker processes) the group itself."""
    if isinstance(store, zarr.Group):
        if store.path not in ("", "/"):
            raise ValueError(
                f"classifier: pass the store's root group or its path, not the group {store.path!r}"
            )
        root = getattr(store.store, "root", None)
        return str(root) if root is not None else store
    return os.fspath(store) if not isinstance(store, str) else store


def open_root(location) -> zarr.Group:
    """The store's root group, read-only."""
    return location if isinstance(location, zarr.Group) else st.open_store(location, mode="r")


def template_image(root: zarr.Group) -> st.StoredImage:
    """The template lung mask image (array not read); IncompleteOutputError if absent."""
    return st.read_image(st.template_group(root), MASK)


def template_mask(root: zarr.Group) -> np.ndarray:
    """The template lung mask as a bool (Z, Y, X) array."""
    return np.asarray(template_image(root).array[...]) > 0


def map_array(root: zarr.Group, patient_id: str, shape) -> zarr.Array:
    """The patient's complete map as a zarr array (not read), checked against ``shape``."""
    group = st.patient_group(root, patient_id, create=False)
    arr = st.read_image(group, MAP).array
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"patient {patient_id}: {MAP} has shape {tuple(arr.shape)} but the template lung "
            f"mask {tuple(shape)}; rerun the template stage for this patient"
        )
    return arr


def masked(values, mask: np.ndarray) -> np.ndarray:
    """``values`` as float32, 0 outside ``mask`` and where not finite."""
    arr = np.asarray(values, dtype=np.float32)
    return np.where(mask & np.isfinite(arr), arr, np.float32(0)).astype(np.float32, copy=False)


class MapDataset(Dataset):
    """Masked template-space maps of ``patient_ids``, read from the store one item at a time.

    Parameters
    ----------
    store : the store's path or URL, or its root zarr group.
    patient_ids : the patients, in item order.
    labels : 0/1 per patient, aligned with ``patient_ids`` (a sequence), or a Series indexed by
        patient_id; None gives label -1 (prediction).
    shrink : items are averaged over blocks of ``shrink`` voxels (:func:`shrink_map`).

    Item ``i`` is ``(map, label)``: float32 tensor (1, Z, Y, X) of :attr:`item_shape` and an
    int64 scalar tensor.
    """

    def __init__(self, store, patient_ids: Sequence[str], labels=None, *, shrink: int = 1):
        self.location = store_location(store)
        self.shrink = int(shrink)
        if self.shrink < 1:
            raise ValueError(f"MapDataset: shrink must be >= 1, got {shrink}")
        self.patient_ids = [str(p) for p in patient_ids]
        if labels is None:
            self.labels = [-1] * len(self.patient_ids)
        elif isinstance(labels, pd.Series):
            absent = [p for p in self.patient_ids if p not in labels.index]
            if absent:
                raise ValueError(f"MapDataset: no label for patient(s) {', '.join(absent)}")
            self.labels = [int(labels.loc[p]) for p in self.patient_ids]
        else:
            self.labels = [int(v) for v in labels]
            if len(self.labels) != len(self.patient_ids):
                raise ValueError(
                    f"MapDataset: {len(self.labels)} labels for {len(self.patient_ids)} patients"
                )
        self._opened = None  # (pid of the process that opened it, root group, mask)
        self._arrays: dict = {}  # patient -> its checked zarr array, in the opening process

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_opened"] = None  # never ship an open store to another process
        state["_arrays"] = {}
        return state

    def _open(self) -> tuple[zarr.Group, np.ndarray]:
        if self._opened is None or self._opened[0] != os.getpid():  # new process (fork)
            root = open_root(self.location)
            self._opened = (os.getpid(), root, template_mask(root))
            self._arrays = {}
        return self._opened[1], self._opened[2]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of the template grid."""
        return tuple(int(s) for s in self._open()[1].shape)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of an item: the template grid shrunk by ``shrink`` (rounded up)."""
        return shrunk_shape(self.input_shape, self.shrink)

    def array(self, i: int) -> np.ndarray:
        """Item ``i``'s masked map at the template resolution, numpy float32 (Z, Y, X)."""
        root, mask = self._open()
        pid = self.patient_ids[i]
        if pid not in self._arrays:  # metadata read and checked once per patient and process
            self._arrays[pid] = map_array(root, pid, mask.shape)
        return masked(self._arrays[pid][...], mask)

    def __getitem__(self, i: int):
        x = shrink_map(torch.from_numpy(self.array(i)), self.shrink)
        return x[None], torch.tensor(self.labels[i], dtype=torch.int64)


def shrunk_shape(shape, shrink: int) -> tuple[int, int, int]:
    """``ceil(n / shrink)`` per axis.

    >>> shrunk_shape((20, 21, 1), 2)
    (10, 11, 1)
    """
    return tuple(-(-int(s) // int(shrink)) for s in shape)


def shrink_map(x: torch.Tensor, shrink: int) -> torch.Tensor:
    """Mean over blocks of ``shrink`` voxels of a (Z, Y, X) map; blocks cut by the border
    average the voxels they hold (torch's ``avg_pool3d`` with ``ceil_mode``).

    >>> shrink_map(torch.arange(27.0).reshape(3, 3, 3), 2)[..., 1].flatten().tolist()
    [8.0, 12.5, 21.5, 26.0]
    """
    if shrink == 1:
        return x
    return F.avg_pool3d(x[None, None], shrink, shrink, ceil_mode=True)[0, 0]


class CachedDataset(Dataset):
    """Items of a :func:`write_cache` file: ``(tensor (1, Z, Y, X), label)``, read through a
    memory map (the page cache, not this process, holds what was read); ``indices`` select and
    order the cached patients."""

    def __init__(self, path, indices: Sequence[int], labels: Sequence[int]):
        self.path = str(path)
        self.indices = [int(i) for i in indices]
        self.labels = [int(v) for v in labels]
        if len(self.labels) != len(self.indices):
            raise ValueError(f"CachedDataset: {len(self.labels)} labels for "
                             f"{len(self.indices)} items")  # fmt: skip
        self._array = None  # (pid of the process that opened it, memory map)
        self.memory: torch.Tensor | None = None  # the rows in RAM, after :meth:`load`

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    @property
    def nbytes(self) -> int:
        """Bytes of this dataset's rows (what :meth:`load` holds in RAM)."""
        rows = self._rows()
        return len(self.indices) * int(np.prod(rows.shape[1:])) * rows.dtype.itemsize

    def load(self) -> CachedDataset:
        """Read this dataset's rows into RAM once (one tensor, item order): its batches are
        then slices of that tensor, served in this process with no loader workers."""
        self.memory = torch.from_numpy(np.ascontiguousarray(self._rows()[self.indices]))
        return self

    def _rows(self) -> np.ndarray:
        if self._array is None or self._array[0] != os.getpid():
            self._array = (os.getpid(), np.load(self.path, mmap_mode="r"))
        return self._array[1]

    def __getitem__(self, i):
        """Item ``i`` as ``(x (1, Z, Y, X), label)``; for a list of items (what
        :func:`make_loader` asks for) the whole batch, ``(x (B, 1, Z, Y, X), labels (B,))``,
        from one read of the memory map."""
        if self.memory is not None:
            if isinstance(i, (list, tuple)):
                return (self.memory[list(i)][:, None],
                        torch.tensor([self.labels[k] for k in i], dtype=torch.int64))
            return self.memory[i][None], torch.tensor(self.labels[i], dtype=torch.int64)
        if isinstance(i, (list, tuple)):
            x = torch.from_numpy(self._rows()[[self.indices[k] for k in i]])
            return x[:, None], torch.tensor([self.labels[k] for k in i], dtype=torch.int64)
        x = torch.from_numpy(np.array(self._rows()[self.indices[i]]))
        return x[None], torch.tensor(self.labels[i], dtype=torch.int64)


def write_cache(dataset: MapDataset, path, *, workers: int = 0, batch_size: int = 8) -> str:
    """Write every item of ``dataset`` (in order) to a ``.npy`` file at ``path``, shape
    (N, Z, Y, X) float32 at the dataset's ``item_shape``, reading the store with ``workers``
    loader processes and writing through a memory map (never all in memory). Returns the path;
    item ``i`` is row ``i``."""
    shape = (len(dataset), *dataset.item_shape)
    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=shape)
    loader = make_loader(dataset, batch_size, False, 0, min(workers, len(dataset)))
    row = 0
    for x, _ in loader:
        out[row:row + len(x)] = x[:, 0].numpy()
        row += len(x)
    del loader
    out.flush()
    del out
    return str(path)


def memory_budget() -> int:
    """Bytes the classifier may hold in RAM for its items: a quarter of the Dask worker's memory
    limit when it runs in one, else a quarter of the memory available now."""
    limit = None
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        pass
    if not limit:
        import psutil

        limit = psutil.virtual_memory().available
    return int(limit) // 4


def hold_in_ram(datasets: dict[str, CachedDataset]) -> dict[str, CachedDataset]:
    """``datasets`` with every item read into RAM (:meth:`CachedDataset.load`) when twice their
    bytes fit in :func:`memory_budget` (the sets, then all items again for the predictions);
    unchanged, streamed from the memory-mapped cache by loader processes, otherwise."""
    if 2 * sum(d.nbytes for d in datasets.values()) <= memory_budget():
        return {k: d.load() for k, d in datasets.items()}
    return datasets


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, workers: int, *,
                pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """A DataLoader over ``dataset`` that prefetches with ``workers`` processes (0: in-process).

    The order depends only on ``seed`` and the epoch, not on ``workers``: shuffling uses its
    own generator (the loader's generator, which also draws the workers' base seed once per
    iterator, would otherwise advance differently with persistent workers). Workers are
    persistent and each keeps 2 batches in flight. A :class:`CachedDataset` held in RAM
    (:meth:`CachedDataset.load`) is served in this process: a batch is one slice of a tensor,
    cheaper than any hand-over from a worker process (what kept a GPU waiting).
    """
    if workers < 0:
        raise ValueError(f"make_loader: workers must be >= 0, got {workers}")
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(int(seed)))
    else:
        sampler = SequentialSampler(dataset)
    if isinstance(dataset, CachedDataset):  # whole batches from the cache, no per-item collation
        sampler, batch_size = BatchSampler(sampler, batch_size, drop_last=False), None
        if dataset.memory is not None:  # a batch is a slice of a tensor in RAM: no processes
            workers = 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed) + 1),
    )
