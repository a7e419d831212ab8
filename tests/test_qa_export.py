"""QA pages, the report on a cohort without labels, and sscflow export, on real CT.

A mini cohort from ../shared/data/lung1_image.nrrd (pyradiomics' lung1, 512x512x48 at
0.57x0.57x5 mm): patient REAL1 is the scan and a rigidly moved copy; patient REAL2's follow-up
is missing. No label columns. It runs through the ``sscflow`` command on a 2.5 mm grid, must
exit 1 naming REAL2, and leave QA pages and a report that a headless browser loads without
console errors. The exports are read back with SimpleITK and compared with the store, and the
exported field, applied by SimpleITK itself, must reproduce the exported warped follow-up.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
import zarr

from sscflow.core import store as st
from sscflow.core.geometry import Geometry
from sscflow.views.export import warp_to_baseline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"
SHIFT_MM = (4.0, -3.0, 2.5)  # the follow-up's content moves by this (x, y, z), mm
needs_ct = pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")


def sscflow(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sscflow.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", cwd=cwd, timeout=900,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "250"})


# The moved copy is on another grid (registration works in physical space).
REGRID = True


def _moved_copy(path: Path, out: Path, regrid: bool = REGRID) -> None:
    """The scan with its content moved rigidly by SHIFT_MM, as a NRRD file: on the scan's own
    grid, or with ``regrid`` on another one (0.8 x 0.8 x 2.5 mm, origin moved by 7 mm)."""
    image = sitk.ReadImage(str(path))
    grid = image
    if regrid:
        spacing = (0.8, 0.8, 2.5)
        size = [int(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing,
                                                  strict=True)]  # fmt: skip
        grid = sitk.Image(size, image.GetPixelID())
        grid.SetSpacing(spacing)
        grid.SetOrigin([o + 7.0 for o in image.GetOrigin()])
        grid.SetDirection(image.GetDirection())
    # resampling at p - shift moves the content by +shift
    moved = sitk.Resample(image, grid, sitk.TranslationTransform(3, [-s for s in SHIFT_MM]),
                          sitk.sitkLinear, -1024.0, image.GetPixelID())  # fmt: skip
    sitk.WriteImage(moved, str(out), useCompression=True)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realct")
    _moved_copy(DATA, folder / "moved.nrrd")
    (folder / "manifest.csv").write_text(
        "patient_id,baseline,followup\n"
        f"REAL1,{DATA},moved.nrrd\n"
        f"REAL2,{DATA},missing_followup.nrrd\n", encoding="utf-8")
    reg = {"backend": "sitk", "sitk": {"levels_mm": [10.0], "iterations": [20],
                                       "sigma_mm": 20.0}}  # small and quick: 2 voxels of 10 mm
    config = {
        "manifest": "manifest.csv", "store": "cohort.zarr", "results": "results",
        "cluster": {"n_workers": 1, "threads_per_worker": 2, "dashboard_address": ":0"},
        "ingest": {"spacing_mm": 2.5},
        "registration": reg,
        "template": {"registration": reg},
    }  # fmt: skip
    (folder / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    res = sscflow("run", str(folder / "run.yaml"))
    return folder, res


@needs_ct
@pytest.mark.slow
def test_unlabelled_real_ct_cohort_runs_and_names_the_bad_patient(real_run):
    folder, res = real_run
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "REAL2" in res.stderr and "missing_followup.nrrd does not exist" in " ".join(
        res.stderr.split())
    assert "1 patient failed" in res.stderr
    assert "(1 patients, 1 left out)" in res.stdout  # and the store's record says the same:
    gm = zarr.open_group(str(folder / "cohort.zarr" / "group_means"), mode="r")
    assert list(gm.attrs["left_out"]) == ["REAL2"] and list(gm.attrs["patients"]) == ["REAL1"]
    # the reason is given once, at ingest; later stages only name that stage
    status = sscflow("status", str(folder / "cohort.zarr"))
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if "REAL2" in x)
    assert line.split("│")[2].strip() == "failed"  # ingest
    assert all(c.strip() == "upstream_failed" for c in line.split("│")[3:8]), line
    assert " ".join(status.stdout.split()).count("missing_followup.nrrd") == 1
    page = (folder / "results" / "report" / "index.html").read_text(encoding="utf-8")
    assert "REAL2" in page and "Not made: no patient has a functional label" in page
    assert (folder / "results" / "figures" / "group_means_sagittal.png").is_file()
    assert (folder / "results" / "figures" / "group_means_sagittal.svg").is_file()
    assert "Provenance" in page and "manifest sha256" in page
    qa = folder / "results" / "report" / "qa" / "REAL1.html"
    assert qa.is_file() and "href='qa/REAL1.html'" in page
    qa_page = qa.read_text(encoding="utf-8")
    for title in ("Baseline and lung mask", "Follow-up before registration",
                  "Follow-up after registration", "Log-Jacobian over the baseline",
                  "Template-space map"):  # fmt: skip
        assert title in qa_page, title
    assert "-0 (" not in page and "nan to nan" not in page and ">nan<" not in page
    # a rerun rewrites nothing: every stage is skipped, the report too
    outputs = [folder / "results" / p for p in ("report/index.html", "report/qa/REAL1.html",
               "patients.csv", "patients_columns.csv", "figures/group_means_sagittal.png")]
    stamps = [p.stat().st_mtime_ns for p in outputs]
    again = sscflow("run", str(folder / "run.yaml"))
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    assert again.returncode == 1
    for stage in ("registration", "jacobian", "to_template", "qa"):
        assert f"{stage}: 0 done, 1 unchanged (skipped)" in again.stdout, again.stdout
    assert "report: 0 done, 1 unchanged (skipped)" in again.stdout
    # the run handed the sitk backend its own section: its own defaults where the config is
    # silent (margin_mm), nothing of the torch backend's
    from sscflow.methods.registration.sitk import Options as SitkOptions

    field = zarr.open_group(str(folder / "cohort.zarr" / "patients" / "REAL1" / "displacement"),
                            mode="r")  # fmt: skip
    params = field.attrs["sscflow"]["params"]
    assert params["backend"] == "sitk" and params["options"]["iterations"] == [20]
    assert params["options"]["sigma_mm"] == 20.0 and "window_mm" not in params["options"]
    assert params["options"]["margin_mm"] == SitkOptions().margin_mm


@needs_ct
@pytest.mark.slow
def test_report_and_qa_page_load_in_a_headless_browser(real_run, tmp_path):
    folder, _ = real_run
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)  # fmt: skip
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium for the report check (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    for page in (folder / "results/report/index.html", folder / "results/report/qa/REAL1.html"):
        shot = tmp_path / f"{page.stem}.png"
        res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                              "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                              "--window-size=1200,2400", page.as_uri()],
                             capture_output=True, encoding="utf-8", errors="replace", timeout=120)
        assert shot.is_file(), res.stderr[-2000:]
        console = [line for line in res.stderr.splitlines() if "CONSOLE" in line]
        assert not console, console


@needs_ct
@pytest.mark.slow
def test_export_reads_back_with_simpleitk_and_the_field_reproduces_the_warp(real_run, tmp_path):
    folder, _ = real_run
    store = folder / "cohort.zarr"
    out = tmp_path / "exported"
    from sscflow.views.export import export_store

    export_store(str(store), out, patients=["REAL1"], fmt="nifti")  # what 'sscflow export' runs
    root = st.open_store(store, mode="r")
    group = root["patients/REAL1"]
    for name in ("baseline", "followup", "lung_mask", "log_jacobian", "log_jacobian_template"):
        stored = st.read_image(group, name)
        img = sitk.ReadImage(str(out / "REAL1" / f"{name}.nii.gz"))
        np.testing.assert_allclose(img.GetSpacing(), stored.geometry.spacing[::-1], atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), stored.geometry.origin[::-1], atol=1e-3)
        np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), np.eye(3), atol=1e-6)
        want = np.nan_to_num(stored.array[...], nan=0.0)  # ITK reads NIfTI NaN as 0
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), want, name)
    field = sitk.ReadImage(str(out / "REAL1" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    u = st.read_image(group, "displacement").array[...]
    vec = sitk.GetArrayFromImage(field)  # (Z, Y, X, 3) with components x, y, z
    np.testing.assert_allclose(vec[..., 0], u[2], atol=1e-5)
    np.testing.assert_allclose(vec[..., 2], u[0], atol=1e-5)
    follow = sitk.ReadImage(str(out / "REAL1" / "followup.nii.gz"), sitk.sitkFloat32)
    base = sitk.ReadImage(str(out / "REAL1" / "baseline.nii.gz"), sitk.sitkFloat32)
    warped = sitk.Resample(follow, base, sitk.DisplacementFieldTransform(field), sitk.sitkLinear,
                           -1024.0)  # fmt: skip
    exported = sitk.ReadImage(str(out / "REAL1" / "followup_warped.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(exported),
                               atol=0.05)  # fmt: skip
    # an independent check of the warp: the mean field in the lungs undoes the planted shift
    mask = st.read_image(group, "lung_mask").array[...].astype(bool)
    mean_xyz = [float(u[k][mask].mean()) for k in (2, 1, 0)]
    np.testing.assert_allclose(mean_xyz, SHIFT_MM, atol=1.0)
    assert (out / "template" / "image.nii.gz").is_file()
    assert (out / "template" / "all_patients.nii.gz").is_file()


def test_warp_to_baseline_known_translation_across_grids():
    """A follow-up on its own grid (other spacing and origin) and a constant field u: the
    result must be the follow-up's analytic values at x + u(x)."""

    def value(z, y, x):  # a smooth function of physical position, mm
        return 100.0 * np.sin(z / 9.0) + 50.0 * np.cos(y / 7.0) + 2.0 * x

    fgeom = Geometry((30, 34, 38), (2.0, 1.7, 1.5), (-31.0, -29.0, -28.0))
    idx = np.indices(fgeom.shape).astype(float)
    pts = [fgeom.origin[k] + idx[k] * fgeom.spacing[k] for k in range(3)]
    follow = value(*pts).astype(np.float32)
    bgeom = Geometry((12, 14, 16), (2.5, 2.5, 2.5), (-14.0, -16.0, -18.0))
    u = np.zeros((3, *bgeom.shape), np.float32)
    u[0], u[1], u[2] = 3.0, -2.0, 1.25  # mm along z, y, x
    out = warp_to_baseline(follow, fgeom, u, bgeom)
    bidx = np.indices(bgeom.shape).astype(float)
    bpts = [bgeom.origin[k] + bidx[k] * bgeom.spacing[k] + u[k] for k in range(3)]
    expected = value(*bpts)
    np.testing.assert_allclose(out, expected, atol=2.5)  # linear interpolation of a smooth field
    assert np.abs(out - expected).mean() < 0.6


@pytest.mark.parametrize("fmt", ["nifti", "nrrd", "mha"])
def test_export_of_a_small_store_reads_back_in_every_format(tmp_path, fmt):
    """A store written by hand (baseline and follow-up on different grids, a constant field,
    a mask, a map with NaN): every exported file has the store's geometry and values, and the
    warped follow-up is the follow-up's analytic value at x + u(x)."""
    from sscflow.views.export import FORMATS, export_store

    bgeom, fgeom, u, group, value = _small_store(tmp_path / "s.zarr")
    out = tmp_path / "out"
    if fmt == "nrrd":  # through the command once
        res = sscflow("export", str(tmp_path / "s.zarr"), "--out", str(out), "--patients", "P1",
                      "--format", fmt)  # fmt: skip
        assert res.returncode == 0 and "for 1 patients" in res.stdout, res.stderr
    else:
        export_store(str(tmp_path / "s.zarr"), out, fmt=fmt)
    ext = FORMATS[fmt]
    for name, g in (("baseline", bgeom), ("followup", fgeom), ("lung_mask", bgeom),
                    ("log_jacobian", bgeom)):  # fmt: skip
        img = sitk.ReadImage(str(out / "P1" / f"{name}{ext}"))
        np.testing.assert_allclose(img.GetSpacing(), g.spacing[::-1], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(img.GetOrigin(), g.origin[::-1], atol=1e-4, err_msg=name)
        stored = st.read_image(group, name).array[...]
        if fmt == "nifti":  # the file holds NaN, but ITK's NIfTI reader turns NaN into 0
            stored = np.nan_to_num(stored, nan=0.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), stored, err_msg=name)
    field = sitk.ReadImage(str(out / "P1" / f"displacement{ext}"), sitk.sitkVectorFloat64)
    np.testing.assert_allclose(field.GetPixel(0, 0, 0), (0.75, -2.0, 1.5), atol=1e-6)  # x, y, z
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "P1" / f"followup_warped{ext}")))
    idx = np.indices(bgeom.shape).astype(float)
    expected = value(*[bgeom.origin[k] + idx[k] * bgeom.spacing[k] + u[k] for k in range(3)])
    inner = (slice(1, -1),) * 3  # x + u(x) inside the follow-up's field of view
    np.testing.assert_allclose(warped[inner], expected[inner], atol=6.0)  # int16 + linear


def _value(z, y, x):
    return 300.0 * np.sin(z / 11.0) + 200.0 * np.cos(y / 9.0) + 3.0 * x - 400.0


@pytest.mark.parametrize("fmt", ["nifti", "mha"])
def test_export_says_where_the_map_was_not_measured(tmp_path, fmt):
    """ITK's NIfTI reader reads NaN as 0 ("no change" in a viewer): the export writes each
    map's measured mask beside it, and --nan-value writes a chosen fill instead of NaN."""
    from sscflow.views.export import FORMATS

    _, _, _, group, _ = _small_store(tmp_path / "s.zarr")
    stored = st.read_image(group, "log_jacobian").array[...]
    ext = FORMATS[fmt]
    res = sscflow("export", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "a"),
                  "--format", fmt)  # fmt: skip
    assert res.returncode == 0, res.stderr
    measured = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a/P1" /
                                                         f"log_jacobian_measured{ext}")))
    np.testing.assert_array_equal(measured, np.isfinite(stored).astype(np.uint8))
    assert 0 < measured.sum() < measured.size
    res = sscflow("export", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "b"),
                  "--format", fmt, "--nan-value", "-9")  # fmt: skip
    assert res.returncode == 0, res.stderr
    filled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b/P1" / f"log_jacobian{ext}")))
    np.testing.assert_array_equal(filled, np.where(np.isfinite(stored), stored, -9.0))


def _small_store(path, input_hash="x", patient_id="P1"):
    """Patient P1 written by hand: baseline and follow-up on different grids, a lung mask, a
    log-Jacobian map with NaN outside the lungs and a constant displacement."""
    value = _value
    bgeom = Geometry((10, 12, 14), (2.5, 2.5, 2.5), (-12.0, -14.0, -16.0))
    fgeom = Geometry((16, 20, 22), (2.0, 1.8, 1.6), (-20.0, -19.0, -18.5))
    grids = {}
    for name, g in (("baseline", bgeom), ("followup", fgeom)):
        idx = np.indices(g.shape).astype(float)
        grids[name] = value(*[g.origin[k] + idx[k] * g.spacing[k] for k in range(3)])
    root = st.open_store(path)
    group = st.patient_group(root, patient_id)
    kw = dict(stage="test", params={}, input_hash=input_hash)
    st.write_image(group, "baseline", grids["baseline"].astype(np.int16), bgeom, **kw)
    st.write_image(group, "followup", grids["followup"].astype(np.int16), fgeom, **kw)
    mask = np.zeros(bgeom.shape, np.uint8)
    mask[2:8, 3:9, 4:10] = 1
    st.write_image(group, "lung_mask", mask, bgeom, label_of="baseline", **kw)
    lj = np.where(mask > 0, 0.05, np.nan).astype(np.float32)
    st.write_image(group, "log_jacobian", lj, bgeom, **kw)
    u = np.zeros((3, *bgeom.shape), np.float32)
    u[0], u[1], u[2] = 1.5, -2.0, 0.75
    st.write_image(group, "displacement", u, bgeom, **kw)
    return bgeom, fgeom, u, group, value


def test_qa_page_is_drawn_resumed_and_redrawn_when_an_input_changes(tmp_path):
    from sscflow.views.qa import flags, qa_patient

    _small_store(tmp_path / "s.zarr")
    first = qa_patient(str(tmp_path / "s.zarr"), "P1", tmp_path / "results")
    assert first["status"] == "done"
    page = (tmp_path / "results/report/qa/P1.html").read_text(encoding="utf-8")
    for title in ("Baseline and lung mask", "Follow-up before registration",
                  "Follow-up after registration", "Log-Jacobian over the baseline"):  # fmt: skip
        assert title in page, title
    assert page.count("data:image/png;base64,") == 4 and "<script" not in page
    assert qa_patient(str(tmp_path / "s.zarr"), "P1", tmp_path / "results")["status"] == "skipped"
    _small_store(tmp_path / "s.zarr", input_hash="changed")
    assert qa_patient(str(tmp_path / "s.zarr"), "P1", tmp_path / "results")["status"] == "done"
    assert [n for n, _ in flags({"reg_lncc_before": 0.5, "reg_lncc_after": 0.4,
                                 "reg_lung_coverage": 0.9})] == ["similarity", "coverage"]


EVIL_ID = "P<script>alert(1)"  # a store key cannot hold "/" (or "\\")
EVIL_TEXT = "<script>alert('manifest')</script>&"


def test_patient_id_and_manifest_text_are_escaped_in_both_pages(tmp_path):
    """Text from the manifest (a patient id, a path, the config) reaches both pages as text:
    the templates escape it, so no <script> element appears however the text is made."""
    from sscflow.flow.pipeline import store_status
    from sscflow.flow.status import STATUS_GROUP
    from sscflow.views.qa import qa_patient
    from sscflow.views.report import write_report

    store = str(tmp_path / "s.zarr")
    _small_store(store, patient_id=EVIL_ID)
    st.require_group(st.open_store(store), STATUS_GROUP).attrs["run"] = {
        "manifest": EVIL_TEXT, "config_yaml": f"manifest: {EVIL_TEXT}\n",
        "rejected": [{"line": 3, "patient_id": EVIL_TEXT, "message": EVIL_TEXT}]}  # fmt: skip
    assert qa_patient(store, EVIL_ID, tmp_path / "results")["status"] == "done"
    qa = (tmp_path / "results/report/qa" / f"{EVIL_ID}.html").read_text(encoding="utf-8")
    report = write_report(store, tmp_path / "results", store_status(store))
    report = report.read_text(encoding="utf-8")
    for page in (qa, report):
        assert "<script" not in page.lower()
        assert "P&lt;script&gt;alert(1)" in page
    assert report.count("&lt;script&gt;alert(&#39;manifest&#39;)&lt;/script&gt;&amp;") >= 3
    assert f"href='qa/{EVIL_ID}" not in report and "href='qa/P&lt;script&gt;" in report
    # the page that replaces a failed report escapes the store's name too
    with pytest.raises(FileNotFoundError):
        write_report(str(tmp_path / f"{EVIL_TEXT}.zarr"), tmp_path / "results", {})
    failed = (tmp_path / "results/report/index.html").read_text(encoding="utf-8")
    assert "report: failed" in failed and "<script" not in failed.lower()


def test_report_prints_no_metric_the_test_set_cannot_define(tmp_path):
    """A test set with one class (no worsening patient): no sensitivity and no AUC are printed
    as numbers, the report says why; a defined metric keeps its number."""
    import json

    from sscflow.flow.pipeline import store_status
    from sscflow.views.report import write_report

    store = str(tmp_path / "s.zarr")
    _small_store(store)
    results = tmp_path / "results"
    folder = results / "classifier" / "functional"
    folder.mkdir(parents=True)
    cnn = {"n": 5, "tp": 0, "fp": 1, "tn": 4, "fn": 0, "sensitivity": 0.0, "specificity": 0.8,
           "specificity_ci": [0.28, 0.99], "accuracy": 0.8, "ppv": 0.0, "npv": 1.0, "auc": 1.0}
    (folder / "metrics.json").write_text(json.dumps({"cnn": cnn}), encoding="utf-8")
    page = write_report(store, results, store_status(store)).read_text(encoding="utf-8")
    assert "not defined: no worsening patient in the test set" in page
    assert "not defined: one class only in the test set" in page
    assert "1.00" not in page  # the AUC of one class
    assert "80% (28–99)" in page  # specificity is defined and printed


def test_spearman_says_why_a_value_is_missing():
    """Three pairs: rho is defined, its 95% CI is not (Fisher z needs n >= 4); a constant
    column has no rho at all. Each missing value names its own reason."""
    import pandas as pd

    from sscflow.views.report import _spearman_section

    table = pd.DataFrame({"patient_id": ["a", "b", "c"], "logjac_mean": [-0.1, 0.0, 0.05],
                          "delta_fvc": [-12.0, 1.0, 3.0], "delta_dlco": [2.0, 2.0, 2.0]})
    rows = {r[0]: r for r in _spearman_section(table)["rows"]}
    fvc, dlco = rows["ΔFVC (% pred.)"], rows["ΔDLCO (% pred.)"]
    assert fvc[2] == "1.00" and fvc[3] == "not defined: needs 4 pairs or more (Fisher z)"
    assert dlco[2] == "not defined: a constant column"


def test_qa_sagittal_views_cut_through_each_lung():
    """On a phantom chest (two lungs either side of the mediastinum), each sagittal view of the
    QA page holds a good part of its own lung, where the view at the lungs' centroid (the
    midline, the page's old choice) holds next to none."""
    from sscflow.synth.phantom import draw_anatomy, grid_geometry, render_baseline
    from sscflow.views.qa import _centre, _views

    rng = np.random.default_rng(3)
    geometry = grid_geometry(4.0)
    ph = render_baseline(draw_anatomy(rng), [], geometry, rng, ribs=False, disease=False)
    lung = np.asarray(ph.lung, bool)
    centre = _centre(lung, lung.shape)
    views = {name: view for name, view, _ in _views(lung, centre, geometry.spacing)}
    midline = lung[:, :, centre[2]].sum()
    for name in ("sagittal, right lung", "sagittal, left lung"):
        assert views[name].sum() > 10 * max(midline, 1), (name, views[name].sum(), midline)
    x = np.nonzero(lung)[2]
    assert centre[3] < centre[2] < centre[4] and x.min() < centre[3] and centre[4] < x.max()


def _images(page: str) -> list[str]:
    import re

    return re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)


def test_a_new_trajectory_rewrites_the_page_without_drawing_it_again(tmp_path):
    """A patient's new timepoint changes only its trajectory figure: the page is written again
    with the new trajectory and the figures drawn before, which are those a full redraw makes."""
    from PIL import Image

    from sscflow.views.qa import figures_path, page_path, qa_patient

    store, results = str(tmp_path / "s.zarr"), tmp_path / "results"
    _small_store(tmp_path / "s.zarr")
    trajectories = []
    for k, colour in enumerate(("red", "blue")):
        trajectories.append(tmp_path / f"trajectory{k}.png")
        Image.new("RGB", (8, 6), colour).save(trajectories[-1])
    first = qa_patient(store, "P1", results, trajectory=trajectories[0])
    assert first["status"] == "done" and not first["figures_reused"]
    assert figures_path(results, "P1").is_file()
    before = _images(page_path(results, "P1").read_text(encoding="utf-8"))
    second = qa_patient(store, "P1", results, trajectory=trajectories[1])
    assert second["status"] == "done" and second["figures_reused"]
    after = _images(page_path(results, "P1").read_text(encoding="utf-8"))
    assert len(after) == len(before) == 5
    assert after[:4] == before[:4] and after[4] != before[4]
    assert base64.b64decode(after[4]) == trajectories[1].read_bytes()
    # the figures reused are the figures drawn: a forced redraw gives the same images
    forced = qa_patient(store, "P1", results, trajectory=trajectories[1], force=True)
    assert forced["status"] == "done" and not forced["figures_reused"]
    assert _images(page_path(results, "P1").read_text(encoding="utf-8")) == after
    # an output the figures show changes: drawn again, not taken from the cache
    _small_store(tmp_path / "s.zarr", input_hash="changed")
    again = qa_patient(store, "P1", results, trajectory=trajectories[1])
    assert again["status"] == "done" and not again["figures_reused"]
