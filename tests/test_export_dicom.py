"""sscflow export --format dicom on a tiny store written by hand.

The CT series, the lung SEG and the log-Jacobian Parametric Map are read back with SimpleITK's
series reader, pydicom and highdicom; every voxel must land on the store's grid within 0.01 mm
(on the canonical grid and on an oblique one), the mask must come back exactly and the map's
physical values (NaN where not measured) bit for bit. The objects carry the pseudonym, keyed
UIDs, no date from the input and the de-identification attributes; ``dciodvfy`` (dicom3tools)
validates them where it is installed.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sscflow.core import store as st
from sscflow.core.geometry import GRID_TOLERANCE_MM, Geometry
from sscflow.discover import DEIDENTIFICATION
from sscflow.errors import SscflowError
from sscflow.views.dicom import write_patient_dicom
from sscflow.views.export import export_store

PID = "P0007"
TURN = 0.3  # rad about z, then 0.2 about x: an oblique grid
C, S, C2, S2 = np.cos(TURN), np.sin(TURN), np.cos(0.2), np.sin(0.2)
OBLIQUE = tuple(map(tuple, np.array([[C, -S, 0], [S, C, 0], [0, 0, 1]])
                    @ np.array([[1, 0, 0], [0, C2, -S2], [0, S2, C2]])))  # fmt: skip
GRIDS = {
    "canonical": Geometry((9, 11, 13), (2.5, 2.0, 1.5), (-12.25, -14.5, -16.75)),
    "oblique": Geometry((7, 10, 12), (3.0, 1.25, 1.75), (40.125, -7.5, 3.0), OBLIQUE),
}


def _images(geometry: Geometry, seed: int = 0) -> dict:
    """A baseline (int16 HU), a lung mask and a log-Jacobian map with values of both signs
    inside the mask and NaN outside, on ``geometry``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-1000, 400, geometry.shape).astype(np.int16)
    mask = np.zeros(geometry.shape, np.uint8)
    mask[1:-2, 2:-3, 3:-2] = 1
    mask[3, 5, 6] = 0  # a hole
    lj = np.where(mask > 0, rng.uniform(-0.7, 0.4, geometry.shape), np.nan).astype(np.float32)
    return {"baseline": base, "lung_mask": mask, "log_jacobian": lj}


def _store(path, geometry: Geometry, seed: int = 0) -> dict:
    """Patient PID in a store, with :func:`_images`."""
    images = _images(geometry, seed)
    group = st.patient_group(st.open_store(path), PID)
    kw = dict(stage="test", params={}, input_hash="x")
    st.write_image(group, "baseline", images["baseline"], geometry, **kw)
    st.write_image(group, "lung_mask", images["lung_mask"], geometry, label_of="baseline", **kw)
    st.write_image(group, "log_jacobian", images["log_jacobian"], geometry, **kw)
    return images


def _affine(g: Geometry) -> np.ndarray:
    """Index (z, y, x, 1) -> physical (x, y, z) mm, from the store's geometry."""
    a = np.eye(4)
    a[:3, :3] = (np.asarray(g.direction) * np.asarray(g.spacing[::-1]))[:, ::-1]
    a[:3, 3] = g.origin[::-1]
    return a


def _on_store_grid(volume: hd.Volume, g: Geometry) -> np.ndarray:
    """highdicom's volume put in the store's index order, after checking that every one of its
    voxels lies on a store voxel within GRID_TOLERANCE_MM."""
    arr = volume.array[..., 0] if volume.array.ndim == 4 else volume.array
    assert arr.shape[:3] == volume.spatial_shape and sorted(arr.shape) == sorted(g.shape)
    idx = np.indices(arr.shape).reshape(3, -1)
    xyz = volume.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    store_idx = np.linalg.solve(_affine(g), xyz)[:3]
    nearest = np.rint(store_idx).astype(int)
    gap = np.linalg.norm((_affine(g) @ np.vstack([nearest, np.ones(idx.shape[1])]) - xyz)[:3],
                         axis=0)  # fmt: skip
    assert gap.max() < GRID_TOLERANCE_MM, gap.max()
    assert all((nearest[k] >= 0).all() and (nearest[k] < g.shape[k]).all() for k in range(3))
    out = np.full(g.shape, -12345.0)
    out[tuple(nearest)] = arr.reshape(-1)
    assert (out != -12345.0).all() or np.isnan(out).any()  # every store voxel was reached
    return out


@pytest.fixture(params=sorted(GRIDS))
def exported(request, tmp_path):
    """The canonical grid through the store and export_store (what the command runs); the
    store keeps canonical grids only, so the oblique one goes to the writer directly."""
    g = GRIDS[request.param]
    out = tmp_path / "dicom"
    if g.is_canonical:
        truth = _store(tmp_path / "s.zarr", g)
        written = export_store(str(tmp_path / "s.zarr"), out, fmt="dicom")["patients"][PID]
    else:
        truth = _images(g)
        written = write_patient_dicom(out / PID, PID, g, **truth)
    return g, truth, out / PID, written, tmp_path


def test_ct_series_reads_back_on_the_store_grid_with_simpleitk(exported):
    g, truth, folder, written, _ = exported
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "CT"))
    assert len(files) == g.shape[0] and len(written) == g.shape[0] + 2
    image = sitk.ReadImage(files)
    assert image.GetSize() == g.shape[::-1]
    for corner in np.ndindex(2, 2, 2):  # voxel positions at the corners (ITK's x, y, z index)
        ijk = [int(c * (n - 1)) for c, n in zip(corner, image.GetSize(), strict=True)]
        expected = (_affine(g) @ [*ijk[::-1], 1])[:3]
        got = image.TransformIndexToPhysicalPoint(ijk)
        assert np.linalg.norm(np.subtract(got, expected)) < GRID_TOLERANCE_MM, (corner, got)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), truth["baseline"])


def test_seg_and_parametric_map_land_on_the_grid_and_keep_the_values(exported):
    g, truth, folder, _, _ = exported
    seg = hd.seg.segread(folder / "lung_mask.SEG.dcm")
    mask = _on_store_grid(seg.get_volume(), g)
    np.testing.assert_array_equal(mask, truth["lung_mask"])  # exactly
    pm = hd.imread(folder / "log_jacobian.PM.dcm")
    values = _on_store_grid(pm.get_volume(), g)  # the real world value mapping applied
    np.testing.assert_array_equal(values, truth["log_jacobian"].astype(np.float64))  # NaN too
    # references, frame of reference, the mapping and the sign convention
    ct = pydicom.dcmread(folder / "CT" / "CT0001.dcm")
    for obj in (seg, pm):
        assert obj.FrameOfReferenceUID == ct.FrameOfReferenceUID
        assert obj.StudyInstanceUID == ct.StudyInstanceUID
        assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
        assert len(obj.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == g.shape[0]
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "lung"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert pm.BitsAllocated == 32 and "FloatPixelData" in pm
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    finite = truth["log_jacobian"][np.isfinite(truth["log_jacobian"])]
    assert (rwvm.RealWorldValueSlope, rwvm.RealWorldValueIntercept) == (1.0, 0.0)
    assert rwvm.DoubleFloatRealWorldValueFirstValueMapped == float(finite.min())
    assert rwvm.DoubleFloatRealWorldValueLastValueMapped == float(finite.max())
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # UCUM: no unit
    assert rwvm.LUTExplanation == "log-Jacobian; negative where lung shrinks"
    assert "negative where lung shrinks" in pm.ContentDescription


def test_objects_carry_the_pseudonym_keyed_uids_and_no_date_or_path(exported):
    g, _, folder, written, tmp_path = exported
    today = {datetime.date.today().strftime("%Y%m%d"),
             (datetime.date.today() - datetime.timedelta(days=1)).strftime("%Y%m%d")}
    codes = {c[0] for c in DEIDENTIFICATION["codes"]} - {"113107"}  # dates removed, not shifted
    uids = set()
    for path in written:
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == f"{PID}^" and ds.PatientID == PID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert {c.CodeValue for c in ds.DeidentificationMethodCodeSequence} == codes
        assert "sscflow de-identification version 1" in "".join(ds.DeidentificationMethod)
        dates = []
        ds.walk(lambda _d, el, dates=dates: dates.append((el.keyword, str(el.value)))
                if el.VR in ("DA", "DT", "TM") and el.value else None)  # fmt: skip
        # the only dates are the export's own (instance creation, content, contribution)
        assert {k for k, _ in dates} <= {"InstanceCreationDate", "InstanceCreationTime",
                                         "ContentDate", "ContentTime", "ContributionDateTime"}
        assert all(v[:8] in today for k, v in dates if "Date" in k), dates
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                   "FrameOfReferenceUID"):  # fmt: skip
            assert ds[kw].value.startswith("2.25.") and len(ds[kw].value) <= 64
            uids.add((kw, ds[kw].value))
        raw = path.read_bytes()
        for needle in (str(tmp_path), "s.zarr", tmp_path.name, "pytest"):
            assert needle.encode() not in raw, (path.name, needle)
    assert len({u for kw, u in uids if kw == "SOPInstanceUID"}) == len(written)
    names = sorted(str(p.relative_to(folder)) for p in written)
    assert names[-2:] == ["log_jacobian.PM.dcm", "lung_mask.SEG.dcm"]
    # the same images export the same UIDs; other images with the same pseudonym do not
    again = write_patient_dicom(tmp_path / "again", PID, g, **_images(g))
    third = write_patient_dicom(tmp_path / "third", PID, g, **_images(g, seed=1))
    first_ct = pydicom.dcmread(written[0])
    assert pydicom.dcmread(again[0]).SOPInstanceUID == first_ct.SOPInstanceUID
    ct3 = pydicom.dcmread(third[0])
    assert ct3.StudyInstanceUID != first_ct.StudyInstanceUID
    assert ct3.SOPInstanceUID != first_ct.SOPInstanceUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) absent")
def test_dciodvfy_finds_no_error(exported):
    _, _, folder, _, _ = exported
    for path in (folder / "CT" / "CT0001.dcm", folder / "lung_mask.SEG.dcm",
                 folder / "log_jacobian.PM.dcm"):  # fmt: skip
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, encoding="utf-8",
                             timeout=60)
        report = res.stdout + res.stderr
        assert report.strip(), path
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], (path.name, report)


def test_the_command_writes_dicom_and_names_the_extra_when_highdicom_is_missing(
    tmp_path, monkeypatch
):
    _store(tmp_path / "s.zarr", GRIDS["canonical"])
    res = subprocess.run([sys.executable, "-m", "sscflow.cli", "export", str(tmp_path / "s.zarr"),
                          "--out", str(tmp_path / "out"), "--format", "dicom"],
                         capture_output=True, text=True, encoding="utf-8", timeout=300,
                         env={**os.environ, "COLUMNS": "250",
                              "PYTHONIOENCODING": "utf-8"})  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"exported {GRIDS['canonical'].shape[0] + 2} files for 1 patients" in res.stdout
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed
    with pytest.raises(SscflowError, match=r"pip install 'sscflow\[dicom\]'"):
        export_store(str(tmp_path / "s.zarr"), tmp_path / "x", fmt="dicom")


def test_template_space_maps_open_over_the_template(tmp_path):
    """The template as a CT series with its SEG, and each patient's template-space map as a
    Parametric Map referencing it, on the template's grid with its values (NaN too)."""
    store = str(tmp_path / "s.zarr")
    _store(store, GRIDS["canonical"])
    root = st.open_store(store)
    grid = Geometry((8, 10, 12), (2.0, 2.0, 2.0), (-10.0, -12.0, -14.0))
    tpl = _images(grid, seed=3)
    kw = dict(stage="test", params={}, input_hash="x")
    group = st.require_group(root, st.TEMPLATE)
    st.write_image(group, "image", tpl["baseline"], grid, **kw)
    st.write_image(group, "lung_mask", tpl["lung_mask"], grid, label_of="image", **kw)
    st.write_image(st.patient_group(root, PID), "log_jacobian_template", tpl["log_jacobian"],
                   grid, **kw)  # fmt: skip
    out = tmp_path / "dicom"
    written = export_store(store, out, fmt="dicom")["template"]
    folder = out / "template"
    assert len(written) == grid.shape[0] + 2  # the CT slices, the SEG, one map
    pm = hd.imread(folder / f"{PID}.log_jacobian_template.PM.dcm")
    values = _on_store_grid(pm.get_volume(), grid)
    np.testing.assert_array_equal(values, tpl["log_jacobian"].astype(np.float64))
    mask = _on_store_grid(hd.seg.segread(folder / "lung_mask.SEG.dcm").get_volume(), grid)
    np.testing.assert_array_equal(mask, tpl["lung_mask"])
    ct = pydicom.dcmread(folder / "CT" / "CT0001.dcm")
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert pm.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ct.PatientID == "TEMPLATE" and PID in pm.SeriesDescription
    patient_pm = hd.imread(out / PID / "log_jacobian.PM.dcm")
    assert patient_pm.SOPInstanceUID != pm.SOPInstanceUID
