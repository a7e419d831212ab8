"""Lung masks on synthetic chest CT against the generator's lung truth (an independent answer)."""

from __future__ import annotations

import numpy as np
import pytest

from sscflow.cohort import read_manifest
from sscflow.config import IngestConfig, SegmentConfig
from sscflow.core import store as st
from sscflow.core.imageio import read_volume
from sscflow.errors import SegmentationError
from sscflow.methods.ingest import ingest_cohort, to_canonical
from sscflow.methods.quality import dice, lung_mask_dice, resample_mask
from sscflow.methods.segment import segment_lungs
from sscflow.synth import read_truth, synthesize_cohort

SPACING = 2.5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = synthesize_cohort(3, out, spacing=SPACING, seed=11)
    return out, read_manifest(manifest)


@pytest.mark.slow
def test_masks_match_truth_on_synthetic_scans(cohort, tmp_path):
    out, manifest = cohort
    store = str(tmp_path / "c.zarr")
    results = ingest_cohort(manifest, store, IngestConfig(spacing_mm=SPACING), SegmentConfig())
    assert all(r.status == "done" for r in results), [r.message for r in results]
    scores = lung_mask_dice(store, out, [p.patient_id for p in manifest.patients])
    assert min(scores.values()) >= 0.95, scores
    # follow-up masks against the warped truth, and lung volumes against the truth volume
    root = st.open_store(store, mode="r")
    for p in manifest.patients:
        truth = read_truth(out, p.patient_id)
        group = st.patient_group(root, p.patient_id, create=False)
        fu = st.read_image(group, "followup_lung_mask")
        fu_grid = getattr(truth, "followup_geometry", None) or truth.geometry
        fu_truth = resample_mask(truth.lung_followup, fu_grid, fu.geometry)  # physical space
        assert dice(np.asarray(fu.array[...]), fu_truth) >= 0.95
        labels = np.asarray(st.read_image(group, "followup_lung_labels").array[...])
        assert set(np.unique(labels)) == {0, 1, 2} and ((labels > 0) == (fu.array[...] > 0)).all()
        truth_ml = truth.lung.sum() * truth.geometry.voxel_volume_ml
        assert group["lung_mask"].attrs["sscflow"]["lung_volume_ml"] == pytest.approx(
            truth_ml, rel=0.05
        )


@pytest.mark.slow
def test_airways_are_excluded(cohort):
    out, manifest = cohort
    p = manifest.patients[0]
    hu, geom = to_canonical(read_volume(p.baseline), SPACING)
    truth = read_truth(out, p.patient_id)
    result = segment_lungs(hu, geom.spacing)
    lung = resample_mask(truth.lung, truth.geometry, geom)
    # the trachea at the top slices is air inside the body but not lung
    top = hu.shape[0] - 3
    assert (hu[top] < -950).any()
    assert not (result.mask[top] & (hu[top] < -950)).any()
    assert result.airway_ml > 5.0
    assert dice(result.mask, lung) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("part", ["lower", "upper"])
def test_partial_thorax(cohort, part):
    """Scans covering only part of the chest: lungs touch the first or last slice."""
    out, manifest = cohort
    p = manifest.patients[1]
    hu, geom = to_canonical(read_volume(p.baseline), SPACING)
    t = read_truth(out, p.patient_id)
    truth = resample_mask(t.lung, t.geometry, geom)
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = (zs[0] + zs[-1]) // 2
    sl = slice(0, mid) if part == "lower" else slice(mid, None)
    result = segment_lungs(hu[sl], geom.spacing)
    assert result.mask[0 if part == "upper" else -1].any()
    assert dice(result.mask, truth[sl]) >= 0.95


def test_errors_on_volumes_without_lungs():
    spacing = (2.0, 2.0, 2.0)
    z, y, x = np.mgrid[0:16, 0:32, 0:32]
    body = ((y - 16) ** 2 + (x - 16) ** 2) < 144
    solid = np.where(body, 40, -1000).astype(np.int16)
    with pytest.raises(SegmentationError, match="no air inside the body"):
        segment_lungs(solid, spacing)
    with pytest.raises(SegmentationError, match="no body found"):
        segment_lungs(np.full((8, 8, 8), -1000, np.int16), spacing)
    tiny = solid.copy()
    tiny[7:10, 15:18, 15:18] = -900  # 0.2 mL of air: far below min_lung_ml
    with pytest.raises(SegmentationError, match="below min_lung_ml"):
        segment_lungs(tiny, spacing)
    with pytest.raises(SegmentationError, match="3-D"):
        segment_lungs(solid[0], spacing)
