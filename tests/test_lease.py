"""One run per store: the lease (sscflow.flow.lease) on a folder and on S3 (moto server on
loopback).

Real processes hold the leases here: this test process, `python -c` children (one SIGKILLed
while it holds a lease), and `sscflow run` / `sscflow ingest` subprocesses refused by a held
lease. Every answer is known from what the test set up: who holds the lease, since when, whether
its heartbeat is older than its timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import moto_s3

from sscflow.errors import LeaseHeldError
from sscflow.flow.lease import Holder, Lease, hold, read_holder


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    yield from moto_s3(monkeypatch_module, bucket="sscflow-lease")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "cohort.zarr")


@pytest.fixture(params=["folder", "s3"])
def any_store(request, tmp_path):
    """A store path on a folder, and one on S3 (moto server on loopback)."""
    if request.param == "s3":
        _, bucket = request.getfixturevalue("s3")
        return f"s3://{bucket}/{request.node.name.replace('[', '-').rstrip(']')}.zarr"
    return str(tmp_path / "cohort.zarr")


def _files(store) -> dict:
    """Every file of a store (folder or bucket prefix) with its size and modification stamp."""
    if "://" in store:
        import s3fs

        fs = s3fs.S3FileSystem(use_listings_cache=False)
        root = store.split("://", 1)[1]
        return {p: fs.info(p)["ETag"] for p in fs.find(root)}
    return {str(p): p.stat().st_mtime_ns for p in Path(store).rglob("*") if p.is_file()}


def test_a_second_run_is_refused_at_once_naming_the_holder(any_store):
    store = any_store
    first = Lease(store, command="sscflow run first.yaml").acquire()
    try:
        holder = read_holder(store)
        assert holder.pid == os.getpid() and holder.host == socket.gethostname()
        before = _files(store)
        t0 = time.monotonic()
        with pytest.raises(LeaseHeldError) as err:
            Lease(store).acquire()
        assert time.monotonic() - t0 < 5.0  # at once, no waiting
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.started))
        msg = str(err.value)
        assert "in use by another run" in msg and "'sscflow run first.yaml'" in msg
        assert f"host {socket.gethostname()}, process {os.getpid()}, since {since}" in msg
        assert "--wait" in msg
        assert _files(store) == before  # the refused run wrote nothing
    finally:
        first.release()
    assert read_holder(store) is None
    with hold(store) as again:  # free again once released
        assert read_holder(store).token == again.token
    assert read_holder(store) is None


def test_the_heartbeat_keeps_a_live_lease_and_a_stale_one_is_taken_over(store):
    live = Lease(store, timeout_s=1.0, heartbeat_s=0.2).acquire()
    try:
        first_beat = read_holder(store).heartbeat
        time.sleep(1.6)  # well past the timeout: only the heartbeat keeps it
        assert read_holder(store).heartbeat > first_beat + 0.5
        with pytest.raises(LeaseHeldError):
            Lease(store, timeout_s=1.0).acquire()
    finally:
        live.release()

    silent = Lease(store, timeout_s=0.5, heartbeat_s=3600).acquire()  # never beats in time
    time.sleep(1.0)
    messages = []
    taker = Lease(store).acquire(on_message=messages.append)
    try:
        assert len(messages) == 1 and "took over the lease" in messages[0]
        assert "more than its 0.5 s timeout" in messages[0]
        assert read_holder(store).token == taker.token
        assert silent.renew() is False and silent.lost  # the old holder learns it lost it
        silent.release()  # ... and does not delete the new holder's record
        assert read_holder(store).token == taker.token
    finally:
        taker.release()
        silent.release()


def test_the_lease_of_a_killed_process_is_taken_over_at_once(store):
    """A run SIGKILLed while it holds the lease (its heartbeat is fresh, its timeout long) on
    this host: the next run sees the process is gone and takes over, as a rerun after a crash."""
    code = ("import os, signal, sys; from sscflow.flow.lease import Lease; "
            "Lease(sys.argv[1], timeout_s=3600).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", code, store], timeout=60)
    assert child.returncode == -signal.SIGKILL
    dead = read_holder(store)
    assert dead is not None and dead.timeout_s == 3600 and dead.pid != os.getpid()
    messages = []
    with hold(store, on_message=messages.append):
        assert f"its process {dead.pid} on this host has exited" in messages[0]


def test_wait_waits_for_the_lease(store):
    holder = Lease(store, command="sscflow run slow.yaml").acquire()
    timer = threading.Timer(1.5, holder.release)
    timer.start()
    messages = []
    t0 = time.monotonic()
    try:
        with hold(store, wait=True, poll_s=0.1, on_message=messages.append) as lease:
            waited = time.monotonic() - t0
            assert read_holder(store).token == lease.token
    finally:
        timer.join()
        holder.release()
    assert waited >= 1.4
    assert len(messages) == 1 and messages[0].startswith("waiting for the lease")
    assert "'sscflow run slow.yaml'" in messages[0]


def test_one_of_two_racing_creates_wins(any_store):
    store = any_store
    from sscflow.flow.lease import _backend

    a, b = _backend(store), _backend(store)
    record = Holder("h", 1, 0.0, 0.0, 0.0, 1.0, "t").to_bytes()
    results = []
    barrier = threading.Barrier(2)

    def create(backend):
        barrier.wait()
        results.append(backend.create(record))

    threads = [threading.Thread(target=create, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    data, tag = a.read()
    assert a.replace(record, tag) and not b.replace(record, "stale-tag")


def _sscflow(*args, env=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sscflow.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", timeout=120, env=env)  # fmt: skip


def test_sscflow_run_and_ingest_are_refused_while_another_run_holds_the_store(any_store,
                                                                             tmp_path):
    store = any_store
    """Through the command line, on a folder and on S3: exit 1, one line naming the holder,
    no cluster started and nothing written."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,baseline,followup\nP1,a.nii.gz,b.nii.gz\n", encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(f"manifest: {manifest}\nstore: {store}\nresults: {tmp_path / 'res'}\n",
        encoding="utf-8")
    with hold(store, command="sscflow run other.yaml"):
        before = _files(store)
        for args in (["run", str(config)], ["ingest", str(manifest), "--store", store]):
            done = _sscflow(*args)
            assert done.returncode == 1, done.stdout + done.stderr
            lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
            assert len(lines) == 1, done.stderr
            assert "in use by another run: 'sscflow run other.yaml' on host" in lines[0]
            assert f"process {os.getpid()}, since" in lines[0]
            assert "dashboard" not in done.stderr  # refused before any cluster started
        assert _files(store) == before
        assert not (tmp_path / "res").exists()


def test_read_only_commands_need_no_lease(tmp_path):
    import zarr

    store = tmp_path / "cohort.zarr"
    zarr.open_group(str(store), mode="w", zarr_format=3)
    with hold(str(store), command="sscflow run busy.yaml"):
        done = _sscflow("status", str(store))
    assert done.returncode == 0, done.stderr
    assert "lease: held by 'sscflow run busy.yaml'" in done.stdout


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory, client):
    from sscflow.synth import synthesize_cohort

    folder = tmp_path_factory.mktemp("lease-run")
    return synthesize_cohort(2, folder / "synthetic", spacing=6.0, seed=1, client=client)


@pytest.mark.slow
def test_a_run_whose_lease_is_taken_over_stops_and_writes_nothing_more(any_store, small_cohort,
                                                                       client, tmp_path):
    """In the middle of a real run (two workers, one thread each) another run takes the lease
    over: once the run has seen it (its heartbeat, here every 0.2 s) it raises LeaseLostError
    naming the new holder and writes no status record more; at most the two tasks then running
    finish their output, tasks that start later write nothing (each checks the lease first),
    and no later stage or cohort output is written."""
    from sscflow.cohort import read_manifest
    from sscflow.config import Config, IngestConfig, SegmentConfig
    from sscflow.errors import LeaseLostError
    from sscflow.flow.lease import _backend
    from sscflow.flow.pipeline import run

    store = any_store
    cfg = Config(store=store, results=tmp_path / "results", ingest=IngestConfig(spacing_mm=6.0),
                 segment=SegmentConfig(min_lung_ml=5.0))  # fmt: skip
    thief = Holder("other-host", 1, 0.0, time.time(), time.time(), 120.0, "thief-token",
                   "sscflow run stolen.yaml")  # fmt: skip
    seen = {}

    def on_record(rec):
        seen.setdefault("records", []).append(rec)
        if "files" not in seen:  # the first record: take the lease over now
            backend = _backend(store)
            while not backend.replace(thief.to_bytes(), backend.read()[1]):
                pass  # the holder's heartbeat came in between: swap again
            seen["files"] = _files(store)
            deadline = time.time() + 10
            while not lease.lost and time.time() < deadline:  # the run's heartbeat sees it
                time.sleep(0.05)

    lease = Lease(store, heartbeat_s=0.2)
    lease.acquire()
    with contextlib.ExitStack() as stack:
        stack.callback(lease.release)
        if "://" in store:  # workers that see the S3 endpoint (started after it)
            from sscflow.config import ClusterConfig
            from sscflow.flow.cluster import dask_client

            client = stack.enter_context(dask_client(ClusterConfig(
                n_workers=2, threads_per_worker=1, dashboard_address=":0")))  # fmt: skip
        with pytest.raises(LeaseLostError) as err:
            run(cfg, read_manifest(small_cohort), client=client, on_record=on_record,
                lease=lease)  # fmt: skip
    message = str(err.value)
    assert "\n" not in message and "'sscflow run stolen.yaml' on host other-host" in message
    assert read_holder(store).token == "thief-token"  # the new holder's record is left alone
    assert len(seen["records"]) == 1  # nothing was recorded after the takeover
    after = _files(store)
    new = {p for p in after if p not in seen["files"] or after[p] != seen["files"][p]}
    written = {p.split("/patients/")[1].split("/")[1] for p in new if "/patients/" in p}
    # only what the (at most two) tasks running at the takeover finished; nothing later
    assert not any("/status/" in p for p in new), sorted(new)
    assert not written & {"displacement", "log_jacobian", "log_jacobian_template"}, written
    assert not any(k in p for p in after for k in ("/group_means/", "/cohort/", "/template/"))
    assert not (tmp_path / "results" / "report").exists()
