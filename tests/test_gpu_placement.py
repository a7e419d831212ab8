"""GPU workers of the local cluster, and where each stage's tasks run.

This machine has no GPU: the devices are given to :func:`sscflow.flow.cluster.dask_client` by hand
(its ``devices`` argument replaces the discovery), so the "GPU" worker is an ordinary worker
process pinned with ``CUDA_VISIBLE_DEVICES`` and offering the GPU resource. What is tested is
the placement (which worker ran what), which does not depend on a device being there.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from sscflow.config import ClusterConfig, load_config
from sscflow.errors import ConfigError
from sscflow.flow.cluster import CPU, GPU, Placement, dask_client, local_gpus, placement
from sscflow.flow.gpu import Device, DeviceBudget, GpuMemoryError, gpu_slots, visible_devices

SMALL = dict(n_workers=2, threads_per_worker=1, dashboard_address=":0")


def _fake_nvidia_smi(folder, text: str) -> str:
    """A ``nvidia-smi`` that prints ``text`` (what the real one prints for the query), first
    on a PATH of its own."""
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\n", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(folder) + os.pathsep + os.environ.get("PATH", "")


def test_visible_devices_hidden_by_an_empty_cuda_visible_devices():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_visible_devices_from_nvidia_smi_and_cuda_visible_devices(tmp_path, monkeypatch):
    smi = "0, GPU-aaa, 81000\n1, GPU-bbb, 40000\n"
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, smi))
    assert visible_devices({}) == [Device("GPU-aaa", 81000 * 2**20),
                                   Device("GPU-bbb", 40000 * 2**20)]  # fmt: skip
    # pinned by index or UUID: kept verbatim (CUDA's reading), memory from nvidia-smi
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1"}) == [Device("1", 40000 * 2**20)]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-aaa,7"}) == [Device("GPU-aaa",
                                                                             81000 * 2**20)]


def test_no_nvidia_smi_and_no_device_node_means_no_gpu(tmp_path, monkeypatch):
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has an NVIDIA device node")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    assert visible_devices({}) == []


def test_local_gpus_follows_cluster_gpus():
    two = [Device("0"), Device("1")]
    assert local_gpus(ClusterConfig(gpus="auto"), two) == two
    assert local_gpus(ClusterConfig(gpus=1), two) == two[:1]
    assert local_gpus(ClusterConfig(gpus=0), two) == []
    with pytest.raises(ConfigError, match=r"cluster.gpus is 3 but 2 CUDA devices are visible"):
        local_gpus(ClusterConfig(gpus=3), two)


def test_config_reads_gpus_and_slots(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: s.zarr\ncluster: {gpus: 2, gpu_slots: 3}\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.cluster.gpus, cfg.cluster.gpu_slots) == (2, 3)
    path.write_text("store: s.zarr\ncluster: {gpus: many}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cluster.gpus"):
        load_config(path)
    path.write_text("store: s.zarr\ncluster: {gpu_slots: 0}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cluster.gpu_slots must be >= 1"):
        load_config(path)


def test_placement_rules():
    assert Placement(0, 0).resources(True) == {} == Placement(0, 0).resources(False)
    assert Placement(1, 2).resources(True) == {GPU: 1}
    assert Placement(1, 2).resources(False) == {CPU: 1}
    assert Placement(1, 0).resources(False) == {}  # hand-started workers without CPU resource


def test_slots_from_free_memory():
    assert gpu_slots(141 * 2**30) == 4  # an H200: the cap
    assert gpu_slots(4 * 2**30) == 1  # one nominal 1 mm pair (3.7 GB)
    assert gpu_slots(141 * 2**30, 2) == 2


def test_device_budget_waits_for_room_and_refuses_what_never_fits():
    budget = DeviceBudget(10)
    with pytest.raises(GpuMemoryError, match=r"patient P1 needs about .* more than"):
        with budget.reserve(11, "patient P1"):
            pass
    order = []

    def second():
        with budget.reserve(6, "second"):
            order.append(("second", budget.used))

    with budget.reserve(6, "first"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append(("first", budget.used))  # the second pair still waits: 6 + 6 > 10
    t.join(10)
    assert order == [("first", 6), ("second", 6)]
    assert budget.used == 0


def _env(name):
    return os.environ.get(name)


def test_local_cluster_starts_a_pinned_gpu_worker_beside_the_cpu_workers():
    cfg = ClusterConfig(**SMALL, gpu_slots=2)
    with dask_client(cfg, devices=[Device("3")]) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {w["name"]: (a, w) for a, w in info.items()}
        assert sorted(map(str, by_name)) == ["0", "1", "gpu-0"]
        gpu_addr, gpu = by_name["gpu-0"]
        assert gpu["resources"] == {GPU: 2} and gpu["nthreads"] == 2
        cpu_addrs = [a for a, w in info.items() if w["name"] != "gpu-0"]
        assert all(info[a]["resources"] == {CPU: 1} for a in cpu_addrs)
        seen = client.run(_env, "CUDA_VISIBLE_DEVICES")
        assert seen[gpu_addr] == "3" and all(seen[a] == "" for a in cpu_addrs)
        place = placement(client)
        assert place == Placement(1, 2)
        gpu_tasks = [client.submit(_env, "CUDA_VISIBLE_DEVICES", pure=False,
                                   resources=place.resources(True)) for _ in range(4)]
        cpu_tasks = [client.submit(_env, "CUDA_VISIBLE_DEVICES", pure=False,
                                   resources=place.resources(False)) for _ in range(8)]
        assert client.gather(gpu_tasks) == ["3"] * 4
        assert client.gather(cpu_tasks) == [""] * 8


def test_no_gpu_is_todays_cluster():
    with dask_client(ClusterConfig(**SMALL), devices=[]) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert len(info) == 2
        assert all(not w.get("resources") for w in info.values())
        assert placement(client) == Placement(0, 0)


@pytest.mark.slow
def test_run_puts_registration_on_the_gpu_worker_and_the_rest_on_cpu_workers(tmp_path):
    """``sscflow run``'s dataflow on a cluster with one (CPU-process) GPU worker and the torch
    backend: registration, template registration and the classifier ran on the GPU worker;
    ingest, extent, Jacobians and QA on the CPU workers; the summary counts it so."""
    import yaml

    from sscflow.cohort import read_manifest
    from sscflow.core.store import open_store
    from sscflow.flow.pipeline import STATUS_GROUP, run
    from sscflow.synth import synthesize_cohort

    with dask_client(ClusterConfig(**SMALL), devices=[Device("0")]) as client:
        manifest = synthesize_cohort(2, tmp_path / "synthetic", spacing=4.0, seed=0,
                                     client=client)  # fmt: skip
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({
            "manifest": str(manifest), "store": str(tmp_path / "c.zarr"),
            "cluster": SMALL, "ingest": {"spacing_mm": 4.0}, "segment": {"min_lung_ml": 5.0},
            "registration": {"backend": "torch", "torch": {"device": "cpu"}}}),
                encoding="utf-8")  # fmt: skip
        summary = run(load_config(path), read_manifest(manifest), client=client)
        gpu_addr = [a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                    if w["name"] == "gpu-0"][0]  # fmt: skip
    where = summary.where
    for stage in ("registration", "to_template", "template", "classifier"):
        assert set(where.get(stage, {"GPU": 1})) == {"GPU"}, (stage, where)
    for stage in ("ingest", "extent", "jacobian", "qa"):
        assert set(where[stage]) == {"CPU"}, (stage, where)
    assert where["registration"]["GPU"] == 2
    root = open_store(tmp_path / "c.zarr", mode="r")
    for pid in ("SYN001", "SYN002"):
        stages = dict(root[f"{STATUS_GROUP}/{pid}"].attrs["stages"])
        assert stages["registration"]["worker"] == gpu_addr
        assert stages["registration"]["where"] == "GPU"
        assert stages["ingest"]["worker"] != gpu_addr and stages["jacobian"]["where"] == "CPU"
