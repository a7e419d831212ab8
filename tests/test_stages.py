"""The stage table (sscflow.stages) and the rule every stage resumes by.

Real stores, real scans (analytic chests written as NIfTI/MHA), the stages run through the same
function a Dask worker runs (``sscflow.flow.pipeline.execute``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from helpers import MINI_SEGMENT
from test_ingest import INGEST, chest, write_manifest, write_scan

import sscflow.methods.ingest
from sscflow.config import Config
from sscflow.core import store as st
from sscflow.flow.pipeline import execute
from sscflow.stages import BY_NAME, COHORT, PATIENT, STAGES, Context


def test_the_table_is_ordered_and_every_dependency_is_declared_before():
    seen = set()
    for stage in STAGES:
        assert stage.scope in (PATIENT, COHORT)
        assert set(stage.after) <= seen, stage.name
        assert set(stage.blocking) <= set(stage.after), stage.name
        assert isinstance(stage.params(Config()), dict)
        seen.add(stage.name)
    assert list(BY_NAME) == ["ingest", "segment", "extent", "registration", "jacobian",
                             "zones", "template", "to_template", "pairs", "qa", "group_means",
                             "classifier", "report"]  # fmt: skip
    assert BY_NAME["segment"].after == ("ingest",)
    assert "segment" in BY_NAME["registration"].after


def test_a_changed_segment_setting_reruns_segmentation_from_the_stored_scans(tmp_path,
                                                                              monkeypatch):
    b = write_scan(chest(), tmp_path / "b.nii.gz")
    f = write_scan(chest(lung_z_radius=26.0), tmp_path / "f.mha")
    patient = write_manifest(tmp_path, [("A", b.name, f.name, 75)]).patients[0]
    store = tmp_path / "c.zarr"
    cfg = Config(store=str(store), ingest=INGEST, segment=MINI_SEGMENT)
    ctx = Context(str(store), str(tmp_path / "results"), cfg)
    ingest = execute("ingest", ctx, patient, None, [])
    first = execute("segment", ctx, patient, None, [ingest])
    assert (ingest["status"], first["status"]) == ("done", "done"), (ingest, first)
    group = st.patient_group(st.open_store(store), "A", create=False)
    old = np.asarray(st.read_image(group, "lung_mask").array[...])
    image_meta = dict(group["baseline"].attrs["sscflow"])

    def no_reading(*args, **kw):
        raise AssertionError("an input file was read or resampled again")

    monkeypatch.setattr(sscflow.methods.ingest, "read_volume", no_reading)
    monkeypatch.setattr(sscflow.methods.ingest, "to_canonical", no_reading)
    # a closing of 0 mm keeps the vessels' holes and the lung surface's notches out of the mask
    changed = replace(cfg, segment=replace(MINI_SEGMENT, closing_mm=0.0))
    ctx = replace(ctx, cfg=changed)
    again = execute("ingest", ctx, patient, None, [])
    rerun = execute("segment", ctx, patient, None, [again])
    assert again["status"] == "skipped", again
    assert rerun["status"] == "done", rerun
    group = st.patient_group(st.open_store(store), "A", create=False)
    new = st.read_image(group, "lung_mask")
    assert new.meta["params"]["closing_mm"] == 0.0
    assert dict(group["baseline"].attrs["sscflow"]) == image_meta  # the image was not rewritten
    assert np.asarray(new.array[...]).sum() < old.sum()  # no closing: a smaller mask
    assert execute("segment", ctx, patient, None, [again])["status"] == "skipped"


def test_a_failed_segmentation_fails_the_downstream_patient_stages_not_the_cohort():
    failed = {"stage": "segment", "patient_id": "A", "status": "failed", "message": "no lungs"}
    ctx = Context("unused.zarr", "unused", Config())
    from sscflow.cohort import Patient

    patient = Patient("A", None, None, 2)  # never read: the stage does not run
    rec = execute("registration", ctx, patient, None, [failed])
    assert rec["status"] == "upstream_failed" and rec["failed_stage"] == "segment"
    gm = execute("classifier", ctx, None, None, [failed, {**failed, "stage": "group_means",
                                                          "patient_id": None}])
    assert gm["status"] == "upstream_failed" and gm["message"] == "group_means (cohort) failed"


def test_the_cohort_stages_record_their_methods_versions():
    from sscflow.methods import analysis, groups
    from sscflow.methods import zones as zone_methods
    from sscflow.stages import classifier, group_means, zones

    assert group_means.VERSION == groups.STAGE_VERSION
    assert classifier.VERSION == analysis.STAGE_VERSION
    assert zones.VERSION == zone_methods.STAGE_VERSION
