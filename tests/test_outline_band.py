"""benchmarks/outline_band.py's fit against planted slopes (the figures of NOTES.md,
"Effective profiles", come from it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def band(benchmark_script):
    return benchmark_script("outline_band")


def test_the_fit_recovers_planted_slopes_and_ignores_noise_of_no_slope(band):
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"dp2": rng.uniform(-8, 8, 40), "ds2": rng.uniform(-40, 40, 40)})
    rows["band_error"] = 0.0012 * rows.dp2 + 0.00028 * rows.ds2 + 0.003
    f = band.fit(rows)
    assert f["a"] == pytest.approx(0.0012, abs=1e-9)
    assert f["b"] == pytest.approx(0.00028, abs=1e-9)
    assert f["c"] == pytest.approx(0.003, abs=1e-9)
    assert f["residual_sd"] < 1e-9 < f["band_sd"]
    # noise alone: slopes near 0 against the planted ones' size, all of it left in the residual
    rows["band_error"] = 0.003 + rng.normal(0, 0.002, 40)
    f = band.fit(rows)
    assert abs(f["a"]) < 0.0003 and abs(f["b"]) < 0.00005
    assert f["residual_sd"] == pytest.approx(f["band_sd"], rel=0.1)
