"""The Kubernetes manifests of deploy/kubernetes, rendered in pure Python, for the tests.

``kubectl kustomize`` is not needed: :func:`render` implements the part of Kustomize that the
manifests use, and fails on anything else, so the manifests cannot drift into features it would
silently skip. (tests/test_deploy.py compares it with ``kubectl kustomize`` where that exists.)

Supported in a ``kustomization.yaml``: ``resources`` (YAML files and folders), ``components``
(folders holding a ``kind: Component``) and ``patches`` given as a ``path`` to a JSON 6902 patch
(a YAML list of ``add``, ``replace``, ``remove`` and ``test`` operations) with a ``target``
selecting by ``kind`` and ``name`` (and optionally ``group``, ``version``).

The worker and scheduler arguments are the container args of the manifests, exactly. On
Kubernetes the dask-kubernetes operator adds two environment variables to every worker
container: ``DASK_WORKER_NAME`` (the pod's Deployment name; the args refer to it as
``$(DASK_WORKER_NAME)``, which Kubernetes expands) and ``DASK_SCHEDULER_ADDRESS``
(``tcp://sscflow-scheduler.<namespace>.svc.cluster.local:8786``), which ``dask worker`` reads as
its scheduler address (dask config key ``scheduler-address``): the args name no address. To run
them outside Kubernetes, set both variables and expand the args with :func:`expand`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = {p.name: p for p in sorted((KUBERNETES / "overlays").iterdir()) if p.is_dir()}
CLUSTER = "sscflow"  # the DaskCluster; the operator names its scheduler Service sscflow-scheduler
_KEYS = {"apiVersion", "kind", "resources", "components", "patches"}


def load_manifests(path: str | Path = BASE) -> list[dict]:
    """Every Kubernetes document of ``path``: a kustomization folder (rendered) or a YAML file.

    Raises ValueError naming the file for what the renderer does not support, a patch whose
    target matches nothing, or two documents with the same kind and name.
    """
    path = Path(path)
    if path.is_dir():
        return render(path)
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def render(folder: str | Path) -> list[dict]:
    """The documents ``kubectl kustomize folder`` prints (same content; order may differ)."""
    folder = Path(folder)
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise ValueError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(spec) - _KEYS
    if unknown:
        raise ValueError(f"{kfile}: tests/k8s.py does not render {sorted(unknown)}")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        docs += load_manifests(folder / entry)
    for entry in spec.get("components", []):
        component = folder / entry
        text = (component / "kustomization.yaml").read_text(encoding="utf-8")
        kind = (yaml.safe_load(text) or {}).get("kind")
        if kind != "Component":
            raise ValueError(f"{component}: a component needs kind: Component, got {kind}")
        docs = _apply(component, docs)
    docs = _apply(folder, docs, spec)
    seen = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in seen:
            raise ValueError(f"{folder}: two documents {key[0]}/{key[1]}")
        seen.add(key)
    return docs


def _apply(folder: Path, docs: list[dict], spec: dict | None = None) -> list[dict]:
    """``docs`` plus the resources of a component folder, then its patches applied."""
    if spec is None:  # a component
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8")) or {}
        unknown = set(spec) - _KEYS
        if unknown:
            raise ValueError(f"{folder}: tests/k8s.py does not render {sorted(unknown)}")
        for entry in spec.get("resources", []):
            docs = docs + load_manifests(folder / entry)
    docs = copy.deepcopy(docs)
    for patch in spec.get("patches", []):
        if set(patch) != {"path", "target"}:
            raise ValueError(f"{folder}: a patch needs exactly path and target, got {patch}")
        ops = yaml.safe_load((folder / patch["path"]).read_text(encoding="utf-8"))
        if not isinstance(ops, list):
            raise ValueError(f"{folder / patch['path']}: only JSON 6902 patches (a list)")
        hits = [d for d in docs if _matches(d, patch["target"])]
        if not hits:
            raise ValueError(f"{folder}: patch {patch['path']} matches no document")
        for doc in hits:
            for op in ops:
                json6902(doc, op)
    return docs


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": doc["kind"],
            "name": doc["metadata"]["name"]}  # fmt: skip
    unknown = set(target) - set(have)
    if unknown:
        raise ValueError(f"patch target keys {sorted(unknown)} are not supported")
    return all(have[k] == v for k, v in target.items())


def json6902(doc: dict, op: dict) -> None:
    """Apply one JSON 6902 operation (add, replace, remove, test) to ``doc`` in place."""
    *parents, last = _pointer(op["path"])
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
            return
        current = node[index]
    else:
        if kind == "add":
            node[last] = copy.deepcopy(op["value"])
            return
        if last not in node:
            raise ValueError(f"JSON 6902 {kind}: {op['path']} does not exist")
        current = node[last]
        index = last
    if kind == "replace":
        node[index] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[index]
    elif kind == "test":
        if current != op["value"]:
            raise ValueError(f"JSON 6902 test failed: {op['path']} is {current!r}")
    else:
        raise ValueError(f"JSON 6902 op {kind!r} is not supported")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with /, got {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def find(docs: list[dict], kind: str, name: str) -> dict:
    """The one document of ``kind`` named ``name``; KeyError when absent."""
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    have = [f"{d['kind']}/{d['metadata']['name']}" for d in docs]
    raise KeyError(f"no {kind}/{name} among {have}")


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """``(where, pod spec)`` for every pod template in a document (none for other kinds)."""
    kind, spec = doc["kind"], doc.get("spec", {})
    name = f"{kind}/{doc['metadata']['name']}"
    if kind == "DaskCluster":
        yield f"{name} scheduler", spec["scheduler"]["spec"]
        yield f"{name} worker", spec["worker"]["spec"]
    elif kind == "DaskWorkerGroup":
        yield f"{name} worker", spec["worker"]["spec"]
    elif kind == "DaskJob":
        yield f"{name} job", spec["job"]["spec"]
        yield from pod_specs({"kind": "DaskCluster", "metadata": {"name": name},
                              "spec": spec["cluster"]["spec"]})  # fmt: skip
    elif kind in {"Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}:
        yield name, spec["template"]["spec"]
    elif kind == "CronJob":
        yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield name, spec


def containers(pod: dict) -> list[dict]:
    """The init containers and containers of a pod spec."""
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def worker_container(group: str, docs: list[dict] | None = None) -> dict:
    """The worker container of the CPU (``"cpu"``: the DaskCluster's default worker group) or
    GPU (``"gpu"``: the DaskWorkerGroup, sscflow-gpu in the manifests) workers; ``docs`` hold
    one of each."""
    docs = load_manifests(BASE) if docs is None else docs
    if group in ("cpu", "gpu"):
        kind = "DaskCluster" if group == "cpu" else "DaskWorkerGroup"
        (doc,) = [d for d in docs if d["kind"] == kind]
        pod = doc["spec"]["worker"]["spec"]
    else:
        raise ValueError(f"worker group must be 'cpu' or 'gpu', got {group!r}")
    (container,) = [c for c in pod["containers"] if c["name"] == "worker"]
    return container


def worker_args(group: str) -> list[str]:
    """The ``dask worker`` args of the ``"cpu"`` or ``"gpu"`` worker group, as in the base
    manifests: ``["dask", "worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", ...]``.

    No scheduler address among them: the operator sets ``DASK_SCHEDULER_ADDRESS``.
    """
    return [str(a) for a in worker_container(group)["args"]]


def scheduler_args() -> list[str]:
    """The ``dask scheduler`` args of the DaskCluster's scheduler, as in the base manifests."""
    pod = find(load_manifests(BASE), "DaskCluster", CLUSTER)["spec"]["scheduler"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "scheduler"]
    return [str(a) for a in container["args"]]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' expansion of ``$(VAR)`` in container args (``$$`` stands for ``$``);
    a variable missing from ``env`` stays as written, as on Kubernetes."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return [re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, a) for a in args]
