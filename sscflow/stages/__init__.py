"""The stages of a run, declared once, in the order they run.

Each stage is one module here (a :class:`~sscflow.stages.base.Stage` named ``STAGE``: its name,
per patient or per cohort, what it reads and writes, the config it depends on, whether it wants
a GPU, and the function that runs it; the function calls the method's own code). The pipeline's
plan, dispatch, resume, ``sscflow status``, progress bars and run summary all come from
:data:`STAGES`. Adding a stage is one module and one line below.

Every output records the hash of its inputs (their own hashes, in order) and of its parameters
(``sscflow.core.store.upstream_hash``); an output whose record matches is skipped
(``sscflow.core.store.current_record``), whether a patient's or the cohort's.
"""

from sscflow.stages import (
    classifier,
    extent,
    group_means,
    ingest,
    jacobian,
    pairs,
    qa,
    registration,
    report,
    segment,
    template,
    to_template,
    zones,
)
from sscflow.stages.base import COHORT, FAILED, FINISHED, PATIENT, Context, Stage

STAGES: tuple[Stage, ...] = (
    ingest.STAGE,
    segment.STAGE,
    extent.STAGE,
    registration.STAGE,
    jacobian.STAGE,
    zones.STAGE,
    template.STAGE,
    to_template.STAGE,
    pairs.STAGE,
    qa.STAGE,
    group_means.STAGE,
    classifier.STAGE,
    report.STAGE,
)
BY_NAME = {s.name: s for s in STAGES}

__all__ = ["STAGES", "BY_NAME", "Stage", "Context", "PATIENT", "COHORT", "FAILED", "FINISHED"]
