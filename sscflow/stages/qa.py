"""qa: each patient's QA page, ``RESULTS/report/qa/<id>.html``, recorded in ``@qa_page``."""

from sscflow.stages.base import PATIENT, Stage


def run(ctx, patient, ups) -> dict:
    from sscflow.views.qa import qa_patient  # pages and figures load on the worker

    return qa_patient(ctx.store, patient.patient_id, ctx.results, force=ctx.force)


# drawn whatever the template-space stage gave (it shows what failed), once the patient's scans
# and masks are in the store
STAGE = Stage("qa", PATIENT, after=("segment", "to_template", "zones"),
              needs=("segment",),
              reads=("baseline", "lung_mask"), writes=("@qa_page",), params=lambda cfg: {},
              run=run)  # fmt: skip
