"""Dask clusters: an in-process LocalCluster by default, or an existing scheduler by address.

Every stage gets its client from :func:`dask_client`, so the same code runs on a laptop, against
``dask scheduler`` / ``dask worker`` processes, or on Kubernetes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sscflow.config import ClusterConfig
from sscflow.errors import ConfigError
from sscflow.kubernetes import THREAD_ENV, kube_cluster

log = logging.getLogger(__name__)


def _worker_threads_plugin():
    from distributed import WorkerPlugin

    class MatchThreads(WorkerPlugin):
        """Give ITK (and torch, once imported) as many threads as the worker has, no more."""

        name = "sscflow-threads"

        def setup(self, worker):
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(worker.state.nthreads))

    return MatchThreads()


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


@contextmanager
def dask_client(cfg: ClusterConfig | None = None) -> Iterator:
    """A connected ``distributed.Client``; the LocalCluster it started (if any) closes on exit.

    With ``cfg.scheduler`` set (``tcp://host:8786``), connects to that scheduler; with
    ``cfg.kind`` "kubernetes", creates or reuses a DaskCluster (:mod:`sscflow.kubernetes`);
    otherwise starts ``cfg.n_workers`` worker processes with ``cfg.threads_per_worker`` threads
    each and the dashboard on ``cfg.dashboard_address`` (127.0.0.1 unless changed).
    """
    from distributed import Client, LocalCluster

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
        threads = str(cfg.threads_per_worker)
        dashboard = cfg.dashboard_address
        if dashboard.startswith(":"):  # a bare port binds to localhost, never to every interface
            dashboard = "127.0.0.1" + dashboard
        cluster = LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=dashboard,
            memory_limit=cfg.memory_limit,
            env={k: threads for k in THREAD_ENV},
        )
        client = Client(cluster)
    try:
        client.register_plugin(_worker_threads_plugin())
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
