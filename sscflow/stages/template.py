"""template: the common space, ``template/{image, lung_mask}``, built once and then reused."""

from dataclasses import asdict

from sscflow.stages.base import COHORT, FAILED, Stage, cohort_ids, torch_backend


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.template import (  # its numerics load on the worker
        build_template,
        describe_provenance,
    )

    # one baseline per patient: its primary pair's (every pair from timepoint 0 shares it)
    ok = {u["patient_id"] for u in ups if u["status"] not in FAILED}
    ids = [p for p in cohort_ids(ups) if p in ok]
    if not ids and ctx.cfg.template.image is None:
        return {"status": "upstream_failed",
                "message": "no patient was ingested; nothing to build a template from"}
    out = build_template(ctx.store, ids, ctx.cfg.template, force=ctx.force,
                         rebuild=ctx.rebuild_template)  # fmt: skip
    out["template_patient"] = out.pop("patient_id", None)  # the record's id is the cohort's
    out.pop("patients_used", None)
    left = out.pop("left_out", None) or []
    prov = out.pop("provenance", None) or {}
    return {**out, "left_out": len(left), "provenance": describe_provenance(prov),
            "generation": prov.get("generation")}  # fmt: skip


STAGE = Stage("template", COHORT, after=("segment",), reads=("baseline", "lung_mask"),
              writes=("template/image", "template/lung_mask"),
              params=lambda cfg: asdict(cfg.template), run=run, gpu=torch_backend)  # fmt: skip
