"""The worsening classifier of Chassagnon et al. (Radiology 2021): a small 3D CNN over
template-space log-Jacobian maps, trained per target ("functional" or "morphologic").

Importing this package does not import PyTorch: the names below load their submodule (and torch)
on first use.

- :func:`targets` (``data``): patient_id -> 0/1 labels for one target, from a cohort table.
- :class:`MapDataset`, :func:`make_loader` (``data``): maps streamed from the store, masked by
  the template lung mask, through a prefetching DataLoader.
- :func:`split_patients`, :func:`save_split`, :func:`load_split` (``split``): a stratified,
  patient-level train / validation / test split.
- :func:`build_model` (``model``): the four-layer network.
- :func:`train` (``training``): training, model selection on validation, one test evaluation.
- :func:`predict` (``prediction``): probabilities of worsening from a trained model folder.

The modules holding ``train`` and ``predict`` are named ``training`` and ``prediction`` so that
importing them never rebinds ``sscflow.methods.classify.train`` (the function) to a module.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "targets": "data",
    "MapDataset": "data",
    "make_loader": "data",
    "split_patients": "split",
    "save_split": "split",
    "load_split": "split",
    "build_model": "model",
    "resolve_device": "model",
    "train": "training",
    "predict": "prediction",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
