"""The manifest (contract): which scans belong to which patient, with optional clinical data.

CSV columns: ``patient_id, baseline, followup`` (paths; relative ones are relative to the
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

    def describe(self, which: str) -> str:
        """'baseline <path>', or for a discovered cohort 'baseline key:<keyed UID>' (the export's
        folder names people and dates: it stays on the private side)."""
        label = {"baseline": "baseline", "followup": "follow-up"}[which]
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

    def __len__(self) -> int:
        return len(self.patients)

    def table(self) -> pd.DataFrame:
        """One row per patient: the clinical columns, PFT changes and the functional label."""
        rows = []
        for p in self.patients:
            row = {"patient_id": p.patient_id, **p.clinical}
            for m in PFT:
                b, f = p.clinical.get(f"{m}_baseline"), p.clinical.get(f"{m}_followup")
                row[f"delta_{m}"] = f - b if b is not None and f is not None else None
            row["functional"] = p.functional
            rows.append(row)
        return pd.DataFrame(rows).set_index("patient_id")


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
                  lenient: bool = False, key=None, scans: bool = True) -> Manifest:  # fmt: skip
    """Read and validate a manifest CSV.

    Every problem is collected and reported together, each naming the line, the column and what
    is wrong. Relative scan paths are resolved against the manifest's folder. With
    ``check_files`` a missing scan is also a problem (ingest instead fails that patient alone).
    With ``lenient`` a row's problems do not stop the others: the row goes to
    ``Manifest.rejected`` (what ``run``, ``ingest`` and ``--dry-run`` report as that patient's
    failure); problems of the file itself (unreadable, columns) still raise. ``key`` (a key file
    path or an open :class:`~sscflow.discover.pseudonym.PseudonymKey`) resolves the
    ``key:`` scan references of a discovered cohort; messages about them name no path or UID.
    ``scans=False`` (the patient list alone, e.g. ``sscflow status``) leaves them unresolved.

    Raises
    ------
    MissingInputError if the manifest does not exist; PrivateSideError when it holds ``key:``
    references and no key is given; KeyFileError for a misplaced or unreadable key file;
    ManifestError (a ValueError) otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"manifest {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"not a readable CSV file: {exc}"]) from None
    df.columns = [c.strip() for c in df.columns]
    problems = []
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    unknown = [c for c in df.columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        problems.append(
            f"unknown column{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            f"(known: {', '.join(REQUIRED + OPTIONAL)})"
        )
    if problems:
        raise ManifestError(path, problems)
    if df.empty:
        raise ManifestError(path, ["no patients (the file has a header but no rows)"])
    private = _private_side(path, df, key) if scans else None

    patients, seen, rejected = [], {}, []
    for i, rec in enumerate(df.to_dict("records")):
        line = i + 2  # the header is line 1
        rec = {k: (v.strip() if isinstance(v, str) else v) for k, v in rec.items()}
        pid = rec["patient_id"]
        where = f"line {line}" + (f" (patient {pid})" if pid else "")
        row_problems = []
        if not pid:
            row_problems.append(f"{where}, column patient_id: empty")
        elif not _ID.match(pid):
            row_problems.append(
                f"{where}, column patient_id: {pid!r} must be 1-64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit (it names a folder in the store)"
            )
        elif pid in seen:
            row_problems.append(f"{where}, column patient_id: duplicate of line {seen[pid]}")
        else:
            seen[pid] = line
        scans, uids, refs = {}, {}, {}
        for col in ("baseline", "followup"):
            if not rec[col]:
                row_problems.append(f"{where}, column {col}: empty (give the scan's path)")
                continue
            if private is not None and rec[col].startswith(REF_PREFIX):
                link = private.resolve(rec[col])
                if link is None:
                    row_problems.append(f"{where}, column {col}: {rec[col]} is not in the key "
                                        "file given (the key of another discover?)")  # fmt: skip
                    continue
                scans[col], uids[col] = Path(link["folder"]), link["series_uid"]
                refs[col] = rec[col]
                if check_files and not scans[col].is_dir():
                    row_problems.append(f"{where}, column {col}: the series folder the key file "
                                        "records no longer exists (was the export moved? run "
                                        "'sscflow discover' again with the same key)")  # fmt: skip
                continue
            p = Path(rec[col]).expanduser()
            p = p if p.is_absolute() else (path.parent / p)
            if check_files and not p.exists():
                row_problems.append(f"{where}, column {col}: {p} does not exist")
            scans[col] = p
        clinical = {}
        for col, (lo, hi) in NUMERIC_RANGES.items():
            raw = rec.get(col, "")
            if raw == "" or raw is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                row_problems.append(f"{where}, column {col}: {raw!r} is not a number")
                continue
            if not math.isfinite(value) or not lo <= value <= hi:
                row_problems.append(
                    f"{where}, column {col}: {raw} is out of range ({lo:g} to {hi:g})"
                )
                continue
            clinical[col] = value
        visual = rec.get("visual", "")
        if visual:
            if visual.lower() not in VISUAL:
                row_problems.append(
                    f"{where}, column visual: unknown label {visual!r} (use {', '.join(VISUAL)})"
                )
            else:
                clinical["visual"] = visual.lower()
        sex = rec.get("sex", "")
        if sex:
            if sex.upper() not in SEX:
                row_problems.append(f"{where}, column sex: {sex!r} must be F or M")
            else:
                clinical["sex"] = sex.upper()
        problems.extend(row_problems)
        if row_problems:
            rejected.append(Rejected(line, pid, tuple(row_problems)))
        else:
            patients.append(
                Patient(
                    patient_id=pid,
                    baseline=scans["baseline"],
                    followup=scans["followup"],
                    line=line,
                    baseline_series_uid=uids.get("baseline")
                    or rec.get("baseline_series_uid") or None,
                    followup_series_uid=uids.get("followup")
                    or rec.get("followup_series_uid") or None,
                    clinical=clinical,
                    refs=refs,
                )
            )
    if problems and not lenient:
        raise ManifestError(path, problems)
    return Manifest(path=path, patients=tuple(patients), rejected=tuple(rejected))


def _private_side(path: Path, df: pd.DataFrame, key):
    """The open key file when the manifest holds ``key:`` references, else None."""
    refs = any(str(v).startswith(REF_PREFIX) for c in ("baseline", "followup") for v in df[c])
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
