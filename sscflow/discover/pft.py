"""The pulmonary function test table: one row per test, dated, joined to each CT by date."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from sscflow.cohort import NUMERIC_RANGES, PFT
from sscflow.discover.settings import PFTColumns
from sscflow.errors import ManifestError, MissingInputError


class PFTTableError(ManifestError):
    """The PFT CSV has wrong columns, unparseable dates or values; lists every problem."""

    def __init__(self, path, problems):
        super().__init__(path, problems)
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        self.args = (f"PFT table {path} has {n} problem{'s' if n != 1 else ''}:\n{lines}",)


@dataclass(frozen=True)
class PFTTest:
    day: date
    values: dict  # fvc, dlco, tlc, kco -> float (% predicted); missing ones absent


def read_pft_table(path: str | os.PathLike, columns: PFTColumns) -> dict[str, list[PFTTest]]:
    """Tests per DICOM PatientID, sorted by date.

    Raises
    ------
    MissingInputError if the file does not exist; PFTTableError (a ValueError) naming every
    missing column, unparseable date (ISO YYYY-MM-DD expected) and bad value by line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"PFT table {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PFTTableError(path, [f"not a readable CSV file: {exc}"]) from None
    df.columns = [c.strip() for c in df.columns]
    wanted = {m: getattr(columns, m) for m in ("patient_id", "date", *PFT)}
    missing = [
        f"{col!r} (discover.pft_columns.{m})"
        for m, col in wanted.items()
        if col not in df.columns and m in ("patient_id", "date")
    ]
    if missing:
        raise PFTTableError(
            path, [f"missing column {m}; found: {', '.join(df.columns)}" for m in missing]
        )
    if not any(wanted[m] in df.columns for m in PFT):
        raise PFTTableError(
            path,
            [
                "none of the PFT value columns "
                + ", ".join(repr(wanted[m]) for m in PFT)
                + f" is present; found: {', '.join(df.columns)} (rename them, or set "
                "discover.pft_columns)"
            ],
        )
    problems, tests = [], {}
    for i, rec in enumerate(df.to_dict("records")):
        line = i + 2
        pid = (rec[wanted["patient_id"]] or "").strip()
        raw_date = (rec[wanted["date"]] or "").strip()
        if not pid:
            problems.append(f"line {line}, column {wanted['patient_id']}: empty")
            continue
        try:
            day = date.fromisoformat(raw_date)
            if len(raw_date) != 10:
                raise ValueError
        except ValueError:
            problems.append(
                f"line {line}, column {wanted['date']}: {raw_date!r} is not an ISO "
                "date (YYYY-MM-DD)"
            )
            continue
        values = {}
        for m in PFT:
            col = wanted[m]
            raw = (rec.get(col) or "").strip()
            if not raw or raw.upper() in ("NA", "NAN"):
                continue
            lo, hi = NUMERIC_RANGES[f"{m}_baseline"]
            try:
                v = float(raw)
            except ValueError:
                problems.append(f"line {line}, column {col}: {raw!r} is not a number")
                continue
            if not math.isfinite(v) or not lo <= v <= hi:
                problems.append(
                    f"line {line}, column {col}: {raw} is out of range "
                    f"({lo:g} to {hi:g} % predicted)"
                )
                continue
            values[m] = v
        tests.setdefault(pid, []).append(PFTTest(day, values))
    if problems:
        raise PFTTableError(path, problems)
    return {pid: sorted(ts, key=lambda t: t.day) for pid, ts in tests.items()}


def nearest_test(tests: list[PFTTest], day: date, window_days: int) -> PFTTest | None:
    """The test closest in time to ``day`` within the window (the earlier one on a tie)."""
    best = None
    for t in tests:
        gap = abs((t.day - day).days)
        if gap <= window_days and (best is None or gap < abs((best.day - day).days)):
            best = t
    return best
