"""Each scan's blur measured on its lung outline, and the blur that matches two scans
(``sscflow.methods.registration.resolution``): against blurs applied here, of known size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sscflow.config import config_from_dict
from sscflow.errors import ConfigError
from sscflow.methods.registration.resolution import (
    Widths,
    edge_widths,
    match_blur,
    matching_blur,
)


def _chest(spacing: float, blur_mm, *, box_z_mm: float = 0.0, seed: int = 0):
    """Two ellipsoidal "lungs" (-850 HU) in soft tissue (+40 HU), a slice box of ``box_z_mm``
    along z and then a Gaussian of ``blur_mm`` (z, y, x), 15 HU noise, on a grid of
    ``spacing`` mm; the lung mask is the shape itself (no segmentation)."""
    n = int(round(120 / spacing))
    c = (np.arange(n) - (n - 1) / 2) * spacing
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    lung = np.zeros((n, n, n), bool)
    for side in (-1, 1):
        lung |= ((z / 45) ** 2 + (y / 35) ** 2 + ((x - side * 27) / 22) ** 2) <= 1
    hu = np.where(lung, -850.0, 40.0)
    if box_z_mm:
        hu = ndimage.uniform_filter1d(hu, max(1, int(round(box_z_mm / spacing))), axis=0)
    hu = ndimage.gaussian_filter(hu, [b / spacing for b in blur_mm])
    hu = hu + np.random.default_rng(seed).normal(0.0, 15.0, hu.shape)
    return hu.astype(np.float32), lung, (spacing,) * 3


@pytest.mark.parametrize("spacing", [1.0, 2.0])
@pytest.mark.parametrize("blur", [(3.0, 1.5, 1.5), (1.5, 2.5, 2.5)])
def test_edge_widths_read_the_blur_along_z_and_in_plane(spacing, blur):
    """The widths are the Gaussian's s.d. along each axis, within 10 %, on a 1 mm and a 2 mm
    grid alike (the blur is in mm, the grid's own sampling adds little)."""
    hu, lung, sp = _chest(spacing, blur)
    w = edge_widths(hu, lung, sp)
    assert w.z == pytest.approx(blur[0], rel=0.10), w
    assert w.inplane == pytest.approx(blur[1], rel=0.10), w


def test_edge_widths_need_a_lung():
    hu, lung, sp = _chest(2.0, (1.0, 1.0, 1.0))
    assert edge_widths(hu, np.zeros_like(lung), sp) == Widths(None, None)


def test_matching_blur_blurs_the_sharper_scan_per_axis():
    """Gaussians add in quadrature: 2 -> 2.5 mm needs 1.5 mm more; the follow-up sharper
    in-plane gets its own blur there; differences below a fifth of a voxel are left alone."""
    f, m = matching_blur(Widths(2.0, 1.5), Widths(2.5, 0.9), (2.0, 1.0, 1.0))
    assert f == pytest.approx([1.5, 0.0, 0.0])
    assert m == pytest.approx([0.0, 1.2, 1.2])
    assert matching_blur(Widths(2.0, 1.0), Widths(2.02, 1.0), (2.0, 2.0, 2.0)) == \
        ([0.0] * 3, [0.0] * 3)  # fmt: skip
    assert matching_blur(Widths(None, 1.0), Widths(3.0, None), (1.0,) * 3) == \
        ([0.0] * 3, [0.0] * 3)  # fmt: skip


def test_match_blur_corrects_a_slice_profile_the_gaussian_misreads():
    """A baseline of 6 mm slices (a box along z, not a Gaussian) against a follow-up of 2 mm
    ones: the blur found for the follow-up makes its measured widths the baseline's (within
    5 %), and its size is the slice profiles' difference in variance (box s.d. thickness /
    sqrt 12), within 20 %."""
    base, lung, sp = _chest(1.0, (1.0, 1.0, 1.0), box_z_mm=6.0, seed=1)
    follow, _, _ = _chest(1.0, (1.0, 1.0, 1.0), box_z_mm=2.0, seed=2)
    wf, wm, blur_f, blur_m = match_blur(base, lung, sp, follow, lung, sp)
    assert blur_f == [0.0, 0.0, 0.0] and blur_m[1:] == [0.0, 0.0], (blur_f, blur_m)
    want = np.sqrt((6.0**2 - 2.0**2) / 12.0)
    assert blur_m[0] == pytest.approx(want, rel=0.20), (blur_m, want)
    matched = edge_widths(ndimage.gaussian_filter(follow, [b / 1.0 for b in blur_m]), lung, sp)
    assert matched.z == pytest.approx(wf.z, rel=0.05), (matched, wf)


def test_registration_with_the_same_blur_on_both_is_untouched():
    """A scan against itself: equal widths, no matching blur, the very field the registration
    gives without the matching (to the bit)."""
    from sscflow.core.geometry import Geometry
    from sscflow.methods.registration import register

    hu, lung, sp = _chest(4.0, (1.5, 1.5, 1.5))
    g = Geometry(hu.shape, sp, (0.0, 0.0, 0.0))
    follow = hu + np.random.default_rng(9).normal(0.0, 10.0, hu.shape).astype(np.float32)
    fields = []
    for match in (True, False):
        u, info = register(hu, follow, mask=lung, moving_mask=lung, fixed_geometry=g,
                           moving_geometry=g, backend="torch", match_resolution=match,
                           return_info=True, iterations=(2, 2, 1), affine_iterations=(2, 1),
                           threads=1)  # fmt: skip
        fields.append(u)
        if match:
            assert info["resolution"]["blur_baseline_mm"] == [0.0, 0.0, 0.0], info
            assert info["resolution"]["blur_followup_mm"] == [0.0, 0.0, 0.0], info
        else:
            assert info["resolution"] is None
    np.testing.assert_array_equal(fields[0], fields[1])


def test_config_match_resolution_is_a_switch():
    cfg = config_from_dict({"manifest": "m.csv", "store": "s.zarr"})
    assert cfg.registration.match_resolution is False  # opt-in (README: where it fails)
    assert cfg.registration.options("torch")["match_resolution"] is False
    on = config_from_dict({"manifest": "m.csv", "store": "s.zarr",
                           "registration": {"match_resolution": True}})  # fmt: skip
    assert on.registration.options("sitk")["match_resolution"] is True
    with pytest.raises(ConfigError, match="registration.match_resolution"):
        config_from_dict({"manifest": "m.csv", "store": "s.zarr",
                          "registration": {"match_resolution": "yes"}})  # fmt: skip
