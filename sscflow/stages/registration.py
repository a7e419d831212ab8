"""registration: follow-up to baseline, ``patients/<id>/{displacement, coverage}``."""

from dataclasses import asdict

from sscflow.stages.base import PATIENT, Stage, torch_backend


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.registration.stage import (
        register_patient,  # its numerics load on the worker
    )

    out = register_patient(ctx.store, patient.patient_id, ctx.cfg.registration,
                           truth_dir=ctx.truth_dir, force=ctx.force)  # fmt: skip
    # one line per warning: the run summary groups them by kind (cli.group_warnings)
    out["warning"] = "\n".join(out.pop("warnings", None) or []) or None
    truth = out.pop("truth", None) or {}
    out.update({f"truth_{k}": v for k, v in truth.items()})
    return out


STAGE = Stage("registration", PATIENT, after=("segment",),
              reads=("baseline", "followup", "lung_mask"), writes=("coverage", "displacement"),
              params=lambda cfg: asdict(cfg.registration), run=run, gpu=torch_backend)  # fmt: skip
