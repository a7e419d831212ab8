import subprocess
import sys


def test_import_stays_light():
    """`import sscflow` (and the CLI module) must not pull torch or Kubernetes clients."""
    code = (
        "import sys, sscflow, sscflow.cli, sscflow.ingest, sscflow.synth, sscflow.store\n"
        "heavy = [m for m in ('torch', 'kubernetes', 'kr8s', 'dask_kubernetes', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_matches_metadata():
    from importlib.metadata import version

    import sscflow

    assert sscflow.__version__ == version("sscflow")
