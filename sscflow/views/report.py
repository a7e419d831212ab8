"""The cohort report: one self-contained HTML page (images embedded), readable offline.

``write_report(store, results_dir, state)`` reads what the other stages left (the cohort table, the
group-mean figure, the classifier outputs under ``results/classifier/<target>/`` and the run
records) and writes ``results/report/index.html``: cohort summary, Tables 1 and 2 (by functional and
by morphologic change), the correlation of mean log-Jacobian with PFT changes, classifier metrics
beside the ILD-extent baseline (with the test-set size and the majority-class accuracy), the
group-mean maps over the template CT, box plots (the paper's Figures 3 and 4), ROC curves, a QA
table linking each patient's QA page (``report/qa/<id>.html``, :mod:`sscflow.views.qa`), a
comparison with the truth for synthetic cohorts, provenance (version, config, backend, grid,
manifest hash) and the failed patients with the stage and reason. It works for any cohort: no
labels, one patient, every patient failed (it then says so and points to the failures). Missing
parts are said to be missing, never silently dropped. The page has no scripts and no external
resources. Every figure is also written to ``results/figures/`` as PNG and SVG.

A report that fails replaces ``index.html`` by a page saying so (with the reason), so a previous
report never stays in place looking current.

Sign convention stated in the report: log-Jacobian < 0 where the lung shrank from baseline to
follow-up (the paper's Figures 2 and 5); the paper's Table 1 reads with the opposite sign.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sscflow import __version__
from sscflow.cohort import primary_units
from sscflow.core import store as st
from sscflow.flow.status import STATUS_GROUP, manifest_patients
from sscflow.methods.groups import cohort_table
from sscflow.methods.quality import lung_mask_dice
from sscflow.methods.stats import TABLE_ROWS, format_p, spearman_table, summary_table
from sscflow.methods.template import describe_provenance, template_provenance
from sscflow.methods.zones import zone_group_means, zone_table
from sscflow.views.figures import save_figure
from sscflow.views.pages import render, write_text
from sscflow.views.qa import FLAG_RULES, KEY_FIGURES, flags, format_value, page_path

TARGETS = {"functional": "Functional worsening (ATS/ERS: FVC -10 or DLCO -15 points)",
           "morphologic": "Morphologic worsening (visual; improved counts as stable)"}  # fmt: skip
GROUPS = {"functional": ("worsening", "stable"), "visual": ("worsened", "stable", "improved")}


def _png(fig) -> str:
    """A matplotlib figure as base64 PNG, for an embedded ``<img>``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _figure(width=7.0, height=3.2, ncols=1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def box_plots(table: pd.DataFrame, by: str, columns: list[tuple[str, str]],
              save: Path | None = None) -> dict:
    """Box plots of ``columns`` ((column, label) pairs) by the groups of ``by`` (Figures 3, 4);
    also written to ``save`` (PNG and SVG) when given. Returns ``{"png": base64 PNG or None,
    "by", "has_columns"}`` (no PNG when no patient has a label or no column has values)."""
    columns = [(c, lab) for c, lab in columns if c in table and table[c].notna().any()]
    groups = [g for g in GROUPS[by] if (table[by] == g).any()] if by in table else []
    if not columns or not groups:
        return {"png": None, "by": by, "has_columns": bool(columns)}
    fig, axes = _figure(3.0 * len(columns), 3.2, len(columns))
    for ax, (col, label) in zip(axes, columns, strict=True):
        data = [table.loc[table[by] == g, col].dropna().to_numpy() for g in groups]
        ticks = [f"{g}\n(n={len(d)})" for g, d in zip(groups, data, strict=True)]
        ax.boxplot(data, tick_labels=ticks)
        ax.set_title(label, fontsize=9)
        ax.axhline(0, color="#999", lw=0.6)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    _save(fig, save)
    return {"png": _png(fig), "by": by, "has_columns": True}


def roc_figure(curves: dict[str, dict], save: Path | None = None) -> str:
    """ROC curves, one line per (name -> {"fpr", "tpr", "auc"}), as base64 PNG."""
    fig, (ax,) = _figure(4.2, 4.0)
    for name, c in curves.items():
        if c and c.get("fpr"):
            ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c.get('auc', float('nan')):.2f})")
    ax.plot([0, 1], [0, 1], color="#aaa", lw=0.8, ls="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, save)
    return _png(fig)


def _save(fig, path: Path | None) -> None:
    if path is not None:
        save_figure(fig, path)


def _cell(value) -> str:
    """A table cell's text: an en dash for a missing value."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return "–"
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _table(df: pd.DataFrame) -> dict:
    """A DataFrame as the templates' table: column names and rows of text."""
    return {"columns": [str(c) for c in df.columns],
            "rows": [[_cell(v) for v in row] for row in df.itertuples(index=False)]}


def _undefined(m: dict) -> dict[str, str]:
    """Why a metric is not defined for this test set (from its confusion counts): a rate whose
    denominator is 0, an AUC with one class only. Printing a number there would mislead.

    >>> _undefined({"tp": 0, "fp": 0, "tn": 3, "fn": 2})["ppv"]
    'not defined: no patient predicted worsening'
    >>> sorted(_undefined({"tp": 0, "fp": 1, "tn": 4, "fn": 0}))
    ['auc', 'sensitivity']
    """
    try:
        tp, fp, tn, fn = (int(m[k]) for k in ("tp", "fp", "tn", "fn"))
    except (KeyError, TypeError, ValueError):
        return {}
    why = {"sensitivity": (tp + fn, "no worsening patient in the test set"),
           "specificity": (tn + fp, "no stable patient in the test set"),
           "ppv": (tp + fp, "no patient predicted worsening"),
           "npv": (tn + fn, "no patient predicted stable")}  # fmt: skip
    out = {k: f"not defined: {text}" for k, (n, text) in why.items() if n == 0}
    if tp + fn == 0 or tn + fp == 0:
        out["auc"] = "not defined: one class only in the test set"
    return out


def _metric_rows(name: str, m: dict) -> dict:
    undefined = _undefined(m)

    def cell(key):
        v, ci = m.get(key), m.get(f"{key}_ci")
        if key in undefined:
            return undefined[key]
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "–"
        lo, hi = ci if ci else (float("nan"), float("nan"))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return f"{100 * v:.0f}%"
        return f"{100 * v:.0f}% ({100 * lo:.0f}–{100 * hi:.0f})"

    auc = m.get("auc")
    auc = None if auc is None else float(auc)
    auc_cell = undefined.get("auc") or ("–" if auc is None or np.isnan(auc) else f"{auc:.2f}")
    return {"Method": name, "n (test)": m.get("n", "–"), "Sensitivity": cell("sensitivity"),
            "Specificity": cell("specificity"), "Accuracy": cell("accuracy"), "PPV": cell("ppv"),
            "NPV": cell("npv"), "AUC": auc_cell,
            "TP/FP/TN/FN": f"{m.get('tp', '–')}/{m.get('fp', '–')}/{m.get('tn', '–')}/"
                           f"{m.get('fn', '–')}"}  # fmt: skip


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


LABELS = {"delta_fvc": "ΔFVC (% pred.)", "delta_dlco": "ΔDLCO (% pred.)",
          "delta_tlc": "ΔTLC (% pred.)", "delta_kco": "ΔKCO (% pred.)"}  # fmt: skip
SMALL_TEST = 20  # fewer test patients than this: the metrics are said to mean little
RATES = {"per_interval": ("logjac_mean", "mean log-Jacobian over the interval between the scans "
                          "(the paper)"),
         "per_year": ("logjac_per_year", "mean log-Jacobian per year (x 12 / months between the "
                      "scans)")}  # fmt: skip
ZONE_GROUPS = ("worsening", "stable")


def run_rate(root) -> str:
    """``statistics.rate`` of the store's last run (its recorded settings), else the default."""
    import yaml

    run = dict(root[STATUS_GROUP].attrs.get("run", {})) if STATUS_GROUP in root else {}
    try:
        changed = yaml.safe_load(run.get("config_yaml") or "") or {}
    except yaml.YAMLError:
        changed = {}
    rate = (changed.get("statistics") or {}).get("rate", "per_interval")
    return rate if rate in RATES else "per_interval"


def write_report(store: str, results_dir, state: dict, *, synthetic: bool | None = None,
                 rate: str | None = None) -> Path:
    """Write ``results_dir/report/index.html`` from the store and the results folder.

    Parameters
    ----------
    store : the cohort store
    results_dir : where ``patients.csv``, ``figures/`` and ``classifier/`` are
    state : every stage's status per patient (``sscflow.flow.pipeline.store_status``)
    synthetic : say plainly that the data are synthetic; None detects it (the run recorded a
        synthetic truth folder, or the registration QA holds errors against a truth)
    rate : ``statistics.rate``: "per_interval" (the mean log-Jacobian; the paper) or "per_year"
        (``logjac_per_year``) for the correlations, Tables 1 and 2, box plots and zone means;
        None: the setting of the store's last run

    Returns
    -------
    Path of the written page. On any error the page is replaced by one that says the report
    failed and why (never the previous report looking current), and the error is raised again.
    """
    results = Path(results_dir)
    out = results / "report" / "index.html"
    try:
        page = render("report.html", **_build(store, results, synthetic, state, rate))
    except Exception as exc:
        write_text(out, render("report_failed.html", store=str(store), when=_now(),
                                error=f"{type(exc).__name__}: {exc}"))  # fmt: skip
        raise
    write_text(out, page)
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _build(store, results: Path, synthetic, state: dict, rate: str | None = None) -> dict:
    """What the report shows, as the template's context."""
    root = st.open_store(store, mode="r")
    rate = rate or run_rate(root)
    if rate not in RATES:
        raise ValueError(f"report: rate must be one of {', '.join(RATES)}, got {rate!r}")
    column, rate_text = RATES[rate]
    run = dict(root[STATUS_GROUP].attrs.get("run", {})) if STATUS_GROUP in root else {}
    members = manifest_patients(root)  # the last run's manifest: removed patients are left out
    in_store = set(st.patient_ids(root))
    # the cohort statistics: one pair per patient, its primary pair (sscflow.cohort)
    table = cohort_table(root, primary_units([p for p in (members or sorted(in_store))
                                              if p in in_store]))  # fmt: skip
    state = dict(state)
    cohort_state = state.pop(None, {})
    if members is not None:
        keep = set(members)
        state = {pid: row for pid, row in state.items() if pid in keep}
    truth = table.get("reg_truth_mean_error_mm")
    if synthetic is None:
        synthetic = bool(run.get("truth_dir")) or (truth is not None and bool(truth.notna().any()))
    figures = results / "figures"

    failed = [(pid, s, r["message"]) for pid, row in state.items()
              for s, r in row.items() if r["status"] == "failed"]  # fmt: skip
    failed += [(f"line {r['line']} ({r['patient_id'] or 'no id'})", "manifest", r["message"])
               for r in run.get("rejected", []) if r.get("patient_id") not in state]
    done = int(table["logjac_mean"].notna().sum()) if "logjac_mean" in table else 0
    cols = [(column, "mean log-Jacobian" + (" per year" if rate == "per_year" else "")),
            *((c, LABELS[c]) for c in LABELS)]
    bad_cohort = [(s, r["status"], r["message"]) for s, r in cohort_state.items()
                  if r["status"] in ("failed", "upstream_failed") and s != "report"]
    return {
        "store": str(store), "when": _now(), "synthetic": synthetic,
        "cohort": _cohort_section(table, len(state), done, len(failed)),
        "rate": rate_text,
        "summary_tables": _tables_section(table, column),
        "spearman": _spearman_section(table, column),
        "zones": _zones_section(root, table, column, figures),
        "pairs": _pairs_section(results),
        "classifier": _classifier_section(results, figures),
        "small_test": SMALL_TEST,
        "maps": _maps_section(results, cohort_state),
        "box_plots": [
            {"title": "By functional change (Figure 3)",
             **box_plots(table, "functional", cols, figures / "boxplots_functional")},
            {"title": "By morphologic change (Figure 4)",
             **box_plots(table, "visual", cols, figures / "boxplots_visual")},
        ],
        "qa": _qa_section(table, results),
        "truth": _truth_section(store, table, run, figures) if synthetic else None,
        "failed": _table(pd.DataFrame(failed, columns=["patient", "stage", "reason"]))
        if failed else None,
        "bad_cohort": _table(pd.DataFrame(bad_cohort, columns=["stage", "status", "reason"]))
        if bad_cohort else None,
        "provenance": _provenance_section(root, run),
    }  # fmt: skip


def _cohort_section(table, n_ids, done, n_failed) -> dict:
    counts = []
    for by, groups in GROUPS.items():
        if by in table:
            c = ", ".join(f"{g} {int((table[by] == g).sum())}" for g in groups)
            counts.append((by, c, int(table[by].isna().sum())))
    return {"n_ids": n_ids, "done": done, "n_failed": n_failed, "counts": counts}


def _tables_section(table, column: str = "logjac_mean") -> list[dict]:
    rows = [r if r[0] != "logjac_mean" or column == "logjac_mean" else
            (column, "Mean log-Jacobian in the lungs per year", r[2]) for r in TABLE_ROWS]
    out = []
    for title, by, need in (("Table 1: by functional change", "functional",
                             "FVC and DLCO at both times"),
                            ("Table 2: by morphologic (visual) change", "visual",
                             "a visual column")):  # fmt: skip
        made = None
        if by in table and table[by].notna().any():
            made = _table(summary_table(table, by, list(GROUPS[by]), rows))
        out.append({"title": title, "by": by, "need": need, "table": made})
    return out


def _spearman_section(table, column: str = "logjac_mean") -> dict | None:
    rho = spearman_table(table, column) if column in table else pd.DataFrame()
    rho = rho[rho["n"] > 0] if len(rho) else rho
    if not len(rho):
        return None
    show = pd.DataFrame({
        "variable": [LABELS.get(v, v) for v in rho["variable"]],
        "n": rho["n"].astype(int),
        "rho": [format_value(v, "{:.2f}") if np.isfinite(v) else
                "not defined: " + ("fewer than 3 pairs" if n < 3 else "a constant column")
                for v, n in zip(rho["rho"], rho["n"], strict=True)],
        "95% CI": [f"{format_value(lo, '{:.2f}')} to {format_value(hi, '{:.2f}')}"
                   if np.isfinite(lo) and np.isfinite(hi) else
                   "not defined: needs 4 pairs or more (Fisher z)" if np.isfinite(v) else "–"
                   for lo, hi, v in zip(rho["ci_low"], rho["ci_high"], rho["rho"], strict=True)],
        "P": [format_p(p) or "–" for p in rho["p"]],
    })  # fmt: skip
    return _table(show)


def _zones_section(root, table, column: str, figures: Path) -> dict | None:
    """Per zone, the worsening and stable groups' means with 95% CIs and the Mann-Whitney
    test, as a table and a figure (``figures/zones``); None when no patient has zones."""
    zones = zone_table(root, list(table["patient_id"]))
    if not len(zones):
        return None
    means = zone_group_means(zones, table, column=column, groups=ZONE_GROUPS)
    show = pd.DataFrame({"zone": means["zone"]})
    for g in ZONE_GROUPS:
        show[f"{g}: mean (95% CI)"] = [
            "–" if not np.isfinite(m) else f"{m:+.4f}" if not np.isfinite(lo) else
            f"{m:+.4f} ({lo:+.4f} to {hi:+.4f})"
            for m, lo, hi in zip(means[f"{g}_mean"], means[f"{g}_low"], means[f"{g}_high"],
                                 strict=True)]  # fmt: skip
        show[f"{g}: n"] = means[f"{g}_n"]
    show["test"] = [t or "–" for t in means["test"]]
    show["P"] = [format_p(p) or "–" for p in means["p"]]
    label = "mean log-Jacobian" + (" per year" if column == "logjac_per_year" else "")
    return {"table": _table(show), "png": zone_figure(means, figures / "zones", label),
            "labelled": bool(sum(int(means[f"{g}_n"].max()) for g in ZONE_GROUPS))}


def _pairs_section(results: Path) -> dict | None:
    """The pairs of patients with more than two scans (``results/pairs.csv``, written by the
    pairs stage): counts, the consistency of each patient's consecutive pairs with its first ->
    last pair, and the trajectory figure; None when every patient has two scans."""
    path = results / "pairs.csv"
    if not path.is_file():
        return None
    pairs = pd.read_csv(path)
    per_patient = pairs.groupby("patient_id")["t1"].max() if len(pairs) else pd.Series([])
    if not len(pairs) or int(per_patient.max()) < 2:
        return None
    direct = pairs[pairs["composition_mean_mm"].notna()]
    show = pd.DataFrame({
        "patient": direct["patient_id"],
        "first -> last": [f"{a} -> {b}" for a, b in zip(direct["t0"], direct["t1"], strict=True)],
        "months": direct["months"],
        "mean distance (mm)": direct["composition_mean_mm"].map(lambda v: f"{v:.3f}"),
        "p95 (mm)": direct["composition_p95_mm"].map(lambda v: f"{v:.3f}"),
        "lung measured": direct["composition_measured_fraction"].map(lambda v: f"{v:.1%}"),
    })  # fmt: skip
    figure = results / "figures" / "trajectories.png"
    png = base64.b64encode(figure.read_bytes()).decode() if figure.is_file() else None
    return {"n_pairs": len(pairs), "n_patients": int((per_patient >= 2).sum()),
            "table": _table(show) if len(show) else None, "png": png}  # fmt: skip


def zone_figure(means: pd.DataFrame, save: Path | None = None,
                label: str = "mean log-Jacobian") -> str:
    """Each zone's group means with their 95% CIs, worsening beside stable (base64 PNG)."""
    fig, (ax,) = _figure(7.5, 3.4)
    x = np.arange(len(means))
    for k, (g, colour) in enumerate(zip(ZONE_GROUPS, ("#c0392b", "#2e6da4"), strict=True)):
        m = means[f"{g}_mean"].to_numpy(float)
        err = np.vstack([m - means[f"{g}_low"].to_numpy(float),
                         means[f"{g}_high"].to_numpy(float) - m])  # fmt: skip
        ax.errorbar(x + (k - 0.5) * 0.3, m, yerr=np.nan_to_num(err), fmt="o", ms=4,
                    color=colour, capsize=2, lw=1, label=f"{g}")  # fmt: skip
    ax.axhline(0, color="#999", lw=0.6)
    ax.set_xticks(x, [z.replace("_", "\n") for z in means["zone"]], fontsize=8)
    ax.set_ylabel(f"{label} (95% CI)", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, save)
    return _png(fig)


def _classifier_section(results: Path, figures: Path) -> dict:
    targets = []
    curves = {}
    for target, label in TARGETS.items():
        folder = results / "classifier" / target
        metrics = _read_json(folder / "metrics.json")
        if metrics is None:
            targets.append({"label": label, "table": None})
            continue
        cnn = metrics["cnn"]
        rows = [_metric_rows("CNN on log-Jacobian maps (cut-off: validation Youden)", cnn)]
        if metrics.get("ild_extent"):
            rows.append(_metric_rows("ILD extent change (HAA, learning-set Youden cut-off)",
                                     metrics["ild_extent"]))  # fmt: skip
        n = int(cnn.get("n") or 0)
        pos = int(cnn.get("tp", 0)) + int(cnn.get("fn", 0))
        majority = max(pos, n - pos) / n if n else float("nan")
        rows.append({"Method": "Majority class (predict the commoner class for everyone)",
                     "n (test)": n, "Accuracy": format_value(majority, "{:.0%}")})
        targets.append({"label": label, "table": _table(pd.DataFrame(rows)), "n": n,
                        "majority": format_value(majority, "{:.0%}")})  # fmt: skip
        curves[f"{target}: CNN"] = cnn.get("roc", {})
        curves[f"{target}: ILD extent"] = (metrics.get("ild_extent") or {}).get("roc", {})
    roc = None
    if any(c and c.get("fpr") for c in curves.values()):
        roc = roc_figure(curves, figures / "roc")
    return {"targets": targets, "roc": roc}


def _maps_section(results: Path, cohort_state: dict) -> dict:
    fig5 = results / "figures" / "group_means_sagittal.png"
    gm = cohort_state.get("group_means", {})
    if gm.get("status") in ("failed", "upstream_failed"):
        return {"failed": gm["status"].replace("_", " "), "message": gm.get("message", "")}
    if fig5.is_file():
        return {"failed": None, "png": base64.b64encode(fig5.read_bytes()).decode(),
                "alt": fig5.stem}  # fmt: skip
    return {"failed": None, "png": None}


def _qa_section(table, results: Path) -> dict:
    rows = []
    for rec in table.to_dict("records"):
        pid = str(rec["patient_id"])
        rows.append({"patient_id": pid, "link": page_path(results, pid).is_file(),
                     "cells": [format_value(rec.get(c), f) for c, _, f in KEY_FIGURES],
                     "flags": ", ".join(n for n, _ in flags(rec)) or "–"})  # fmt: skip
    return {"rows": rows, "heads": [h for _, h, _ in KEY_FIGURES],
            "rules": [(n, r) for n, r, _ in FLAG_RULES]}


def _truth_section(store, table, run, figures: Path) -> dict:
    cols = [c for c in table.columns if c.startswith("reg_truth_")]
    dice = {}
    truth_dir = run.get("truth_dir")
    if truth_dir and Path(truth_dir, "truth").is_dir():
        ids = [p for p in table["patient_id"] if np.isfinite(table.set_index(
            "patient_id").at[p, "lung_volume_baseline_ml"])]  # fmt: skip
        try:
            dice = lung_mask_dice(store, truth_dir, ids)
        except (OSError, ValueError, KeyError):
            dice = {}
    t = table[["patient_id", *cols]].copy()
    t.insert(1, "lung Dice", [dice.get(p, np.nan) for p in t["patient_id"]])
    t = t[t.drop(columns="patient_id").notna().any(axis=1)]
    if not len(t):
        return {"summary": None}
    summary = []
    for c in t.columns[1:]:
        v = pd.to_numeric(t[c], errors="coerce").dropna()
        if len(v):
            summary.append({"measure": c.removeprefix("reg_truth_"), "n": len(v),
                            "median": format_value(v.median(), "{:.3f}"),
                            "min": format_value(v.min(), "{:.3f}"),
                            "max": format_value(v.max(), "{:.3f}")})  # fmt: skip
    show = t.copy()
    for c in show.columns[1:]:
        show[c] = [format_value(v, "{:.3f}") for v in show[c]]
    show.columns = [c.removeprefix("reg_truth_") for c in show.columns]
    fig, axes = _figure(6.0, 2.6, 2)
    for ax, (c, label) in zip(axes, (("lung Dice", "lung Dice"),
                                     ("reg_truth_mean_error_mm", "displacement error (mm)")),
                              strict=True):  # fmt: skip
        v = pd.to_numeric(t.get(c, pd.Series(dtype=float)), errors="coerce").dropna()
        if len(v):
            ax.hist(v, bins=min(20, max(3, len(v))), color="#4a7fb0")
        ax.set_title(f"{label} (n = {len(v)})", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, figures / "truth")
    return {"summary": _table(pd.DataFrame(summary)), "per_patient": _table(show),
            "png": _png(fig)}


def _provenance_section(root, run: dict) -> dict:
    spacing = None
    for pid in st.patient_ids(root):
        meta = root[f"{st.PATIENTS}/{pid}"].get("baseline")
        if meta is not None and "sscflow" in meta.attrs:
            spacing = (meta.attrs["sscflow"].get("params") or {}).get("spacing_mm")
            break
    backends = {}
    for pid in st.patient_ids(root):
        g = root[f"{st.PATIENTS}/{pid}"]
        for name, stage in (("displacement", "registration"),
                            ("log_jacobian_template", "to_template")):  # fmt: skip
            if st.output_state(g, name) == "complete":
                qa = g[name].attrs["sscflow"].get("qa") or {}
                dev = (qa.get("parameters") or {}).get("device") if isinstance(
                    qa.get("parameters"), dict) else None  # fmt: skip
                key = f"{qa.get('backend', '?')}" + (f" (device {dev})" if dev else "")
                backends.setdefault(stage, {}).setdefault(key, 0)
                backends[stage][key] += 1
    rows = [("sscflow version (this report)", __version__),
            ("sscflow version (the run)", run.get("version", "–")),
            ("run started", run.get("started", "–")),
            ("manifest", run.get("manifest", "–")),
            ("manifest sha256", run.get("manifest_sha256", "–")),
            ("canonical grid spacing (mm)", format_value(spacing, "{:g}")),
            ("template", describe_provenance(template_provenance(root))),
            ("cluster", run.get("cluster", "–")),
            ("config sha256 (every setting)", run.get("config_sha256", "–"))]  # fmt: skip
    deid = run.get("deidentification")
    if deid:  # a discovered cohort
        rows.append(("de-identification", f"{deid.get('method')} (version {deid.get('version')};"
                     f" DICOM CID 7050: {', '.join(c[0] for c in deid.get('codes', []))})"))
    for stage, counts in backends.items():
        rows.append((f"{stage} backend", ", ".join(f"{k}: {v} patients"
                                                    for k, v in counts.items())))  # fmt: skip
    return {"rows": [(k, str(v)) for k, v in rows], "config": run.get("config_yaml")}


def report_key(store, results_dir, state: dict) -> str:
    """A hash of everything the report shows (cohort table, run records, classifier metrics,
    group means, QA pages, run provenance less its start time): unchanged, the report is."""
    root = st.open_store(store, mode="r")
    results = Path(results_dir)
    run = dict(root[STATUS_GROUP].attrs.get("run", {})) if STATUS_GROUP in root else {}
    for key in ("started", "cluster"):  # differ on every run, show nothing new
        run.pop(key, None)
    state = {k: dict(v) for k, v in state.items()}
    state.get(None, {}).pop("report", None)
    metrics = [(results / "classifier" / t / "metrics.json") for t in TARGETS]
    gm = (st.stored_record(root, "group_means") or {}).get("input_hash")
    zones = zone_table(root).to_csv(index=False)
    pages = [(p, dict(root[f"{st.PATIENTS}/{p}"].attrs.get("qa_page", {})).get("input_hash"))
             for p in st.patient_ids(root)]  # fmt: skip
    return st.hash_values(__version__, cohort_table(root).to_csv(index=False),
                          {str(k): v for k, v in state.items()}, run, gm, pages, zones,
                          [m.read_text(encoding="utf-8") if m.is_file() else None
                           for m in metrics])  # fmt: skip
