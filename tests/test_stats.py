"""sscflow.methods.stats against published values, scipy called directly and hand counts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from sscflow.methods import stats

# --- Clopper-Pearson ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 10, 0.0, 0.3085), (5, 10, 0.1871, 0.8129), (8, 10, 0.4439, 0.9748)],
)
def test_clopper_pearson_published_values(k, n, low, high):
    got = stats.clopper_pearson(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize(("k", "n"), [(1, 7), (3, 3), (12, 40), (0, 1)])
def test_clopper_pearson_beta_quantiles(k, n):
    level = 0.9
    a = (1 - level) / 2
    low = sps.beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
    high = sps.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    assert stats.clopper_pearson(k, n, level) == pytest.approx((low, high), rel=1e-9, abs=1e-12)


def test_clopper_pearson_zero_trials_and_bad_input():
    assert all(math.isnan(v) for v in stats.clopper_pearson(0, 0))
    with pytest.raises(ValueError, match="at most n"):
        stats.clopper_pearson(4, 3)
    with pytest.raises(ValueError, match="non-negative integer"):
        stats.clopper_pearson(1.5, 3)


# --- binary metrics -----------------------------------------------------------------------------


def test_binary_metrics_hand_counted():
    # pairs (truth, prediction): TP x3, FN x1, FP x2, TN x4
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    m = stats.binary_metrics(y_true, y_pred)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 1, 2, 4, 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["sensitivity_ci"] == stats.clopper_pearson(3, 4)
    assert m["accuracy_ci"] == stats.clopper_pearson(7, 10)
    assert m["npv_ci"] == stats.clopper_pearson(4, 5)


def test_binary_metrics_zero_denominator_is_nan():
    m = stats.binary_metrics(np.array([0, 0, 0]), np.array([False, False, True]))
    assert math.isnan(m["sensitivity"]) and all(math.isnan(v) for v in m["sensitivity_ci"])
    assert m["specificity"] == pytest.approx(2 / 3)
    assert (m["ppv"], m["npv"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="only 0 and 1"):
        stats.binary_metrics([0, 2], [0, 1])


# --- ROC and Youden -----------------------------------------------------------------------------


def _pair_auc(y, s):
    pos = [b for t, b in zip(y, s, strict=True) if t == 1]
    neg = [b for t, b in zip(y, s, strict=True) if t == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_pair_count():
    y = [0, 1, 0, 1, 1, 0, 1, 0]
    s = [0.2, 0.9, 0.5, 0.5, 0.3, 0.1, 0.8, 0.6]  # a tie across classes counts 1/2
    r = stats.roc(y, s)
    assert r["auc"] == pytest.approx(_pair_auc(y, s))
    assert r["n"] == 8 and r["fpr"][0] == 0.0 and r["tpr"][-1] == 1.0
    assert len(r["fpr"]) == len(r["tpr"]) == len(r["thresholds"])


def test_roc_drops_missing_and_one_class_is_nan():
    r = stats.roc([0, 1, np.nan, 1], [0.1, 0.9, 0.5, np.nan])
    assert r["n"] == 2 and r["auc"] == 1.0
    one = stats.roc([1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(one["auc"]) and one["fpr"] == []


def test_youden_obvious_optimum():
    score = [0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8, 0.9]
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    t = stats.youden_threshold(score, y)
    assert t == pytest.approx(0.6)
    assert stats.binary_metrics(y, stats.classify(score, t))["accuracy"] == 1.0


def test_youden_lower_is_positive():
    logjac = np.array([-0.30, -0.20, -0.12, -0.02, 0.00, 0.01])  # shrinkage = worsening
    y = [1, 1, 1, 0, 0, 0]
    t = stats.youden_threshold(logjac, y, greater_is_positive=False)
    assert t == pytest.approx(-0.12)
    pred = stats.classify(logjac, t, greater_is_positive=False)
    assert pred.tolist() == y
    with pytest.raises(ValueError, match="both classes"):
        stats.youden_threshold([1, 2], [1, 1])


def test_youden_imperfect_separation_maximises_j():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(30), np.ones(20)].astype(int)
    score = np.r_[rng.normal(0, 1, 30), rng.normal(1.2, 1, 20)]
    t = stats.youden_threshold(score, y)

    def j(c):  # sensitivity + specificity - 1, counted by hand
        return np.mean(score[y == 1] >= c) + np.mean(score[y == 0] < c) - 1

    assert j(t) == pytest.approx(max(j(c) for c in score))


# --- Spearman -----------------------------------------------------------------------------------


def _table(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({"logjac_mean": x, "delta_fvc": 5 * x + rng.normal(size=n) * 4,
                         "delta_dlco": rng.normal(size=n)})  # fmt: skip


def test_spearman_matches_scipy_and_ci_contains_rho():
    t = _table(40)
    t.loc[3, "delta_fvc"] = np.nan
    out = stats.spearman_table(t)
    assert out["variable"].tolist() == ["delta_fvc", "delta_dlco"]  # absent columns skipped
    fvc = out.iloc[0]
    ref = sps.spearmanr(t["logjac_mean"].drop(3), t["delta_fvc"].drop(3))
    assert fvc["n"] == 39
    assert fvc["rho"] == pytest.approx(ref.statistic) and fvc["p"] == pytest.approx(ref.pvalue)
    for _, row in out.iterrows():
        assert row["ci_low"] < row["rho"] < row["ci_high"]


def test_spearman_ci_narrows_with_n():
    small = stats.spearman_table(_table(15), ys=["delta_fvc"]).iloc[0]
    large = stats.spearman_table(_table(150), ys=["delta_fvc"]).iloc[0]
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]


def test_spearman_ci_fisher_z_by_hand():
    # rho = 0.6, n = 28: se = sqrt(1.18 / 25) = 0.217256, z = atanh(0.6) = 0.693147
    low, high = stats.spearman_ci(0.6, 28)
    assert low == pytest.approx(math.tanh(0.693147 - 1.959964 * 0.217256), abs=1e-5)
    assert high == pytest.approx(math.tanh(0.693147 + 1.959964 * 0.217256), abs=1e-5)
    assert (round(low, 3), round(high, 3)) == (0.261, 0.807)


def test_spearman_small_n_and_constant():
    t = pd.DataFrame({"logjac_mean": [1.0, 2.0, 3.0], "delta_fvc": [3.0, 1.0, 2.0],
                      "delta_dlco": [1.0, 1.0, 1.0]})  # fmt: skip
    out = stats.spearman_table(t).set_index("variable")
    assert out.loc["delta_fvc", "n"] == 3 and np.isfinite(out.loc["delta_fvc", "rho"])
    assert math.isnan(out.loc["delta_fvc", "ci_low"])  # n < 4
    assert math.isnan(out.loc["delta_dlco", "rho"])  # constant: undefined, no warning
    with pytest.raises(KeyError, match="nope"):
        stats.spearman_table(t, x="nope")


# --- group comparisons --------------------------------------------------------------------------


def test_compare_groups_matches_scipy():
    a, b, c = [1.0, 3.5, 2.2, 8.0, np.nan], [4.1, 5.0, 6.3, 7.7], [0.5, 9.1, 6.0]
    two = stats.compare_groups({"a": a, "b": b})
    ref = sps.mannwhitneyu([1.0, 3.5, 2.2, 8.0], b, alternative="two-sided")
    assert two["test"] == "Mann-Whitney U"
    assert (two["statistic"], two["p"]) == pytest.approx((ref.statistic, ref.pvalue))
    three = stats.compare_groups({"a": a, "b": b, "c": c})
    ref = sps.kruskal([1.0, 3.5, 2.2, 8.0], b, c)
    assert three["test"] == "Kruskal-Wallis" and three["p"] == pytest.approx(ref.pvalue)
    dropped = stats.compare_groups({"a": a, "b": b, "empty": [np.nan]})
    assert dropped["groups"] == ["a", "b"] and dropped["p"] == pytest.approx(two["p"])
    alone = stats.compare_groups({"a": a, "b": []})
    assert alone["test"] is None and math.isnan(alone["p"])
    same = stats.compare_groups({"a": [1, 1], "b": [1], "c": [1, 1]})
    assert math.isnan(same["p"])


def test_compare_counts_tea_tasting():
    r = stats.compare_counts([[3, 1], [1, 3]])
    assert r["test"] == "Fisher exact"
    assert r["p"] == pytest.approx(0.4857, abs=1e-4)
    assert r["p"] == pytest.approx(sps.fisher_exact([[3, 1], [1, 3]]).pvalue)


def _exact_rx2(table):
    """Fisher's exact two-sided p for an R x 2 table, by enumerating all tables with its margins."""
    table = np.asarray(table)
    rows, col0, total = table.sum(axis=1), table[:, 0].sum(), table.sum()

    def prob(x):
        return math.prod(math.comb(r, k) for r, k in zip(rows, x, strict=True)) / math.comb(
            total, col0)  # fmt: skip

    observed = prob(table[:, 0])
    tables = (x for x in itertools.product(*[range(r + 1) for r in rows]) if sum(x) == col0)
    return sum(p for p in map(prob, tables) if p <= observed * (1 + 1e-7))


def test_compare_counts_r_by_c_close_to_exact_enumeration():
    table = [[6, 1], [2, 5], [3, 3]]
    r = stats.compare_counts(table)
    assert r["test"] == "Fisher exact (Monte Carlo)"
    assert r["p"] == pytest.approx(_exact_rx2(table), abs=0.01)
    assert stats.compare_counts(table)["p"] == r["p"]  # seeded: reproducible


def test_compare_counts_degenerate_tables():
    assert math.isnan(stats.compare_counts([[2, 3], [0, 0]])["p"])  # one non-empty group
    assert stats.compare_counts([[2, 0], [3, 0]])["p"] == 1.0  # everyone in one category
    with pytest.raises(ValueError, match="non-negative integer"):
        stats.compare_counts([[1, -1], [2, 2]])


# --- Tables 1 and 2 -----------------------------------------------------------------------------


@pytest.fixture
def tiny():
    return pd.DataFrame({
        "functional": ["worsening"] * 4 + ["stable"] * 4 + [None],
        "age": [50, 60, 70, 80, 40, 44, 48, np.nan, 99],
        "sex": ["F", "F", "M", None, "M", "M", "M", "F", "F"],
        "delta_fvc": [-12.0, -8.0, -6.0, -2.0, 1.0, -1.0, 3.0, 0.0, 5.0],
        "logjac_mean": [-0.061, -0.052, -0.044, -0.032, -0.002, 0.004, 0.001, -0.01, 0.0],
    })  # fmt: skip


ROWS = [
    ("functional", "Patients", "count"),
    ("age", "Age (y)", "continuous"),
    ("sex", "Women", "categorical:F"),
    ("delta_fvc", "Change in FVC", "continuous"),
    ("logjac_mean", "Mean log-Jacobian", "continuous"),
    ("dlco_baseline", "DLCO", "continuous"),  # absent: skipped
]


def test_summary_values_numbers(tiny):
    v = stats.summary_values(tiny, "functional", ["worsening", "stable"], ROWS)
    assert "dlco_baseline" not in set(v["variable"])
    age = v[v["variable"] == "age"].set_index("group")
    assert age.loc["worsening", ["median", "q1", "q3"]].tolist() == [65.0, 57.5, 72.5]
    assert age.loc["stable", ["n", "median", "q1", "q3"]].tolist() == [3, 44.0, 42.0, 46.0]
    ref = sps.mannwhitneyu([50, 60, 70, 80], [40, 44, 48], alternative="two-sided").pvalue
    assert age.loc["worsening", "p"] == pytest.approx(ref)
    sex = v[v["variable"] == "sex"].set_index("group")
    assert sex.loc["worsening", ["n", "count"]].tolist() == [3, 2]
    assert sex.loc["worsening", "percent"] == pytest.approx(200 / 3)
    assert sex.loc["stable", ["n", "count", "percent"]].tolist() == [4, 1, 25.0]
    ref = sps.fisher_exact([[2, 1], [1, 3]]).pvalue
    assert sex.loc["stable", "p"] == pytest.approx(ref)
    count = v[v["variable"] == "functional"].set_index("group")
    assert count["n"].tolist() == [4, 4] and count["p"].isna().all()


def test_summary_table_text(tiny):
    t = stats.summary_table(tiny, "functional", ["worsening", "stable"], ROWS)
    assert t.columns.tolist() == ["Variable", "worsening (n = 4)", "stable (n = 4)", "P value"]
    rows = t.set_index("Variable")
    assert rows.loc["Patients"].tolist() == ["4", "4", ""]
    assert rows.loc["Women"].tolist()[:2] == ["2 (67%)", "1 (25%)"]
    assert rows.loc["Women", "P value"] == ".486"
    assert rows.loc["Age (y)"].tolist()[:2] == ["65 (58-72)", "44 (42-46)"]
    assert rows.loc["Change in FVC"].tolist()[:2] == ["-7.0 (-9.0 to -5.0)", "0.5 (-0.2 to 1.5)"]
    assert rows.loc["Mean log-Jacobian", "worsening (n = 4)"] == "-0.048 (-0.054 to -0.041)"
    assert "DLCO" not in rows.index


def test_format_p():
    assert stats.format_p(0.0009999) == "<.001"
    assert stats.format_p(0.001) == ".001"
    assert stats.format_p(0.04999) == ".050"
    assert stats.format_p(1.0) == "1.000"
    assert stats.format_p(float("nan")) == ""


def test_table_rows_cover_the_cohort_columns():
    columns = {c for c, _, _ in stats.TABLE_ROWS}
    assert {"age", "sex", "interval_months", "delta_fvc", "logjac_mean",
            "lung_volume_followup_ml"} <= columns  # fmt: skip
    assert all(k in ("continuous", "categorical:F") for _, _, k in stats.TABLE_ROWS)
