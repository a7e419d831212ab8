"""Template space: the median choice, a tiny cohort whose template maps are known in closed form,
resume and force, missing inputs, the "average" method and a template read from a file.

The cohort: one chest-like phantom ``_chest`` (body, two textured ellipsoid lungs) in physical
coordinates. Patient A is the phantom itself; B and C are the phantom scaled by ``s``, rotated
about the z axis through the lung centre and translated by ``t`` (``M = s R``), on grids of other
shapes and origins: ``P(y) = F(M^-1 (y - t))``. So the template (A) point x corresponds to
``y = t + M x`` in P and the true template -> patient field is ``u(x) = t + (M - I) x``; the
lung-centroid start finds ``t`` only. Each patient's "log-Jacobian" map is a
linear ramp ``h(y) = b + a . y``, which trilinear interpolation reproduces exactly, so the warped
map must equal ``h(x + u(x))`` up to ``|a| x`` the registration error.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from sscflow.config import RegistrationConfig, TemplateConfig
from sscflow.core import store as st
from sscflow.core.geometry import Geometry
from sscflow.errors import IncompleteOutputError, InputImageError
from sscflow.methods.registration.torch import Options as TorchOptions
from sscflow.methods.template import build_template, choose_template, to_template_patient

SP = 2.5  # mm, every stored grid
RAMP_A = np.array([0.01, 0.006, -0.008])  # per mm, (z, y, x)
RAMP_B = -0.1
# name: (scale, rotation about the z axis (degrees), translation (z, y, x) mm, grid shape,
# origin offset from a centred grid (mm))
PATIENTS = {
    "A": (1.0, 0.0, (0.0, 0.0, 0.0), (30, 30, 30), (0.0, 0.0, 0.0)),
    "B": (0.9, 7.0, (3.0, -2.0, 2.5), (28, 28, 30), (1.0, -0.7, 0.4)),
    "C": (1.1, 7.0, (-2.5, 2.0, -3.0), (32, 32, 32), (-0.6, 1.3, -1.1)),
}
REG = RegistrationConfig(
    backend="torch",
    torch=TorchOptions(
        levels_mm=(5.0, 2.5),  # shrink 2, 1 at SP
        iterations=(30, 15),
        affine_iterations=(80,),
        margin_mm=5.0,
        threads=1,
        window_mm=12.5,  # 5 voxels; the velocity grid 2 voxels, its widths 2 and 1 of those
        velocity_spacing_mm=5.0,
        velocity_sigma_mm=10.0,
        gradient_sigma_mm=5.0,
        learning_rate_mm=3.0,
    ),
)
CFG = TemplateConfig(registration=REG)


def _texture_field():
    rng = np.random.default_rng(7)
    noise = ndimage.gaussian_filter(rng.standard_normal((48, 48, 48)), 1.5)
    return noise / noise.std()


TEXTURE = _texture_field()  # on a 2 mm lattice, voxel (0, 0, 0) at (-48, -48, -48) mm


def _soft(r2, width=0.08):
    """1 inside r2 < 1, 0 outside, a smooth edge (anti-aliased sampling)."""
    return 1.0 / (1.0 + np.exp((np.sqrt(r2) - 1.0) / width))


def _lung_weight(z, y, x):
    return sum(_soft((z / 26.0) ** 2 + (y / 20.0) ** 2 + ((x - side * 15.0) / 12.0) ** 2)
               for side in (-1, 1))  # fmt: skip


def _chest(z, y, x):
    """The phantom F in HU at physical points (mm): air, a body (40 HU), lungs (-850 HU) with a
    smooth vessel-like texture within -945..-495 HU (the torch backend's local NCC needs
    contrast; the segmentation needs lungs below -400 HU and above the airways' -950 HU)."""
    body = _soft((y / 30.0) ** 2 + (x / 34.0) ** 2, 0.03)
    lung = _lung_weight(z, y, x)
    idx = np.stack([(c + 48.0) / 2.0 for c in (z, y, x)])
    tex = np.clip(ndimage.map_coordinates(TEXTURE, idx, order=1, mode="nearest"), -0.5, 2.5)
    return -1000.0 + 1040.0 * body + (-870.0 + 150.0 * tex) * lung + 20.0 * tex * body * (1 - lung)


def _geometry(shape, offset, spacing=SP) -> Geometry:
    origin = tuple(-(n - 1) / 2 * spacing + o for n, o in zip(shape, offset, strict=True))
    return Geometry(shape, (spacing,) * 3, origin)


def _points(geom: Geometry):
    axes = [o + np.arange(n) * s for n, s, o in zip(geom.shape, geom.spacing, geom.origin,
                                                     strict=True)]  # fmt: skip
    return np.meshgrid(*axes, indexing="ij")


def _matrix(name):
    """M = s R: the template point x is the patient point t + M x ((z, y, x) mm)."""
    s, degrees, *_ = PATIENTS[name]
    c, n = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return s * np.array([[1.0, 0.0, 0.0], [0.0, c, -n], [0.0, n, c]])


def _patient_arrays(name):
    """Baseline (int16 HU), lung mask (uint8) and ramp map (float32) of a patient, its geometry."""
    _, _, t, shape, offset = PATIENTS[name]
    geom = _geometry(shape, offset)
    y = _points(geom)
    inv = np.linalg.inv(_matrix(name))
    d = [yk - tk for yk, tk in zip(y, t, strict=True)]
    p = [sum(inv[i, j] * d[j] for j in range(3)) for i in range(3)]  # the phantom point at y
    hu = np.rint(_chest(*p)).astype(np.int16)
    mask = (_lung_weight(*p) >= 0.5).astype(np.uint8)
    ramp = (RAMP_B + sum(a * yk for a, yk in zip(RAMP_A, y, strict=True))).astype(np.float32)
    return hu, mask, ramp, geom


def _true_u(name, tgeom):
    """u(x) = t + (M - I) x on the template grid, (3, Z, Y, X) mm."""
    t, m = PATIENTS[name][2], _matrix(name) - np.eye(3)
    x = _points(tgeom)
    return np.stack([t[i] + sum(m[i, j] * x[j] for j in range(3)) for i in range(3)])


def _write_patient(root, name, *, log_jacobian=True):
    hu, mask, ramp, geom = _patient_arrays(name)
    group = st.patient_group(root, name)
    w = dict(params={"v": 1}, chunk=16)
    st.write_image(group, "baseline", hu, geom, stage="ingest", input_hash=f"{name}-b",
                   fill_value=-1024, **w)  # fmt: skip
    st.write_image(
        group,
        "lung_mask",
        mask,
        geom,
        stage="segment",
        input_hash=f"{name}-m",
        extra={"lung_volume_ml": float(mask.sum()) * geom.voxel_volume_ml},
        **w,
    )
    if log_jacobian:
        st.write_image(group, "log_jacobian", ramp, geom, stage="jacobian",
                       input_hash=f"{name}-j", **w)  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A store with patients A, B, C (baseline, lung_mask, log_jacobian) and no template."""
    path = tmp_path_factory.mktemp("cohort") / "cohort.zarr"
    root = st.open_store(path)
    for name in PATIENTS:
        _write_patient(root, name)
    return path


@pytest.fixture(scope="module")
def median_store(cohort, tmp_path_factory):
    """The cohort with its median template and B, C in template space (registered once)."""
    path = tmp_path_factory.mktemp("median") / "cohort.zarr"
    shutil.copytree(cohort, path)
    out = build_template(path, list(PATIENTS), CFG)
    rows = {pid: to_template_patient(path, pid, CFG) for pid in ("B", "C")}
    return path, out, rows


def _copy(store, tmp_path):
    dst = tmp_path / "cohort.zarr"
    shutil.copytree(store, dst)
    return dst


def _mtimes(folder):
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _ncc(a, b, mask):
    a, b = (np.asarray(v, float)[mask] for v in (a, b))
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# --- choose_template


def test_choose_template_median_nearest_and_ties():
    assert choose_template({"P3": 5200.0, "P1": 4100.0, "P2": 3600.0}) == "P1"
    assert choose_template({"only": 1.0}) == "only"
    # even count: median 4000 lies between 3900 and 4100 -> both 100 mL away -> smallest id
    assert choose_template({"Z9": 4100.0, "A1": 3900.0, "M": 2000.0, "Q": 6000.0}) == "A1"
    assert choose_template({"b": 3.0, "a": 1.0}) == "a"
    # nearest the median (4100), not the mean (5067, nearer w's 5000)
    assert choose_template({"x": 1000.0, "y": 4100.0, "z": 10100.0, "w": 5000.0, "v": 900.0}) == "y"
    with pytest.raises(ValueError, match="no lung volume given"):
        choose_template({})


# --- median template and patients in template space


def test_median_template_copies_the_median_patient(median_store, cohort):
    path, out, _ = median_store
    assert out["status"] == "done" and out["source"] == "cohort-median"
    assert out["patient_id"] == "A" and out["patients_used"] == ["A", "B", "C"]
    assert out["left_out"] == []
    root = st.open_store(path, mode="r")
    base = st.read_image(root["patients/A"], "baseline")
    img = st.read_image(root["template"], "image")
    mask = st.read_image(root["template"], "lung_mask")
    assert img.array.dtype == np.int16 and mask.array.dtype == np.uint8
    np.testing.assert_array_equal(img.array[...], base.array[...])
    np.testing.assert_array_equal(mask.array[...], root["patients/A/lung_mask/0"][...])
    assert img.geometry == base.geometry
    meta = mask.meta
    assert meta["source"] == "cohort-median" and meta["patient_id"] == "A"
    assert meta["patients_used"] == ["A", "B", "C"]
    assert meta["lung_volume_ml"] == pytest.approx(out["lung_volume_ml"])
    assert out["lung_volume_ml"] == pytest.approx(mask.array[...].sum() * SP**3 / 1000)


@pytest.mark.parametrize("pid", ["B", "C"])
def test_known_scale_and_translation_is_recovered(median_store, pid):
    """u(x) = t + (s - 1) x; the lung-centroid start gets t only, so the scaling part (up to
    2.6 mm at the lung's ends) must come from the registration."""
    path, _, rows = median_store
    root = st.open_store(path, mode="r")
    tmask = st.read_image(root["template"], "lung_mask")
    tgeom = tmask.geometry
    inner = ndimage.binary_erosion(tmask.array[...].astype(bool), iterations=2)
    disp = st.read_image(root[f"patients/{pid}"], "template_displacement")
    lj = st.read_image(root[f"patients/{pid}"], "log_jacobian_template")
    assert disp.array.shape == (3, *tgeom.shape) and disp.array.dtype == np.float32
    assert lj.array.shape == tgeom.shape and lj.array.dtype == np.float32
    assert disp.geometry == tgeom and lj.geometry == tgeom

    true_u = _true_u(pid, tgeom)
    u = disp.array[...]
    err = np.sqrt(((u - true_u) ** 2).sum(axis=0))[inner]
    start = np.asarray(rows[pid]["prealign_mm"])[:, None, None, None]
    err_start = np.sqrt(((start - true_u) ** 2).sum(axis=0))[inner]
    assert err_start.mean() > 1.5  # the test can fail: the centroid start alone is not enough
    # A third of a 2.5 mm voxel on average, 1.5 mm at the 95th percentile (measured: 0.7, 1.0 mm
    # with these few iterations), and well under half the start's error.
    assert err.mean() < 0.9 and np.percentile(err, 95) < 1.5, (err.mean(), err_start.mean())
    assert err.mean() < 0.5 * err_start.mean()

    # The warped map must be h(x + u_true(x)); its error is a . (u - u_true), at most |a| = 0.0141
    # per mm of displacement error. 0.008 mean / 0.016 p95 is |a| times 0.57 / 1.13 mm (measured
    # 0.005 / 0.011); the centroid start alone gives 0.013 / 0.029.
    x = _points(tgeom)
    expected = RAMP_B + sum(a * (xk + uk) for a, xk, uk in zip(RAMP_A, x, true_u, strict=True))
    diff = np.abs(lj.array[...] - expected)[inner]
    no_reg = np.abs(RAMP_B + sum(a * (xk + sk) for a, xk, sk in zip(RAMP_A, x, start,
                                                                       strict=True))
                    - expected)[inner]  # fmt: skip
    assert no_reg.mean() > 0.01
    assert diff.mean() < 0.008 and np.percentile(diff, 95) < 0.016, diff.mean()

    qa = lj.meta["qa"]
    assert rows[pid]["status"] == "done" and rows[pid]["dice"] == qa["dice"]
    assert qa["backend"] == "torch" and qa["runtime_s"] > 0
    assert qa["dice"] > 0.9
    assert qa["ncc_after"] > qa["ncc_before"]
    assert qa["folded_fraction"] == 0.0
    # the patient's own mean (its ramp inside its lung) and the warped one inside the template
    # lung sample the same tissue, so they agree to the map error
    assert abs(qa["mean_template"] - qa["mean_patient"]) < 0.01
    assert qa["mean_template"] == pytest.approx(  # the stored map: rounded to 2^-12
        float(lj.array[...][tmask.array[...].astype(bool)].mean()), abs=2.0**-13
    )


def test_rerun_skips_and_force_redoes(median_store, tmp_path):
    path = _copy(median_store[0], tmp_path)
    template_files = _mtimes(path / "template")
    patient_files = _mtimes(path / "patients" / "B")
    again = build_template(path, list(PATIENTS), CFG)
    assert again["status"] == "skipped" and again["patient_id"] == "A"
    assert again["patients_used"] == ["A", "B", "C"]
    row = to_template_patient(path, "B", CFG)
    assert row["status"] == "skipped" and row["dice"] > 0.9
    assert _mtimes(path / "template") == template_files
    assert _mtimes(path / "patients" / "B") == patient_files

    # another registration parameter is another output
    other = replace(CFG, registration=replace(REG, torch=replace(REG.torch, iterations=(20, 10))))
    assert build_template(path, list(PATIENTS), other)["status"] == "done"
    assert to_template_patient(path, "B", other)["status"] == "done"
    assert to_template_patient(path, "B", other)["status"] == "skipped"
    before = _mtimes(path / "patients" / "B" / "log_jacobian_template")
    assert to_template_patient(path, "B", other, force=True)["status"] == "done"
    after = _mtimes(path / "patients" / "B" / "log_jacobian_template")
    assert after.keys() == before.keys() and after != before
    assert build_template(path, list(PATIENTS), other, force=True)["status"] == "done"


def test_missing_inputs(cohort, median_store, tmp_path):
    path = _copy(median_store[0], tmp_path)
    root = st.open_store(path)
    del root["patients/C/log_jacobian"]
    with pytest.raises(
        IncompleteOutputError,
        match=r"patient C: .*log_jacobian is absent.*"
        r"registration and jacobian stages",
    ):
        to_template_patient(path, "C", CFG)
    with pytest.raises(IncompleteOutputError, match="patient Z is not in the store"):
        to_template_patient(path, "Z", CFG)
    # no template yet
    with pytest.raises(IncompleteOutputError, match="patient A: .*build the template first"):
        to_template_patient(cohort, "A", CFG)
    # a template whose lung mask was never completed (an interrupted build) is not used
    tpl = st.open_store(path)["template"]
    tpl["lung_mask"].attrs["sscflow"] = {**tpl["lung_mask"].attrs["sscflow"], "complete": False}
    with pytest.raises(IncompleteOutputError, match="template/lung_mask is incomplete"):
        to_template_patient(path, "B", CFG)
    # ... and the build is redone, leaving out a patient without a lung mask
    hu, _, _, geom = _patient_arrays("A")
    st.write_image(st.patient_group(root, "D"), "baseline", hu, geom, stage="ingest",
                   params={}, input_hash="D")  # fmt: skip
    out = build_template(path, ["A", "B", "C", "D"], CFG)
    assert out["status"] == "done" and out["left_out"] == ["D"]
    assert "lung_mask is absent" in out["left_out_reasons"]["D"]
    assert out["patients_used"] == ["A", "B", "C"] and out["patient_id"] == "A"
    with pytest.raises(IncompleteOutputError, match="no patient has a complete baseline"):
        build_template(path, ["D", "nobody"], CFG, rebuild=True)


def test_average_template(cohort, tmp_path):
    path = _copy(cohort, tmp_path)
    cfg = replace(CFG, method="average", iterations=1)
    out = build_template(path, list(PATIENTS), cfg)
    assert out["status"] == "done" and out["source"] == "cohort-average"
    assert out["patient_id"] == "A" and out["patients_used"] == ["A", "B", "C"]
    root = st.open_store(path, mode="r")
    img = st.read_image(root["template"], "image")
    mask = st.read_image(root["template"], "lung_mask").array[...].astype(bool)
    a_hu, a_mask, _, a_geom = _patient_arrays("A")
    assert img.geometry == a_geom and img.array.dtype == np.int16
    assert mask.any() and img.meta["source"] == "cohort-average"
    # B and C registered onto A: the vote is A's lungs again
    assert _dice(mask, a_mask) > 0.93  # measured 0.96
    # Each baseline warped onto A is A up to interpolation and registration error, so their mean
    # is A's texture. Measured inside A's lungs, two voxels from the edge: 15 HU mean absolute
    # difference, NCC 0.99; averaging the baselines after the lung-centroid shift alone (B and
    # C are scaled and rotated) gives 32 HU and 0.94.
    inner = ndimage.binary_erosion(a_mask.astype(bool), iterations=2)
    diff = np.abs(img.array[...].astype(float) - a_hu)[inner]
    assert diff.mean() < 22.0, diff.mean()
    assert _ncc(img.array[...], a_hu, inner) > 0.97
    assert build_template(path, list(PATIENTS), cfg)["status"] == "skipped"


def _write_mha(array, geom: Geometry, path, pixel=sitk.sitkInt16):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geom.spacing[::-1])
    image.SetOrigin(geom.origin[::-1])
    sitk.WriteImage(sitk.Cast(image, pixel), str(path))


def test_template_from_file(cohort, tmp_path):
    path = _copy(cohort, tmp_path)
    fgeom = _geometry((40, 38, 38), (0.3, -0.2, 0.1), spacing=2.0)  # another voxel size
    z, y, x = _points(fgeom)
    _write_mha(np.rint(_chest(z, y, x)).astype(np.int16), fgeom, tmp_path / "tpl.mha")
    _write_mha((_lung_weight(z, y, x) >= 0.5).astype(np.uint8), fgeom, tmp_path / "tpl_lungs.mha",
               sitk.sitkUInt8)  # fmt: skip

    for lung_file in (None, tmp_path / "tpl_lungs.mha"):
        cfg = replace(CFG, image=tmp_path / "tpl.mha", lung_mask=lung_file)
        out = build_template(path, list(PATIENTS), cfg)
        assert out["status"] == "done" and out["source"] == "file"
        assert out["patient_id"] is None and out["patients_used"] == ["A"]
        root = st.open_store(path, mode="r")
        img = st.read_image(root["template"], "image")
        mask = st.read_image(root["template"], "lung_mask")
        g = img.geometry
        assert g.spacing == (SP, SP, SP) and mask.geometry == g  # the patients' voxel size
        truth = _lung_weight(*_points(g)) >= 0.5
        assert _dice(mask.array[...], truth) > (0.95 if lung_file else 0.85)
        expect = np.rint(_chest(*_points(g)))
        assert np.median(np.abs(img.array[...] - expect)) < 15.0  # linear resampling 2 -> 2.5 mm
        assert mask.meta["source"] == "file" and mask.meta["file"] == str(cfg.image)
        assert build_template(path, list(PATIENTS), cfg)["status"] == "skipped"

    # the template file changes: rebuilt; a lung mask of another scan: refused
    _write_mha(np.rint(_chest(z, y, x) + 5).astype(np.int16), fgeom, tmp_path / "tpl.mha")
    assert build_template(path, list(PATIENTS), cfg)["status"] == "done"
    small = _geometry((30, 38, 38), (0, 0, 0), spacing=2.0)
    _write_mha(np.ones(small.shape, np.uint8), small, tmp_path / "other.mha", sitk.sitkUInt8)
    bad = replace(cfg, lung_mask=tmp_path / "other.mha")
    with pytest.raises(InputImageError, match="is on another grid than the image"):
        build_template(path, list(PATIENTS), bad)


# --- the template is an artefact: built once, reused, rebuilt on request, shared by file


def _bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_template_is_kept_when_patients_come_and_go_and_rebuilt_on_request(cohort, tmp_path):
    from sscflow.methods.template import describe_provenance, template_provenance

    path = _copy(cohort, tmp_path)
    first = build_template(path, ["A", "B"], CFG)
    assert first["status"] == "done" and first["action"] == "built"
    assert first["reason"] == "the store has no template yet"
    prov = template_provenance(path)
    assert prov == first["provenance"]
    assert prov["source"] == "cohort-median" and prov["method"] == "median"
    assert prov["built_from"] == 2 and prov["generation"] == 1
    assert prov["patient_id"] == first["patient_id"] in ("A", "B")
    files = _bytes(path / "template")

    # a patient added, then the template's own source patient removed: kept as it is
    grown = build_template(path, ["A", "B", "C"], CFG)
    assert grown["status"] == "skipped" and grown["action"] == "reused"
    assert (grown["added"], grown["removed"]) == (1, 0)
    assert grown["patients_used"] == ["A", "B"] and grown["patient_id"] == first["patient_id"]
    # a new timepoint moves a patient's first -> last pair to <pid>/pairs/0-2: the same patient
    later = build_template(path, ["A/pairs/0-2", "B/pairs/0-2", "C"], CFG)
    assert later["action"] == "reused" and (later["added"], later["removed"]) == (1, 0)
    shrunk = build_template(path, ["B", "C"], CFG)
    assert shrunk["action"] == "reused" and (shrunk["added"], shrunk["removed"]) == (1, 1)
    assert _bytes(path / "template") == files  # byte for byte
    old_hash = st.read_image(st.open_store(path)["template"], "image").meta["input_hash"]

    # asked for: rebuilt from the patients given now, a new generation and a new input hash
    again = build_template(path, ["B", "C"], CFG, rebuild=True)
    assert again["action"] == "rebuilt" and again["reason"] == "asked for (--rebuild-template)"
    new = template_provenance(path)
    assert new["generation"] == 2 and new["built_from"] == 2 and new["patient_id"] in ("B", "C")
    assert new["content_sha256"] != prov["content_sha256"]  # another patient's baseline
    image = st.read_image(st.open_store(path)["template"], "image")
    assert image.meta["input_hash"] != old_hash  # so every template-space map is redone
    text = describe_provenance(new)
    assert f"patient {new['patient_id']}" in text and "generation 2" in text
    assert new["content_sha256"][:12] in text

    # a changed template section: rebuilt, and the reason names the key
    changed = build_template(path, ["B", "C"], replace(CFG, iterations=3))
    assert changed["action"] == "rebuilt"
    assert "template.iterations: 2 -> 3" in changed["reason"]
    assert build_template(path, ["A"], replace(CFG, iterations=3))["action"] == "reused"


def test_an_exported_template_round_trips_into_another_store(cohort, tmp_path):
    """The template of one store, written to NRRD files with its geometry (what an export
    does), is the template of another cohort's store: same voxels, same physical grid."""
    import hashlib

    from sscflow.methods.template import template_provenance

    first = tmp_path / "first" / "cohort.zarr"
    shutil.copytree(cohort, first)
    build_template(first, list(PATIENTS), CFG)
    source = st.open_store(first, mode="r")["template"]
    image, mask = st.read_image(source, "image"), st.read_image(source, "lung_mask")
    files = {}
    for name, stored, pixel in (("image", image, sitk.sitkInt16),
                                ("lung_mask", mask, sitk.sitkUInt8)):  # fmt: skip
        files[name] = tmp_path / f"template_{name}.nrrd"
        _write_mha(np.asarray(stored.array[...]), stored.geometry, files[name], pixel)
    other = tmp_path / "other" / "cohort.zarr"
    shutil.copytree(cohort, other)
    cfg = replace(CFG, image=files["image"], lung_mask=files["lung_mask"])
    out = build_template(other, ["B", "C"], cfg)
    assert out["source"] == "file" and out["action"] == "built"
    target = st.open_store(other, mode="r")["template"]
    got_image, got_mask = st.read_image(target, "image"), st.read_image(target, "lung_mask")
    assert got_image.geometry == image.geometry and got_mask.geometry == mask.geometry
    np.testing.assert_array_equal(got_image.array[...], image.array[...])
    np.testing.assert_array_equal(got_mask.array[...], mask.array[...])
    prov = template_provenance(other)
    assert prov["file"] == str(files["image"]) and prov["lung_mask_file"] == str(
        files["lung_mask"])
    assert prov["file_sha256"] == hashlib.sha256(files["image"].read_bytes()).hexdigest()
    assert prov["content_sha256"] == template_provenance(first)["content_sha256"]
    assert build_template(other, ["A", "B", "C"], cfg)["action"] == "reused"
    _write_mha(np.asarray(image.array[...]) + 1, image.geometry, files["image"], sitk.sitkInt16)
    rebuilt = build_template(other, ["B", "C"], cfg)
    assert rebuilt["action"] == "rebuilt" and "changed since the template was built" in (
        rebuilt["reason"])


def test_resample_keeps_the_edge_voxels_under_a_tiny_displacement():
    """A point a hair past the last voxel reads that voxel; half a voxel and more past, fill."""
    from sscflow.core.geometry import resample as _resample

    g = Geometry((6, 5, 4), (2.0, 2.0, 2.0), (-5.0, 3.0, 0.0))
    vol = np.random.default_rng(0).uniform(-900, -700, g.shape).astype(np.float32)
    u = np.full((3, *g.shape), -1e-4, np.float32)  # outward at voxel 0 on every axis
    np.testing.assert_allclose(_resample(vol, g, g, u, fill=-1024.0), vol, atol=0.05)
    u = np.zeros((3, *g.shape), np.float32)
    u[0] = 1.2  # 0.6 voxel up along z: the top slice is past the grid
    out = _resample(vol, g, g, u, fill=-1024.0)
    np.testing.assert_array_equal(out[-1], -1024.0)
    np.testing.assert_allclose(out[:-1], 0.4 * vol[:-1] + 0.6 * vol[1:], rtol=1e-5)
