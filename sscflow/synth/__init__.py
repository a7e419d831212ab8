"""A synthetic longitudinal chest CT cohort whose truth is known.

Baseline phantoms (body, chest wall, ribs and spine, lungs with vessel trees, trachea and main
bronchi, heart, scanner noise); follow-ups are the baseline warped by a known smooth
diffeomorphism (global inspiration change, posterior-basal shrinkage for worsening, expansion
for improvement) with planted density change. Labels and pulmonary function tests resemble the
cohort of Chassagnon et al., Radiology 2021.

Sign convention: fixed = baseline, moving = follow-up, ``followup(x + u(x)) = baseline(x)``, and
the true log-Jacobian is negative where tissue shrinks from baseline to follow-up.

With ``timepoints=N >= 3`` each patient gets N scans with the disease progressing over time and
the exact truth of every pair of them (:mod:`sscflow.synth.cohort` gives the layout).

Public API: :func:`plan_cohort`, :func:`synthesize_patient`, :func:`synthesize_cohort`,
:func:`read_truth`, :func:`write_truth`, :class:`Truth` and :func:`pair_unit_id`.
"""

from sscflow.synth.cohort import (
    Truth,
    pair_unit_id,
    read_truth,
    synthesize_cohort,
    synthesize_patient,
    write_truth,
)
from sscflow.synth.plan import plan_cohort

__all__ = ["Truth", "pair_unit_id", "plan_cohort", "read_truth", "synthesize_cohort",
           "synthesize_patient", "write_truth"]
