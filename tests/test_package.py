import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_stays_light():
    """`import sscflow` (and the CLI module) must not pull torch or Kubernetes clients."""
    code = (
        "import sys, sscflow, sscflow.cli, sscflow.methods.ingest, sscflow.synth,"
        " sscflow.core.store\n"
        "heavy = [m for m in ('torch', 'kubernetes', 'kr8s', 'dask_kubernetes', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         encoding="utf-8", check=True)
    assert out.stdout.strip() == ""


def test_version_matches_metadata():
    from importlib.metadata import version

    import sscflow

    assert sscflow.__version__ == version("sscflow")


NO_TORCH = '''
import sys


class NoTorch:
    """Any import of torch fails, as in an environment without the gpu extra."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
'''


@pytest.mark.slow
def test_doctests_collect_and_pass_without_torch(tmp_path):
    """torch is an optional extra: with every import of it failing, the package's doctests are
    collected and pass, and only the classifier's torch modules are left out (conftest.py)."""
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True,
                             encoding="utf-8")  # fmt: skip
    assert blocked.returncode != 0 and "(blocked)" in blocked.stderr
    res = subprocess.run([sys.executable, "-m", "pytest", "--doctest-modules", "sscflow",
                          "-p", "no:cacheprovider", "-o", "addopts="], cwd=ROOT, env=env,
                         capture_output=True, encoding="utf-8", timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    header = next(x for x in res.stdout.splitlines() if "torch is not importable" in x)
    left_out = header.split(": ", 1)[1].split(", ")
    assert left_out and all(p.startswith("sscflow/methods/classify/") for p in left_out), left_out
    assert " passed" in res.stdout.splitlines()[-1] and "error" not in res.stdout.splitlines()[-1]


def test_the_old_module_paths_are_the_new_modules():
    """README's 0.1 imports (``sscflow.registration``, ``sscflow.pipeline``, ...) still work, and
    name the same module objects as the new paths: no second copy whose state could diverge."""
    code = (
        "import importlib, sys\n"
        "import sscflow\n"
        "from sscflow._moved import MOVED\n"
        "for old, new in MOVED.items():\n"
        "    a = importlib.import_module('sscflow.' + old)\n"
        "    b = importlib.import_module('sscflow.' + new)\n"
        "    assert a is b and a.__spec__.name == 'sscflow.' + new, old\n"
        "from sscflow.registration.stage import register_patient\n"
        "from sscflow.methods.registration.stage import register_patient as same\n"
        "assert register_patient is same\n"
        "assert sys.modules['sscflow.registration.stage'] is sys.modules["
        "'sscflow.methods.registration.stage']\n"
        "print(len(MOVED))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         encoding="utf-8", check=True)
    assert int(out.stdout) >= 20
