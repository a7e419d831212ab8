"""Shared fixtures: a real Dask cluster for the tests that need one; benchmark scripts loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sscflow.config import ClusterConfig


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster (two worker processes) shared by the tests that need one."""
    from sscflow.flow.cluster import dask_client

    with dask_client(ClusterConfig(n_workers=2, threads_per_worker=1, dashboard_address=":0")) as c:
        yield c


@pytest.fixture(scope="session")
def benchmark_script():
    """Load ``benchmarks/<name>.py`` as a module (the scripts are not a package), for the tests
    of their arithmetic: ``benchmark_script("scale")``."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
