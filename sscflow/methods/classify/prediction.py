"""Probabilities of worsening from a trained model folder (``model.pt`` + ``metadata.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from sscflow.core import store as st
from sscflow.methods.classify.data import (
    MAP,
    MapDataset,
    make_loader,
    open_root,
    shrunk_shape,
    template_image,
)
from sscflow.methods.classify.data import store_location as _location
from sscflow.methods.classify.model import build_model, config_from_dict, resolve_device
from sscflow.methods.classify.training import _evaluate


def predict(store, patient_ids, model_dir, *, device: str | None = None,
            workers: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Predict ``patient_ids`` from their masked ``log_jacobian_template`` maps.

    Parameters
    ----------
    store : the cohort store's path or URL, or its root zarr group.
    patient_ids : patients whose maps are in the store.
    model_dir : a folder written by :func:`~sscflow.methods.classify.train`.
    device : "cpu", "cuda" or "auto"; default the trained config's device.
    workers : loader processes; default the trained config's ``loader_workers``.

    Returns
    -------
    DataFrame with columns ``patient_id``, ``probability`` (of worsening, float) and
    ``prediction`` (1 when the probability reaches the model's cut-off, chosen on its
    validation set: ``threshold`` in its metadata), in the order of ``patient_ids``.

    Raises FileNotFoundError when the model folder or a map is missing, ValueError when a map's
    shape (or the template's) differs from the shape the model was trained on.
    """
    model_dir = Path(model_dir)
    files = [model_dir / "metadata.json", model_dir / "model.pt"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"classifier model folder {model_dir} has no {f.name}; "
                                    "train a model there first")  # fmt: skip
    meta = json.loads(files[0].read_text(encoding="utf-8"))
    config = config_from_dict(meta["config"])
    input_shape = tuple(int(s) for s in meta["input_shape"])
    threshold = float(meta.get("threshold", 0.5))  # chosen on the validation set in training
    ids = [str(p) for p in patient_ids]
    location = _location(store)
    root = open_root(location)
    _check_shapes(root, ids, input_shape, model_dir)

    dev = resolve_device(config.device, device)
    model = build_model(config, shrunk_shape(input_shape, config.input_shrink))
    state = torch.load(files[1], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(dev)
    n_workers = config.loader_workers if workers is None else workers
    loader = make_loader(MapDataset(location, ids, shrink=config.input_shrink),
                         config.batch_size, False, config.seed,
                         min(n_workers, len(ids)), pin_memory=dev.type == "cuda")  # fmt: skip
    prob = _evaluate(model, loader, dev)[1] if ids else []
    del loader
    return pd.DataFrame({
        "patient_id": ids,
        "probability": [float(q) for q in prob],
        "prediction": [int(q >= threshold) for q in prob],
    })


def _check_shapes(root, ids, input_shape, model_dir) -> None:
    mask_shape = tuple(template_image(root).array.shape)
    if mask_shape != input_shape:
        raise ValueError(
            f"classifier {model_dir}: trained on maps of shape {input_shape} but this store's "
            f"template lung mask is {mask_shape}; use the template the model was trained with"
        )
    for pid in ids:
        image = st.read_image(st.patient_group(root, pid, create=False), MAP)
        if tuple(image.array.shape) != input_shape:
            raise ValueError(
                f"patient {pid}: {MAP} has shape {tuple(image.array.shape)} but the classifier "
                f"in {model_dir} was trained on {input_shape}; map it onto that template first"
            )
