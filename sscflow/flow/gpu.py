"""Which CUDA devices this machine offers, and how many registrations one of them runs at once.

Three questions, each answered without importing torch in the client:

- :func:`visible_devices`: the devices a process started here would see, as the identifiers to
  put in a worker's ``CUDA_VISIBLE_DEVICES``. ``CUDA_VISIBLE_DEVICES`` when it is set (its
  entries are kept verbatim, so a worker pinned to one reads it the way CUDA would here);
  otherwise ``nvidia-smi`` (installed with every NVIDIA driver and mounted into GPU containers);
  torch's ``cuda.device_count()`` only as a last resort, when a ``/dev/nvidia0`` exists but
  ``nvidia-smi`` does not (importing torch costs a couple of seconds, and on the CPU-only
  machines that have torch it would be paid by every run for nothing).
- :func:`pair_gpu_bytes`: the device memory one pair's registration needs, from its voxel count:
  ``GPU_BYTES_PER_VOXEL`` (50) bytes per voxel of the two scans: the upper end of what the torch
  backend was measured to need on an H200, 1.2-2 GB for the real CT at 1 mm (a 236 x 292 x 292
  baseline and its follow-up, about 40 million voxels of both).
- :func:`gpu_slots`: how many pairs one device runs at once: as many nominal 1 mm pairs
  (``NOMINAL_PAIR_VOXELS``) as fit in 90% of its free memory, at most ``MAX_SLOTS``.

In the worker, :func:`reserve` holds a pair's estimated bytes against the device's free memory
(measured once, when the worker first reserves): a pair waits while the pairs already running
leave too little, and one larger than the whole device fails alone with a clear message, before
it allocates anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sscflow.errors import SscflowError

GPU_BYTES_PER_VOXEL = 50  # device bytes per voxel of baseline + follow-up (see above)
NOMINAL_PAIR_VOXELS = 2 * 350 * 350 * 300  # two chest CTs of 350 x 350 x 300 mm at 1 mm
MAX_SLOTS = 4  # pairs at once per device: beyond a few, their kernels only queue on the device
MEMORY_FRACTION = 0.9  # of the device's free memory; the rest: CUDA context, fragmentation


@dataclass(frozen=True)
class Device:
    """One CUDA device: ``ident`` is what a worker's ``CUDA_VISIBLE_DEVICES`` is set to (an
    index or a ``GPU-...`` UUID); ``free_bytes`` its free memory when it could be read."""

    ident: str
    free_bytes: int | None = None


def parse_visible(value: str | None) -> list[str] | None:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value; None when it is unset.

    As CUDA reads it: comma-separated indices or UUIDs; an empty value or ``-1`` hides every
    device, and the list stops at the first entry that is not a device (``-1``, empty).

    >>> parse_visible("0,2")
    ['0', '2']
    >>> parse_visible("")
    []
    >>> parse_visible("1,-1,2")
    ['1']
    >>> parse_visible(" GPU-5fa3 , MIG-1 ")
    ['GPU-5fa3', 'MIG-1']
    >>> parse_visible(None) is None
    True
    """
    if value is None:
        return None
    out = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        out.append(entry)
    return out


def parse_nvidia_smi(text: str) -> list[tuple[str, str, int]]:
    """``(index, uuid, free bytes)`` per line of ``nvidia-smi --query-gpu=index,uuid,memory.free
    --format=csv,noheader,nounits`` (memory in MiB).

    >>> parse_nvidia_smi("0, GPU-aa, 80000\\n1, GPU-bb, [N/A]\\n")
    [('0', 'GPU-aa', 83886080000), ('1', 'GPU-bb', 0)]
    """
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        free = int(float(parts[2])) * 2**20 if parts[2].replace(".", "", 1).isdigit() else 0
        rows.append((parts[0], parts[1], free))
    return rows


def _nvidia_smi() -> list[tuple[str, str, int]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,uuid,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer: no usable device
    return parse_nvidia_smi(out.stdout)


def _torch_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def visible_devices(env: dict | None = None) -> list[Device]:
    """The CUDA devices a worker started from this process could use (see the module's notes)."""
    env = os.environ if env is None else env
    pinned = parse_visible(env.get("CUDA_VISIBLE_DEVICES"))
    if pinned == []:
        return []
    smi = _nvidia_smi()
    if smi is None:  # no driver tools: a device node without them is worth asking torch about
        if not Path("/dev/nvidia0").exists():
            return []
        n = _torch_count()
        idents = pinned[:n] if pinned is not None else [str(i) for i in range(n)]
        return [Device(i) for i in idents]
    free = {}
    for index, uuid, nbytes in smi:
        free[index] = free[uuid] = nbytes
    if pinned is None:
        return [Device(uuid, nbytes) for _, uuid, nbytes in smi]
    return [Device(p, free.get(p)) for p in pinned if p in free or not free]


def pair_gpu_bytes(voxels: int) -> int:
    """Device bytes one registration needs for a pair of ``voxels`` voxels (both scans).

    >>> round(pair_gpu_bytes(40_000_000) / 1e9, 1)
    2.0
    """
    return int(voxels) * GPU_BYTES_PER_VOXEL


def gpu_slots(free_bytes: int | None, setting: int | str = "auto", *,
              cap: int = MAX_SLOTS) -> int:  # fmt: skip
    """Pairs one device runs at once: ``setting`` when it is a number, else as many nominal 1 mm
    pairs as fit in 90% of ``free_bytes`` (1 when unknown), between 1 and ``cap``.

    >>> gpu_slots(140 * 2**30)  # an H200: many fit, the cap holds
    4
    >>> gpu_slots(8 * 2**30)  # an 8 GB card: two nominal pairs of 3.7 GB each
    2
    >>> gpu_slots(None), gpu_slots(2 * 2**30), gpu_slots(None, 3)
    (1, 1, 3)
    """
    if setting != "auto":
        return max(1, int(setting))
    if not free_bytes:
        return 1
    fit = int(free_bytes * MEMORY_FRACTION) // pair_gpu_bytes(NOMINAL_PAIR_VOXELS)
    return max(1, min(cap, fit))


class GpuMemoryError(SscflowError, MemoryError):
    """A pair needs more device memory than the device has."""


class DeviceBudget:
    """Device memory held by the pairs running in this process: :meth:`reserve` waits while
    the others leave too little, and refuses at once a pair larger than ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, what: str = "this pair") -> Iterator[None]:
        nbytes = int(nbytes)
        if nbytes > self.capacity:
            raise GpuMemoryError(
                f"{what} needs about {nbytes / 1e9:.1f} GB of GPU memory for registration "
                f"({GPU_BYTES_PER_VOXEL} bytes per voxel of both scans), more than the "
                f"{self.capacity / 1e9:.1f} GB this GPU has free; register it at a coarser "
                "ingest.spacing_mm, on a larger GPU, or with registration.device: cpu"
            )
        with self._cond:
            self._cond.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


_BUDGET: list[DeviceBudget] = []
_BUDGET_LOCK = threading.Lock()


def device_budget() -> DeviceBudget | None:
    """This process's budget of its current CUDA device (90% of the free memory when first
    asked), or None when torch or a CUDA device is missing here."""
    try:
        import torch
    except ImportError:
        return None

    if not torch.cuda.is_available():
        return None
    with _BUDGET_LOCK:
        if not _BUDGET:
            free, _ = torch.cuda.mem_get_info()
            _BUDGET.append(DeviceBudget(int(free * MEMORY_FRACTION)))
        return _BUDGET[0]


@contextmanager
def reserve(voxels: int, what: str = "this pair") -> Iterator[None]:
    """Hold a pair's device memory (:func:`pair_gpu_bytes` of ``voxels``) while it registers;
    nothing to hold without a CUDA device."""
    budget = device_budget()
    if budget is None:
        yield
        return
    with budget.reserve(pair_gpu_bytes(voxels), what):
        yield
