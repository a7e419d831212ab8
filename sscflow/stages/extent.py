"""extent: the ILD-extent (HAA) baseline of each scan, an attribute of the patient group."""

from sscflow.methods.extent import ILD_HIGH_HU, ILD_LOW_HU, extent_patient
from sscflow.stages.base import PATIENT, Stage, worker_scheduler


def run(ctx, patient, ups) -> dict:
    return extent_patient(ctx.store, patient.patient_id, force=ctx.force,
                          scheduler=worker_scheduler())  # fmt: skip


STAGE = Stage("extent", PATIENT, after=("segment",),
              reads=("baseline", "followup", "lung_mask", "followup_lung_mask"),
              writes=("@extent",), run=run,
              params=lambda cfg: {"low_hu": ILD_LOW_HU, "high_hu": ILD_HIGH_HU})  # fmt: skip
