"""Cohort table, streamed template-space group means and the Figure 5 sagittal projections."""

from __future__ import annotations

import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from dask.callbacks import Callback

from sscflow.core import store as st
from sscflow.core.geometry import Geometry
from sscflow.errors import IncompleteOutputError
from sscflow.methods.groups import (
    cohort_table,
    group_mean_dataset,
    group_means,
    patient_maps,
    write_cohort_table,
)
from sscflow.views.figures import plot_group_means, sagittal_projection

TEMPLATE = Geometry((12, 10, 14), (2.0, 1.5, 1.25), (-10.0, 5.0, -8.0))
NATIVE = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
CHUNK = 8  # stored chunks of the maps: 2 x 2 x 2 blocks per map

# patient: (fvc baseline, fvc followup, functional, visual, has a complete template map)
PATIENTS = {
    "P01": (80.0, 65.0, "worsening", "worsened", True),
    "P02": (90.0, 78.0, "worsening", "stable", True),
    "P03": (70.0, 72.0, "stable", "stable", True),
    "P04": (85.0, 84.0, "stable", "improved", True),
    "P05": (60.0, 61.0, "stable", None, True),  # no visual label
    "P06": (75.0, 60.0, "worsening", "worsened", False),  # map written but never completed
    "P07": (None, None, None, "worsened", True),  # no PFT: no functional label
}
NAN_VOXELS = (slice(0, 2), slice(0, 3), slice(0, 4))  # P03's map: outside its field of view


def patient_map(i: int) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    z = np.arange(TEMPLATE.shape[0], dtype=np.float32)[:, None, None]
    m = (0.05 * i - 0.2 + 0.01 * z + 0.02 * rng.standard_normal(TEMPLATE.shape)).astype(np.float32)
    if i == 3:
        m[NAN_VOXELS] = np.nan
    return m


def template_mask() -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in TEMPLATE.shape], indexing="ij")
    mask = ((zz - 6) / 5.0) ** 2 + ((yy - 5) / 3.5) ** 2 + ((xx - 7) / 5.5) ** 2 <= 1.0
    return mask.astype(np.uint8)


def write(group, name, data, geometry, extra=None, complete=True):
    st.write_image(group, name, data, geometry, stage="test", params={}, input_hash="x",
                   extra=extra or {}, chunk=CHUNK, complete=complete)  # fmt: skip


def build_store(path) -> str:
    root = st.open_store(path)
    tpl = root.require_group("template")
    write(tpl, "image", np.full(TEMPLATE.shape, -800, np.int16), TEMPLATE)
    write(tpl, "lung_mask", template_mask(), TEMPLATE)
    for i, (pid, (fb, ff, functional, visual, _)) in enumerate(PATIENTS.items(), start=1):
        group = st.patient_group(root, pid)
        clinical = {"age": 50.0 + i, "sex": "F" if i % 2 else "M", "dlco_baseline": 55.0}
        if fb is not None:
            clinical.update(fvc_baseline=fb, fvc_followup=ff)
        if visual is not None:
            clinical["visual"] = visual
        group.attrs["sscflow"] = {"clinical": clinical, "functional": functional}
        write(group, "lung_mask", np.ones(NATIVE.shape, np.uint8), NATIVE,
              {"lung_volume_ml": 3000.0 + i})  # fmt: skip
        if pid == "P06":  # ingest only; its template map was interrupted
            write(group, "log_jacobian_template", patient_map(i), TEMPLATE, complete=False)
            continue
        write(group, "followup_lung_mask", np.ones(NATIVE.shape, np.uint8), NATIVE,
              {"lung_volume_ml": 2900.0 + i})  # fmt: skip
        if pid != "P07":
            qa = {"backend": "sitk", "runtime_s": 1.5, "folded_fraction": 0.0,
                  "ncc_before": 0.8, "ncc_after": 0.95, "lncc_before": 0.5, "lncc_after": 0.7,
                  "mad_hu_before": 90.0, "mad_hu_after": 40.0,
                  "parameters": {"levels": [4, 2, 1]},
                  "truth": {"mean_error_mm": 0.1 * i, "p95_error_mm": 0.3}}  # fmt: skip
            write(group, "displacement", np.zeros((3, *NATIVE.shape), np.float32), NATIVE,
                  {"qa": qa})  # fmt: skip
            summary = {"voxels": 64, "mean": -0.01 * i, "median": -0.02 * i, "p5": -0.1,
                       "folded": 0, "folded_fraction": 0.0, "mask": "lung_mask"}  # fmt: skip
            write(group, "log_jacobian", np.zeros(NATIVE.shape, np.float32), NATIVE,
                  {"summary": summary})  # fmt: skip
        write(group, "log_jacobian_template", patient_map(i), TEMPLATE,
              {"qa": {"dice": 0.9 + 0.001 * i, "mean_template": -0.01}})  # fmt: skip
    return str(path)


def reference(members: list[str]) -> np.ndarray:
    """Voxel-wise mean of the members' maps, skipping NaN voxels (numpy, whole arrays)."""
    index = {pid: i for i, pid in enumerate(PATIENTS, start=1)}
    stack = np.stack([patient_map(index[p]).astype(np.float64) for p in members])
    with np.errstate(invalid="ignore"):
        return np.nansum(stack, axis=0) / np.isfinite(stack).sum(axis=0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A store of seven patients, its cohort table and its written group means."""
    path = build_store(tmp_path_factory.mktemp("groups") / "cohort.zarr")
    table = cohort_table(path)
    result = group_means(path, table)
    return path, table, result


# --- the cohort table -------------------------------------------------------------------------


def test_cohort_table_values_and_missing_outputs(cohort, tmp_path):
    _, table, _ = cohort
    assert list(table["patient_id"]) == list(PATIENTS)
    assert table.columns[0] == "patient_id"
    row = table.set_index("patient_id")
    assert row.loc["P01", "delta_fvc"] == pytest.approx(-15.0)
    assert row.loc["P03", "delta_fvc"] == pytest.approx(2.0)
    assert np.isnan(row.loc["P07", "delta_fvc"]) and np.isnan(row.loc["P01", "delta_dlco"])
    assert row.loc["P01", "functional"] == "worsening" and pd.isna(row.loc["P07", "functional"])
    assert pd.isna(row.loc["P05", "visual"]) and row.loc["P04", "visual"] == "improved"
    assert row.loc["P02", "lung_volume_baseline_ml"] == pytest.approx(3002.0)
    assert row.loc["P02", "lung_volume_followup_ml"] == pytest.approx(2902.0)
    assert row.loc["P03", "logjac_mean"] == pytest.approx(-0.03)
    assert row.loc["P03", "logjac_median"] == pytest.approx(-0.06)
    for col in ("reg_backend", "reg_ncc_after", "reg_mad_hu_before", "reg_truth_mean_error_mm",
                "tpl_dice", "folded_fraction", "logjac_p5"):  # fmt: skip
        assert col in table.columns, col
    assert "reg_parameters_levels" not in table.columns
    assert row.loc["P04", "reg_truth_mean_error_mm"] == pytest.approx(0.4)
    assert row.loc["P04", "tpl_dice"] == pytest.approx(0.904)
    # P06: only ingest is complete; P07: no registration, no log_jacobian
    for col in ("lung_volume_followup_ml", "logjac_mean", "reg_ncc_after", "tpl_dice",
                "reg_truth_mean_error_mm"):  # fmt: skip
        assert np.isnan(row.loc["P06", col]), col
    assert np.isnan(row.loc["P07", "reg_ncc_after"]) and np.isnan(row.loc["P07", "logjac_mean"])
    assert row.loc["P06", "lung_volume_baseline_ml"] == pytest.approx(3006.0)
    assert table["delta_fvc"].dtype == np.float64 and table["tpl_dice"].dtype == np.float64

    csv = write_cohort_table(table, tmp_path / "tables")
    assert csv == tmp_path / "tables" / "patients.csv"
    back = pd.read_csv(csv)
    assert list(back.columns) == list(table.columns)
    np.testing.assert_allclose(back["delta_fvc"], table["delta_fvc"].round(2))
    columns = pd.read_csv(tmp_path / "tables" / "patients_columns.csv")
    assert list(columns["column"]) == list(table.columns)  # every column documented
    assert columns["description"].notna().all(), columns[columns["description"].isna()]
    odd = table.assign(delta_fvc=3.0999999999999943, logjac_mean=-0.0005055206304772126)
    text = write_cohort_table(odd, tmp_path / "odd").read_text(encoding="utf-8")
    assert ",3.1," in text and ",-0.00051," in text and "3.0999" not in text


def test_cohort_table_subset_and_unknown_patient(cohort):
    path, _, _ = cohort
    assert list(cohort_table(path, ["P04", "P01"])["patient_id"]) == ["P04", "P01"]
    with pytest.raises(IncompleteOutputError, match="patient P99 is not in the store"):
        cohort_table(path, ["P99"])


# --- group means --------------------------------------------------------------------------------


def test_group_means_equal_numpy_means(cohort):
    path, _, result = cohort
    assert result["path"] == f"{path}/group_means"
    assert result["left_out"] == ["P06"]
    assert result["n_patients"] == 6
    assert result["counts"] == {"functional": {"worsening": 2, "stable": 3},
                                "visual": {"worsened": 2, "stable": 2, "improved": 1}}

    ds = xr.open_zarr(path + "/group_means")
    assert ds.attrs["sscflow"]["complete"] is True
    assert ds.attrs["left_out"] == ["P06"] and ds.attrs["n_patients"] == 6
    assert ds.attrs["patients"] == ["P01", "P02", "P03", "P04", "P05", "P07"]
    assert "shrinkage" in ds.attrs["units"]
    assert list(ds["functional"].values) == ["worsening", "stable"]
    assert list(ds["visual"].values) == ["worsened", "stable", "improved"]
    assert ds["functional_mean"].dims == ("functional", "z", "y", "x")
    assert ds["functional_mean"].dtype == np.float32 and ds["lung_mask"].dtype == np.uint8
    members = {
        ("functional", "worsening"): ["P01", "P02"],  # P06 has no complete map
        ("functional", "stable"): ["P03", "P04", "P05"],  # P05 kept here despite no visual label
        ("visual", "worsened"): ["P01", "P07"],  # P07 has no functional label, only visual
        ("visual", "stable"): ["P02", "P03"],
        ("visual", "improved"): ["P04"],
    }
    for (grouping, name), pids in members.items():
        got = ds[f"{grouping}_mean"].sel({grouping: name}).values
        np.testing.assert_allclose(got, reference(pids), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{grouping}={name}")  # fmt: skip
        assert int(ds[f"{grouping}_count"].sel({grouping: name})) == len(pids)
    assert np.isfinite(ds["functional_mean"].values).all()  # P03's NaN voxels are skipped
    np.testing.assert_array_equal(ds["lung_mask"].values, template_mask())
    for axis, n, h, o in zip("zyx", TEMPLATE.shape, TEMPLATE.spacing, TEMPLATE.origin,
                             strict=True):  # fmt: skip
        np.testing.assert_allclose(ds[axis].values, o + h * np.arange(n))
    assert ds.attrs["spacing"] == list(TEMPLATE.spacing)
    assert ds.attrs["origin"] == list(TEMPLATE.origin)


def test_group_without_patients_is_nan_with_count_zero(cohort, tmp_path):
    path, table, _ = cohort
    subset = table[table["patient_id"] != "P04"]  # the only "improved" patient
    other = build_store(tmp_path / "c.zarr")
    result = group_means(other, subset, chunk=6)
    assert result["counts"]["visual"]["improved"] == 0
    ds = xr.open_zarr(other + "/group_means")
    assert list(ds["visual"].values) == ["worsened", "stable", "improved"]
    assert int(ds["visual_count"].sel(visual="improved")) == 0
    assert np.isnan(ds["visual_mean"].sel(visual="improved").values).all()
    np.testing.assert_allclose(ds["functional_mean"].sel(functional="stable").values,
                               reference(["P03", "P05"]), rtol=1e-6, atol=1e-7)  # fmt: skip
    assert ds["visual_mean"].encoding["chunks"] == (1, 6, 6, 6)


class _Sizes(Callback):
    """Largest numpy result of any task (a local scheduler)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, np.ndarray):
            self.largest = max(self.largest, result.nbytes)


def test_group_means_stream_chunk_by_chunk(cohort):
    path, table, _ = cohort
    maps = patient_maps(path, table, chunk=4, batch=2)
    stack = maps["log_jacobian"].data
    assert isinstance(stack, da.Array)
    assert stack.chunks == ((2, 2, 2), (4, 4, 4), (4, 4, 2), (4, 4, 4, 2))
    assert len(dict(stack.dask)) <= 3 * 3 * 3 * 4 + 1  # one read task per block of 2 patients
    assert maps["log_jacobian"].dtype == np.float32
    assert patient_maps(path, table)["log_jacobian"].data.chunks[1:] == ((8, 4), (8, 2), (8, 6))
    lazy = group_mean_dataset(maps)
    for name in ("functional_mean", "visual_mean", "lung_mask"):
        assert isinstance(lazy[name].data, da.Array), name
    assert lazy["visual_mean"].data.numblocks == (3, 3, 3, 4)

    sizes = _Sizes()
    computed = np.empty(lazy["functional_mean"].shape, np.float32)
    with sizes, dask.config.set(scheduler="sync"):
        da.store(lazy["functional_mean"].data, computed, lock=False)  # no final gather task
    accumulators = 2 * 6 * 4**3 * 8  # sums and counts of the 5 groups + all, one block, float64
    whole_map = int(np.prod(TEMPLATE.shape)) * 8
    assert 0 < sizes.largest <= accumulators < whole_map, sizes.largest
    np.testing.assert_allclose(computed[0], reference(["P01", "P02"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(computed[1], reference(["P03", "P04", "P05"]), rtol=1e-6,
                               atol=1e-7)  # fmt: skip


def test_group_means_on_a_client(cohort, tmp_path, client):
    _, table, _ = cohort
    path = build_store(tmp_path / "c.zarr")
    result = group_means(path, table, client=client)
    assert result["counts"]["functional"] == {"worsening": 2, "stable": 3}
    ds = xr.open_zarr(path + "/group_means")
    np.testing.assert_allclose(ds["visual_mean"].sel(visual="worsened").values,
                               reference(["P01", "P07"]), rtol=1e-6, atol=1e-7)  # fmt: skip


def test_group_means_bad_inputs(cohort, tmp_path):
    path, table, _ = cohort
    bad = table.copy()
    bad.loc[bad["patient_id"] == "P01", "visual"] = "much worse"
    with pytest.raises(ValueError, match="patient P01: visual label 'much worse' is unknown"):
        group_means(path, bad)
    with pytest.raises(ValueError, match="lacks column"):
        group_means(path, table.drop(columns=["functional"]))
    empty = tmp_path / "empty.zarr"
    st.open_store(empty)
    with pytest.raises(IncompleteOutputError, match="no template group; run the template"):
        group_means(str(empty), table)
    wrong = build_store(tmp_path / "wrong.zarr")
    root = st.open_store(wrong)
    other = Geometry(TEMPLATE.shape, TEMPLATE.spacing, (0.0, 0.0, 0.0))
    write(st.patient_group(root, "P02"), "log_jacobian_template", patient_map(2), other)
    with pytest.raises(ValueError, match="patient P02: log_jacobian_template grid"):
        group_means(wrong, table)


# --- figures ------------------------------------------------------------------------------------


def test_sagittal_projection_equals_masked_mean():
    rng = np.random.default_rng(7)
    mean = rng.standard_normal((6, 5, 4))
    mask = (rng.random((6, 5, 4)) > 0.5).astype(np.uint8)
    mask[2, 3, :] = 0  # a (z, y) column with no lung
    got = sagittal_projection(mean, mask)
    expected = np.full((6, 5), np.nan)
    for z in range(6):
        for y in range(5):
            inside = mask[z, y] > 0
            if inside.any():
                expected[z, y] = mean[z, y][inside].mean()
    assert got.shape == (6, 5)
    assert np.isnan(got[2, 3])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.isnan(sagittal_projection(np.full((6, 5, 4), np.nan), mask)).all()  # empty group
    with pytest.raises(ValueError, match="one shape"):
        sagittal_projection(mean, mask[:, :, :2])


def test_plot_group_means_writes_a_png(cohort, tmp_path):
    from matplotlib.image import imread

    path, _, _ = cohort
    png = plot_group_means(path, tmp_path / "figures" / "group_means.png")
    assert png == tmp_path / "figures" / "group_means.png" and png.is_file()
    pixels = imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20
    reds = (pixels[..., 0] > 0.6) & (pixels[..., 2] < 0.4)  # expansion (> 0) is drawn red
    blues = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.4)  # shrinkage (< 0) blue
    assert reds.any() and blues.any()


def test_modules_stay_out_of_import_sscflow():
    code = (
        "import sys, sscflow\n"
        "print(','.join(m for m in ('sscflow.methods.groups', 'sscflow.views.figures',"
        " 'matplotlib', 'xarray')"
        " if m in sys.modules))\n"
        "import sscflow.methods.groups, sscflow.views.figures\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         encoding="utf-8", check=True)
    assert out.stdout.split("\n")[:2] == ["", "False"]
