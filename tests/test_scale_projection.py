"""benchmarks/scale.py's projection arithmetic against hand-worked answers."""

from __future__ import annotations

import doctest

import pytest


@pytest.fixture(scope="module")
def scale(benchmark_script):
    return benchmark_script("scale")


# measured at 2 mm: per patient ingest 1 s, registration 4 s, jacobian 1 s; template 2 s per run;
# classifier 0.5 s per patient; 1 ms per task, 5 tasks per patient + 2 cohort tasks
PATIENT = {"ingest": 1.0, "registration": 4.0, "jacobian": 1.0}
FIXED = {"template": 2.0}
PER_PATIENT = {"classifier": 0.5}
COMMON = dict(voxel_factor=8.0, overhead_per_task_s=0.001, tasks_per_patient=5, cohort_tasks=2)


def test_cpu_only(scale):
    p = scale.project(PATIENT, FIXED, PER_PATIENT, patients=10, cpu_workers=4, **COMMON)
    # 6 s per patient x 8 = 48 s; ceil(10 / 4) = 3 rounds -> 144 s
    assert p["cpu"] == pytest.approx(144.0) and p["gpu"] == 0.0
    assert p["cohort"] == pytest.approx(8.0 * (2.0 + 10 * 0.5))  # 56 s
    assert p["overhead"] == pytest.approx(0.001 * (5 * 10 + 2))  # 0.052 s
    assert p["total"] == pytest.approx(144.0 + 56.0 + 0.052)


def test_more_workers_than_patients_is_one_round(scale):
    p = scale.project(PATIENT, FIXED, PER_PATIENT, patients=10, cpu_workers=128, **COMMON)
    assert p["patients"] == pytest.approx(48.0)


def test_gpu_workers_take_the_registration(scale):
    p = scale.project(PATIENT, FIXED, PER_PATIENT, patients=10, cpu_workers=4, gpu_workers=2,
                      gpu_stages=("registration",), gpu_speedup=16.0, **COMMON)  # fmt: skip
    # GPU: 4 s x 8 / 16 = 2 s per patient, ceil(10 / 2) = 5 rounds -> 10 s
    # CPU: (1 + 1) s x 8 = 16 s per patient, 3 rounds -> 48 s; the pools overlap -> 48 s
    assert p["gpu"] == pytest.approx(10.0) and p["cpu"] == pytest.approx(48.0)
    assert p["total"] == pytest.approx(48.0 + 56.0 + 0.052)


def test_gpu_stages_stay_on_cpu_without_gpu_workers(scale):
    p = scale.project(PATIENT, FIXED, PER_PATIENT, patients=10, cpu_workers=4,
                      gpu_stages=("registration",), gpu_speedup=16.0, **COMMON)  # fmt: skip
    assert p["cpu"] == pytest.approx(144.0) and p["gpu"] == 0.0


def test_docstring_example(scale):
    result = doctest.testmod(scale, verbose=False)
    assert result.attempted >= 1 and result.failed == 0
