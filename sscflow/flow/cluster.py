"""Dask clusters: an in-process LocalCluster by default, or an existing scheduler by address.

Every stage gets its client from :func:`dask_client`, so the same code runs on a laptop, against
``dask scheduler`` / ``dask worker`` processes, or on Kubernetes.

GPUs are Dask resources. A GPU worker offers ``GPU=<slots>`` (pairs it registers at once) and
each GPU task asks for ``GPU=1``; when a cluster has GPU workers, its CPU workers offer
``CPU=<threads>`` and every other task asks for ``CPU=1``, so that ingest, segmentation and
Jacobians never take a GPU worker's threads (:func:`placement`). The LocalCluster starts one GPU
worker per visible CUDA device (``cluster.gpus``), pinned to it with ``CUDA_VISIBLE_DEVICES``,
and hides the devices from its CPU workers; a remote scheduler's and the Kubernetes worker
groups' workers are started with the same resources (README, deploy/kubernetes).

Our own few lines, not dask-cuda's ``LocalCUDACluster``: that starts only GPU workers (one per
device, each with ``CUDA_VISIBLE_DEVICES`` rotated) and no CPU workers beside them, so the CPU
stages would still need a second cluster or hand-made worker specs; it brings RAPIDS-oriented
dependencies (pynvml, numba) and its own release cadence tied to CUDA versions. What sscflow
needs from it, pinning a worker to a device, is one environment variable of a Nanny spec.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sscflow.config import ClusterConfig
from sscflow.errors import ConfigError
from sscflow.flow.gpu import Device, gpu_slots, visible_devices
from sscflow.flow.kubernetes import THREAD_ENV, kube_cluster

log = logging.getLogger(__name__)
GPU, CPU = "GPU", "CPU"  # the Dask resources of GPU workers and of CPU workers beside them


# glibc malloc in a worker: arrays up to this size come from the heap, and the heap keeps up to
# MALLOC_KEEP_BYTES of freed memory (see keep_freed_memory)
MALLOC_HEAP_BYTES = 64 * 2**20
MALLOC_KEEP_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the kernel at
    once; True where it took effect (glibc), False elsewhere.

    A Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
    ``distributed.nanny.pre-spawn-environ``), which also turns off glibc's adaptive mmap
    threshold: every array over 128 KiB is then mapped, faulted in page by page and unmapped,
    once per registration iteration. Measured on the 2-core CPU machine (2026-12-06, three
    torch registrations of a synthetic 4 mm pair in one process): 20.6 s with that setting
    (15.1 s of it in the kernel, 9.1 million page faults), 10.7 s with this one (0.3 s, 13,000
    faults), 11.2 s with glibc's defaults. (The synthetic cohort once set this around each
    patient and restored the nanny's setting after it; it now relies on this.)
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, MALLOC_HEAP_BYTES)
                and mallopt(m_trim_threshold, MALLOC_KEEP_BYTES))  # fmt: skip


def _worker_threads_plugin():
    from distributed import WorkerPlugin

    class MatchThreads(WorkerPlugin):
        """Give ITK (and torch, once imported) as many threads as the worker has, no more, and
        let the worker reuse the memory it frees (:func:`keep_freed_memory`)."""

        name = "sscflow-threads"

        def setup(self, worker):
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(worker.state.nthreads))
            logging.getLogger("distributed.worker.state_machine").addFilter(_not_cancelled)
            keep_freed_memory()

    return MatchThreads()


def _not_cancelled(record: logging.LogRecord) -> bool:
    """False for a worker's "Async instruction for <Task cancelled ...> ended with
    CancelledError": a task stopped because the run was interrupted, as asked."""
    return "ended with CancelledError" not in record.getMessage()


def security(cfg: ClusterConfig):
    """distributed's Security for ``cfg.tls``: TLS required when its files are set; otherwise
    whatever dask's own configuration says (``distributed.comm.tls.*``)."""
    from distributed.security import Security

    tls = cfg.tls
    if not tls.enabled:
        return None
    for name in ("ca_file", "cert", "key"):
        if not getattr(tls, name).is_file():
            raise ConfigError(f"cluster.tls.{name}: {getattr(tls, name)} does not exist")
    if cfg.scheduler and not cfg.scheduler.startswith("tls://"):
        raise ConfigError(
            f"cluster.tls is set, so the scheduler address must start with tls://, "
            f"got {cfg.scheduler}"
        )
    return Security(tls_ca_file=str(tls.ca_file), tls_client_cert=str(tls.cert),
                    tls_client_key=str(tls.key), require_encryption=True)  # fmt: skip


def local_gpus(cfg: ClusterConfig, devices: Sequence[Device] | None = None) -> list[Device]:
    """The devices the LocalCluster gives a GPU worker each: every visible one for
    ``cfg.gpus`` "auto", none for 0, the first N for N. ``devices`` replaces the discovery
    (:func:`sscflow.flow.gpu.visible_devices`), e.g. to test placement on a machine without GPU."""
    if cfg.gpus == 0:
        return []
    found = visible_devices() if devices is None else list(devices)
    if cfg.gpus == "auto":
        return found
    if cfg.gpus > len(found):
        raise ConfigError(
            f"cluster.gpus is {cfg.gpus} but {len(found)} CUDA device"
            f"{'s are' if len(found) != 1 else ' is'} visible (CUDA_VISIBLE_DEVICES, "
            "nvidia-smi); set cluster.gpus: auto, or a number up to the devices present"
        )
    return found[: cfg.gpus]


def _local_cluster(cfg: ClusterConfig, devices: list[Device]):
    """A LocalCluster of ``cfg.n_workers`` CPU workers plus one GPU worker per device."""
    from distributed import LocalCluster
    from distributed.system import MEMORY_LIMIT

    threads = str(cfg.threads_per_worker)
    env = {k: threads for k in THREAD_ENV}
    dashboard = cfg.dashboard_address
    if dashboard.startswith(":"):  # a bare port binds to localhost, never to every interface
        dashboard = "127.0.0.1" + dashboard
    if not _port_free(dashboard):  # another run's dashboard: any free port, without
        dashboard = dashboard.rpartition(":")[0] + ":0"  # distributed's four-line warning
    memory = cfg.memory_limit
    if memory == "auto" and devices:  # the machine's memory shared by every worker, as "auto"
        memory = int(MEMORY_LIMIT / (cfg.n_workers + len(devices)))
    extra = {}
    if devices:  # the CPU workers neither see the GPUs nor take a GPU task
        env["CUDA_VISIBLE_DEVICES"] = ""
        extra["resources"] = {CPU: cfg.threads_per_worker}
    cluster = LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=dashboard,
        memory_limit=memory,
        env=env,
        **extra,
    )
    if not devices:
        return cluster
    for i, device in enumerate(devices):
        slots = gpu_slots(device.free_bytes, cfg.gpu_slots)
        spec = copy.deepcopy(cluster.new_spec)
        spec["options"].update(
            nthreads=slots,
            resources={GPU: slots},
            env={**env, "CUDA_VISIBLE_DEVICES": device.ident},
        )
        cluster.worker_spec[f"gpu-{i}"] = spec
        log.info("GPU worker gpu-%d on CUDA device %s: %d pair(s) at once", i, device.ident, slots)
    cluster.scale(len(cluster.worker_spec))  # starts the specs just added
    return cluster


def _port_free(address: str) -> bool:
    """Whether ``host:port`` can be listened on now (port 0, any free one, always can)."""
    import socket

    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host or "127.0.0.1", int(port)))
        except OSError:
            return False
    return True


def dashboard_note(cfg: ClusterConfig, link: str) -> str:
    """``" (port 8787 is in use: another run?)"`` when the dashboard of a local cluster is
    not on its configured port, else ``""``."""
    want = cfg.dashboard_address.rpartition(":")[2]
    got = link.split("://")[-1].split("/")[0].rpartition(":")[2]
    if cfg.scheduler or cfg.kind == "kubernetes" or not want.isdigit() or int(want) == 0:
        return ""
    return "" if got == want else f" (port {want} is in use: another run?)"


@dataclass(frozen=True)
class Placement:
    """Where a run's tasks go: the number of workers offering ``GPU`` and ``CPU``."""

    gpu_workers: int = 0
    cpu_workers: int = 0

    def resources(self, gpu: bool) -> dict:
        """``client.submit``'s ``resources`` for a task that wants a GPU (``gpu``) or not: GPU
        work on GPU workers when there are any; other work on the CPU workers when GPU workers
        exist and CPU workers say so; otherwise anywhere, as without GPUs."""
        if gpu and self.gpu_workers:
            return {GPU: 1}
        if not gpu and self.gpu_workers and self.cpu_workers:
            return {CPU: 1}
        return {}

    def describe(self) -> str:
        if not self.gpu_workers:
            return "no Dask worker offers a GPU: every stage runs on CPU workers"
        cpu = (f"{self.cpu_workers} CPU workers (resource CPU)" if self.cpu_workers else
               "any worker (no worker offers the CPU resource, so CPU stages may also take "
               "the GPU workers' threads)")  # fmt: skip
        return (f"{self.gpu_workers} GPU worker{'s' if self.gpu_workers != 1 else ''} for "
                f"registration, template and classifier; ingest, segmentation, Jacobians on {cpu}")


def placement(client) -> Placement:
    """The :class:`Placement` of ``client``'s cluster, from its workers' resources now."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    res = [w.get("resources", {}) or {} for w in workers]
    return Placement(sum(r.get(GPU, 0) > 0 for r in res), sum(r.get(CPU, 0) > 0 for r in res))


def worker_kind() -> str | None:
    """In a task: "GPU" on a worker offering the GPU resource, else "CPU"; None in the client."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return GPU if worker.state.total_resources.get(GPU, 0) > 0 else CPU


@contextmanager
def dask_client(cfg: ClusterConfig | None = None, *,
                devices: Sequence[Device] | None = None) -> Iterator:  # fmt: skip
    """A connected ``distributed.Client``; the LocalCluster it started (if any) closes on exit.

    With ``cfg.scheduler`` set (``tcp://host:8786``), connects to that scheduler; with
    ``cfg.kind`` "kubernetes", creates or reuses a DaskCluster (:mod:`sscflow.flow.kubernetes`);
    otherwise starts ``cfg.n_workers`` worker processes with ``cfg.threads_per_worker`` threads
    each and the dashboard on ``cfg.dashboard_address`` (127.0.0.1 unless changed), plus one GPU
    worker per CUDA device (:func:`local_gpus`; ``devices`` replaces the discovery).
    """
    from distributed import Client

    cfg = cfg or ClusterConfig()
    if cfg.scheduler:
        client = Client(cfg.scheduler, timeout="30s", security=security(cfg))
        cluster = None
    elif cfg.kind == "kubernetes":
        cluster = kube_cluster(cfg.kubernetes)
        client = Client(cluster)
    else:
        if cfg.tls.enabled:
            log.warning("cluster.tls applies to a remote scheduler (cluster.scheduler); the "
                        "local cluster listens on 127.0.0.1 only")  # fmt: skip
        gpus = local_gpus(cfg, devices)
        if not gpus:
            log.info("no CUDA device visible: %d CPU workers, no GPU worker", cfg.n_workers)
        cluster = _local_cluster(cfg, gpus)
        client = Client(cluster)
        client.wait_for_workers(len(cluster.worker_spec), timeout=120)
    try:
        client.register_plugin(_worker_threads_plugin())
        yield client
    finally:
        client.close()  # first: no future of ours is lost when the workers go
        if cluster is not None and cfg.kind != "kubernetes" and not cfg.scheduler:
            _close_workers(cluster)
        if cluster is not None:
            cluster.close()


def _close_workers(cluster, timeout: float = 60.0) -> None:
    """Close a LocalCluster's workers, giving each process ``timeout`` s to exit before its
    nanny kills it: a worker that ran the pipeline may need more than the 4 s that the
    cluster's own close allows (and the nanny's "still alive ..., killing" warning)."""
    import asyncio

    async def close_all():
        await asyncio.gather(*(w.close(timeout=timeout) for w in cluster.workers.values()),
                             return_exceptions=True)  # fmt: skip

    try:
        cluster.sync(close_all)
    except Exception as exc:  # the cluster's own close still follows
        log.info("closing the workers: %s", exc)
