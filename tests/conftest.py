"""Shared fixtures: a real Dask cluster for the tests that need one."""

from __future__ import annotations

import pytest

from sscflow.config import ClusterConfig


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster (two worker processes) shared by the tests that need one."""
    from sscflow.flow.cluster import dask_client

    with dask_client(ClusterConfig(n_workers=2, threads_per_worker=1, dashboard_address=":0")) as c:
        yield c
