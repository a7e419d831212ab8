"""The paper's classification analysis: the CNN for both targets beside the ILD-extent baseline.

``classify_cohort(store, results_dir, config)`` trains the classifier
(``sscflow.methods.classify``) for
functional and for morphologic worsening, and evaluates on the same held-out test set:

- the CNN: sensitivity, specificity, accuracy, PPV, NPV with exact (Clopper-Pearson) 95% CIs,
  confusion counts and ROC AUC (``sscflow.methods.stats``);
- the density baseline of the paper: the change in high-attenuation area (ILD extent, % of lung
  between -600 and 0 HU by default, ``sscflow.methods.extent``) thresholded at the Youden-optimal
  cut-off found on the learning set (training + validation), applied once to the test set.

Writes ``results/classifier/<target>/{model.pt, metadata.json, split.json, predictions.csv,
metrics.json}``. Resuming is the classifier stage's (``sscflow.stages.classifier``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from sscflow.methods.groups import cohort_table
from sscflow.methods.stats import binary_metrics, roc, youden_threshold

TARGETS = ("functional", "morphologic")
STAGE_VERSION = 1


def _evaluate(y_true, y_pred, score) -> dict:
    out = binary_metrics(np.asarray(y_true, int), np.asarray(y_pred, int))
    out["roc"] = roc(np.asarray(y_true, int), np.asarray(score, float))
    out["auc"] = out["roc"].get("auc")
    return out


def extent_baseline(table, split: dict, labels) -> dict | None:
    """The ILD-extent baseline on ``split``'s test set (Youden cut-off from the learning set)."""
    if "delta_haa" not in table:
        return None
    haa = table.set_index("patient_id")["delta_haa"]
    learn = [p for p in split["train"] + split["validation"] if np.isfinite(haa.get(p, np.nan))]
    test = [p for p in split["test"] if np.isfinite(haa.get(p, np.nan))]
    y_learn = np.array([labels[p] for p in learn], int)
    if len(test) == 0 or len(set(y_learn)) < 2:
        return None
    cut = youden_threshold(haa[learn].to_numpy(), y_learn)  # a rise in extent means worsening
    y_test = np.array([labels[p] for p in test], int)
    score = haa[test].to_numpy()
    out = _evaluate(y_test, (score >= cut).astype(int), score)
    out["threshold_haa_points"] = float(cut)
    return out


def classify_cohort(store, results_dir, config, *, device=None, patient_ids=None) -> dict:
    """Train and evaluate both targets; returns ``{target: {"status", "cnn", "ild_extent"}}``.

    ``patient_ids``: the cohort to learn from (a run passes its manifest's patients); every
    patient of the store when None. A target whose labels are too few (or of one class) is
    reported as skipped with the reason; it does not fail the other target.
    """
    import multiprocessing

    from sscflow.methods.classify.data import targets
    from sscflow.methods.classify.training import train

    table = cohort_table(store, patient_ids)
    if config.loader_workers and multiprocessing.current_process().daemon:
        # a Dask worker process is daemonic and may not start DataLoader processes: stream the
        # maps from the store in this process instead (same data, no prefetch processes)
        config = dataclasses.replace(config, loader_workers=0)
    out = {}
    for target in TARGETS:
        folder = Path(results_dir) / "classifier" / target
        metrics_path = folder / "metrics.json"
        t0 = time.perf_counter()
        try:
            result = train(store, table, target, config, folder, device=device)
        except ValueError as exc:  # too few labelled patients, one class only
            out[target] = {"status": "not_trained", "reason": str(exc)}
            metrics_path.unlink(missing_ok=True)  # an older model's metrics are not this run's
            continue
        split = json.loads((folder / "split.json").read_text(encoding="utf-8"))
        labels = targets(table, target)
        metrics = {
            "target": target,
            "cnn": _evaluate(result["y_true"], result["y_pred"], result["y_prob"]),
            "ild_extent": extent_baseline(table, split, labels),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        tmp = metrics_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(metrics, default=_plain, indent=1), encoding="utf-8")
        tmp.replace(metrics_path)  # written last: a killed run retrains
        out[target] = {**metrics, "status": "done"}
    return out


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
