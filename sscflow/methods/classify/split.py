"""Patient-level train / validation / test split, stratified by label, saved as JSON.

First ``test_fraction`` of the labelled patients go to the test set, then ``validation_fraction``
of the rest to validation (sklearn's ``train_test_split``, sizes rounded up for the held-out
part). A stage is stratified unless a class has fewer than 2 members there or a held-out part
would be smaller than the number of classes; then that stage is a plain random split and the
result says ``"stratified": False``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

SETS = ("train", "validation", "test")


def split_patients(labels: pd.Series, test_fraction: float, validation_fraction: float,
                   seed: int) -> dict:  # fmt: skip
    """Split the patients of ``labels`` (0/1, indexed by patient_id).

    Returns ``{"train": [...], "validation": [...], "test": [...]}`` (sorted patient ids,
    disjoint, together all of ``labels``' patients) plus ``"stratified"`` (bool), ``"seed"``,
    ``"test_fraction"`` and ``"validation_fraction"``. The same inputs give the same split.

    >>> y = pd.Series([0, 1] * 5, index=[f"p{i}" for i in range(10)])
    >>> s = split_patients(y, 0.2, 0.25, seed=0)
    >>> [len(s[k]) for k in ("train", "validation", "test")], s["stratified"]
    ([6, 2, 2], True)
    """
    for name, f in (("test_fraction", test_fraction), ("validation_fraction",
                                                       validation_fraction)):  # fmt: skip
        if not 0 < f < 1:
            raise ValueError(f"split_patients: {name} must be within (0, 1), got {f}")
    ids = sorted(str(p) for p in labels.index)
    if len(set(ids)) != len(ids):
        raise ValueError("split_patients: labels has duplicate patient ids")
    y = [int(labels.loc[p]) for p in ids]
    learn, test, strat_test = _split(ids, y, test_fraction, seed)
    y_learn = [int(labels.loc[p]) for p in learn]
    train, validation, strat_val = _split(learn, y_learn, validation_fraction, seed)
    return {
        "train": sorted(train),
        "validation": sorted(validation),
        "test": sorted(test),
        "stratified": strat_test and strat_val,
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "validation_fraction": float(validation_fraction),
    }


def _split(ids: list[str], y: list[int], fraction: float, seed: int):
    n = len(ids)
    n_out = math.ceil(fraction * n)
    if n < 2 or n_out >= n:
        raise ValueError(
            f"split_patients: {n} patient(s) cannot be split with a held-out fraction of "
            f"{fraction}; label more patients"
        )
    counts = pd.Series(y).value_counts()
    n_classes = len(counts)
    stratify = n_classes > 1 and counts.min() >= 2 and n_classes <= n_out <= n - n_classes
    keep, out = train_test_split(ids, test_size=n_out, random_state=seed,
                                 stratify=y if stratify else None)  # fmt: skip
    return list(keep), list(out), bool(stratify)


def save_split(split: dict, path: str | os.PathLike) -> Path:
    """Write ``split`` as JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(split, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_split(path: str | os.PathLike) -> dict:
    """Read a split written by :func:`save_split`; checks it has disjoint train/validation/test."""
    split = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in SETS if not isinstance(split.get(k), list)]
    if missing:
        raise ValueError(f"split {path}: lacks the list(s) {', '.join(missing)}")
    seen: dict[str, str] = {}
    for k in SETS:
        for p in split[k]:
            if p in seen:
                raise ValueError(f"split {path}: patient {p} is in both {seen[p]} and {k}")
            seen[p] = k
    return split
