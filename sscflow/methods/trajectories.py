"""Patients with more than two scans: the pair table, per-year rates and the consistency of the
pairs (the ``pairs`` cohort stage).

``RESULTS/pairs.csv`` (contract: :data:`PAIR_COLUMNS`, then the PFT changes per year and the
labels): one row per registered pair of every patient, from each pair's stored outputs::

    patient_id, t0, t1, months, logjac_mean, logjac_per_year,
    delta_fvc, delta_dlco, delta_tlc, delta_kco, composition_mean_mm, ...

``patient_id`` is the manifest's (the pair's unit id is ``sscflow.cohort.unit_id(patient_id,
t0, t1)``); ``months`` the interval between the two scans; ``logjac_mean`` the mean log-Jacobian
inside the baseline lung mask (< 0 = shrinkage) and ``logjac_per_year`` = ``logjac_mean`` x 12 /
``months``; ``delta_<pft>`` the follow-up minus baseline value (% predicted points) and
``delta_<pft>_per_year`` the same per year.

**Consistency.** For a patient whose consecutive pairs 0 -> 1 -> ... -> N-1 and first -> last
pair 0 -> N-1 are all registered, the consecutive displacement fields composed in physical space
(:func:`sscflow.methods.pairs.composition_inconsistency`) are compared with the first -> last
field inside the baseline lung mask, where every field was measured: ``composition_mean_mm``
(mean distance, mm), ``composition_p95_mm`` and ``composition_measured_fraction``, on the
first -> last row. Registration errors that do not cancel show up here without any truth. It is
stored with its input hash in the ``consistency`` attribute of ``STORE/patients/<id>/pairs`` and
recomputed only when a field changes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sscflow.cohort import PFT, parse_unit, unit_id
from sscflow.core import store as st
from sscflow.methods.zones import per_year

PAIR_COLUMNS = ("patient_id", "t0", "t1", "months", "logjac_mean", "logjac_per_year",
                *(f"delta_{m}" for m in PFT), "composition_mean_mm")  # fmt: skip
CONSISTENCY = "consistency"  # attribute of STORE/patients/<id>/pairs
FIELD, COVERAGE, MASK = "displacement", "coverage", "lung_mask"
VERSION = 1


def chains(units) -> dict[str, dict]:
    """Per patient with a first -> last pair beyond 0 -> 1 and every consecutive pair up to its
    last timepoint: ``{patient_id: {"direct": unit, "steps": [units 0->1, 1->2, ...]}}``.

    >>> chains(["A", "A/pairs/1-2", "A/pairs/0-2", "B", "C/pairs/0-2"])
    {'A': {'direct': 'A/pairs/0-2', 'steps': ['A', 'A/pairs/1-2']}}
    """
    by: dict[str, set] = {}
    for u in units:
        pid, t0, t1 = parse_unit(u)
        by.setdefault(pid, set()).add((t0, t1))
    out = {}
    for pid, pairs in by.items():
        last = max((t1 for t0, t1 in pairs if t0 == 0), default=1)
        steps = [(t, t + 1) for t in range(last)]
        if last > 1 and all(s in pairs for s in steps):
            out[pid] = {"direct": unit_id(pid, 0, last),
                        "steps": [unit_id(pid, a, b) for a, b in steps]}  # fmt: skip
    return out


def consistency_patient(store, patient_id: str, direct: str, steps: list[str], *,
                        force: bool = False) -> dict:  # fmt: skip
    """The composition of ``steps``' fields against ``direct``'s (unit ids), stored in the
    ``consistency`` attribute of ``patients/<id>/pairs``; skipped when its inputs are the
    same. Returns the record (``mean_mm``, ``p95_mm``, ``max_mm``, ``measured_fraction``,
    ``n_voxels``, ``status``)."""
    from sscflow.methods.pairs import composition_inconsistency

    t_start = time.perf_counter()
    root = st.open_store(store)
    groups = {u: st.patient_group(root, u, create=False) for u in (direct, *steps)}
    metas = [st.stored_record(groups[u], name) for u in (direct, *steps)
             for name in (FIELD, COVERAGE)]  # fmt: skip
    mask_meta = st.stored_record(groups[direct], MASK)
    if any(m is None for m in metas) or mask_meta is None:
        return {"status": "pending", "message": "a pair's field is not complete"}
    key = st.upstream_hash([*metas, mask_meta], VERSION)
    holder = st.require_group(st.patient_group(root, patient_id), st.PAIRS)
    old = dict(holder.attrs.get(CONSISTENCY, {}) or {})
    if not force and old.get("input_hash") == key:
        return {**old, "status": "skipped", "seconds": time.perf_counter() - t_start}

    def field(u):
        g = groups[u]
        disp, cov = st.read_image(g, FIELD), st.read_image(g, COVERAGE)
        return (np.asarray(disp.array[...], np.float32), st.stored_geometry(disp),
                np.asarray(cov.array[...]))  # fmt: skip

    mask = st.read_image(groups[direct], MASK)
    out = composition_inconsistency([field(u) for u in steps], field(direct),
                                    np.asarray(mask.array[...]) > 0)  # fmt: skip
    record = {k: (None if math.isnan(v) else float(v)) if isinstance(v, (float, np.floating))
              else v for k, v in out.items()}  # NaN (nothing measured) is not JSON: None
    record |= {"direct": direct, "steps": list(steps), "input_hash": key}
    holder.attrs[CONSISTENCY] = st._jsonable(record)
    return {**record, "status": "done", "seconds": time.perf_counter() - t_start}


def pair_table(cohort: pd.DataFrame, consistency: dict | None = None) -> pd.DataFrame:
    """``pairs.csv`` as a DataFrame from a cohort table of every pair (``sscflow.methods.groups.
    cohort_table`` over unit ids) and the consistency records by patient."""
    rows = []
    consistency = consistency or {}
    for rec in cohort.to_dict("records"):
        pid, t0, t1 = parse_unit(rec["patient_id"])
        months = rec.get("interval_months")
        row = {"patient_id": pid, "t0": t0, "t1": t1, "months": months,
               "logjac_mean": rec.get("logjac_mean"),
               "logjac_per_year": per_year(rec.get("logjac_mean"), months)}  # fmt: skip
        for m in PFT:
            row[f"delta_{m}"] = rec.get(f"delta_{m}")
        c = consistency.get(pid) or {}
        is_direct = c.get("direct") == rec["patient_id"]
        row["composition_mean_mm"] = c.get("mean_mm") if is_direct else math.nan
        row["composition_p95_mm"] = c.get("p95_mm") if is_direct else math.nan
        row["composition_measured_fraction"] = (c.get("measured_fraction") if is_direct
                                                else math.nan)  # fmt: skip
        for m in PFT:
            row[f"delta_{m}_per_year"] = per_year(rec.get(f"delta_{m}"), months)
        for k in ("functional", "visual", "fvc_baseline", "fvc_followup", "dlco_baseline",
                  "dlco_followup"):  # fmt: skip
            row[k] = rec.get(k)
        rows.append(row)
    columns = [*PAIR_COLUMNS, "composition_p95_mm", "composition_measured_fraction",
               *(f"delta_{m}_per_year" for m in PFT), "functional", "visual",
               "fvc_baseline", "fvc_followup", "dlco_baseline", "dlco_followup"]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        table = table.sort_values(["patient_id", "t0", "t1"], kind="stable")
    return table.reset_index(drop=True)


def write_pair_table(table: pd.DataFrame, folder) -> Path:
    """Write ``folder/pairs.csv`` (log-Jacobians to 1e-6, mm to 0.001, PFT points to 0.01);
    unchanged, the file is not rewritten. Returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    out = table.copy()
    for c in out.columns:
        if not pd.api.types.is_float_dtype(out[c]):
            continue
        digits = 6 if "logjac" in c or "fraction" in c else 3 if c.endswith("_mm") else 2
        out[c] = out[c].round(digits)
    text = out.to_csv(index=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def trajectory_points(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per patient and timepoint: months since timepoint 0, the cumulative mean log-Jacobian
    (the sum of the consecutive pairs' means up to it: each pair's mean is over its own
    baseline, so the sum is the trajectory's shape, not one map's mean) and FVC / DLCO (% pred.)
    where given. Columns ``patient_id, timepoint, months, logjac_cumulative, fvc, dlco``."""
    rows = []
    for pid, part in pairs.groupby("patient_id", sort=True):
        steps = part[part["t1"] == part["t0"] + 1].sort_values("t0")
        if steps.empty or int(steps["t0"].iloc[0]) != 0:
            continue
        months, total = 0.0, 0.0
        first = steps.iloc[0]
        rows.append({"patient_id": pid, "timepoint": 0, "months": 0.0, "logjac_cumulative": 0.0,
                     "fvc": first.get("fvc_baseline"), "dlco": first.get("dlco_baseline")})
        for s in steps.itertuples():
            months += float(s.months) if s.months == s.months else math.nan
            total += float(s.logjac_mean) if s.logjac_mean == s.logjac_mean else math.nan
            rows.append({"patient_id": pid, "timepoint": int(s.t1), "months": months,
                         "logjac_cumulative": total, "fvc": s.fvc_followup,
                         "dlco": s.dlco_followup})  # fmt: skip
    return pd.DataFrame(rows, columns=["patient_id", "timepoint", "months",
                                       "logjac_cumulative", "fvc", "dlco"])  # fmt: skip
