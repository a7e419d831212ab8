"""High-attenuation area on crafted volumes with known counts, and the per-patient stage."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from sscflow.core import store as st
from sscflow.core.geometry import Geometry
from sscflow.errors import IncompleteOutputError
from sscflow.methods.extent import extent_patient, high_attenuation_area

SHAPE = (4, 5, 6)
GEOMETRY = Geometry(SHAPE, (2.0, 1.0, 1.0), (0.0, -3.0, 5.0))


def crafted(n_haa: int, n_lung: int) -> tuple[np.ndarray, np.ndarray]:
    """HU (int16) and mask (uint8): ``n_lung`` lung voxels, the first ``n_haa`` of them in the
    HAA range (alternately on the two inclusive bounds), the rest -850 HU; outside the lung
    every voxel is -400 HU (in range, but must not count)."""
    hu = np.full(SHAPE, -400, np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    flat_hu, flat_mask = hu.reshape(-1), mask.reshape(-1)
    flat_mask[:n_lung] = 1
    flat_hu[:n_lung] = -850
    flat_hu[:n_haa] = np.where(np.arange(n_haa) % 2 == 0, -600, -250)
    return hu, mask


def test_haa_known_counts_and_inclusive_bounds():
    hu, mask = crafted(n_haa=15, n_lung=60)
    assert high_attenuation_area(hu, mask) == pytest.approx(25.0)
    # just outside the bounds: not counted
    hu.reshape(-1)[:2] = (-601, -249)
    assert high_attenuation_area(hu, mask) == pytest.approx(100 * 13 / 60)
    assert high_attenuation_area(hu, mask, low=-601, high=-249) == pytest.approx(25.0)


def test_haa_dask_equals_numpy():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 100, SHAPE).astype(np.int16)
    mask = (rng.random(SHAPE) < 0.6).astype(np.uint8)
    expected = high_attenuation_area(hu, mask)
    ref = 100 * np.count_nonzero(mask.astype(bool) & (hu >= -600) & (hu <= -250)) / mask.sum()
    assert expected == pytest.approx(ref)
    lazy_hu = da.from_array(hu, chunks=(2, 3, 4))
    lazy_mask = da.from_array(mask, chunks=(3, 2, 5))  # other chunks: rechunked like hu
    assert high_attenuation_area(lazy_hu, lazy_mask) == pytest.approx(expected)
    assert high_attenuation_area(lazy_hu, mask) == pytest.approx(expected)


def test_haa_bad_input():
    hu, mask = crafted(3, 10)
    with pytest.raises(ValueError, match="mask is empty"):
        high_attenuation_area(hu, np.zeros_like(mask))
    with pytest.raises(ValueError, match="mask is empty"):
        high_attenuation_area(da.from_array(hu, chunks=2), da.zeros(SHAPE, chunks=2))
    with pytest.raises(ValueError, match="same grid"):
        high_attenuation_area(hu, mask[:-1])
    with pytest.raises(ValueError, match="must not exceed"):
        high_attenuation_area(hu, mask, low=-200, high=-300)


# --- the per-patient stage ----------------------------------------------------------------------


def _write(group, name, data, tag):
    st.write_image(group, name, data, GEOMETRY, stage="test", params={"tag": tag},
                   input_hash=f"hash-{name}-{tag}", chunk=3)  # fmt: skip


@pytest.fixture
def cohort(tmp_path):
    root = st.open_store(tmp_path / "s.zarr")
    group = st.patient_group(root, "P001")
    group.attrs["sscflow"] = {"clinical": {"age": 60}, "functional": "worsening"}
    hu, mask = crafted(n_haa=6, n_lung=60)  # 10 %
    _write(group, "baseline", hu, 1)
    _write(group, "lung_mask", mask, 1)
    hu, mask = crafted(n_haa=12, n_lung=48)  # 25 %
    _write(group, "followup", hu, 1)
    _write(group, "followup_lung_mask", mask, 1)
    return tmp_path / "s.zarr", root


def test_extent_patient_known_percentages_and_skip(cohort):
    path, root = cohort
    out = extent_patient(str(path), "P001")
    assert out["status"] == "done" and out["patient_id"] == "P001"
    assert out["haa_baseline"] == pytest.approx(10.0)
    assert out["haa_followup"] == pytest.approx(25.0)
    assert out["delta_haa"] == pytest.approx(15.0)

    group = st.patient_group(st.open_store(path, mode="r"), "P001", create=False)
    stored = group.attrs["extent"]
    assert stored["haa_baseline"] == pytest.approx(10.0)
    assert stored["lung_voxels_followup"] == 48 and stored["params"]["low_hu"] == -600.0
    assert group.attrs["sscflow"]["functional"] == "worsening"  # ingest's attribute untouched

    again = extent_patient(str(path), "P001")
    assert again["status"] == "skipped" and again["delta_haa"] == pytest.approx(15.0)
    assert extent_patient(root, "P001", force=True)["status"] == "done"

    # a changed input (new follow-up hash) is recomputed
    _write(st.patient_group(root, "P001"), "followup", crafted(24, 48)[0], 2)
    redo = extent_patient(str(path), "P001", scheduler="synchronous")
    assert redo["status"] == "done" and redo["haa_followup"] == pytest.approx(50.0)


def test_extent_patient_missing_inputs(cohort):
    path, root = cohort
    with pytest.raises(IncompleteOutputError, match="P999.*ingest the patient first"):
        extent_patient(str(path), "P999")
    del root["patients/P001/followup_lung_mask"]
    with pytest.raises(IncompleteOutputError, match="P001.*followup_lung_mask.*ingest the patient"):
        extent_patient(str(path), "P001")
    with pytest.raises(IncompleteOutputError, match="does not exist"):
        extent_patient(str(path.parent / "none.zarr"), "P001")
    assert not (path.parent / "none.zarr").exists()


def test_extent_counts_dense_disease_and_stores_its_band(cohort):
    """Fibrosis denser than classic HAA (-250..0 HU), now inside the lung masks, is counted by
    the stage's ILD band; the band is stored with the result."""
    path, root = cohort
    group = st.patient_group(root, "P001")
    hu, mask = crafted(n_haa=0, n_lung=48)
    hu.reshape(-1)[:12] = (-200, -100, 0) * 4  # dense reticulation / honeycomb walls
    hu.reshape(-1)[12:14] = (1, 40)  # soft tissue (vessels): above the band
    _write(group, "followup", hu, 3)
    out = extent_patient(str(path), "P001")
    assert out["haa_followup"] == pytest.approx(100 * 12 / 48)
    assert high_attenuation_area(hu, mask) == 0.0  # classic -600..-250 HAA misses them
    stored = st.patient_group(st.open_store(path, mode="r"), "P001", create=False).attrs["extent"]
    assert stored["band_hu"] == [-600.0, 0.0] and stored["params"]["high_hu"] == 0.0
