"""The manifest (contract): which scans belong to which patient, with optional clinical data.

Two forms. The **wide** form (two scans per patient, one row per patient) has the columns
``patient_id, baseline, followup`` (paths; relative ones are relative to the
manifest's folder). Optional: ``baseline_series_uid, followup_series_uid`` (to pick one DICOM series
in a folder holding several), ``fvc_baseline, fvc_followup, dlco_baseline, dlco_followup,
tlc_baseline, tlc_followup, kco_baseline, kco_followup`` (% predicted), ``visual``
(worsened | stable | improved), ``interval_months``, ``age``, ``sex`` (F | M).

Functional worsening follows the ATS/ERS/JRS/ALAT rule: an FVC% decline of 10 points or more, or a
DLCO% decline of 15 points or more. A patient without the values the rule needs gets no label.

A manifest written by ``sscflow discover`` names its scans ``key:<keyed SeriesInstanceUID>``
(never a path of the export, never an original UID): they are resolved through the private side
of the key file given as ``key`` (``--key`` or ``discover.key``), which records the series folder
and the original UIDs. Such a manifest without its key is refused with one line saying so.

The **long** form (any number of scans per patient, one row per scan) has the columns
``patient_id, timepoint, scan`` (timepoint 0, 1, 2, ... in time order) and optionally
``series_uid``, ``months`` (since timepoint 0), ``fvc, dlco, tlc, kco`` (% predicted, at that
scan), ``visual`` (the morphologic label of the change since the previous timepoint), ``age``,
``sex``. A wide manifest means timepoints 0 and 1.

What runs is a **pair** of scans of one patient (``Patient`` is one pair: baseline = the scan
at ``t0``, follow-up = the scan at ``t1``). The pairs of a patient with N timepoints are chosen by
``pairs`` (:data:`PAIR_MODES`; the config's top-level ``pairs``, default ``both``): the
consecutive pairs t -> t+1, the first -> last pair, or both (for N = 2 all three are the one pair
0 -> 1). Each pair has a *unit id*, the path of its outputs under ``STORE/patients/`` (and of its
run record under ``STORE/status/``): ``<patient_id>`` for the pair 0 -> 1 (the two-scan layout,
so a store made from a wide manifest stays as it is and adding timepoints later re-runs nothing)
and ``<patient_id>/pairs/<t0>-<t1>`` for every other pair (:func:`unit_id`). A pair's clinical
values are those of its two scans (``fvc_baseline`` = FVC at ``t0``, ...), its
``interval_months`` the difference of their ``months``, its ``visual`` label the worst of the
steps it spans (worsened if any step worsened, else improved if any improved, else stable).

The cohort statistics (template, group means, classifier, correlations) take one pair per
patient, its *primary* pair (:func:`primary_units`): the pair from timepoint 0 to the latest
timepoint registered from it (first -> last; the paper's pair).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sscflow.errors import ManifestError, MissingInputError, SscflowError

REQUIRED = ("patient_id", "baseline", "followup")
LONG_REQUIRED = ("patient_id", "timepoint", "scan")
LONG_OPTIONAL = ("series_uid", "months", "fvc", "dlco", "tlc", "kco", "visual", "age", "sex")
PAIR_MODES = ("both", "consecutive", "first_last")
MAX_TIMEPOINTS = 100
SERIES = ("baseline_series_uid", "followup_series_uid")
PFT = ("fvc", "dlco", "tlc", "kco")
PFT_COLUMNS = tuple(f"{m}_{t}" for m in PFT for t in ("baseline", "followup"))
NUMERIC_RANGES = {
    **{c: (1.0, 250.0) for c in PFT_COLUMNS},  # % predicted
    "interval_months": (0.0, 600.0),
    "age": (0.0, 120.0),
}
VISUAL = ("worsened", "stable", "improved")
SEX = ("F", "M")
OPTIONAL = SERIES + PFT_COLUMNS + ("visual", "interval_months", "age", "sex")
FVC_DECLINE = 10.0  # points of % predicted
DLCO_DECLINE = 15.0
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REF_PREFIX = "key:"  # as sscflow.discover.pseudonym.REF_PREFIX


class PrivateSideError(SscflowError, ValueError):
    """A discovered cohort's manifest was read without the key file that resolves its scans."""


@dataclass(frozen=True)
class Patient:
    """One manifest row, validated. ``clinical`` holds the optional columns that were given."""

    patient_id: str
    baseline: Path
    followup: Path
    line: int
    baseline_series_uid: str | None = None
    followup_series_uid: str | None = None
    clinical: dict = field(default_factory=dict)
    refs: dict = field(default_factory=dict)  # 'baseline'/'followup' -> its key: reference
    subject: str | None = None  # the manifest's patient_id when this pair is not 0 -> 1
    t0: int = 0  # the baseline's timepoint
    t1: int = 1  # the follow-up's timepoint
    primary: bool = True  # the pair the cohort statistics use (first -> last; primary_units)

    @property
    def subject_id(self) -> str:
        """The patient's id in the manifest (``patient_id`` is this pair's unit id)."""
        return self.subject or self.patient_id

    def describe(self, which: str) -> str:
        """'baseline <path>', or for a discovered cohort 'baseline key:<keyed UID>' (the export's
        folder names people and dates: it stays on the private side)."""
        label = {"baseline": "baseline", "followup": "follow-up"}[which]
        if (self.t0, self.t1) != (0, 1):
            label += f" (timepoint {self.t0 if which == 'baseline' else self.t1})"
        return f"{label} {self.refs.get(which) or self.scan(which)[0]}"

    @property
    def functional(self) -> str | None:
        return functional_label(self.clinical)

    def scan(self, which: str) -> tuple[Path, str | None]:
        """(path, series_uid) of 'baseline' or 'followup'."""
        if which == "baseline":
            return self.baseline, self.baseline_series_uid
        if which == "followup":
            return self.followup, self.followup_series_uid
        raise ValueError(f"scan must be 'baseline' or 'followup', got {which!r}")


@dataclass(frozen=True)
class Rejected:
    """A manifest row that cannot run (read with ``lenient=True``): it fails alone, at ingest."""

    line: int
    patient_id: str  # as written (may be empty or invalid)
    problems: tuple[str, ...]

    @property
    def valid_id(self) -> bool:
        """Whether ``patient_id`` can name a folder in the store (status records go there)."""
        return bool(_ID.match(self.patient_id))

    @property
    def message(self) -> str:
        return "; ".join(self.problems)


@dataclass(frozen=True)
class Manifest:
    path: Path
    patients: tuple[Patient, ...]
    rejected: tuple[Rejected, ...] = ()

    long: bool = False  # read from the long form (one row per scan)

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def subjects(self) -> list[str]:
        """The manifest's patients (not pairs), in manifest order."""
        return list(dict.fromkeys(p.subject_id for p in self.patients))

    @property
    def primary(self) -> tuple[Patient, ...]:
        """One pair per patient, the one the cohort statistics use (:func:`primary_units`)."""
        keep = set(primary_units([p.patient_id for p in self.patients]))
        return tuple(p for p in self.patients if p.patient_id in keep)

    def table(self) -> pd.DataFrame:
        """One row per patient: the clinical columns, PFT changes and the functional label."""
        rows = []
        for p in self.patients:
            row = {"patient_id": p.patient_id, **p.clinical}
            if self.long:
                row |= {"subject": p.subject_id, "t0": p.t0, "t1": p.t1}
            for m in PFT:
                b, f = p.clinical.get(f"{m}_baseline"), p.clinical.get(f"{m}_followup")
                row[f"delta_{m}"] = f - b if b is not None and f is not None else None
            row["functional"] = p.functional
            rows.append(row)
        return pd.DataFrame(rows).set_index("patient_id")


def unit_id(patient_id: str, t0: int, t1: int) -> str:
    """The unit id of a patient's pair t0 -> t1 (its outputs' path under ``STORE/patients``).

    >>> unit_id("P001", 0, 1), unit_id("P001", 1, 2)
    ('P001', 'P001/pairs/1-2')
    """
    return patient_id if (t0, t1) == (0, 1) else f"{patient_id}/pairs/{t0}-{t1}"


_UNIT = re.compile(r"^(?P<pid>[^/]+)/pairs/(?P<t0>\d+)-(?P<t1>\d+)$")


def parse_unit(unit: str) -> tuple[str, int, int]:
    """(patient_id, t0, t1) of a unit id (:func:`unit_id`'s inverse).

    >>> parse_unit("P001/pairs/0-2"), parse_unit("P001")
    (('P001', 0, 2), ('P001', 0, 1))
    """
    m = _UNIT.match(str(unit))
    return (m["pid"], int(m["t0"]), int(m["t1"])) if m else (str(unit), 0, 1)


def primary_units(units) -> list[str]:
    """Of each patient's unit ids, the one the cohort statistics use: the pair from timepoint 0
    to the latest timepoint registered from it (first -> last), else the earliest pair; in the
    order given.

    >>> primary_units(["A", "A/pairs/1-2", "A/pairs/0-2", "B"])
    ['A/pairs/0-2', 'B']
    """
    best: dict[str, tuple] = {}
    for u in units:
        pid, t0, t1 = parse_unit(u)
        rank = (t0 == 0, t1 if t0 == 0 else -t0)
        if pid not in best or rank > best[pid][0]:
            best[pid] = (rank, u)
    keep = {u for _, u in best.values()}
    return [u for u in units if u in keep]


def pairs_of(n: int, mode: str = "both") -> list[tuple[int, int]]:
    """The pairs registered for a patient with ``n`` timepoints (:data:`PAIR_MODES`).

    >>> pairs_of(3), pairs_of(3, "consecutive"), pairs_of(2, "first_last")
    ([(0, 1), (1, 2), (0, 2)], [(0, 1), (1, 2)], [(0, 1)])
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_MODES)}, got {mode!r}")
    consecutive = [(t, t + 1) for t in range(n - 1)]
    if mode == "consecutive" or n == 2:
        return consecutive
    if mode == "first_last":
        return [(0, n - 1)]
    return consecutive + [(0, n - 1)]


def combined_visual(labels) -> str | None:
    """The morphologic label of a pair from the labels of the steps it spans: worsened if any
    step worsened, else improved if any improved, else stable; None when a step has none.

    >>> combined_visual(["stable", "worsened"]), combined_visual(["improved", "stable"])
    ('worsened', 'improved')
    """
    labels = list(labels)
    if not labels or any(v is None for v in labels):
        return None
    for v in ("worsened", "improved"):
        if v in labels:
            return v
    return "stable"


def functional_label(clinical: dict) -> str | None:
    """'worsening', 'stable' or None (not enough PFT values to decide).

    >>> functional_label({"fvc_baseline": 80, "fvc_followup": 69.5})
    'worsening'
    >>> functional_label({"fvc_baseline": 80, "fvc_followup": 75}) is None
    True
    >>> functional_label({"fvc_baseline": 80, "fvc_followup": 75,
    ...                   "dlco_baseline": 60, "dlco_followup": 50})
    'stable'
    """
    declines = []
    for name, limit in (("fvc", FVC_DECLINE), ("dlco", DLCO_DECLINE)):
        b, f = clinical.get(f"{name}_baseline"), clinical.get(f"{name}_followup")
        declines.append(None if b is None or f is None else (b - f) >= limit - 1e-9)
    if any(d is True for d in declines):
        return "worsening"
    if all(d is False for d in declines):
        return "stable"
    return None


def read_manifest(path: str | os.PathLike, *, check_files: bool = False,
                  lenient: bool = False, key=None, scans: bool = True,
                  pairs: str = "both") -> Manifest:  # fmt: skip
    """Read and validate a manifest CSV, wide or long (the module's docstring).

    Every problem is collected and reported together, each naming the line, the column and what
    is wrong. Relative scan paths are resolved against the manifest's folder. With
    ``check_files`` a missing scan is also a problem (ingest instead fails that patient alone).
    With ``lenient`` a row's problems do not stop the others: the row (in the long form, the
    patient with all its rows) goes to ``Manifest.rejected`` (what ``run``, ``ingest`` and
    ``--dry-run`` report as that patient's failure); problems of the file itself (unreadable,
    columns) still raise. ``key`` (a key file path or an open
    :class:`~sscflow.discover.pseudonym.PseudonymKey`) resolves the ``key:`` scan references of
    a discovered cohort; messages about them name no path or UID. ``scans=False`` (the patient
    list alone, e.g. ``sscflow status``) leaves them unresolved. ``pairs`` chooses the pairs of
    a patient with more than two timepoints (:data:`PAIR_MODES`).

    Raises
    ------
    MissingInputError if the manifest does not exist; PrivateSideError when it holds ``key:``
    references and no key is given; KeyFileError for a misplaced or unreadable key file;
    ManifestError (a ValueError) otherwise.
    """
    path = Path(path)
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_MODES)}, got {pairs!r}")
    if not path.is_file():
        raise MissingInputError(f"manifest {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"not a readable CSV file: {exc}"]) from None
    df.columns = [c.strip() for c in df.columns]
    long = "timepoint" in df.columns or ("scan" in df.columns and "baseline" not in df.columns)
    required, optional = (LONG_REQUIRED, LONG_OPTIONAL) if long else (REQUIRED, OPTIONAL)
    problems = []
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
                        + (" (the long form: one row per scan)" if long else ""))  # fmt: skip
    unknown = [c for c in df.columns if c not in required + optional]
    if unknown:
        problems.append(
            f"unknown column{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            f"(known{' in the long form' if long else ''}: {', '.join(required + optional)})"
        )
    if problems:
        raise ManifestError(path, problems)
    if df.empty:
        raise ManifestError(path, ["no patients (the file has a header but no rows)"])
    scan_columns = ("scan",) if long else ("baseline", "followup")
    reader = _Rows(path, _private_side(path, df, key, scan_columns) if scans else None,
                   check_files)  # fmt: skip
    records = [{k: (v.strip() if isinstance(v, str) else v) for k, v in rec.items()}
               for rec in df.to_dict("records")]  # fmt: skip
    read = _read_long if long else _read_wide
    patients, rejected = read(reader, records, pairs)
    problems = [msg for r in rejected for msg in r.problems]
    if problems and not lenient:
        raise ManifestError(path, problems)
    return Manifest(path=path, patients=tuple(patients), rejected=tuple(rejected), long=long)


class _Rows:
    """What reading one manifest's rows needs: its folder, its key, whether files must exist."""

    def __init__(self, path: Path, private, check_files: bool):
        self.path, self.private, self.check_files = path, private, check_files

    def patient_id(self, pid: str, where: str, seen: dict, line: int, problems: list) -> None:
        if not pid:
            problems.append(f"{where}, column patient_id: empty")
        elif not _ID.match(pid):
            problems.append(
                f"{where}, column patient_id: {pid!r} must be 1-64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit (it names a folder in the store)"
            )
        elif pid in seen:
            problems.append(f"{where}, column patient_id: duplicate of line {seen[pid]}")
        else:
            seen[pid] = line

    def scan(self, value: str, col: str, where: str, problems: list):
        """(path, series UID from the key or None, key: reference or None), or None."""
        if not value:
            problems.append(f"{where}, column {col}: empty (give the scan's path)")
            return None
        if self.private is not None and value.startswith(REF_PREFIX):
            link = self.private.resolve(value)
            if link is None:
                problems.append(f"{where}, column {col}: {value} is not in the key file given "
                                "(the key of another discover?)")  # fmt: skip
                return None
            folder = Path(link["folder"])
            if self.check_files and not folder.is_dir():
                problems.append(f"{where}, column {col}: the series folder the key file records "
                                "no longer exists (was the export moved? run 'sscflow "
                                "discover' again with the same key)")  # fmt: skip
            return folder, link["series_uid"], value
        p = Path(value).expanduser()
        p = p if p.is_absolute() else (self.path.parent / p)
        if self.check_files and not p.exists():
            problems.append(f"{where}, column {col}: {p} does not exist")
        return p, None, None

    @staticmethod
    def numbers(rec: dict, ranges: dict, where: str, problems: list) -> dict:
        out = {}
        for col, (lo, hi) in ranges.items():
            raw = rec.get(col, "")
            if raw == "" or raw is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                problems.append(f"{where}, column {col}: {raw!r} is not a number")
                continue
            if not math.isfinite(value) or not lo <= value <= hi:
                problems.append(f"{where}, column {col}: {raw} is out of range ({lo:g} to {hi:g})")
                continue
            out[col] = value
        return out

    @staticmethod
    def labels(rec: dict, where: str, problems: list) -> dict:
        out = {}
        visual = rec.get("visual", "")
        if visual:
            if visual.lower() not in VISUAL:
                problems.append(
                    f"{where}, column visual: unknown label {visual!r} (use {', '.join(VISUAL)})"
                )
            else:
                out["visual"] = visual.lower()
        sex = rec.get("sex", "")
        if sex:
            if sex.upper() not in SEX:
                problems.append(f"{where}, column sex: {sex!r} must be F or M")
            else:
                out["sex"] = sex.upper()
        return out


def _read_wide(reader: _Rows, records: list[dict], pairs: str):
    patients, seen, rejected = [], {}, []
    for i, rec in enumerate(records):
        line = i + 2  # the header is line 1
        pid = rec["patient_id"]
        where = f"line {line}" + (f" (patient {pid})" if pid else "")
        problems: list[str] = []
        reader.patient_id(pid, where, seen, line, problems)
        found = {col: reader.scan(rec[col], col, where, problems)
                 for col in ("baseline", "followup")}  # fmt: skip
        clinical = reader.numbers(rec, NUMERIC_RANGES, where, problems)
        clinical |= reader.labels(rec, where, problems)
        if problems:
            rejected.append(Rejected(line, pid, tuple(problems)))
            continue
        patients.append(Patient(
            patient_id=pid, baseline=found["baseline"][0], followup=found["followup"][0],
            line=line,
            baseline_series_uid=found["baseline"][1] or rec.get("baseline_series_uid") or None,
            followup_series_uid=found["followup"][1] or rec.get("followup_series_uid") or None,
            clinical=clinical,
            refs={c: f[2] for c, f in found.items() if f[2]},
        ))  # fmt: skip
    return patients, rejected


LONG_RANGES = {**{m: (1.0, 250.0) for m in PFT}, "months": (0.0, 600.0), "age": (0.0, 120.0)}


def _read_long(reader: _Rows, records: list[dict], pairs: str):
    """The long form: rows grouped by patient (in the order patients first appear), checked as
    a whole (timepoints 0..N-1 once each, months increasing), then one Patient per pair."""
    by_patient: dict[str, list[tuple[int, dict]]] = {}
    for i, rec in enumerate(records):
        by_patient.setdefault(rec["patient_id"], []).append((i + 2, rec))
    patients, rejected, seen = [], [], {}
    for pid, rows in by_patient.items():
        first = rows[0][0]
        problems: list[str] = []
        reader.patient_id(pid, f"line {first}" + (f" (patient {pid})" if pid else ""), seen,
                          first, problems)  # fmt: skip
        scans: dict[int, dict] = {}
        for line, rec in rows:
            where = f"line {line}" + (f" (patient {pid})" if pid else "")
            raw = rec.get("timepoint", "")
            try:
                t = int(raw)
                if str(t) != raw.lstrip("+") or not 0 <= t < MAX_TIMEPOINTS:
                    raise ValueError
            except ValueError:
                problems.append(f"{where}, column timepoint: {raw!r} must be a whole number "
                                f"0-{MAX_TIMEPOINTS - 1} (0 for the first scan)")  # fmt: skip
                continue
            if t in scans:
                problems.append(f"{where}, column timepoint: {t} is also on line "
                                f"{scans[t]['line']}")  # fmt: skip
                continue
            found = reader.scan(rec["scan"], "scan", where, problems)
            values = reader.numbers(rec, LONG_RANGES, where, problems)
            values |= reader.labels(rec, where, problems)
            scans[t] = {"line": line, "found": found, "values": values,
                        "series_uid": rec.get("series_uid") or None}  # fmt: skip
        times = sorted(scans)
        where = f"line {first}" + (f" (patient {pid})" if pid else "")
        if scans and times != list(range(len(times))):
            problems.append(f"{where}, column timepoint: the patient's timepoints are "
                            f"{', '.join(map(str, times))}; they must be 0, 1, 2, ... "
                            "without gaps")  # fmt: skip
        elif scans and len(times) < 2:
            problems.append(f"{where}: only one scan (a patient needs two timepoints or more)")
        months = [scans[t]["values"].get("months") for t in times]
        if not problems and any(m is not None for m in months):
            if any(m is None for m in months):
                problems.append(f"{where}, column months: given for some of the patient's "
                                "scans only (give it for all, 0 at timepoint 0)")  # fmt: skip
            elif months[0] != 0 or any(b <= a for a, b in zip(months, months[1:], strict=False)):
                problems.append(f"{where}, column months: {', '.join(f'{m:g}' for m in months)} "
                                "must start at 0 (timepoint 0) and increase with the "
                                "timepoint")  # fmt: skip
        if problems:
            rejected.append(Rejected(first, pid, tuple(problems)))
            continue
        chosen = pairs_of(len(times), pairs)
        primary = parse_unit(primary_units([unit_id(pid, a, b) for a, b in chosen])[0])[1:]
        for t0, t1 in chosen:
            a, b = scans[t0], scans[t1]
            clinical = {}
            for m in PFT:
                for which, s in (("baseline", a), ("followup", b)):
                    if m in s["values"]:
                        clinical[f"{m}_{which}"] = s["values"][m]
            if a["values"].get("months") is not None:
                clinical["interval_months"] = b["values"]["months"] - a["values"]["months"]
            for k in ("age", "sex"):
                v = a["values"].get(k, b["values"].get(k))
                if v is not None:
                    clinical[k] = v
            visual = combined_visual(scans[t]["values"].get("visual")
                                     for t in range(t0 + 1, t1 + 1))  # fmt: skip
            if visual is not None:
                clinical["visual"] = visual
            refs = {c: s["found"][2] for c, s in (("baseline", a), ("followup", b))
                    if s["found"][2]}  # fmt: skip
            patients.append(Patient(
                patient_id=unit_id(pid, t0, t1), baseline=a["found"][0], followup=b["found"][0],
                line=a["line"],
                baseline_series_uid=a["found"][1] or a["series_uid"],
                followup_series_uid=b["found"][1] or b["series_uid"],
                clinical=clinical, refs=refs,
                subject=None if (t0, t1) == (0, 1) else pid, t0=t0, t1=t1,
                primary=(t0, t1) == primary,
            ))  # fmt: skip
    return patients, rejected


def _private_side(path: Path, df: pd.DataFrame, key, columns=("baseline", "followup")):
    """The open key file when the manifest holds ``key:`` references, else None."""
    refs = any(str(v).startswith(REF_PREFIX) for c in columns for v in df[c])
    if not refs:
        return None
    if key is None:
        raise PrivateSideError(
            f"manifest {path} was written by 'sscflow discover': its scans are keyed references "
            "resolved through the private key file; pass --key KEYFILE (the --key given to "
            "discover) or set discover.key in the config"
        )
    if isinstance(key, (str, os.PathLike)):
        from sscflow.discover.pseudonym import PseudonymKey

        key = PseudonymKey.open(key, scheme=None, forbidden=[path.parent], must_exist=True)
    return key
