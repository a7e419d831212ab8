"""to_template: each patient's map in template space, ``patients/<id>/log_jacobian_template``."""

from dataclasses import asdict

from sscflow.stages.base import PATIENT, Stage, torch_backend


def run(ctx, patient, ups) -> dict:
    if not patient.primary:  # a long manifest's other pairs: nothing downstream reads their map
        return {"status": "skipped", "needed": False,  # sscflow status: done, not pending
                "message": "not the patient's first -> last pair: the cohort statistics use "
                           "that pair's map only"}  # fmt: skip
    from sscflow.methods.template import (
        to_template_patient,  # its numerics load on the worker
    )

    out = to_template_patient(ctx.store, patient.patient_id, ctx.cfg.template, force=ctx.force)
    qa = out.pop("qa", None) or {}
    out.update({k: v for k, v in qa.items() if k not in out})
    return out


STAGE = Stage("to_template", PATIENT, after=("jacobian", "template"),
              reads=("baseline", "lung_mask", "log_jacobian"),
              writes=("template_displacement", "log_jacobian_template"),
              params=lambda cfg: asdict(cfg.template.registration), run=run,
              gpu=torch_backend)  # fmt: skip
