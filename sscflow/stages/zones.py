"""zones: the baseline's lung zones and the log-Jacobian per zone, ``patients/<id>/zones``."""

from sscflow.stages.base import PATIENT, Stage

VERSION = 1  # sscflow.methods.zones.STAGE_VERSION (a test keeps them equal)


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.zones import zones_patient  # its numerics load on the worker

    return zones_patient(ctx.store, patient.patient_id, rind_mm=ctx.cfg.zones.rind_mm,
                         force=ctx.force, t0=patient.t0, t1=patient.t1)  # fmt: skip


STAGE = Stage("zones", PATIENT, after=("jacobian",),
              reads=("lung_mask", "lung_labels", "log_jacobian"), writes=("zones",),
              params=lambda cfg: {"rind_mm": cfg.zones.rind_mm, "version": VERSION},
              run=run)  # fmt: skip
