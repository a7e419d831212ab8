"""Studies and patients: the best series per study, the PFT near each CT, the pair per patient.

Study rules (excluded.csv level ``study``): ``conflicting_patient_ids`` (one StudyInstanceUID
under several PatientIDs), ``no_date``, ``no_eligible_series``, ``no_pft`` (no test within
``discover.pft_window_days``, when ``discover.require_pft``). Patient rules (level ``patient``):
``fewer_than_two_cts``, ``interval_too_short``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from sscflow.discover.pft import PFTTest, nearest_test
from sscflow.discover.series import RULES, SeriesCheck
from sscflow.discover.settings import DiscoverConfig

STUDY_RULES = {
    "conflicting_patient_ids": "one study under several PatientIDs",
    "no_date": "no study date",
    "no_eligible_series": "no eligible series",
    "no_pft": "no pulmonary function test near the CT",
}
PATIENT_RULES = {
    "fewer_than_two_cts": "fewer than two eligible CTs",
    "interval_too_short": "CTs too close in time",
}
# rules for what was fine on its own but not chosen
NOT_CHOSEN = {
    "lower_rank": "eligible, but another series of the study ranks first",
    "study_not_used": "eligible, but its study was excluded or not selected",
    "not_selected": "eligible, but not a CT of the patient that discover.timepoints selects",
    "patient_excluded": "eligible, but the patient was excluded",
}
DAYS_PER_MONTH = 365.25 / 12


@dataclass
class Study:
    uid: str
    patient_id: str  # "" when the study is under conflicting PatientIDs
    patient_ids: set = field(default_factory=set)  # every PatientID its series carry
    series: list[SeriesCheck] = field(default_factory=list)
    day: date | None = None
    best: SeriesCheck | None = None
    pft: PFTTest | None = None
    rule: str = ""
    detail: str = ""

    @property
    def eligible(self) -> bool:
        return not self.rule


@dataclass
class PatientPick:
    patient_id: str
    studies: list[Study]  # every study of the patient, by date (unknown dates last)
    baseline: Study | None = None
    followup: Study | None = None
    rule: str = ""
    detail: str = ""
    #: the chosen studies in time order: baseline and follow-up, or with ``timepoints: all``
    #: every eligible CT at least ``min_interval_days`` after the previous chosen one
    scans: list[Study] = field(default_factory=list)

    @property
    def interval_months(self) -> float:
        return (self.followup.day - self.baseline.day).days / DAYS_PER_MONTH

    def months(self, st: Study) -> float:
        """Months from the baseline CT to ``st``."""
        return (st.day - self.baseline.day).days / DAYS_PER_MONTH

    def age(self) -> int | None:
        """Whole years at the baseline CT (PatientAge, else birth date), or None."""
        s = self.baseline.best
        raw = s.age.strip().upper()
        if len(raw) == 4 and raw[:3].isdigit() and raw[3] in "YMWD":
            n = int(raw[:3])
            return n if raw[3] == "Y" else 0
        b = _day(s.birth_date)
        if b is None:
            return None
        d = self.baseline.day
        return d.year - b.year - ((d.month, d.day) < (b.month, b.day))

    def sex(self) -> str:
        return self.baseline.best.sex if self.baseline.best.sex in ("F", "M") else ""


def _day(yyyymmdd: str) -> date | None:
    try:
        return date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    except (ValueError, TypeError):
        return None


def build_studies(checks: list[SeriesCheck], cfg: DiscoverConfig, pft: dict | None) -> list[Study]:
    """Group checked series into studies and pick each study's best series (``rank``)."""
    by_uid: dict[str, Study] = {}
    for c in checks:
        if c.rule == "inconsistent_series":
            continue  # belongs to no single study
        by_uid.setdefault(c.study_uid, Study(c.study_uid, c.patient_id)).series.append(c)
    studies = sorted(by_uid.values(), key=lambda s: s.uid)
    for st in studies:
        pids = st.patient_ids = {c.patient_id for c in st.series}
        days = sorted(d for d in (_day(c.date) for c in st.series) if d is not None)
        st.day = days[0] if days else None
        if len(pids) > 1:
            st.patient_id = ""
            st.rule, st.detail = (
                "conflicting_patient_ids",
                (
                    f"one StudyInstanceUID under {len(pids)} different PatientIDs (series "
                    + ", ".join(sorted(c.uid for c in st.series))
                    + "); fix the export"
                ),
            )
            continue
        if st.day is None:
            st.rule, st.detail = "no_date", "no StudyDate, SeriesDate or AcquisitionDate"
            continue
        eligible = sorted((c for c in st.series if c.eligible), key=SeriesCheck.rank)
        if not eligible:
            counts: dict[str, int] = {}
            for c in st.series:
                counts[c.rule] = counts.get(c.rule, 0) + 1
            st.rule = "no_eligible_series"
            st.detail = (
                f"none of its {len(st.series)} series is eligible ("
                + ", ".join(f"{RULES.get(r, r)}: {n}" for r, n in sorted(counts.items()))
                + ")"
            )
            continue
        st.best = eligible[0]
        tests = (pft or {}).get(st.patient_id, [])
        st.pft = nearest_test(tests, st.day, cfg.pft_window_days) if pft is not None else None
        if cfg.require_pft and st.pft is None:
            st.rule, st.detail = (
                "no_pft",
                (f"no pulmonary function test within {cfg.pft_window_days} days of the CT"),
            )
    return studies


def pick_patients(studies: list[Study], cfg: DiscoverConfig) -> list[PatientPick]:
    """Per PatientID, the eligible studies ``discover.timepoints`` asks for: the first and last,
    the first two, or (``all``) every one at least ``min_interval_days`` after the previous
    chosen one (a CT closer than that to it is a repeat, not a timepoint)."""
    by_pid: dict[str, list[Study]] = {}
    for st in studies:  # a study under conflicting PatientIDs counts for each of them
        for pid in st.patient_ids or {st.patient_id}:
            by_pid.setdefault(pid, []).append(st)
    picks = []
    for pid in sorted(by_pid):
        sts = sorted(by_pid[pid], key=lambda s: (s.day is None, s.day or date.min, s.uid))
        p = PatientPick(pid, sts)
        ok = [s for s in sts if s.eligible]
        if len(ok) < 2:
            p.rule, p.detail = (
                "fewer_than_two_cts",
                (
                    f"{len(ok)} eligible CT{'s' if len(ok) != 1 else ''} of {len(sts)} "
                    f"stud{'ies' if len(sts) != 1 else 'y'}; two are needed"
                ),
            )
            picks.append(p)
            continue
        first = ok[0]
        later = [s for s in ok[1:] if (s.day - first.day).days >= cfg.min_interval_days]
        if not later:
            p.rule, p.detail = (
                "interval_too_short",
                (
                    f"eligible CTs within {(ok[-1].day - first.day).days} days of each other; "
                    f"discover.min_interval_days = {cfg.min_interval_days}"
                ),
            )
        else:
            p.baseline = first
            if cfg.timepoints == "all":
                p.scans = [first]
                for s in ok[1:]:
                    if (s.day - p.scans[-1].day).days >= cfg.min_interval_days:
                        p.scans.append(s)
                p.followup = p.scans[-1]
            else:
                p.followup = later[-1] if cfg.timepoints == "first_last" else later[0]
                p.scans = [p.baseline, p.followup]
        picks.append(p)
    return picks
