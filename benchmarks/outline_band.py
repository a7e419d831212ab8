"""Where a blur mismatch shows: the lungs' outer band against the scans' slices and pixels.

Reads what ``benchmarks/timepoints.py --accuracy-only --keep DIR`` left (the three-scan store
``DIR/three.zarr`` and the synthetic truth ``DIR/synthetic/truth``): for every pair, the error
of its mean log-Jacobian against the truth's whole-lung mean, over the baseline's lung mask,
its outermost voxel (the band) and the rest (the interior). On a patient with no regional
change the truth is uniform in the lungs, so a band that reads otherwise than the interior is
the registration's, and a difference in blur between the two scans makes one (the blurrier
outline reads as expansion). Then, on those patients' pairs, the least-squares fit

    band error = a * (pixel_1^2 - pixel_0^2) + b * (slice_1^2 - slice_0^2) + c

(mm^2; scan 0 the pair's baseline): a and b are 0 where the pixels and the slices are matched
as they should be (``benchmarks/NOTES.md``, "Effective profiles"). Prints one row per pair,
then the fit.

    python benchmarks/outline_band.py DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from sscflow.core import store as st


def pair_bands(root: Path) -> pd.DataFrame:
    """One row per pair of ``root`` (a ``timepoints.py --keep`` folder): the scans' slice and
    pixel sizes, the truth, and the errors over the lungs, the band and the interior."""
    store = st.open_store(root / "three.zarr", "r")
    truth = pd.read_csv(root / "synthetic" / "truth" / "pairs.csv")
    scans = pd.read_csv(root / "synthetic" / "truth" / "truth.csv").set_index("patient_id")
    rows = []
    for _, pair in truth.iterrows():
        pid, t0, t1 = pair.patient_id, int(pair.t0), int(pair.t1)
        group = st.patient_group(store, pid, create=False)
        if (t0, t1) != (0, 1):
            group = group[f"pairs/{t0}-{t1}"]
        logjac = np.asarray(st.read_image(group, "log_jacobian").array[...], float)
        lung = np.asarray(st.read_image(group, "lung_mask").array[...]).astype(bool)
        lung &= np.isfinite(logjac)
        interior = ndimage.binary_erosion(lung)
        band = lung & ~interior

        lung_e, band_e, interior_e = (float(logjac[sel].mean() - pair.mean_logjac)
                                      for sel in (lung, band, interior))  # fmt: skip
        scan = scans.loc[pid]
        rows.append({
            "patient_id": pid, "t0": t0, "t1": t1,
            "regional": float(scan.regional_strength) != 0.0,
            "slice0": scan[f"t{t0}_slice_mm"], "slice1": scan[f"t{t1}_slice_mm"],
            "pixel0": scan[f"t{t0}_pixel_mm"], "pixel1": scan[f"t{t1}_pixel_mm"],
            "truth": float(pair.mean_logjac),
            "lung_error": lung_e, "band_error": band_e, "interior_error": interior_e,
        })  # fmt: skip
    out = pd.DataFrame(rows)
    out["dp2"] = out.pixel1**2 - out.pixel0**2
    out["ds2"] = out.slice1**2 - out.slice0**2
    return out


def fit(rows: pd.DataFrame) -> dict:
    """a, b, c of the band fit above on ``rows``, and the residual's s.d."""
    x = np.c_[rows.dp2, rows.ds2, np.ones(len(rows))]
    coef, *_ = np.linalg.lstsq(x, rows.band_error, rcond=None)
    resid = rows.band_error - x @ coef
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]),
            "residual_sd": float(resid.std()), "band_sd": float(rows.band_error.std())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="a folder kept by timepoints.py --keep")
    args = ap.parse_args(argv)
    rows = pair_bands(args.dir)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(rows.drop(columns=["dp2", "ds2"]).round(4).to_string(index=False))
    flat = rows[~rows.regional]
    f = fit(flat)
    print(f"no-change pairs: {len(flat)}; band error = {f['a']:+.5f} * dp2 {f['b']:+.6f} * ds2 "
          f"{f['c']:+.4f} (residual s.d. {f['residual_sd']:.4f}, band s.d. {f['band_sd']:.4f})")


if __name__ == "__main__":
    main()
