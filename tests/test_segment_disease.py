"""Lung masks in diseased lungs: the phantom's hard cases against its truth, disease planted into
the real CT ../shared/data/lung1_image.nrrd against an independent reference, bad input, and the
optional lungmask backend's plumbing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sscflow.config import SegmentConfig, config_from_dict
from sscflow.errors import ConfigError, MissingDependencyError, MissingInputError, SegmentationError
from sscflow.methods.quality import dice
from sscflow.methods.segment import segment_lungs
from sscflow.synth import deform, phantom
from sscflow.synth.plan import patient_streams
from sscflow.synth.plant import plant_texture, plant_wall_mass, subpleural_region

SPACING = 2.0
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _scan(ph: phantom.Phantom, seed: int, noise: float = 20.0) -> np.ndarray:
    hu = ph.hu + noise * phantom.smooth_noise(np.random.default_rng(seed), ph.hu.shape, 0.5)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _render(index: int, spacing: float = SPACING, **kw):
    streams = patient_streams(5, index)
    geometry = phantom.grid_geometry(spacing)
    anatomy = phantom.draw_anatomy(streams["anatomy"])
    vessels = phantom.grow_vessels(anatomy, streams["vessels"])
    return phantom.render_baseline(anatomy, vessels, geometry, streams["texture"], **kw)


def _ball(geometry, centre, radius) -> np.ndarray:
    z, y, x = phantom.frame_axes(geometry)
    d2 = (z[:, None, None] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2
    return d2 + (x[None, None, :] - centre[2]) ** 2 <= radius**2


@pytest.fixture(scope="module", params=[0, 1])
def diseased(request):
    ph = _render(request.param)
    seg = segment_lungs(_scan(ph, request.param), ph.geometry.spacing)
    return ph, seg


def test_phantom_has_the_hard_cases(diseased):
    ph, _ = diseased
    ml = ph.geometry.voxel_volume_ml
    assert ph.emphysema.sum() * ml > 30 and ph.fibrosis.sum() * ml > 50
    assert len(ph.disease.nodules) >= 2 and ph.nodules.any()
    hu = ph.hu
    assert np.median(hu[ph.emphysema]) < -950  # below the airway threshold
    fib = hu[ph.fibrosis]
    assert np.percentile(fib, 5) < -400 and np.percentile(fib, 75) > -150 and fib.max() <= 60
    # every lesion is lung in the truth; the hilar bulla lies in the old 20 mm midline band
    assert not ((ph.emphysema | ph.fibrosis | ph.nodules) & ~ph.lung).any()
    centre, r = ph.disease.bullae[0]
    assert abs(centre[2] - ph.anatomy.cx) - r < 20.0


def test_emphysema_fibrosis_and_nodules_stay_in(diseased):
    ph, seg = diseased
    mask = seg.mask > 0
    assert mask[ph.emphysema].mean() >= 0.99
    hilar = ph.emphysema & _ball(ph.geometry, *ph.disease.bullae[0])
    assert hilar.sum() > 50 and mask[hilar].mean() >= 0.99
    assert mask[ph.fibrosis].mean() >= 0.90
    for centre, r in ph.disease.nodules:
        nodule = ph.nodules & _ball(ph.geometry, centre, r + 1.0)
        assert mask[nodule].mean() >= 0.7, (centre, r)
    assert mask[ph.nodules].mean() >= 0.8
    assert dice(mask, ph.lung) >= 0.97


def test_trachea_out_mediastinum_out_and_sides(diseased):
    ph, seg = diseased
    a, g = ph.anatomy, ph.geometry
    z, y, x = phantom.frame_axes(g)
    mask = seg.mask > 0
    assert seg.trachea_found and seg.warnings == ()
    # the trachea lumen above the carina (radius - 1 mm) is out; so are the main bronchi
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    pts = np.stack([zz, yy, xx], axis=-1)
    for k, (start, end, r0, r1) in enumerate(a.airway_capsules(top=float(z[-1]) + 50.0)):
        dist, t = phantom._segment_distance(pts, start, end)
        lumen = dist <= r0 + t * (r1 - r0) - 1.0
        assert lumen.sum() > 100
        if k == 0:  # the trachea
            assert not (mask & lumen).any()
        else:  # a main bronchus, down to where it enters the lung
            assert (mask & lumen).sum() <= 0.02 * lumen.sum()
    assert 5.0 < seg.airway_ml < 200.0
    # the mediastinum (2 mm inside its walls, over the lungs' height) and the heart stay out
    width = a.mediastinum_halfwidth(yy)
    cavity = phantom.ellipsoid_sd((yy - a.cy, xx - a.cx), (a.cav_ay, a.cav_ax)) > 2.0
    zs = np.flatnonzero(ph.lung.any(axis=(1, 2)))
    rows = (zz >= z[zs[0]]) & (zz <= z[zs[-1]])
    mediastinum = (np.abs(xx - a.cx) < width - 2.0) & cavity & rows
    hc = a.heart_c
    heart = phantom.ellipsoid_sd((zz - hc[0], yy - hc[1], xx - hc[2]), a.heart_semi) > 2.0
    assert mediastinum.sum() > 1000 and not (mask & mediastinum).any()
    assert not (mask & heart).any()
    # labels: 1 right (x < midline), 2 left, volumes per side against the truth
    agree = seg.labels[ph.lung] == ph.sides[ph.lung]
    assert agree.mean() >= 0.98
    ml = g.voxel_volume_ml
    assert seg.right_ml == pytest.approx((ph.sides == 1).sum() * ml, rel=0.05)
    assert seg.left_ml == pytest.approx((ph.sides == 2).sum() * ml, rel=0.05)
    assert ((seg.labels > 0) == mask).all() and seg.mask.dtype == np.uint8


def test_fibrosis_grows_at_follow_up_when_worsening():
    ph = _render(2, spacing=3.0)
    axes = phantom.frame_axes(ph.geometry)
    sink = deform.Sink(tuple(ph.anatomy.sink_centre(ph.anatomy.lungs[0], 0.7, 0.5, 20.0)), 30.0,
                       -0.2)  # fmt: skip
    args = dict(ild_hu=0.0, extra_hu=0.0)
    base, worse, _ = deform.density_fields(ph.parenchyma, axes, [sink], np.random.default_rng(0),
                                           3.0, change_hu=200.0, fibrosis_margin=ph.fibrosis_margin,
                                           **args)  # fmt: skip
    _, same, _ = deform.density_fields(ph.parenchyma, axes, [sink], np.random.default_rng(0),
                                       3.0, change_hu=0.0, fibrosis_margin=ph.fibrosis_margin,
                                       **args)  # fmt: skip
    margin = ph.fibrosis_margin
    shell = ph.lung & (margin > 1.5) & (margin < 5.0) & (ph.parenchyma > 0.9)
    far = ph.lung & ~np.isfinite(margin)
    assert shell.sum() > 50
    assert float((worse - base)[shell].mean()) > 250.0  # -850 lung becomes reticular, dense
    assert float(np.abs(same - base)[shell].max()) == 0.0  # stable: no growth
    assert float(np.abs(worse - base)[far].max()) < 210.0  # away from the band: the bump only


def test_one_lung_and_no_trachea_warn_but_segment():
    ph = _render(3, spacing=3.0, disease=False)
    hu = _scan(ph, 3)
    one = hu.copy()
    one[ph.sides == 2] = 40  # a left pneumonectomy: the cavity filled with fluid / tissue
    seg = segment_lungs(one, ph.geometry.spacing)
    assert seg.components == 1 and set(np.unique(seg.labels)) == {0, 1}
    assert any("one lung" in w for w in seg.warnings)
    assert dice(seg.mask, ph.sides == 1) >= 0.95
    # cropped below the carina: no trachea, the airways stay in, a warning says so
    zs = np.flatnonzero(ph.lung.any(axis=(1, 2)))
    carina = ph.anatomy.carina_z
    z = phantom.frame_axes(ph.geometry)[0]
    top = int(np.searchsorted(z, carina - 35.0))
    low = segment_lungs(hu[zs[0] - 3 : top], ph.geometry.spacing)
    assert not low.trachea_found and any("no trachea" in w for w in low.warnings)
    assert low.airway_ml == 0.0 and low.components == 2


def _airway_lumen(ph) -> np.ndarray:
    """The phantom's trachea and main bronchi, 1 mm inside their walls (its own geometry)."""
    a, g = ph.anatomy, ph.geometry
    z, y, x = phantom.frame_axes(g)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    pts = np.stack([zz, yy, xx], axis=-1)
    lumen = np.zeros(ph.hu.shape, bool)
    for start, end, r0, r1 in a.airway_capsules(top=float(z[-1]) + 50.0):
        dist, t = phantom._segment_distance(pts, start, end)
        lumen |= dist <= r0 + t * (r1 - r0) - 1.0
    return lumen


@pytest.mark.parametrize("offset", [0, 60, 90])
def test_airways_out_when_air_reads_high(offset):
    """Air reads -1000 on some scanners and -940 or -910 on others (calibration, beam
    hardening): the airways are found from the scan's own lumen, not a fixed -950 HU (which
    left them all in the mask at +60)."""
    ph = _render(3, spacing=3.0, disease=False)
    hu = (_scan(ph, 3).astype(np.int32) + offset).astype(np.int16)
    lumen = _airway_lumen(ph)
    assert lumen.sum() * ph.geometry.voxel_volume_ml > 20.0
    assert (float(np.median(hu[lumen])) > -950.0) == (offset >= 60)
    seg = segment_lungs(hu, ph.geometry.spacing)
    assert seg.trachea_found
    assert (seg.mask[lumen] > 0).mean() <= 0.10
    assert dice(seg.mask, ph.lung) >= 0.95


def test_pleural_masses_stay_in():
    """Soft-tissue masses of 25-40 mm against the costal pleura at five places (known from the
    phantom's own lung): at least half of each is lung; the mediastinum and heart stay out."""
    ph = _render(3, spacing=3.0, disease=False)
    hu = _scan(ph, 3)
    rng = np.random.default_rng(5)
    hc, semi = ph.anatomy.heart_c, ph.anatomy.heart_semi
    z, y, x = phantom.frame_axes(ph.geometry)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    heart = phantom.ellipsoid_sd((zz - hc[0], yy - hc[1], xx - hc[2]), semi) > 2.0
    cases = [(-1, 0.5, 0.0, 30.0), (1, 0.4, 0.0, 40.0), (-1, 0.3, 60.0, 25.0),
             (1, 0.6, -45.0, 35.0), (1, 0.3, 90.0, 30.0)]  # fmt: skip
    for side, height, angle, diameter in cases:
        planted, mass = plant_wall_mass(hu, ph.lung, ph.geometry.spacing, rng, side=side,
                                        height=height, angle_deg=angle,
                                        diameter_mm=diameter)  # fmt: skip
        # most of the ellipsoid replaced lung (the rest is chest wall)
        ellipsoid_ml = math.pi / 6 * 0.8 * diameter**3 / 1000.0
        assert mass.sum() * ph.geometry.voxel_volume_ml > 0.4 * ellipsoid_ml
        seg = segment_lungs(planted, ph.geometry.spacing)
        assert (seg.mask[mass] > 0).mean() >= 0.50, (side, height, angle, diameter)
        assert dice(seg.mask, ph.lung) >= 0.96
        assert not (seg.mask & heart).any()


def test_lungmask_backend_errors(tmp_path):
    hu = np.full((8, 8, 8), -1000, np.int16)
    with pytest.raises(SegmentationError, match="lungmask_weights"):
        segment_lungs(hu, (1.0, 1.0, 1.0), backend="lungmask")
    with pytest.raises(MissingInputError, match="never downloads"):
        segment_lungs(hu, (1.0, 1.0, 1.0), backend="lungmask",
                      lungmask_weights=str(tmp_path / "absent.pth"))  # fmt: skip
    with pytest.raises(SegmentationError, match="threshold. or .lungmask"):
        segment_lungs(hu, (1.0, 1.0, 1.0), backend="unet")
    with pytest.raises(ConfigError, match="lungmask_weights"):
        config_from_dict({"segment": {"backend": "lungmask"}})
    try:
        import lungmask  # noqa: F401
    except ImportError:
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"not used")
        with pytest.raises(MissingDependencyError, match=r'pip install "sscflow\[lungmask\]"'):
            segment_lungs(hu, (1.0, 1.0, 1.0), backend="lungmask", lungmask_weights=str(weights))


def test_lungmask_backend_plumbing(tmp_path):
    """A randomly initialised R231-shaped U-net saved to a temporary file: shapes, grid, labels
    and volumes come back on the canonical grid (no accuracy claim)."""
    pytest.importorskip("lungmask")
    import torch
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True,
               residual=False)  # fmt: skip
    weights = tmp_path / "random_r231.pth"
    torch.save(net.state_dict(), weights)
    ph = _render(4, spacing=6.0, disease=False)
    zc = int(np.flatnonzero(ph.lung.any(axis=(1, 2))).mean())
    hu = _scan(ph, 4)[zc - 2 : zc + 2]  # four slices: the U-net runs at 256 x 256 per slice
    cfg = SegmentConfig(backend="lungmask", lungmask_weights=str(weights), min_lung_ml=0.0)
    from dataclasses import asdict

    try:
        seg = segment_lungs(hu, ph.geometry.spacing, **asdict(cfg))
    except SegmentationError as exc:  # a random model may find nothing: still a clear error
        assert "no lung" in str(exc)
        return
    assert seg.labels.shape == hu.shape and seg.mask.shape == hu.shape
    assert set(np.unique(seg.labels)) <= {0, 1, 2}
    assert ((seg.labels > 0) == (seg.mask > 0)).all()
    ml = ph.geometry.voxel_volume_ml
    assert seg.volume_ml == pytest.approx((seg.labels > 0).sum() * ml)


# --- the real CT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ct():
    image_path, label_path = DATA / "lung1_image.nrrd", DATA / "lung1_label.nrrd"
    if not image_path.exists():
        pytest.skip(f"{image_path} is not there")
    from sscflow.core.imageio import read_volume
    from sscflow.methods.ingest import to_canonical
    from sscflow.methods.quality import threshold_reference

    image = read_volume(image_path)
    hu, geometry = to_canonical(image, 1.0)
    ref, _ = to_canonical(threshold_reference(image), 1.0, label=True)
    tumour, _ = to_canonical(read_volume(label_path), 1.0, label=True)
    return hu, geometry, ref > 0, tumour > 0


@pytest.mark.slow
def test_real_ct_keeps_planted_disease_and_the_tumour(real_ct):
    hu, geometry, ref, tumour = real_ct
    sp = geometry.spacing
    region = subpleural_region(ref, sp, depth_mm=15.0)
    assert region.sum() * geometry.voxel_volume_ml > 200.0
    rng = np.random.default_rng(3)
    # emphysema-like: bullae of -990 HU against the mediastinal pleura at the hila, in the
    # midline band the old segmenter filed as airway
    emph = np.zeros(ref.shape, bool)
    xs = np.flatnonzero(ref.any(axis=(0, 1)))
    mid = 0.5 * (xs[0] + xs[-1])
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    zc = int(zs[0] + 0.6 * (zs[-1] - zs[0]))
    for side in (-1, 1):
        cols = np.flatnonzero(ref[zc].any(axis=0))
        cols = cols[(cols - mid) * side >= 20]  # lateral of the trachea and oesophagus
        x0 = int(cols.min() if side > 0 else cols.max())  # the medial edge of that lung
        rows = np.flatnonzero(ref[zc, :, x0 + side * 8])
        c = np.array([zc, np.median(rows), x0 + side * 8])
        zz, yy, xx = np.ogrid[: ref.shape[0], : ref.shape[1], : ref.shape[2]]
        emph |= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 100) & ref
    assert emph.sum() > 2000
    planted = plant_texture(hu, region, (-500.0, -100.0), sp, rng)
    planted[emph] = np.clip(-990 + rng.normal(0, 10, emph.sum()), -1024, -960).astype(np.int16)
    seg = segment_lungs(planted, sp)
    mask = seg.mask > 0
    assert mask[region].mean() >= 0.90
    assert mask[emph].mean() >= 0.99
    assert mask[tumour].mean() >= 0.95
    assert dice(mask, ref) >= 0.96
    assert seg.airway_ml < 60.0 and seg.components == 2

    denser = plant_texture(hu, region, (-300.0, 0.0), sp, rng, cysts=0.05)
    seg = segment_lungs(denser, sp)
    mask = seg.mask > 0
    assert mask[region].mean() >= 0.80
    assert dice(mask, ref) >= 0.95


@pytest.mark.slow
def test_real_ct_trachea_and_main_bronchi_out(real_ct):
    """The trachea and main bronchi of the real CT (found by :func:`airway_reference`: tracked
    slice by slice and along hand-traced centrelines, not by the segmenter) are at most 10% in
    the mask: as scanned, with air reading 70 HU high, with noise, cut 20 mm above the carina
    and on a 2 mm grid."""
    from sscflow.core.imageio import read_volume
    from sscflow.methods.ingest import to_canonical
    from sscflow.methods.quality import airway_reference

    hu, geometry, _, _ = real_ct
    ref = airway_reference(hu, geometry)
    assert 15.0 < ref.sum() * geometry.voxel_volume_ml < 30.0
    top = int(np.flatnonzero(ref.any(axis=(1, 2)))[0] + round(40.0 / geometry.spacing[0]))
    rng = np.random.default_rng(7)
    noise = ndi_smooth_noise(rng, hu.shape, 60.0)
    cases = {
        "as scanned": (hu, ref),
        "air +70 HU": ((hu.astype(np.int32) + 70).astype(np.int16), ref),
        "noise 60 HU": (np.clip(hu + noise, -1024, 3071).astype(np.int16), ref),
        "cut 40 mm above the lowest bronchus": (hu[:top], ref[:top]),
    }
    for name, (h, r) in cases.items():
        seg = segment_lungs(h, geometry.spacing)
        assert seg.trachea_found, name
        assert (seg.mask[r] > 0).mean() <= 0.10, name
    hu2, g2 = to_canonical(read_volume(DATA / "lung1_image.nrrd"), 2.0)
    ref2 = airway_reference(hu2, g2)
    seg = segment_lungs(hu2, g2.spacing)
    assert (seg.mask[ref2] > 0).mean() <= 0.10


def ndi_smooth_noise(rng, shape, sd: float) -> np.ndarray:
    """Gaussian noise smoothed over about 1 mm, scaled to ``sd`` HU."""
    from scipy import ndimage as ndi

    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.7)
    return n * np.float32(sd / n.std())


@pytest.mark.slow
def test_real_ct_keeps_pleural_masses(real_ct):
    """Soft-tissue masses of 20-40 mm planted against the costal pleura of the real CT at six
    places (lateral, anterior, posterior, both sides, three heights): at least half of each is in
    the mask, and the rest of the mask is unchanged (Dice against the reference)."""
    hu, geometry, ref, _ = real_ct
    sp = geometry.spacing
    rng = np.random.default_rng(11)
    base = dice(segment_lungs(hu, sp).mask, ref)
    cases = [(-1, 0.5, 0.0, 30.0), (1, 0.4, 0.0, 40.0), (-1, 0.3, 60.0, 20.0),
             (1, 0.6, -45.0, 30.0), (-1, 0.7, -30.0, 40.0), (1, 0.25, 90.0, 25.0)]  # fmt: skip
    for side, height, angle, diameter in cases:
        planted, mass = plant_wall_mass(hu, ref, sp, rng, side=side, height=height,
                                        angle_deg=angle, diameter_mm=diameter)  # fmt: skip
        seg = segment_lungs(planted, sp)
        assert (seg.mask[mass] > 0).mean() >= 0.50, (side, height, angle, diameter)
        assert dice(seg.mask, ref) >= base - 0.003
