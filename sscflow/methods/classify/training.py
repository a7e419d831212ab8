"""Training: cross-entropy and Adam, model selection on validation loss, one test evaluation.

Method:

1. Labels from :func:`~sscflow.methods.classify.data.targets`; labelled patients without a complete
   ``log_jacobian_template`` in the store are left out (listed as ``left_out`` in the metadata).
2. A stratified patient-level split (:func:`~sscflow.methods.classify.split.split_patients`), saved
   as ``split.json``.
3. Every used patient's masked map is read from the store once, by ``config.loader_workers``
   processes, shrunk to the classifier's resolution (``config.input_shrink``) and written to an
   on-disk cache in the output folder (removed afterwards). ``config.epochs`` epochs over the
   training set (shuffled, batches of ``config.batch_size``) stream from that cache, also with
   ``config.loader_workers`` processes. After each epoch the
   validation loss is computed; the state with the lowest validation loss (the first, on ties)
   is kept. The test set is not looked at during training or selection.
4. The kept state predicts every patient once (so the test set is evaluated once), written to
   ``predictions.csv`` (probability of worsening = softmax of the logits; prediction 1 when it
   reaches the cut-off chosen on the validation set, :func:`decision_threshold`); weights to
   ``model.pt``; what was done, the cut-off included, to ``metadata.json``.

Reproducibility: parameters and dropout are drawn from torch's generator seeded with
``config.seed`` inside ``torch.random.fork_rng`` (the caller's global generator is left as it
was); shuffling has its own seeded generator; the split uses ``random_state=seed``; nothing draws
from numpy's global generator. On CPU ``torch.use_deterministic_algorithms(True)`` is on during
training (restored afterwards), so two runs with the same seed give identical weights and
predictions, with any number of loader workers. On CUDA only cuDNN's deterministic mode is set
(full determinism there would also need ``CUBLAS_WORKSPACE_CONFIG`` set before CUDA starts).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import sscflow
from sscflow.config import ClassifierConfig
from sscflow.core import store as st
from sscflow.methods.classify.data import (
    MAP,
    CachedDataset,
    MapDataset,
    hold_in_ram,
    make_loader,
    open_root,
    shrunk_shape,
    store_location,
    targets,
    template_image,
    write_cache,
)
from sscflow.methods.classify.model import build_model, config_to_dict, resolve_device
from sscflow.methods.classify.split import SETS, save_split, split_patients
from sscflow.methods.stats import youden_threshold

MIN_PATIENTS = 6  # labelled patients with maps needed to train at all


def train(store, table: pd.DataFrame, target: str, config: ClassifierConfig, out_dir, *,
          device: str | None = None) -> dict:  # fmt: skip
    """Train the classifier for ``target`` ("functional" or "morphologic") and write its outputs.

    Parameters
    ----------
    store : the cohort store's path or URL, or its root zarr group.
    table : a :func:`sscflow.methods.groups.cohort_table` (``patient_id``, ``functional``,
    ``visual``).
    target : "functional" or "morphologic" (see :func:`~sscflow.methods.classify.data.targets`).
    config : the classifier settings.
    out_dir : folder for ``split.json``, ``model.pt``, ``metadata.json``, ``predictions.csv``;
        created if needed, existing files replaced.
    device : "cpu", "cuda" or "auto"; overrides ``config.device``.

    Returns
    -------
    dict with the four paths (``split``, ``model``, ``metadata``, ``predictions``), ``history``
    ({"train_loss": [...], "validation_loss": [...]} per epoch), ``best_epoch`` (1-based),
    ``device``, ``left_out`` and for the test set ``test_patients``, ``y_true`` (0/1),
    ``y_prob`` (probability of worsening) and ``y_pred`` (0/1), as lists in the same order.

    Raises ValueError when fewer than 6 labelled patients have maps or only one class is there.
    """
    t0 = time.perf_counter()
    config.validate("classifier")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    location = store_location(store)
    root = open_root(location)
    labels, left_out = _labelled_with_maps(root, table, target)
    dev = resolve_device(config.device, device)

    split = split_patients(labels, config.test_fraction, config.validation_fraction, config.seed)
    split_path = save_split(split, out / "split.json")
    template = template_image(root)
    mask_meta, input_shape = template.meta, tuple(int(s) for s in template.array.shape)

    # every used patient's item, at the classifier's resolution, in an on-disk cache that the
    # epochs stream from (removed afterwards); rows in the order train, validation, test
    order = [p for k in SETS for p in split[k]]
    cache_dir = tempfile.TemporaryDirectory(prefix=".cache-", dir=out)
    try:
        cache = write_cache(MapDataset(location, order, labels, shrink=config.input_shrink),
                            Path(cache_dir.name) / "items.npy", workers=config.loader_workers,
                            batch_size=config.batch_size)  # fmt: skip
    except BaseException:
        cache_dir.cleanup()  # a map that cannot be read leaves no half-written cache behind
        raise
    rows = {p: i for i, p in enumerate(order)}
    datasets = {k: CachedDataset(cache, [rows[p] for p in split[k]],
                                 [int(labels.loc[p]) for p in split[k]]) for k in SETS}  # fmt: skip
    datasets = hold_in_ram(datasets)
    item_shape = shrunk_shape(input_shape, config.input_shrink)
    pin = dev.type == "cuda"
    with cache_dir, _deterministic(dev), torch.random.fork_rng(devices=_cuda_indices(dev)):
        torch.manual_seed(config.seed)
        model = build_model(config, item_shape).to(dev)
        optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                     weight_decay=config.weight_decay)  # fmt: skip
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        train_loader = make_loader(datasets["train"], config.batch_size, True, config.seed,
                                   config.loader_workers, pin_memory=pin)  # fmt: skip
        val_loader = make_loader(datasets["validation"], config.batch_size, False, config.seed,
                                 config.loader_workers, pin_memory=pin)  # fmt: skip
        history: dict[str, list[float]] = {"train_loss": [], "validation_loss": []}
        best = (float("inf"), 0, None)  # (validation loss, epoch, state)
        for epoch in range(1, config.epochs + 1):
            history["train_loss"].append(_train_epoch(model, train_loader, optimiser, loss_fn, dev))
            val_loss = _evaluate(model, val_loader, dev, loss_fn)[0]
            history["validation_loss"].append(val_loss)
            if val_loss < best[0] or best[2] is None:
                best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        del train_loader, val_loader  # stops their worker processes
        model.load_state_dict(best[2])
        rows, threshold = _predict_sets(model, split, datasets, config, dev, pin)

    model_path = out / "model.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_path)
    predictions = pd.DataFrame(rows, columns=["patient_id", "set", "label", "probability",
                                              "prediction"])  # fmt: skip
    predictions_path = out / "predictions.csv"
    predictions.to_csv(predictions_path, index=False)
    used = sorted(labels.index)
    meta = {
        "target": target,
        "config": config_to_dict(config),
        "input_shape": list(input_shape),
        "split_sizes": {k: len(split[k]) for k in SETS},
        "stratified": split["stratified"],
        "class_counts": {str(k): int(v) for k, v in labels.value_counts().sort_index().items()},
        "left_out": left_out,
        "data_hash": _data_hash(root, used, labels, mask_meta),
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "sscflow": sscflow.__version__},  # fmt: skip
        "device": str(dev),
        "deterministic": dev.type == "cpu",
        "best_epoch": best[1],
        "best_validation_loss": best[0],
        "threshold": threshold,
        "history": history,
        "seconds": time.perf_counter() - t0,
    }
    metadata_path = out / "metadata.json"
    metadata_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    test = predictions[predictions["set"] == "test"]
    return {
        "split": split_path,
        "model": model_path,
        "metadata": metadata_path,
        "predictions": predictions_path,
        "history": history,
        "best_epoch": best[1],
        "device": str(dev),
        "left_out": left_out,
        "test_patients": test["patient_id"].tolist(),
        "y_true": test["label"].astype(int).tolist(),
        "y_prob": test["probability"].astype(float).tolist(),
        "y_pred": test["prediction"].astype(int).tolist(),
    }


def _labelled_with_maps(root, table, target) -> tuple[pd.Series, list[str]]:
    labels = targets(table, target)
    keep, left_out = [], []
    for pid in labels.index:
        try:
            group = st.patient_group(root, pid, create=False)
            complete = st.output_state(group, MAP) == "complete"
        except FileNotFoundError:  # the patient is not in the store
            complete = False
        (keep if complete else left_out).append(pid)
    labels = labels.loc[keep]
    counts = labels.value_counts()
    if len(labels) < MIN_PATIENTS or len(counts) < 2:
        found = ", ".join(f"{int(n)} with label {k}" for k, n in counts.sort_index().items())
        raise ValueError(
            f"classifier target {target!r}: {len(labels)} labelled patient(s) with a {MAP} map "
            f"({found or 'none'}; {len(left_out)} labelled without a map); training needs at "
            f"least {MIN_PATIENTS} and both classes (0 and 1)"
        )
    return labels, sorted(left_out)


def _data_hash(root, used: list[str], labels: pd.Series, mask_meta: dict) -> str:
    """sha256 of every used map's (input_hash, params), the template mask's and the labels."""
    maps = []
    for pid in used:
        meta = dict(root[f"{st.PATIENTS}/{pid}/{MAP}"].attrs["sscflow"])
        maps.append([pid, meta.get("input_hash"), meta.get("params")])
    mask = [mask_meta.get("input_hash"), mask_meta.get("params")]
    return st.hash_values(maps, mask, {p: int(labels.loc[p]) for p in used})


def _train_epoch(model, loader, optimiser, loss_fn, dev) -> float:
    model.train()
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        (loss / len(y)).backward()
        optimiser.step()
        total += float(loss.detach())
        n += len(y)
    return total / n


@torch.no_grad()
def _evaluate(model, loader, dev, loss_fn=None) -> tuple[float, np.ndarray]:
    """Mean loss (NaN without ``loss_fn``) and probabilities of class 1, in loader order."""
    model.eval()
    total, n, probs = 0.0, 0, []
    for x, y in loader:
        logits = model(x.to(dev, non_blocking=True))
        if loss_fn is not None:
            total += float(loss_fn(logits, y.to(dev, non_blocking=True)))
        n += len(y)
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
    prob = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    return (total / n if loss_fn is not None and n else float("nan")), prob


def _predict_sets(model, split, datasets, config, dev, pin) -> tuple[list[tuple], float]:
    ids = [p for k in SETS for p in split[k]]
    sets = [k for k in SETS for _ in split[k]]
    labels = [v for k in SETS for v in datasets[k].labels]
    everyone = CachedDataset(datasets["train"].path, [i for k in SETS
                             for i in datasets[k].indices], labels)  # fmt: skip
    if datasets["train"].memory is not None:
        everyone.load()
    loader = make_loader(everyone, config.batch_size, False, config.seed,
                         config.loader_workers, pin_memory=pin)  # fmt: skip
    prob = _evaluate(model, loader, dev)[1]
    del loader
    threshold = decision_threshold(
        [q for q, s in zip(prob, sets, strict=True) if s == "validation"],
        [y for y, s in zip(labels, sets, strict=True) if s == "validation"])  # fmt: skip
    rows = [(p, s, int(y), float(q), int(q >= threshold))
            for p, s, y, q in zip(ids, sets, labels, prob, strict=True)]  # fmt: skip
    return rows, threshold


def decision_threshold(prob, labels) -> float:
    """The probability cut-off for "worsening": Youden-optimal on the validation set (chosen
    there, like the model, and applied unchanged to the test set; the ILD-extent baseline's
    cut-off is chosen the same way), or 0.5 when the validation set lacks a class.

    >>> decision_threshold([0.2, 0.3, 0.35, 0.6], [0, 0, 1, 1])
    0.35
    >>> decision_threshold([0.2, 0.9], [1, 1])
    0.5
    """
    if len(set(int(v) for v in labels)) < 2:
        return 0.5
    return float(youden_threshold(np.asarray(prob, dtype=float), np.asarray(labels)))


def _cuda_indices(dev: torch.device) -> list[int]:
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


@contextmanager
def _deterministic(dev: torch.device):
    """Deterministic kernels while training: all of torch on CPU, cuDNN on CUDA."""
    if dev.type == "cpu":
        was, warn = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn)
    else:
        cudnn = torch.backends.cudnn
        was = (cudnn.deterministic, cudnn.benchmark)
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            yield
        finally:
            cudnn.deterministic, cudnn.benchmark = was
