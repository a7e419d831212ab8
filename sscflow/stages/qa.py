"""qa: each patient's QA page, ``RESULTS/report/qa/<id>.html``, recorded in ``@qa_page``."""

from sscflow.stages.base import PATIENT, Stage


def run(ctx, patient, ups) -> dict:
    from sscflow.stages.pairs import patient_figure
    from sscflow.views.qa import qa_patient  # pages and figures load on the worker

    trajectory = patient_figure(ctx.results, patient.subject_id)
    return qa_patient(ctx.store, patient.patient_id, ctx.results, force=ctx.force,
                      trajectory=trajectory if trajectory.is_file() else None)  # fmt: skip


# drawn whatever the template-space stage gave (it shows what failed), once the patient's scans
# and masks are in the store; after the pairs stage, whose trajectory figure of a patient with
# three scans or more each of its pairs' pages shows
STAGE = Stage("qa", PATIENT, after=("segment", "to_template", "zones", "pairs"),
              needs=("segment",),
              reads=("baseline", "lung_mask"), writes=("@qa_page",), params=lambda cfg: {},
              run=run)  # fmt: skip
