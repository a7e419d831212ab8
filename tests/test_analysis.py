"""The ILD-extent baseline of the classification analysis, on a table with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sscflow.methods.analysis import extent_baseline


def test_extent_baseline_uses_the_learning_cut_off_on_the_test_set():
    # learning set: worsening patients gain >= 3 points of high-attenuation area, stable < 2;
    # the Youden cut-off is therefore the smallest worsening value, 3.0
    learn = {f"L{i}": (v, y) for i, (v, y) in enumerate(
        [(0.5, 0), (1.0, 0), (1.5, 0), (1.9, 0), (3.0, 1), (4.0, 1), (5.0, 1), (6.0, 1)])}
    # test set: two true positives (3.5, 8), one false negative (2.5), one true negative (0.0)
    # and one false positive (3.2)
    test = {"T0": (3.5, 1), "T1": (8.0, 1), "T2": (2.5, 1), "T3": (0.0, 0), "T4": (3.2, 0)}
    rows = {**learn, **test}
    table = pd.DataFrame({"patient_id": list(rows), "delta_haa": [v for v, _ in rows.values()]})
    labels = pd.Series({p: y for p, (_, y) in rows.items()})
    ids = list(learn)
    split = {"train": ids[:6], "validation": ids[6:], "test": list(test)}
    out = extent_baseline(table, split, labels)
    assert out["threshold_haa_points"] == pytest.approx(3.0)
    assert (out["tp"], out["fn"], out["tn"], out["fp"]) == (2, 1, 1, 1)
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(1 / 2)
    assert out["accuracy"] == pytest.approx(3 / 5)
    # AUC over the 3 x 2 (worsening, stable) test pairs: 3.5, 8 and 2.5 beat 0.0; 3.5 and 8
    # beat 3.2, 2.5 does not -> 5 / 6
    assert out["auc"] == pytest.approx(5 / 6)


def test_extent_baseline_needs_both_classes_in_the_learning_set():
    table = pd.DataFrame({"patient_id": ["a", "b", "c"], "delta_haa": [1.0, 2.0, np.nan]})
    labels = pd.Series({"a": 0, "b": 0, "c": 1})
    split = {"train": ["a"], "validation": ["b"], "test": ["c"]}
    assert extent_baseline(table, split, labels) is None
