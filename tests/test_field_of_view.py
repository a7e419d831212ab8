"""What the follow-up imaged: the imaged field of view found from the pixels, the map's NaN and
the unmeasured lung where it stops short, and the end-slice warning (issue 22 item 1).

Known answers: scans built with a known cut (air, the scanner's padding, or a grid that ends),
in any direction; the real CT (``../shared/data``) where its field of view is known to cut the
lung bases and not the apices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sscflow.core.geometry import Geometry, grid_points, index_to_physical, inside, to_itk
from sscflow.core.imageio import write_dicom_series
from sscflow.methods.edges import lung_area_cm2, lungs_at_edges
from sscflow.methods.ingest import imaged_field_of_view, imaged_mask
from sscflow.methods.registration.frame import coverage_mask, imaged_on, unmeasured_parts
from sscflow.synth import planted

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"


def _chest(shape=(40, 48, 56), seed=0):
    """A body of soft tissue (40 HU + noise) with two air 'lungs', air around it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32) + rng.normal(0, 15, shape).astype(np.float32)
    cy = (y - shape[1] / 2) / shape[1]
    body = (cy / 0.42) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    hu[body] = 40.0 + rng.normal(0, 15, int(body.sum()))
    for cx in (shape[2] * 0.3, shape[2] * 0.7):
        lung = ((cy / 0.25) ** 2 + ((x - cx) / (shape[2] * 0.13)) ** 2 < 1) & (z > 2)
        lung &= z < shape[0] - 3
        hu[lung] = -850.0 + rng.normal(0, 15, int(lung.sum()))
    return hu


@pytest.mark.parametrize("fill", [-1024.0, -3024.0, -2048.0])
@pytest.mark.parametrize("axis, lo, hi", [(0, 0, 31), (0, 6, 40), (2, 9, 56), (1, 0, 44)])
def test_imaged_field_of_view_is_the_part_before_the_cut(fill, axis, lo, hi):
    hu = _chest()
    cut = hu.copy()
    index = [slice(None)] * 3
    index[axis] = slice(0, lo)
    cut[tuple(index)] = fill
    index[axis] = slice(hi, None)
    cut[tuple(index)] = fill
    d = planted.rotation(25.0, (0.3, 1.0, 0.2))  # an oblique grid: planes are the scan's own
    g = Geometry(hu.shape, (2.5, 0.8, 0.9), (-40.0, 10.0, 300.0), tuple(map(tuple, d)))
    found = imaged_field_of_view(to_itk(cut, g))
    # the truth: the cut planes, and the body's own extent on the other axes
    box = []
    for k in range(3):
        others = tuple(a for a in range(3) if a != k)
        rows = np.flatnonzero((hu > -500).any(axis=others))
        a, b = int(rows[0]), int(rows[-1]) + 1
        box.append((max(a, lo), min(b, hi)) if k == axis else (a, b))
    assert found == g.sub_grid(box)
    assert found.direction == g.direction and found.spacing == g.spacing


def test_an_uncut_scan_keeps_the_body_and_a_scan_without_tissue_its_grid():
    hu = _chest()
    g = Geometry(hu.shape, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    found = imaged_field_of_view(to_itk(hu, g))
    assert found.shape[0] == hu.shape[0]  # every axial plane crosses the body
    assert found.shape[1] < hu.shape[1] and found.shape[2] < hu.shape[2]  # air beside it, dropped
    air = np.full((8, 8, 8), -1000.0, np.float32)
    small = Geometry((8, 8, 8), g.spacing, g.origin)
    assert imaged_field_of_view(to_itk(air, small)) == small


def test_inside_with_a_margin_in_millimetres():
    g = Geometry((10, 20, 10), (2.0, 1.0, 4.0), (0.0, 0.0, 0.0))
    # x (axis 2) spans -2 .. 38 mm (half a voxel of 4 mm beyond the edge centres)
    pts = np.array([[9.0] * 4, [9.0] * 4, [-1.9, 37.9, 3.1, 32.9]])
    assert inside(pts, g).tolist() == [True, True, True, True]
    assert inside(pts, g, margin_mm=5.0).tolist() == [False, False, True, True]


def test_unmeasured_lung_is_told_apex_base_or_side():
    g = Geometry((30, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    u = np.zeros((3, *g.shape), np.float32)
    lung = np.zeros(g.shape, bool)
    lung[2:28, 4:16, 4:16] = True
    top = g.sub_grid(((0, 20), (0, 20), (0, 20)))  # stops 10 slices short of the top (z high)
    covered = coverage_mask(u, g, top)
    parts = unmeasured_parts(u, g, top, lung & ~covered)
    assert parts == pytest.approx({"apex": 8 * 12 * 12 * 0.008, "base": 0.0, "side": 0.0},
                                  abs=0.005)  # fmt: skip
    side = g.sub_grid(((0, 30), (0, 20), (8, 20)))
    parts = unmeasured_parts(u, g, side, lung & ~coverage_mask(u, g, side))
    assert parts == pytest.approx({"apex": 0.0, "base": 0.0, "side": 26 * 12 * 4 * 0.008},
                                  abs=0.005)  # fmt: skip
    # a follow-up written head first (z flipped): its low-index end is the apex side, yet what
    # is missing is still the base of the baseline's lungs
    flip = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
    f = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (58.0, 0.0, 0.0), flip)
    missing = lung & ~coverage_mask(u, g, f)
    assert missing[:10].any() and not missing[10:].any()
    assert unmeasured_parts(u, g, f, missing) == pytest.approx(
        {"apex": 0.0, "base": 8 * 12 * 12 * 0.008, "side": 0.0}, abs=0.005)


def test_the_similarity_sees_only_what_the_follow_up_imaged():
    g = Geometry((20, 12, 12), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    f = g.sub_grid(((0, 15), (0, 12), (0, 12)))
    from sscflow.methods.registration.align import identity

    got = imaged_on(g, identity(), f)
    expected = inside(grid_points(g), f).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert got[:15].all() and not got[15:].any()


def test_a_scan_that_images_the_lungs_whole_raises_no_warning(tmp_path):
    hu = _chest()  # lungs from slice 3 to slice 36 of 40
    g = Geometry(hu.shape, (5.0, 2.0, 2.0), (-100.0, 0.0, 0.0))  # lungs of 11 cm² a slice
    sitk.WriteImage(to_itk(np.rint(hu).astype(np.int16), g), str(tmp_path / "whole.nii.gz"))
    assert lungs_at_edges(tmp_path / "whole.nii.gz") == []
    cut = to_itk(np.rint(hu[:30]).astype(np.int16), g.sub_grid(((0, 30), (0, 48), (0, 56))))
    sitk.WriteImage(cut, str(tmp_path / "cut.nii.gz"))
    assert lungs_at_edges(tmp_path / "cut.nii.gz") == ["apex"]


def test_lung_area_counts_air_inside_the_body_only():
    hu = np.full((100, 100), -1000.0)
    hu[10:90, 10:90] = 40.0
    hu[20:80, 20:45] = -850.0  # a 'lung' of 60 x 25 px at 0.7 mm: 7.35 cm²
    hu[45:50, 60:64] = -950.0  # a trachea-sized air pocket: 0.098 cm², below the floor
    assert lung_area_cm2(hu, (0.7, 0.7)) == pytest.approx(60 * 25 * 0.49 / 100)
    hu[20:80, 20:45] = -100.0  # dense: not air
    assert lung_area_cm2(hu, (0.7, 0.7)) == 0.0


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")
def test_lungs_at_the_end_slices_of_the_real_ct(tmp_path):
    image = sitk.ReadImage(str(DATA))
    # its field of view cuts the lung bases, and ends above the apices
    assert lungs_at_edges(DATA) == ["base"]
    # as a DICOM series: from mid-lung up, the bottom slice cuts the lungs; cut below the
    # apices too, both ends
    sub = image[:, :, 30:48:2]  # every other slice: a small, fast series
    write_dicom_series(sub, tmp_path / "s", patient_id="X", patient_name="X", series_uid="1.2.3",
                       study_uid="1.2.4")  # fmt: skip
    assert lungs_at_edges(tmp_path / "s", "1.2.3") == ["base"]
    short = image[:, :, 0:36:3]
    write_dicom_series(short, tmp_path / "c", patient_id="X", patient_name="X",
                       series_uid="1.2.5", study_uid="1.2.4")  # fmt: skip
    assert sorted(lungs_at_edges(tmp_path / "c", "1.2.5")) == ["apex", "base"]
    # a scan written from head to feet (z flipped): the bottom slice is still the base
    flipped = sitk.Flip(image, [False, False, True], flipAboutOrigin=False)
    path = tmp_path / "flipped.nrrd"
    sitk.WriteImage(flipped, str(path))
    assert np.asarray(flipped.GetDirection())[8] < 0
    assert lungs_at_edges(path) == ["base"]
    pts = index_to_physical(np.array([[0.0, 0, 0]]), Geometry.of(flipped))
    assert pts[0, 0] > index_to_physical(np.array([[47.0, 0, 0]]), Geometry.of(flipped))[0, 0]


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")
def test_discover_warns_per_chosen_series_whose_end_slice_shows_lung(tmp_path):
    """A PACS-style export of the real CT: the baseline whole (its field of view cuts the
    bases), the follow-up stopping below the apices too. The warning names the pseudonym."""
    from sscflow.discover import DiscoverConfig, discover
    from sscflow.discover.synthetic import image_slices, write_slices

    image = sitk.ReadImage(str(DATA))[::4, ::4, :]  # 128 x 128 in-plane: small and fast
    for which, vol, date in (("baseline", image, "20190102"),
                             ("followup", image[:, :, :36], "20200305")):  # fmt: skip
        px, pos, ori, ps = image_slices(vol)
        header = {"PatientID": "12345", "PatientName": "Doe^Jane", "StudyDate": date,
                  "SliceThickness": "5", "PatientPosition": "HFS", "ConvolutionKernel": "B60f"}
        write_slices(tmp_path / "export" / "Doe^Jane_12345" / date / which, px, pos,
                     header=header, series_uid=f"1.2.826.0.1.{date}",
                     study_uid=f"1.2.826.1.{date}", orientation=ori,
                     pixel_spacing=ps)  # fmt: skip
    cfg = DiscoverConfig(min_extent_mm=60.0, max_slice_thickness_mm=5.0, require_pft=False)
    res = discover(tmp_path / "export", tmp_path / "cohort", key=tmp_path / "keys" / "k.key",
                   cfg=cfg)  # fmt: skip
    assert res.n_included == 1
    (pseudo,) = {line.split(":")[0] for line in res.warnings}
    assert pseudo.startswith("patient P") and "12345" not in pseudo
    assert [line.split(": ", 1)[1] for line in res.warnings] == [
        "baseline: lung in the bottom (base) slice; the scan may stop short of the lungs, and "
        "the log-Jacobian map is NaN where the follow-up did not image them",
        "follow-up: lung in the bottom (base) and top (apex) slices; the scan may stop short of "
        "the lungs, and the log-Jacobian map is NaN where the follow-up did not image them"]


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")
@pytest.mark.parametrize("backend", ["torch", "sitk"])
def test_a_cut_follow_up_invents_no_change_at_the_cut(backend):
    """No change at all, the follow-up's range stopping 32 mm above the lowest lung slice, air
    past the cut on the same grid: told what the follow-up imaged, the registration leaves the
    measured lung still; trusting the grid (the old behaviour) it reads the cut as change."""
    pytest.importorskip("torch") if backend == "torch" else None
    from sscflow.methods.ingest import to_canonical
    from sscflow.methods.registration import register
    from sscflow.methods.registration.common import log_jacobian
    from sscflow.methods.segment import segment_lungs

    hu, g = to_canonical(sitk.ReadImage(str(DATA)), 4.0)
    hu = hu.astype(np.float32)
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    noisy = hu + planted._noise(np.random.default_rng(0), hu.shape, 15.0)
    fu, grid, seen = planted.cut_view(noisy, g, lung, side="base", short_mm=32.0, fill="air")
    found = imaged_field_of_view(to_itk(fu, grid))  # the cut, and the body's extent in-plane
    assert (found.shape[0], found.origin[0]) == (seen.shape[0], pytest.approx(seen.origin[0]))
    p99 = {}
    for case, (image, fov) in {"uncut": (noisy, g), "told": (fu, seen),
                               "trusted": (fu, None)}.items():  # fmt: skip
        imaged = imaged_mask(grid, fov) if fov is not None else None  # as the segment stage
        mmask = segment_lungs(image, g.spacing, imaged=imaged).mask
        u = register(hu, image, mask=lung, moving_mask=mmask,
                     fixed_geometry=g, moving_geometry=grid, backend=backend,
                     moving_fov=fov)  # fmt: skip
        measured = lung & coverage_mask(u, g, seen, margin_mm=5.0)
        p99[case] = float(np.percentile(np.abs(log_jacobian(u, g.spacing)[measured]), 99))
    # Measured at 4 mm (2026-12-05, settings in mm): torch uncut 0.017, told 0.036, trusted
    # 0.36; sitk (its 2 mm level left out on 4 mm voxels) uncut 0.026, told 0.109, trusted
    # 0.41. Trusting the grid, the cut reads as change; told, torch stays near twice its own
    # noise floor at this coarse grid (issue 22's 0.02 is met at 2 mm: 0.007-0.008, see
    # benchmarks/registration.py --pairs cut). Demons, which cannot leave voxels out, stays
    # several times its own noise floor and well below what the cut invents when trusted.
    limit = {"torch": 0.045, "sitk": 0.15}[backend]
    assert p99["told"] <= limit, p99
    assert p99["trusted"] >= {"torch": 7, "sitk": 3}[backend] * p99["told"], p99


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")
def test_a_lung_cut_at_its_side_is_kept_when_segmentation_knows_what_was_imaged():
    """Air past a side cut opens the right lung to the air around the body: without the imaged
    field of view the lung is lost whole; with it, only the part past the cut is missing."""
    from sscflow.methods.ingest import imaged_mask, to_canonical
    from sscflow.methods.segment import segment_lungs

    hu, g = to_canonical(sitk.ReadImage(str(DATA)), 4.0)
    lung = segment_lungs(hu, g.spacing)
    fu, grid, seen = planted.cut_view(hu, g, lung.mask.astype(bool), side="right",
                                      short_mm=40.0, fill="air")  # fmt: skip
    found = imaged_field_of_view(to_itk(fu, grid))
    imaged = imaged_mask(grid, found)
    assert imaged is not None and not imaged[:, :, :10].any() and imaged[:, :, 40:].any()
    blind = segment_lungs(fu, grid.spacing)
    told = segment_lungs(fu, grid.spacing, imaged=imaged)
    kept = lung.mask.astype(bool) & inside(grid_points(g), seen)  # the lung the cut leaves
    assert blind.right_ml < 0.2 * lung.right_ml  # lost: joined to the air outside
    assert told.mask.astype(bool)[kept].mean() >= 0.97
    assert not told.mask.astype(bool)[~imaged].any()


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not there")
def test_a_lung_cut_by_the_grid_side_is_kept(monkeypatch):
    """A follow-up reconstructed on a field of view that ends 40 mm inside the right lung (the
    grid itself stops there: nothing past the cut to call unimaged): the lung touches the
    grid's side, and was taken for the air around the body and lost whole (p99 |log-J| 0.35
    in the measured lung on ``benchmarks/registration.py --pairs cut --fills crop``). The
    side is walled just past the grid, and only the part past the cut is missing."""
    from sscflow.methods import segment
    from sscflow.methods.ingest import to_canonical
    from sscflow.methods.quality import resample_mask
    from sscflow.methods.segment import segment_lungs

    hu, g = to_canonical(sitk.ReadImage(str(DATA)), 4.0)
    lung = segment_lungs(hu, g.spacing)
    fu, grid, seen = planted.cut_view(hu, g, lung.mask.astype(bool), side="right",
                                      short_mm=40.0, fill="crop")  # fmt: skip
    assert grid.shape[2] < g.shape[2]  # the grid ends at the cut
    kept = lung.mask.astype(bool) & inside(grid_points(g), seen)  # the lung the cut leaves
    told = segment_lungs(fu, grid.spacing)
    with monkeypatch.context() as m:  # the reference: no wall past the grid's side
        m.setattr(segment, "_walled", lambda hu, imaged, spacing: (hu, None))
        before = segment_lungs(fu, grid.spacing)
    assert before.right_ml < 0.2 * lung.right_ml
    back = resample_mask(told.mask, grid, g).astype(bool)
    assert back[kept].mean() >= 0.97
    assert abs(told.left_ml - lung.left_ml) < 0.02 * lung.left_ml


def test_the_imaged_part_beside_the_body_changes_no_lung_mask():
    """The imaged field of view ends at the body's sides where only air lies beyond (no cut):
    the air between the body and those sides stays outside the lungs (walling every side
    closed it in and read it as lung: a demo patient's mask grew to 7.7 L)."""
    from sscflow.methods.ingest import imaged_mask
    from sscflow.methods.segment import segment_lungs

    hu = _chest(shape=(40, 64, 72))
    hu[:, :, :4] = -1024.0  # the writer's constant air beyond the field of view
    g = Geometry(hu.shape, (5.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    imaged = imaged_mask(g, imaged_field_of_view(to_itk(hu, g)))
    assert imaged is not None and not imaged.all()
    plain = segment_lungs(hu, g.spacing, min_lung_ml=5.0).mask
    told = segment_lungs(hu, g.spacing, min_lung_ml=5.0, imaged=imaged).mask
    np.testing.assert_array_equal(told, plain)
