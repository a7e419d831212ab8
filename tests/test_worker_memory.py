"""A worker reuses the memory it frees: arrays allocated and freed over and over (as every
registration iteration does) are not faulted in page by page each time.

Measured as the page faults of 40 allocations of a 2 MiB array in a real worker process: a
Dask nanny's own setting (``MALLOC_TRIM_THRESHOLD_=65536``) maps and unmaps each (512 faults
apiece, about 20,000); sscflow's workers (``dask_client``) reuse the heap.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")


def _faults_of_repeated_arrays(n: int = 40, nbytes: int = 2 * 2**20) -> int:
    import resource

    import numpy as np

    np.ones(nbytes // 8).sum()  # the first one may fault in: not counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.ones(nbytes // 8)
        a.sum()
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_sscflow_workers_reuse_freed_memory(client, tmp_path):
    faults = client.run(_faults_of_repeated_arrays)
    assert faults and all(n < 2_000 for n in faults.values()), faults
    # and still after other work on them: making a synthetic patient once restored the
    # nanny's setting on its way out (20,520 faults after it)
    from sscflow.synth import synthesize_cohort

    synthesize_cohort(2, tmp_path / "synthetic", spacing=6.0, seed=0, client=client)
    faults = client.run(_faults_of_repeated_arrays)
    assert all(n < 2_000 for n in faults.values()), faults


def test_a_plain_nanny_worker_faults_each_array_in_again():
    """The reference: a LocalCluster of distributed's own defaults, no sscflow plugin."""
    import dask
    from distributed import Client, LocalCluster

    if "MALLOC_TRIM_THRESHOLD_" not in dask.config.get("distributed.nanny.pre-spawn-environ", {}):
        pytest.skip("this distributed no longer sets MALLOC_TRIM_THRESHOLD_ for its workers")
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster) as c:  # fmt: skip
        faults = c.run(_faults_of_repeated_arrays)
    assert all(n > 10_000 for n in faults.values()), faults
