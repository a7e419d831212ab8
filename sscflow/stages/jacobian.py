"""jacobian: the log-Jacobian map and its summary, ``patients/<id>/log_jacobian``."""

from dataclasses import asdict

from sscflow.stages.base import PATIENT, Stage, worker_scheduler


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.jacobian.stage import (
        log_jacobian_patient,  # its numerics load on the worker
    )

    return log_jacobian_patient(ctx.store, patient.patient_id, ctx.cfg.jacobian,
                                scheduler=worker_scheduler(), force=ctx.force)  # fmt: skip


STAGE = Stage("jacobian", PATIENT, after=("registration",),
              reads=("displacement", "coverage", "lung_mask"), writes=("log_jacobian",),
              params=lambda cfg: asdict(cfg.jacobian), run=run)  # fmt: skip
