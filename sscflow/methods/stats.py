"""Statistics of the paper: diagnostic metrics, ROC, Spearman correlations and Tables 1 and 2.

Chassagnon et al. (Radiology 2021) report, for the log-Jacobian classifier of worsening,
sensitivity, specificity, accuracy and predictive values with exact (Clopper-Pearson) 95%
confidence intervals, the area under the ROC curve, a cut-off chosen by the Youden index on the
learning set, Spearman correlations between the mean log-Jacobian and the changes in pulmonary
function tests, and tables of medians (interquartile ranges) and counts (percentages) compared
between groups with Mann-Whitney / Kruskal-Wallis and Fisher tests.

Every test here is scipy's or scikit-learn's; this module only chooses, validates and formats.
Missing values are dropped pairwise; an undefined value (a denominator of 0, one class only) is
NaN, never an error.

This module imports pandas, scipy and scikit-learn; ``import sscflow`` does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

#: The rows of the paper's Tables 1 and 2: (column of :func:`sscflow.methods.groups.cohort_table`,
#: label, kind). :func:`summary_table` skips those whose column the table lacks.
TABLE_ROWS: list[tuple[str, str, str]] = [
    ("age", "Age (y)", "continuous"),
    ("sex", "Women", "categorical:F"),
    ("interval_months", "Interval between CT scans (mo)", "continuous"),
    ("fvc_baseline", "FVC at baseline (% predicted)", "continuous"),
    ("delta_fvc", "Change in FVC (percentage points)", "continuous"),
    ("dlco_baseline", "DLCO at baseline (% predicted)", "continuous"),
    ("delta_dlco", "Change in DLCO (percentage points)", "continuous"),
    ("tlc_baseline", "TLC at baseline (% predicted)", "continuous"),
    ("delta_tlc", "Change in TLC (percentage points)", "continuous"),
    ("kco_baseline", "KCO at baseline (% predicted)", "continuous"),
    ("delta_kco", "Change in KCO (percentage points)", "continuous"),
    ("lung_volume_baseline_ml", "Lung volume at baseline (mL)", "continuous"),
    ("lung_volume_followup_ml", "Lung volume at follow-up (mL)", "continuous"),
    ("logjac_mean", "Mean log-Jacobian in the lungs", "continuous"),
]

PFT_DELTAS = ("delta_fvc", "delta_dlco", "delta_tlc", "delta_kco")
FISHER_RESAMPLES = 99_999
FISHER_SEED = 20210101


# --- diagnostic performance -------------------------------------------------------------------


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of a proportion k / n.

    Parameters
    ----------
    k : successes, 0 <= k <= n
    n : trials; 0 gives (nan, nan)
    level : confidence level in (0, 1)

    Returns
    -------
    (low, high) as floats in [0, 1]; low is 0 when k == 0 and high is 1 when k == n.

    Examples
    --------
    >>> low, high = clopper_pearson(5, 10)
    >>> round(low, 4), round(high, 4)
    (0.1871, 0.8129)
    """
    k, n = _count(k, "k"), _count(n, "n")
    if k > n:
        raise ValueError(f"clopper_pearson: k must be at most n, got k={k}, n={n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"clopper_pearson: level must be in (0, 1), got {level}")
    if n == 0:
        return (math.nan, math.nan)
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def binary_metrics(y_true, y_pred, level: float = 0.95) -> dict:
    """Sensitivity, specificity, accuracy, PPV and NPV with exact confidence intervals.

    Parameters
    ----------
    y_true, y_pred : 1-D arrays of 0 / 1 (or bool) of equal length; 1 = worsening (positive)
    level : confidence level of the Clopper-Pearson intervals

    Returns
    -------
    dict with the counts ``tp, fp, tn, fn, n`` (int) and, for each of ``sensitivity``
    (tp / (tp + fn)), ``specificity`` (tn / (tn + fp)), ``accuracy`` ((tp + tn) / n), ``ppv``
    (tp / (tp + fp)) and ``npv`` (tn / (tn + fn)), the value and ``<name>_ci`` = (low, high).
    A value whose denominator is 0 is NaN, with a (nan, nan) interval.

    Examples
    --------
    >>> m = binary_metrics([1, 1, 0, 0], [1, 0, 0, 0])
    >>> m["tp"], m["fn"], float(m["sensitivity"]), float(m["specificity"])
    (1, 1, 0.5, 1.0)
    """
    t, p = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(
            f"binary_metrics: y_true and y_pred differ in length ({t.size} and {p.size})"
        )
    if t.size:
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(t, p, labels=[0, 1]).ravel())
    else:
        tn = fp = fn = tp = 0
    out: dict = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": tp + fp + tn + fn}
    ratios = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "accuracy": (tp + tn, out["n"]),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
    }
    for name, (k, n) in ratios.items():
        out[name] = k / n if n else math.nan
        out[f"{name}_ci"] = clopper_pearson(k, n, level)
    return out


def roc(y_true, score) -> dict:
    """ROC curve and its area; pairs with a missing label or score are dropped.

    Parameters
    ----------
    y_true : 1-D array of 0 / 1 (1 = worsening); NaN allowed (dropped)
    score : 1-D array, higher = more likely positive (negate a score where lower means
        worsening, e.g. a log-Jacobian); NaN allowed (dropped)

    Returns
    -------
    dict: ``n`` (pairs used), ``auc`` (sklearn ``roc_auc_score``; NaN with one class only) and the
    lists ``fpr``, ``tpr``, ``thresholds`` of sklearn ``roc_curve`` (the first threshold is
    +inf; the lists are empty with one class only).

    Examples
    --------
    >>> float(roc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])["auc"])
    0.75
    """
    t, s = _pairs(y_true, score, "roc")
    out = {"n": int(t.size), "auc": math.nan, "fpr": [], "tpr": [], "thresholds": []}
    if np.unique(t).size < 2:
        return out
    fpr, tpr, thresholds = roc_curve(t, s)
    out.update(auc=float(roc_auc_score(t, s)), fpr=fpr.tolist(), tpr=tpr.tolist(),
               thresholds=thresholds.tolist())  # fmt: skip
    return out


def youden_threshold(score, y_true, *, greater_is_positive: bool = True) -> float:
    """The cut-off that maximises Youden's J = sensitivity + specificity - 1 on this set.

    Choose it on the learning set and apply it unchanged to the test set
    (:func:`classify`).

    Parameters
    ----------
    score : 1-D array of scores; NaN pairs are dropped
    y_true : 1-D array of 0 / 1, 1 = worsening
    greater_is_positive : True when ``score >= threshold`` means positive. False for a score
        where lower means worsening (the mean log-Jacobian: shrinkage is negative); then
        ``score <= threshold`` means positive. Implemented by negating the score for sklearn's
        ``roc_curve`` and negating the cut-off back.

    Returns
    -------
    float: an observed score value. Among cut-offs with equal J, the strictest one (fewest
    positives) is returned.

    Raises
    ------
    ValueError when the set does not hold both classes.

    Examples
    --------
    >>> float(youden_threshold([1, 2, 3, 10, 11, 12], [0, 0, 0, 1, 1, 1]))
    10.0
    >>> float(youden_threshold([-0.2, -0.1, 0.0, 0.1], [1, 1, 0, 0], greater_is_positive=False))
    -0.1
    """
    t, s = _pairs(y_true, score, "youden_threshold")
    if np.unique(t).size < 2:
        raise ValueError(
            f"youden_threshold: needs both classes (0 and 1) in y_true, got only {np.unique(t)}"
        )
    sign = 1.0 if greater_is_positive else -1.0
    fpr, tpr, thresholds = roc_curve(t, sign * s, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # index 0 is the +inf cut-off (nobody positive)
    best = int(np.argmax(j)) + 1  # thresholds decrease: the first maximum is the strictest
    return float(sign * thresholds[best])


def classify(score, threshold: float, *, greater_is_positive: bool = True) -> np.ndarray:
    """0 / 1 predictions: ``score >= threshold`` (or ``<=`` when not greater_is_positive).

    NaN scores give 0; drop them before computing metrics.

    >>> classify([0.1, 0.5, 0.9], 0.5).tolist()
    [0, 1, 1]
    """
    s = np.asarray(score, dtype=float)
    hit = s >= threshold if greater_is_positive else s <= threshold
    return hit.astype(np.int64)


# --- correlations -----------------------------------------------------------------------------


def spearman_ci(rho: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a Spearman rho by the Fisher z transform.

    z = atanh(rho) is taken as normal with the Bonett-Wright (2000) standard error
    sqrt((1 + rho^2 / 2) / (n - 3)), which is wider than Pearson's 1 / sqrt(n - 3) to account for
    ranks; the bounds are tanh(z -/+ q * se) with q the normal quantile of (1 + level) / 2.

    Returns (nan, nan) when n < 4 or rho is NaN.

    >>> low, high = spearman_ci(0.5, 30)
    >>> round(low, 3), round(high, 3)
    (0.148, 0.74)
    """
    if n < 4 or not np.isfinite(rho):
        return (math.nan, math.nan)
    se = math.sqrt((1.0 + rho**2 / 2.0) / (n - 3))
    q = float(sps.norm.ppf(0.5 + level / 2.0))
    with np.errstate(divide="ignore"):  # rho = +-1 gives z = +-inf and a (1, 1) interval
        z = float(np.arctanh(rho))
    return (float(np.tanh(z - q * se)), float(np.tanh(z + q * se)))


def spearman_table(
    table: pd.DataFrame,
    x: str = "logjac_mean",
    ys: Sequence[str] = PFT_DELTAS,
    level: float = 0.95,
) -> pd.DataFrame:
    """Spearman correlation of ``x`` with each of ``ys``, on complete pairs.

    Parameters
    ----------
    table : e.g. :func:`sscflow.methods.groups.cohort_table`
    x : column correlated with each of ``ys`` (the mean log-Jacobian by default)
    ys : columns; those absent from ``table`` are skipped
    level : confidence level of the interval (:func:`spearman_ci`)

    Returns
    -------
    DataFrame with columns ``variable, n, rho, ci_low, ci_high, p``: rho and the two-sided p of
    ``scipy.stats.spearmanr``; NaN rho and p when n < 3 or either column is constant, NaN
    interval when n < 4.

    Raises
    ------
    KeyError when ``x`` is not a column of ``table``.
    """
    if x not in table.columns:
        raise KeyError(f"spearman_table: column {x!r} is not in the table; it has {list(table)}")
    rows = []
    for y in ys:
        if y not in table.columns:
            continue
        pair = pd.DataFrame({"x": pd.to_numeric(table[x], errors="coerce"),
                             "y": pd.to_numeric(table[y], errors="coerce")}).dropna()  # fmt: skip
        n = len(pair)
        rho = p = math.nan
        if n >= 3 and pair["x"].nunique() > 1 and pair["y"].nunique() > 1:
            res = sps.spearmanr(pair["x"], pair["y"])
            rho, p = float(res.statistic), float(res.pvalue)
        low, high = spearman_ci(rho, n, level)
        rows.append({"variable": y, "n": n, "rho": rho, "ci_low": low, "ci_high": high, "p": p})
    return pd.DataFrame(rows, columns=["variable", "n", "rho", "ci_low", "ci_high", "p"])


# --- group comparisons ------------------------------------------------------------------------


def compare_groups(values_by_group: Mapping[str, Sequence[float]]) -> dict:
    """Compare a continuous variable between groups, without assuming normality.

    Parameters
    ----------
    values_by_group : group name -> values; NaN values are dropped, then empty groups

    Returns
    -------
    dict: ``test`` ("Mann-Whitney U" for two groups, two-sided, ``scipy.stats.mannwhitneyu``;
    "Kruskal-Wallis" for three or more, ``scipy.stats.kruskal``; None for fewer than two),
    ``statistic``, ``p`` and ``groups`` (the names kept). With fewer than two groups, or when
    every value of a Kruskal-Wallis comparison is the same, statistic and p are NaN.

    Examples
    --------
    >>> r = compare_groups({"a": [1, 2, 3], "b": [4, 5, 6]})
    >>> r["test"], round(r["p"], 3)
    ('Mann-Whitney U', 0.1)
    """
    kept = {}
    for name, values in values_by_group.items():
        v = np.asarray(values, dtype=float).ravel()
        v = v[~np.isnan(v)]
        if v.size >= 1:
            kept[name] = v
    out = {"test": None, "statistic": math.nan, "p": math.nan, "groups": list(kept)}
    samples = list(kept.values())
    if len(samples) == 2:
        res = sps.mannwhitneyu(samples[0], samples[1], alternative="two-sided")
        out.update(test="Mann-Whitney U", statistic=float(res.statistic), p=float(res.pvalue))
    elif len(samples) > 2:
        out["test"] = "Kruskal-Wallis"
        if np.unique(np.concatenate(samples)).size > 1:  # all equal: H is 0 / 0
            res = sps.kruskal(*samples)
            out.update(statistic=float(res.statistic), p=float(res.pvalue))
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``values`` (NaN dropped) and its confidence interval by Student's t:
    mean +- t(level, n - 1) s / sqrt(n). Returns (mean, low, high); NaN interval when n < 2,
    all NaN when n is 0.

    >>> m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    >>> m, round(lo, 4), round(hi, 4)
    (2.0, -0.4841, 4.4841)
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if v.size < 2:
        return (mean, math.nan, math.nan)
    half = float(sps.t.ppf(0.5 + level / 2.0, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(
        v.size)
    return (mean, mean - half, mean + half)


def compare_counts(table, *, n_resamples: int = FISHER_RESAMPLES, seed: int = FISHER_SEED) -> dict:
    """Fisher's exact test of independence in a contingency table of counts.

    Rows and columns whose counts are all 0 are dropped first. A 2 x 2 table gets the exact
    two-sided ``scipy.stats.fisher_exact``. A larger R x C table (three groups, say) gets
    scipy's R x C Fisher test (scipy >= 1.15), whose p-value is estimated by Monte Carlo:
    ``n_resamples`` tables drawn from ``scipy.stats.random_table`` with the observed margins,
    from a generator seeded with ``seed`` so the p-value is reproducible (standard error about
    sqrt(p (1 - p) / n_resamples), under 0.002 by default). No chi-square approximation is used.

    Parameters
    ----------
    table : 2-D array of non-negative integer counts (groups x categories)

    Returns
    -------
    dict: ``test`` ("Fisher exact" or "Fisher exact (Monte Carlo)"; None when fewer than two
    non-empty rows are left), ``statistic`` (the odds ratio for 2 x 2; otherwise the
    probability of the observed table) and ``p``. With fewer than two non-empty rows p is NaN;
    with one non-empty column (everyone in the same category) p is 1.

    Examples
    --------
    >>> round(compare_counts([[3, 1], [1, 3]])["p"], 4)
    0.4857
    """
    counts = np.asarray(table)
    if counts.ndim != 2:
        raise ValueError(f"compare_counts: table must be 2-D, got shape {counts.shape}")
    if counts.size and (np.any(counts < 0) or np.any(counts != np.round(counts))):
        raise ValueError(f"compare_counts: table must hold non-negative integer counts, got "
                         f"{counts.tolist()}")  # fmt: skip
    counts = counts.astype(np.int64)
    counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]
    if counts.shape[0] < 2:
        return {"test": None, "statistic": math.nan, "p": math.nan}
    if counts.shape[1] < 2:
        return {"test": "Fisher exact", "statistic": math.nan, "p": 1.0}
    if counts.shape == (2, 2):
        res = sps.fisher_exact(counts, alternative="two-sided")
        return {"test": "Fisher exact", "statistic": float(res.statistic), "p": float(res.pvalue)}
    method = sps.MonteCarloMethod(n_resamples=n_resamples, rng=np.random.default_rng(seed))
    res = sps.fisher_exact(counts, method=method)
    return {"test": "Fisher exact (Monte Carlo)", "statistic": float(res.statistic),
            "p": float(res.pvalue)}  # fmt: skip


# --- Tables 1 and 2 ---------------------------------------------------------------------------


def summary_values(
    table: pd.DataFrame,
    by: str,
    groups: Sequence[str],
    rows: Sequence[tuple[str, str, str]] = TABLE_ROWS,
) -> pd.DataFrame:
    """The numbers behind :func:`summary_table`, one row per (variable, group).

    Parameters
    ----------
    table : one row per patient, e.g. :func:`sscflow.methods.groups.cohort_table`
    by : the column holding the group of each patient (e.g. "functional", "visual")
    groups : the groups to show, in order; patients in other groups (or none) are left out
    rows : (column, label, kind) items; kind is "continuous", "categorical:<value>" or "count".
        Items whose column is not in ``table`` are skipped.

    Returns
    -------
    DataFrame with columns ``variable, label, kind, group, n, median, q1, q3, count, percent,
    test, p``: ``n`` is the number of non-missing values (patients for "count"); ``median``,
    ``q1`` and ``q3`` (continuous; linear-interpolated quartiles, as ``numpy.percentile``);
    ``count`` and ``percent`` (categorical: rows equal to the value, percent of the non-missing
    rows, NaN when there are none); ``test`` and ``p`` are the variable's comparison across the
    groups (:func:`compare_groups` or :func:`compare_counts`), repeated on each of its rows.
    """
    if by not in table.columns:
        raise KeyError(f"summary_values: group column {by!r} is not in the table")
    groups = list(groups)
    if not groups or len(set(groups)) != len(groups):
        raise ValueError(f"summary_values: groups must be distinct values of {by!r}, got {groups}")
    parts = {g: table[table[by] == g] for g in groups}
    out = []
    for column, label, kind in rows:
        if column not in table.columns:
            continue
        base = {"variable": column, "label": label, "kind": kind}
        empty = dict.fromkeys(("median", "q1", "q3", "count", "percent"), math.nan)
        cells = {g: {"n": len(part), **empty} for g, part in parts.items()}
        test = {"test": None, "p": math.nan}
        if kind == "continuous":
            values = {g: pd.to_numeric(part[column], errors="coerce").dropna().to_numpy(float)
                      for g, part in parts.items()}  # fmt: skip
            for g, v in values.items():
                cells[g]["n"] = int(v.size)
                if v.size:
                    q1, med, q3 = np.percentile(v, [25, 50, 75])
                    cells[g].update(median=float(med), q1=float(q1), q3=float(q3))
            test = compare_groups(values)
        elif kind.startswith("categorical:"):
            value = kind.split(":", 1)[1]
            counts = []
            for g, part in parts.items():
                known = part[column].dropna()
                k = int((known.astype(str) == value).sum())
                percent = 100.0 * k / len(known) if len(known) else math.nan
                cells[g].update(n=len(known), count=k, percent=percent)
                counts.append([k, len(known) - k])
            test = compare_counts(counts)
        elif kind != "count":
            raise ValueError(f"summary_values: row {column!r} has unknown kind {kind!r}; use "
                             "'continuous', 'categorical:<value>' or 'count'")  # fmt: skip
        for g in groups:
            out.append({**base, "group": g, **cells[g], "test": test["test"], "p": test["p"]})
    columns = ["variable", "label", "kind", "group", "n", "median", "q1", "q3", "count",
               "percent", "test", "p"]  # fmt: skip
    return pd.DataFrame(out, columns=columns)


def summary_table(
    table: pd.DataFrame,
    by: str,
    groups: Sequence[str],
    rows: Sequence[tuple[str, str, str]] = TABLE_ROWS,
) -> pd.DataFrame:
    """The paper's Table 1 / Table 2 layout: one line per variable, one column per group.

    Cells: "median (Q1-Q3)" for continuous rows (rounded to 0 decimals when the largest absolute
    value shown is >= 10, 1 when >= 1, otherwise to two significant digits; " to " replaces
    the hyphen when a quartile is negative, e.g. "-5.0 (-8.0 to -2.0)"), "count (percent%)"
    for categorical rows (percent to the unit; "0 (NA)" without non-missing values) and the
    number of patients for "count" rows. A group without values shows "NA".

    Parameters are those of :func:`summary_values`.

    Returns
    -------
    DataFrame with columns "Variable", "<group> (n = N)" for each group (N patients in it) and
    "P value" ("<.001", otherwise three decimals without the leading zero, e.g. ".486"; empty
    when there is no test or p is NaN).

    Examples
    --------
    >>> t = pd.DataFrame({"g": ["a"] * 3 + ["b"] * 3, "age": [50, 58, 60, 40, 44, 48]})
    >>> summary_table(t, "g", ["a", "b"], [("age", "Age (y)", "continuous")]).iloc[0].tolist()
    ['Age (y)', '58 (54-59)', '44 (42-46)', '.100']
    """
    values = summary_values(table, by, groups, rows)
    sizes = {g: int((table[by] == g).sum()) for g in groups}
    headers = {g: f"{g} (n = {sizes[g]})" for g in groups}
    lines = []
    for start in range(0, len(values), len(groups)):  # one block of len(groups) rows per item
        block = values.iloc[start : start + len(groups)]
        first = block.iloc[0]
        line = {"Variable": first["label"]}
        decimals = _decimals(block[["median", "q1", "q3"]].to_numpy(float))
        for _, cell in block.iterrows():
            line[headers[cell["group"]]] = _cell(cell, decimals)
        line["P value"] = format_p(first["p"])
        lines.append(line)
    return pd.DataFrame(lines, columns=["Variable", *headers.values(), "P value"])


def format_p(p: float) -> str:
    """A P value in Radiology style: "<.001", else three decimals without the leading zero.

    >>> format_p(0.00042), format_p(0.4857), format_p(float("nan"))
    ('<.001', '.486', '')
    """
    if p is None or not np.isfinite(p):
        return ""
    if p < 0.001:
        return "<.001"
    text = f"{p:.3f}"
    return text[1:] if text.startswith("0") else text


def _cell(cell, decimals: int) -> str:
    kind = cell["kind"]
    if kind == "count":
        return str(int(cell["n"]))
    if kind == "continuous":
        if not np.isfinite(cell["median"]):
            return "NA"
        values = np.array([cell[k] for k in ("median", "q1", "q3")], float)
        if np.abs(values).max() > 0:  # a cell of small values keeps two significant digits
            decimals = max(decimals, _decimals(values))
        rounded = [round(float(v), decimals) + 0.0 for v in values]  # + 0.0: no "-0"
        med, q1, q3 = (f"{v:.{decimals}f}" for v in rounded)
        sep = " to " if min(rounded[1:]) < 0 else "-"
        return f"{med} ({q1}{sep}{q3})"
    if not np.isfinite(cell["percent"]):
        return "0 (NA)"
    return f"{int(cell['count'])} ({cell['percent']:.0f}%)"


def _decimals(values: np.ndarray) -> int:
    finite = np.abs(values[np.isfinite(values)])
    m = float(finite.max()) if finite.size else 0.0
    if m >= 10:
        return 0
    if m >= 1 or m == 0:
        return 1
    return int(math.ceil(-math.log10(m))) + 1


# --- input checks -----------------------------------------------------------------------------


def _count(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"clopper_pearson: {name} must be a non-negative integer, got {value!r}")
    return int(value)


def _binary(values, name: str) -> np.ndarray:
    v = np.asarray(values).ravel()
    if v.dtype == bool:
        return v.astype(np.int64)
    v = v.astype(float)
    bad = ~np.isin(v, (0.0, 1.0))
    if bad.any():
        got = np.unique(v[bad])[:5].tolist()
        raise ValueError(f"binary_metrics: {name} must hold only 0 and 1 (1 = worsening), got "
                         f"{got}; drop missing labels first")  # fmt: skip
    return v.astype(np.int64)


def _pairs(y_true, score, who: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(score, dtype=float).ravel()
    if t.shape != s.shape:
        raise ValueError(f"{who}: y_true and score differ in length ({t.size} and {s.size})")
    keep = ~(np.isnan(t) | np.isnan(s))
    t, s = t[keep], s[keep]
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError(f"{who}: y_true must hold only 0 and 1 (1 = worsening), got "
                         f"{np.unique(t).tolist()[:5]}")  # fmt: skip
    return t.astype(np.int64), s
