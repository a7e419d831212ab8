"""benchmarks/gpu.py in its reduced form (no CUDA here): every section runs, the output also
lands in $OUT/gpu.txt, and the key ratio is the last line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")
def test_gpu_benchmark_reduced_form_prints_every_figure(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(SCRIPT), "--spacing", "4", "--repeats", "1",
                          "--reduced"], capture_output=True, encoding="utf-8", timeout=1800,
                         env={**os.environ, "OUT": str(out)})  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = (out / "gpu.txt").read_text(encoding="utf-8")
    assert text.strip() == res.stdout.strip()
    for figure in (r"registration, 4 mm real CT on \w+: .* alignment .* resampling and blur .* "
                   r"optimisation", r"accuracy: mean error", r"\d+ pairs per hour",
                   r"classifier streamed / in memory: [0-9.]+",
                   r"store per patient: .* [0-9.]+ bytes per baseline voxel"):  # fmt: skip
        assert re.search(figure, text), figure
    last = text.strip().splitlines()[-1]
    assert re.search(r"ratio device path / host path [0-9.]+$", last), last
    # the planted pair is registered: its mean error is well under a voxel
    error = float(re.search(r"mean error ([0-9.]+) mm", text).group(1))
    assert error < 1.0
