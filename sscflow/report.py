"""The cohort report: one self-contained HTML page (images embedded), readable offline.

``write_report(store, results_dir)`` reads what the other stages left (the cohort table, the
group-mean figure, the classifier outputs under ``results/classifier/<target>/`` and the run
records) and writes ``results/report/index.html``: cohort summary, Tables 1 and 2 (by functional
and by morphologic change), the correlation of mean log-Jacobian with PFT changes, classifier
metrics beside the ILD-extent baseline, the group-mean sagittal maps, box plots (the paper's
Figures 3 and 4), ROC curves and the failed patients with reasons. Missing parts are said to be
missing, never silently dropped. The page has no scripts and no external resources.

Sign convention stated in the report: log-Jacobian < 0 where the lung shrank from baseline to
follow-up (the paper's Figures 2 and 5); the paper's Table 1 reads with the opposite sign.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

TARGETS = {"functional": "Functional worsening (ATS/ERS: FVC -10 or DLCO -15 points)",
           "morphologic": "Morphologic worsening (visual; improved counts as stable)"}  # fmt: skip
GROUPS = {"functional": ("worsening", "stable"), "visual": ("worsened", "stable", "improved")}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.note{background:#fff6d6;border:1px solid #e8d48a;
padding:.6em 1em}.muted{color:#666}img{max-width:100%}
"""


def _png(fig) -> str:
    """A matplotlib figure as an embedded ``<img>`` (base64 PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _img_file(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _figure(width=7.0, height=3.2, ncols=1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def box_plots(table: pd.DataFrame, by: str, columns: list[tuple[str, str]]) -> str:
    """Box plots of ``columns`` ((column, label) pairs) by the groups of ``by`` (Figures 3, 4)."""
    columns = [(c, lab) for c, lab in columns if c in table and table[c].notna().any()]
    if not columns or by not in table:
        return '<p class="muted">No data for these box plots.</p>'
    groups = [g for g in GROUPS[by] if (table[by] == g).any()]
    fig, axes = _figure(3.0 * len(columns), 3.2, len(columns))
    for ax, (col, label) in zip(axes, columns, strict=True):
        data = [table.loc[table[by] == g, col].dropna().to_numpy() for g in groups]
        ticks = [f"{g}\n(n={len(d)})" for g, d in zip(groups, data, strict=True)]
        ax.boxplot(data, tick_labels=ticks)
        ax.set_title(label, fontsize=9)
        ax.axhline(0, color="#999", lw=0.6)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def roc_figure(curves: dict[str, dict]) -> str:
    """ROC curves, one line per (name -> {"fpr", "tpr", "auc"})."""
    fig, (ax,) = _figure(4.2, 4.0)
    for name, c in curves.items():
        if c and c.get("fpr"):
            ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c.get('auc', float('nan')):.2f})")
    ax.plot([0, 1], [0, 1], color="#aaa", lw=0.8, ls="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, na_rep="–", border=0)


def _metric_rows(name: str, m: dict) -> dict:
    def cell(key):
        v, ci = m.get(key), m.get(f"{key}_ci")
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "–"
        lo, hi = ci if ci else (float("nan"), float("nan"))
        return f"{100 * v:.0f}% ({100 * lo:.0f}–{100 * hi:.0f})"

    auc = m.get("auc")
    return {"Method": name, "n (test)": m.get("n", "–"), "Sensitivity": cell("sensitivity"),
            "Specificity": cell("specificity"), "Accuracy": cell("accuracy"), "PPV": cell("ppv"),
            "NPV": cell("npv"),
            "AUC": "–" if auc is None or np.isnan(auc) else f"{auc:.2f}",
            "TP/FP/TN/FN": f"{m.get('tp', '–')}/{m.get('fp', '–')}/{m.get('tn', '–')}/"
                           f"{m.get('fn', '–')}"}  # fmt: skip


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_report(store: str, results_dir, *, synthetic: bool | None = None) -> Path:
    """Write ``results_dir/report/index.html`` from the store and the results folder.

    Parameters
    ----------
    store : the cohort store
    results_dir : where ``patients.csv``, ``figures/`` and ``classifier/`` are
    synthetic : say plainly that the data are synthetic; None detects it (patient ids made by
        ``sscflow synth`` and truth errors in the registration QA)

    Returns
    -------
    Path of the written page.
    """
    from sscflow import store as st
    from sscflow.groups import cohort_table
    from sscflow.pipeline import manifest_patients, store_status
    from sscflow.stats import TABLE_ROWS, format_p, spearman_table, summary_table
    from sscflow.template import describe_provenance, template_provenance

    results = Path(results_dir)
    root = st.open_store(store, mode="r")
    members = manifest_patients(root)  # the last run's manifest: removed patients are left out
    in_store = set(st.patient_ids(root))
    table = cohort_table(root, None if members is None else [p for p in members if p in in_store])
    if synthetic is None:
        truth = table.get("reg_truth_mean_error_mm")
        synthetic = truth is not None and bool(truth.notna().any())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [f"<h1>sscflow cohort report</h1><p class='muted'>Store "
             f"<code>{html.escape(str(store))}</code>, written {when}. Template: "
             f"{html.escape(describe_provenance(template_provenance(root)))}.</p>"]  # fmt: skip
    if synthetic:
        parts.append("<p class='note'><b>These data are synthetic</b> (made by "
                     "<code>sscflow synth</code>): no patient is real, and the figures check the "
                     "method against a known truth.</p>")  # fmt: skip
    parts.append("<p>Convention: log-Jacobian = log det(I + ∇u) is <b>negative where the lung "
                 "shrank</b> from baseline to follow-up (the paper's Figures 2 and 5; its Table 1 "
                 "medians read with the opposite sign). PFT changes are follow-up minus baseline, "
                 "in % predicted points.</p>")  # fmt: skip

    # cohort summary
    n = len(table)
    done = int(table["logjac_mean"].notna().sum()) if "logjac_mean" in table else 0
    counts = []
    for by, groups in GROUPS.items():
        if by in table:
            c = ", ".join(f"{g} {int((table[by] == g).sum())}" for g in groups)
            counts.append(f"<li>{by}: {c}, no label {int(table[by].isna().sum())}</li>")
    parts.append(f"<h2>Cohort</h2><p>{n} patients in the store; {done} with a log-Jacobian map."
                 f"</p><ul>{''.join(counts)}</ul>")  # fmt: skip

    # Tables 1 and 2
    for title, by in (("Table 1: by functional change", "functional"),
                      ("Table 2: by morphologic (visual) change", "visual")):  # fmt: skip
        if by in table and table[by].notna().any():
            t = summary_table(table, by, list(GROUPS[by]), TABLE_ROWS)
            parts.append(f"<h2>{title}</h2>" + _table_html(t) +
                         "<p class='muted'>Median (interquartile range) or count (%); P: "
                         "Mann-Whitney (2 groups), Kruskal-Wallis (3), Fisher's exact (counts)."
                         "</p>")  # fmt: skip

    # correlations
    rho = spearman_table(table)
    if len(rho):
        show = rho.copy()
        show["95% CI"] = [f"{lo:.2f} to {hi:.2f}" for lo, hi in zip(show.ci_low, show.ci_high,
                                                                       strict=True)]  # fmt: skip
        show["rho"] = show["rho"].map(lambda v: f"{v:.2f}")
        show["P"] = show["p"].map(format_p)
        parts.append("<h2>Mean log-Jacobian against PFT change (Spearman)</h2>"
                     + _table_html(show[["variable", "n", "rho", "95% CI", "P"]]))  # fmt: skip

    # classifier
    parts.append("<h2>Classifier (test set, exact 95% CIs)</h2>")
    curves = {}
    for target, label in TARGETS.items():
        folder = results / "classifier" / target
        metrics = _read_json(folder / "metrics.json")
        if metrics is None:
            parts.append(f"<p class='muted'>{html.escape(label)}: not trained.</p>")
            continue
        rows = [_metric_rows("CNN on log-Jacobian maps (cut-off: validation Youden)",
                             metrics["cnn"])]  # fmt: skip
        if metrics.get("ild_extent"):
            rows.append(_metric_rows("ILD extent change (HAA, learning-set Youden cut-off)",
                                     metrics["ild_extent"]))  # fmt: skip
        parts.append(f"<h3>{html.escape(label)}</h3>" + _table_html(pd.DataFrame(rows)))
        curves[f"{target}: CNN"] = metrics["cnn"].get("roc", {})
        curves[f"{target}: ILD extent"] = (metrics.get("ild_extent") or {}).get("roc", {})
    if curves:
        parts.append("<h3>ROC curves (test set)</h3>" + roc_figure(curves))

    # figures
    parts.append("<h2>Group-mean log-Jacobian maps (sagittal projection, template space)</h2>")
    fig5 = results / "figures" / "group_means_sagittal.png"
    parts.append(_img_file(fig5) if fig5.is_file() else "<p class='muted'>Not made yet.</p>")
    cols = [("logjac_mean", "mean log-Jacobian"), ("delta_fvc", "ΔFVC % pred."),
            ("delta_dlco", "ΔDLCO % pred."), ("delta_tlc", "ΔTLC % pred."),
            ("delta_kco", "ΔKCO % pred.")]  # fmt: skip
    parts.append("<h2>By functional change (Figure 3)</h2>" + box_plots(table, "functional", cols))
    parts.append("<h2>By morphologic change (Figure 4)</h2>" + box_plots(table, "visual", cols))

    # failures
    state = store_status(store)
    state.pop(None, None)
    if members is not None:
        keep = set(members)
        state = {pid: row for pid, row in state.items() if pid in keep}
    failed = [(pid, s, r["status"], r["message"]) for pid, row in state.items()
              for s, r in row.items() if r["status"] in ("failed",)]  # fmt: skip
    parts.append("<h2>Failed patients</h2>")
    if failed:
        parts.append(_table_html(pd.DataFrame(failed, columns=["patient", "stage", "status",
                                                               "reason"])))  # fmt: skip
    else:
        parts.append("<p>None.</p>")

    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<title>sscflow cohort report</title><style>" + CSS + "</style></head><body>"
            + "\n".join(parts) + "</body></html>")  # fmt: skip
    out = results / "report" / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".html.partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # never a half-written page
    return out
