"""``sscflow discover``: a DICOM export and a dated PFT table in, a pseudonymised manifest out."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sscflow.cohort import LONG_OPTIONAL, LONG_REQUIRED, PFT, read_manifest
from sscflow.discover.flowchart import write_flowchart
from sscflow.discover.headers import batches, iter_files, read_headers, relative
from sscflow.discover.pft import read_pft_table
from sscflow.discover.pseudonym import REF_PREFIX, PseudonymKey
from sscflow.discover.select import NOT_CHOSEN, build_studies, pick_patients
from sscflow.discover.series import RULES, check_series, group_series
from sscflow.discover.settings import DiscoverConfig
from sscflow.errors import MissingInputError, SscflowError

log = logging.getLogger(__name__)
EXCLUDED_COLUMNS = ("level", "patient_id", "study", "series_uid", "file", "rule", "detail")
MANIFEST_COLUMNS = (
    "patient_id",
    "baseline",
    "followup",
    "baseline_series_uid",
    "followup_series_uid",
    *(f"{m}_{t}" for m in PFT for t in ("baseline", "followup")),
    "interval_months",
    "age",
    "sex",
)
LONG_MANIFEST_COLUMNS = (*LONG_REQUIRED, *LONG_OPTIONAL)  # discover.timepoints: all


@dataclass
class DiscoverResult:
    manifest: Path | None
    excluded: Path
    flowchart_json: Path
    flowchart_png: Path
    key: Path
    files: dict
    n_series: int
    n_studies: int
    n_patients: int
    n_included: int
    seconds: float
    rules: dict = field(default_factory=dict)  # rule -> count of excluded.csv rows
    timings: dict = field(default_factory=dict)  # seconds: list, headers, select, write
    #: per included scan whose first or last slice still shows lung ("patient P0003: follow-up:
    #: lung in the top (apex) slice; ..."): pseudonyms only
    warnings: list = field(default_factory=list)


@dataclass
class Inputs:
    """What :func:`check_inputs` found usable: the folders, the opened key, the PFT tests."""

    root: Path
    out: Path
    key: PseudonymKey
    tests: pd.DataFrame | None


def check_inputs(root, out, *, key, cfg: DiscoverConfig | None = None, pft=None,
                 store=None) -> Inputs:  # fmt: skip
    """Every check of the arguments that needs no header read (the DICOM folder, the PFT rule,
    the key file's place and mode, the PFT table), so that a command refuses bad arguments
    before it starts a cluster or draws a progress bar. Raises as :func:`discover` does."""
    cfg = cfg or DiscoverConfig()
    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise MissingInputError(f"DICOM folder {root} does not exist")
    if cfg.require_pft and pft is None:
        raise SscflowError(
            "discover.require_pft is true (the paper's rule: a PFT within "
            f"{cfg.pft_window_days} days of each CT), but no --pft table was given; "
            "give one, or set discover.require_pft: false"
        )
    forbidden = [out] + ([Path(store)] if store and "://" not in str(store) else [])
    pkey = PseudonymKey.open(key, scheme=cfg.pseudonym, forbidden=forbidden)
    tests = read_pft_table(pft, cfg.pft_columns) if pft is not None else None
    return Inputs(root, out, pkey, tests)


def discover(
    root,
    out,
    *,
    key,
    cfg: DiscoverConfig | None = None,
    pft=None,
    store=None,
    client=None,
    progress=None,
    inputs: Inputs | None = None,
) -> DiscoverResult:
    """Index ``root`` (headers only), select the cohort and write it into ``out``.

    Parameters
    ----------
    root : the DICOM export (any folder layout; non-DICOM and unreadable files are skipped)
    out : the cohort folder: manifest.csv, excluded.csv, flowchart.json, flowchart.png
    key : the pseudonym key file (created, or reused for stable pseudonyms); outside ``out``
        and ``store``
    cfg : the ``discover`` settings
    pft : optional PFT CSV (see :func:`sscflow.discover.pft.read_pft_table`)
    store : the store folder of the config, where the key file may not lie either
    client : a ``distributed.Client``: headers are read in batches of ``cfg.files_per_task``
        files, one task each; without it, in this process
    progress : optional ``callable(done_files, total_files)``

    Raises
    ------
    MissingInputError if ``root`` or ``pft`` does not exist; KeyFileError for a misplaced or
    open key file; PFTTableError for a bad PFT table; SscflowError when PFTs are required and
    no table is given.
    """
    t0 = time.perf_counter()
    cfg = cfg or DiscoverConfig()
    inputs = inputs or check_inputs(root, out, key=key, cfg=cfg, pft=pft, store=store)
    root, out, pkey, tests = inputs.root, inputs.out, inputs.key, inputs.tests

    skip = {str(out), str(pkey.path.resolve())}
    files = [p for p in iter_files(root) if not p.startswith(str(out) + os.sep) and p not in skip]
    t_list = time.perf_counter()
    records = _read_all(files, cfg.files_per_task, client, progress)
    t_read = time.perf_counter()

    file_counts = {
        "found": len(files),
        "dicom": 0,
        "not_dicom": 0,
        "unreadable": 0,
        "without_series": 0,
    }
    rows = []
    for path, status, problem, tags in records:
        if status == "ok" and not tags.get("SeriesInstanceUID"):
            status, problem = "without_series", "DICOM without a SeriesInstanceUID (e.g. DICOMDIR)"
        if status == "ok":
            file_counts["dicom"] += 1
            continue
        file_counts[status] += 1
        rows.append(_row("file", file=pkey.file_ref(relative(path, root)), rule=status,
                         detail=problem))  # fmt: skip
    if file_counts["dicom"] == 0:
        log.warning("discover: no DICOM image file under %s", root)

    checks = [
        check_series(s, cfg) for s in group_series(r for r in records if r[1] == "ok").values()
    ]
    studies = build_studies(checks, cfg, tests)
    picks = pick_patients(studies, cfg)
    every_pid = sorted({c.patient_id for c in checks if c.patient_id})
    pseudo = pkey.assign(every_pid)
    for c in checks:  # the link back to the export: on the private side only
        pkey.link_series(str(Path(c.folder).resolve()), c.uid, c.study_uid)
    pkey.save()  # before any output names a pseudonym or a keyed UID

    # study numbers per patient, by date: "2/3" is the patient's second of three studies
    number = {}
    for p in picks:
        for i, st in enumerate(p.studies):
            number[st.uid] = f"{i + 1}/{len(p.studies)}"
    study_of = {s.uid: s for s in studies}

    def study_number(uid):  # none for a study under several PatientIDs
        st = study_of.get(uid)
        return number.get(uid, "") if st is not None and st.patient_id else ""

    chosen_studies = {s.uid for p in picks for s in p.scans}
    chosen_series = {st.best.uid for p in picks for st in p.scans}
    for c in sorted(checks, key=lambda c: c.uid):
        if c.uid in chosen_series:
            continue
        if c.rule:
            rule, detail = c.rule, c.detail
        else:
            st = study_of[c.study_uid]
            if st.best is not None and st.best.uid != c.uid:
                rule = "lower_rank"
                detail = f"{NOT_CHOSEN['lower_rank']} ({pkey.uid(st.best.uid)})"
            else:
                rule, detail = "study_not_used", NOT_CHOSEN["study_not_used"]
        rows.append(
            _row(
                "series",
                pseudo.get(c.patient_id, ""),
                study_number(c.study_uid),
                pkey.uid(c.uid),
                rule=rule,
                detail=detail,
            )
        )
    excluded_pids = {p.patient_id for p in picks if p.rule}
    for st in studies:
        if st.uid in chosen_studies:
            continue
        if st.rule:
            rule, detail = st.rule, st.detail
        elif st.patient_id in excluded_pids:
            rule, detail = "patient_excluded", NOT_CHOSEN["patient_excluded"]
        else:
            rule, detail = "not_selected", NOT_CHOSEN["not_selected"]
        rows.append(
            _row(
                "study",
                pseudo.get(st.patient_id, ""),
                study_number(st.uid),
                pkey.uid(st.best.uid) if st.best else "",
                rule=rule,
                detail=detail,
            )
        )
    for p in picks:
        if p.rule:
            rows.append(_row("patient", pseudo[p.patient_id], rule=p.rule, detail=p.detail))

    included = [p for p in picks if not p.rule]
    warnings = _edge_warnings(included, pseudo)
    t_select = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    manifest = _write_manifest(included, pseudo, pkey, out, long=cfg.timepoints == "all")
    order = {"patient": 0, "study": 1, "series": 2, "file": 3}
    rows.sort(
        key=lambda r: (order[r["level"]], r["patient_id"], r["study"], r["series_uid"], r["file"])
    )
    excluded = out / "excluded.csv"
    pd.DataFrame(rows, columns=list(EXCLUDED_COLUMNS)).to_csv(excluded, index=False)
    doc = _flowchart(file_counts, checks, studies, picks, cfg, tests is not None)
    fj, fp = write_flowchart(doc, out)
    rules: dict[str, int] = {}
    for r in rows:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    return DiscoverResult(
        manifest=manifest,
        excluded=excluded,
        flowchart_json=fj,
        flowchart_png=fp,
        key=pkey.path,
        files=file_counts,
        n_series=len(checks),
        n_studies=len(studies),
        n_patients=len(picks),
        n_included=len(included),
        seconds=time.perf_counter() - t0,
        timings={
            "list": t_list - t0,
            "headers": t_read - t_list,
            "select": t_select - t_read,
            "write": time.perf_counter() - t_select,
        },
        rules=rules,
        warnings=warnings,
    )


def _edge_warnings(included, pseudo) -> list[str]:
    """A line per chosen series whose first or last slice shows lung (two slices read each)."""
    from sscflow.methods.edges import edge_warning, lungs_at_edges

    lines = []
    for p in sorted(included, key=lambda p: pseudo[p.patient_id]):
        names = ["baseline", "follow-up"] if len(p.scans) == 2 else [
            f"timepoint {k}" for k in range(len(p.scans))]  # fmt: skip
        for which, st in zip(names, p.scans, strict=True):
            try:
                parts = lungs_at_edges(Path(st.best.folder), st.best.uid)
            except (RuntimeError, OSError, ValueError):
                continue  # ingest reads the series whole and says what is wrong with it
            if parts:
                lines.append(f"patient {pseudo[p.patient_id]}: {edge_warning(which, parts)}")
    return lines


def _row(level, patient_id="", study="", series_uid="", *, file="", rule, detail=""):
    return {
        "level": level,
        "patient_id": patient_id,
        "study": study,
        "series_uid": series_uid,
        "file": file,
        "rule": rule,
        "detail": detail,
    }


def _read_all(files, per_task, client, progress):
    """Every file's header record, in the order of ``files``."""
    chunks = batches(files, per_task)
    done, results = 0, [None] * len(chunks)
    if progress:
        progress(0, len(files))
    if client is None:
        for i, chunk in enumerate(chunks):
            results[i] = read_headers(chunk)
            done += len(chunk)
            if progress:
                progress(done, len(files))
    else:
        from distributed import as_completed

        token = uuid.uuid4().hex[:8]
        futures = client.map(
            read_headers, chunks, key=[f"discover-headers-{token}-{i}" for i in range(len(chunks))]
        )
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in as_completed(futures):
            i = index[fut.key]
            results[i] = fut.result()
            done += len(chunks[i])
            fut.release()
            if progress:
                progress(done, len(files))
    return [r for chunk in results for r in chunk]


def _write_manifest(included, pseudo, pkey: PseudonymKey, out: Path, *, long: bool = False
                    ) -> Path | None:  # fmt: skip
    """manifest.csv: pseudonyms, ``key:<keyed series UID>`` scan references (resolved through
    the key file by ``sscflow run --key``), keyed UIDs, PFT values, interval, age, sex. ``long``:
    the long form, a row per chosen CT (``timepoint``, ``months`` since the first, the PFT
    near that CT; ``visual`` left empty for the reader to fill)."""
    path = out / "manifest.csv"
    rows = []
    for p in sorted(included, key=lambda p: pseudo[p.patient_id]):
        age = p.age()
        person = {"age": "" if age is None or not 0 <= age <= 120 else str(age), "sex": p.sex()}
        if long:
            for k, st in enumerate(p.scans):
                keyed = pkey.uid(st.best.uid)
                rows.append({"patient_id": pseudo[p.patient_id], "timepoint": str(k),
                             "scan": REF_PREFIX + keyed, "series_uid": keyed,
                             "months": f"{p.months(st):.1f}", **_pft_values(st, ""),
                             "visual": "", **person})  # fmt: skip
            continue
        row = {"patient_id": pseudo[p.patient_id]}
        for which, st in (("baseline", p.baseline), ("followup", p.followup)):
            keyed = pkey.uid(st.best.uid)
            row[which] = REF_PREFIX + keyed
            row[f"{which}_series_uid"] = keyed
            row.update(_pft_values(st, f"_{which}"))
        rows.append({**row, "interval_months": f"{p.interval_months:.1f}", **person})
    if not rows:
        path.unlink(missing_ok=True)  # no patient: no manifest, rather than one that fails later
        return None
    columns = LONG_MANIFEST_COLUMNS if long else MANIFEST_COLUMNS
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    read_manifest(path, key=pkey)  # what discover writes, sscflow run reads as it is
    return path


def _pft_values(st, suffix: str) -> dict:
    """``{fvc<suffix>: "80", ...}``: the study's PFT values, empty where none was measured."""
    values = st.pft.values if st.pft else {}
    return {f"{m}{suffix}": "" if values.get(m) is None else f"{values[m]:g}" for m in PFT}


def _nonzero(counts: dict) -> dict:
    return {k: n for k, n in counts.items() if n}


def _count(rule_of, items) -> dict:
    counts: dict[str, int] = {}
    for it in items:
        r = rule_of(it)
        if r:
            counts[r] = counts.get(r, 0) + 1
    return counts


def _flowchart(files, checks, studies, picks, cfg, have_pft) -> dict:
    pids = {c.patient_id for c in checks if c.patient_id}
    pre_pft = [s for s in studies if s.best is not None]  # passed the series and study rules
    eligible = [s for s in studies if s.eligible]
    included = [p for p in picks if not p.rule]
    pre_uids = {s.uid for s in pre_pft}
    n_series_ok = sum(c.eligible for c in checks if c.study_uid in pre_uids)
    # what was fine on its own but dropped: each step's boxes add up to the next step's counts
    unused = sum(c.eligible for c in checks if c.study_uid not in pre_uids)
    chosen = {s.uid for p in included for s in p.scans}
    kept_pids = {p.patient_id for p in included}
    not_chosen = {
        "not_selected": sum(s.patient_id in kept_pids and s.uid not in chosen for s in eligible),
        "patient_excluded": sum(s.patient_id not in kept_pids for s in eligible),
    }
    steps = [
        {
            "step": "export",
            "label": "CT studies in the export",
            "patients": len(pids),
            "studies": len(studies),
            "series": len(checks),
            "excluded": {},
        },
        {
            "step": "series",
            "label": "Studies with an eligible series",
            "patients": len({s.patient_id for s in pre_pft}),
            "studies": len(pre_pft),
            "series": n_series_ok,
            "excluded": {
                "series": _nonzero({**_count(lambda c: c.rule, checks), "study_not_used": unused}),
                "studies": _count(lambda s: s.rule if s.rule != "no_pft" else "", studies),
            },
        },
        {
            "step": "pft",
            "label": f"CTs with a PFT within {cfg.pft_window_days} days"
            if have_pft
            else "CTs (no PFT table given)",
            "patients": len({s.patient_id for s in eligible}),
            "studies": len(eligible),
            "series": len(eligible),
            "excluded": {
                "series": _nonzero({"lower_rank": n_series_ok - len(pre_pft)}),
                "studies": _count(lambda s: s.rule if s.rule == "no_pft" else "", studies),
            },
        },
        {
            "step": "included",
            "label": "Patients included ("
            + {"first_last": "first and last CT", "first_second": "first two CTs",
               "all": "every CT"}[cfg.timepoints]  # fmt: skip
            + ")",
            "patients": len(included),
            "studies": len(chosen),
            "series": len(chosen),
            "excluded": {
                "studies": _nonzero(not_chosen),
                "patients": _count(lambda p: p.rule, picks),
            },
        },
    ]
    return {"files": files, "rules": {**RULES}, "steps": steps}
