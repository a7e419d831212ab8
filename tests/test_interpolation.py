"""The follow-up's resampling blur given to the baseline (``registration.match_interpolation``).

Reference: SimpleITK's own cubic B-spline resampling (``sitkBSpline``, what ``register`` resamples
the follow-up with) of a sampled cosine: the amplitude it passes at a shift of a fraction of a
voxel is what the baseline's filter must pass."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from sscflow.methods.registration.interpolation import match_interpolation, match_resampling

N = 256


def _amplitude(signal: np.ndarray, w: float) -> float:
    """The amplitude of the cosine of frequency ``w`` (radians per sample) in ``signal``, away
    from its ends (least squares on cos and sin)."""
    n = np.arange(len(signal))[40:-40]
    basis = np.stack([np.cos(w * n), np.sin(w * n)], 1)
    (a, b), *_ = np.linalg.lstsq(basis, signal[40:-40], rcond=None)
    return float(np.hypot(a, b))


@pytest.mark.parametrize("t", [0.125, 0.25, 0.375, 0.5])
@pytest.mark.parametrize("w", [np.pi / 2, 3 * np.pi / 4])
def test_the_filter_passes_what_simpleitk_resampling_passes(t, w):
    x = np.cos(w * np.arange(N))
    volume = np.broadcast_to(x, (4, 4, N)).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    shift = sitk.TranslationTransform(3, (t, 0.0, 0.0))  # x, in voxels of spacing 1
    resampled = sitk.GetArrayFromImage(sitk.Resample(image, image, shift, sitk.sitkBSpline, 0.0))
    want = _amplitude(resampled[2, 2].astype(np.float64), w)
    got = _amplitude(match_interpolation(volume, np.eye(3), np.array([0.0, 0.0, t]))[2, 2], w)
    assert abs(got - want) <= 0.015, (got, want)
    if t == 0.5 and w > 2:
        assert want < 0.8  # the resampling does attenuate there


def test_torch_and_numpy_filter_alike_and_a_map_on_the_grid_changes_nothing():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 14, 16)).astype(np.float32)
    m = np.array([[0.98, 0.05, 0.0], [0.02, 1.01, 0.1], [0.0, -0.04, 0.99]])
    b = np.array([0.3, 1.7, -2.2])
    a = match_interpolation(x, m, b)
    assert np.abs(a - x).max() > 0.1  # it filters
    assert np.allclose(match_interpolation(torch.from_numpy(x), m, b).numpy(), a, atol=1e-5)
    # whole voxels: nothing to match, the baseline as it was
    same = match_interpolation(x, np.eye(3), np.array([2.0, -1.0, 0.0]))
    assert same is x


def test_the_fraction_is_read_along_the_followups_axis_in_physical_space():
    """A follow-up on a grid shifted half a voxel along x (and whole voxels along z): the
    baseline is filtered along x alone, whatever the grids' origins."""
    from sscflow.core.geometry import Geometry

    fg = Geometry((6, 8, 40), (2.0, 1.5, 1.0), (-10.0, 3.0, 7.0))
    mg = Geometry((6, 8, 40), (2.0, 1.5, 1.0), (-14.0, 3.0, 7.5))
    x = np.zeros(fg.shape, np.float32)
    x[3, 4, 20] = 1.0
    out = match_resampling(x, mg, fg, np.eye(3), np.zeros(3))
    assert np.isclose(out.sum(), 1.0, atol=1e-5)  # a zero-phase filter that keeps the mean
    assert out[3, 4, 20] < 0.9 and (out[:, :, 20] != 0).sum() == 1  # along x only
    assert np.allclose(out[3, 4, 15:26], out[3, 4, 15:26][::-1])  # symmetric: no shift


def test_config_match_interpolation_is_on_and_a_switch():
    from sscflow.config import config_from_dict
    from sscflow.errors import ConfigError

    cfg = config_from_dict({"manifest": "m.csv", "store": "s.zarr"})
    assert cfg.registration.match_interpolation is True
    assert cfg.registration.options("torch")["match_interpolation"] is True
    off = config_from_dict({"manifest": "m.csv", "store": "s.zarr",
                            "registration": {"match_interpolation": False}})  # fmt: skip
    assert off.registration.options("sitk")["match_interpolation"] is False
    with pytest.raises(ConfigError, match="registration.match_interpolation"):
        config_from_dict({"manifest": "m.csv", "store": "s.zarr",
                          "registration": {"match_interpolation": "yes"}})  # fmt: skip
