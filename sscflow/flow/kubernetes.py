"""``sscflow run --cluster kubernetes``: a DaskCluster through the dask-kubernetes operator.

:func:`cluster_spec` and :func:`gpu_group_spec` build the same resources as
``deploy/kubernetes/base`` (a test holds them equal for the default settings), from the config's
``cluster.kubernetes`` section: one CPU worker group (the DaskCluster's default group, which a
DaskAutoscaler can scale) whose workers offer ``CPU=<threads>``, and one GPU worker group whose
workers offer ``GPU=1``, so the registration, template and classifier stages land on the GPU
workers and the others on the CPU workers. :func:`kube_cluster` creates the
cluster, or connects to it when one of that name exists (a rerun resumes on the same workers).

dask-kubernetes is an optional extra: ``pip install "sscflow[kubernetes]"``.
"""

from __future__ import annotations

import copy
import re

from sscflow.config import KubernetesConfig
from sscflow.errors import SscflowError

UID = 10001  # the images' non-root user
COMM_PORT, DASHBOARD_PORT, WORKER_DASHBOARD_PORT = 8786, 8787, 8788
MEMORY_FRACTION = 0.9  # dask's memory limit, of the container's (the rest: nanny, untracked)
#: the variables that set a worker's thread count for OpenMP / BLAS (set by every cluster kind)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def dask_memory_limit(quantity: str) -> str:
    """Dask's ``--memory-limit`` for a container memory limit: ``"32Gi"`` -> ``"28.8GiB"``."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Mi|Gi)", quantity)
    if not match:
        raise SscflowError(f"memory quantity must be in Mi or Gi (e.g. 32Gi), got {quantity!r}")
    value = round(float(match.group(1)) * MEMORY_FRACTION, 3)
    return f"{value:g}{match.group(2)}B"


def worker_args(nthreads: int, memory: str, *, gpu: bool = False) -> list[str]:
    """The ``dask worker`` command of a worker container. The operator gives the scheduler's
    address in ``DASK_SCHEDULER_ADDRESS`` and the worker's name in ``DASK_WORKER_NAME``."""
    args = ["dask", "worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", str(nthreads),
            "--memory-limit", dask_memory_limit(memory), "--dashboard",
            "--dashboard-address", str(WORKER_DASHBOARD_PORT)]  # fmt: skip
    # GPU workers offer the GPU, CPU workers the CPU resource: with a GPU group present, the
    # CPU stages ask for CPU=1 and so never take a GPU worker's threads (sscflow.flow.cluster)
    return args + ["--resources", "GPU=1" if gpu else f"CPU={nthreads}"]


def scheduler_args() -> list[str]:
    return ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(COMM_PORT),
            "--dashboard-address", f":{DASHBOARD_PORT}"]  # fmt: skip


def _container_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}  # fmt: skip


def _pod_security(*, volumes: bool) -> dict:
    sec = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID}
    if volumes:  # files on the data volume belong to the images' group
        sec |= {"fsGroup": UID, "fsGroupChangePolicy": "OnRootMismatch"}
    return sec | {"seccompProfile": {"type": "RuntimeDefault"}}


def _labels(component: str) -> dict:
    return {"labels": {"app.kubernetes.io/name": "sscflow",
                       "app.kubernetes.io/component": component}}  # fmt: skip


def _probe(delay: int, period: int) -> dict:
    return {"httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": delay, "periodSeconds": period}  # fmt: skip


def _scheduler(cfg: KubernetesConfig) -> dict:
    container = {
        "name": "scheduler", "image": cfg.image, "imagePullPolicy": "IfNotPresent",
        "args": scheduler_args(),
        "ports": [{"name": "tcp-comm", "containerPort": COMM_PORT, "protocol": "TCP"},
                  {"name": "http-dashboard", "containerPort": DASHBOARD_PORT,
                   "protocol": "TCP"}],
        "readinessProbe": _probe(5, 10), "livenessProbe": _probe(15, 20),
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                      "limits": {"cpu": "2", "memory": "4Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }  # fmt: skip
    service = {
        "type": "ClusterIP",  # never public: the dashboard is reached with kubectl port-forward
        "selector": {"dask.org/cluster-name": cfg.name, "dask.org/component": "scheduler"},
        "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": COMM_PORT,
                   "targetPort": "tcp-comm"},
                  {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT,
                   "targetPort": "http-dashboard"}],
    }  # fmt: skip
    spec = {"serviceAccountName": "sscflow", "automountServiceAccountToken": False,
            "securityContext": _pod_security(volumes=False), "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]}  # fmt: skip
    return {"metadata": _labels("scheduler"), "spec": spec, "service": service}


def _worker(cfg: KubernetesConfig, *, gpu: bool) -> dict:
    limits = {"cpu": str(cfg.worker_cpu), "memory": cfg.worker_memory}
    if gpu:
        limits["nvidia.com/gpu"] = "1"  # a string: the CRD types quantities as strings
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": cfg.worker_memory}}]  # spilled data
    if cfg.data_claim:
        mounts.append({"name": "data", "mountPath": "/data"})
        volumes.append({"name": "data",
                        "persistentVolumeClaim": {"claimName": cfg.data_claim}})  # fmt: skip
    container = {
        "name": "worker", "image": cfg.gpu_image if gpu else cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "args": worker_args(cfg.worker_cpu, cfg.worker_memory, gpu=gpu),
        "env": [{"name": k, "value": str(cfg.worker_cpu)} for k in THREAD_ENV],
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT,
                   "protocol": "TCP"}],
        "resources": {"requests": dict(limits), "limits": limits},
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }  # fmt: skip
    if cfg.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": cfg.env_from_secret}}]
    spec = {"serviceAccountName": "sscflow", "automountServiceAccountToken": False,
            "securityContext": _pod_security(volumes=True)}  # fmt: skip
    if gpu:  # site-specific: how GPU nodes are labelled and tainted
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]  # fmt: skip
    spec |= {"containers": [container], "volumes": volumes}
    replicas = cfg.gpu_workers if gpu else cfg.cpu_workers
    return {"replicas": replicas, "metadata": _labels("worker-gpu" if gpu else "worker-cpu"),
            "spec": spec}  # fmt: skip


def cluster_spec(cfg: KubernetesConfig) -> dict:
    """The DaskCluster resource: scheduler (ClusterIP Service) and the CPU worker group."""
    return {
        "apiVersion": "kubernetes.dask.org/v1", "kind": "DaskCluster",
        "metadata": {"name": cfg.name, "labels": {"app.kubernetes.io/name": "sscflow"}},
        "spec": {"scheduler": _scheduler(cfg), "worker": _worker(cfg, gpu=False)},
    }  # fmt: skip


def gpu_group_spec(cfg: KubernetesConfig) -> dict:
    """The DaskWorkerGroup of GPU workers (``nvidia.com/gpu: 1``, ``--resources GPU=1``)."""
    return {
        "apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup",
        "metadata": {"name": f"{cfg.name}-gpu", "labels": {"app.kubernetes.io/name": "sscflow"}},
        "spec": {"cluster": cfg.name, "worker": _worker(cfg, gpu=True)},
    }  # fmt: skip


def kube_cluster(cfg: KubernetesConfig):
    """Create the DaskCluster (and its GPU worker group), or connect to the existing one.

    Needs the ``kubernetes`` extra, the dask-kubernetes operator in the cluster, and a kubectl
    context (``KUBECONFIG``) or an in-cluster service account allowed to manage Dask resources.
    """
    try:
        from dask_kubernetes.operator import KubeCluster
        from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode
    except ImportError as exc:
        raise SscflowError(
            "--cluster kubernetes needs dask-kubernetes: pip install 'sscflow[kubernetes]' "
            f"({exc})"
        ) from None
    try:
        cluster = KubeCluster(
            custom_cluster_spec=copy.deepcopy(cluster_spec(cfg)),
            namespace=cfg.namespace,
            shutdown_on_close=cfg.shutdown_on_close,
            create_mode=CreateMode.CREATE_OR_CONNECT,
            quiet=True,
        )
    except Exception as exc:  # kubeconfig missing, API unreachable, operator absent, RBAC
        raise SscflowError(
            f"could not create or reach the Kubernetes Dask cluster {cfg.name!r}: "
            f"{type(exc).__name__}: {exc}. Check the kubectl context (KUBECONFIG), that the "
            "dask-kubernetes operator is installed, and the namespace."
        ) from None
    if cfg.gpu_workers:
        try:  # named <cluster>-gpu, as gpu_group_spec and deploy/kubernetes name it
            cluster.add_worker_group(name="gpu", custom_spec=gpu_group_spec(cfg)["spec"]["worker"])
        except Exception as exc:
            if "409" not in str(exc) and "already exists" not in str(exc).lower():
                cluster.close()
                raise SscflowError(f"could not add the GPU worker group: {exc}") from None
            # a reconnected cluster keeps the GPU group it already has
    return cluster
