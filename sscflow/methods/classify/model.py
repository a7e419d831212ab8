"""The four-layer 3D CNN of Chassagnon et al. and the choice of torch device.

Its input is the map at the classifier's resolution (the template grid averaged over blocks of
``input_shrink`` voxels by the data loader, :func:`sscflow.methods.classify.data.shrink_map`; it
divides the cost by ``input_shrink**3``). Then ``len(config.channels)`` blocks of a stride-2
``Conv3d`` (``kernel`` voxels, padding ``kernel // 2``, no bias: the batch norm that follows
has one) + ``BatchNorm3d`` + ``ReLU``, then
dropout and one fully connected layer to two classes (stable, worsening). With the default three
channel counts that is the paper's four layers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sscflow.config import ClassifierConfig

N_CLASSES = 2


class WorseningCNN(nn.Module):
    """Input (N, 1, Z, Y, X) float32 at the classifier's resolution; output (N, 2) logits
    (index 1: worsening)."""

    def __init__(self, config: ClassifierConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        blocks = []
        in_channels = 1
        for out_channels in config.channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv3d(in_channels, out_channels, config.kernel, stride=2,
                              padding=config.kernel // 2, bias=False),  # fmt: skip
                    nn.BatchNorm3d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(config.dropout)
        self.feature_shape = feature_shape(config, input_shape)
        n = in_channels * self.feature_shape[0] * self.feature_shape[1] * self.feature_shape[2]
        self.classifier = nn.Linear(n, N_CLASSES)
        self.input_shape = tuple(int(s) for s in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def feature_shape(config: ClassifierConfig, input_shape) -> tuple[int, int, int]:
    """Spatial shape after the stride-2 convolutions (``n -> (n + 2 (k // 2) - k) // 2 + 1``)
    of an input of ``input_shape`` (at the classifier's resolution).

    >>> feature_shape(ClassifierConfig(), (20, 20, 20))
    (3, 3, 3)
    >>> feature_shape(ClassifierConfig(), (10, 10, 10))
    (2, 2, 2)
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"classifier input_shape must be three positive sizes, got {input_shape}")
    k, pad = config.kernel, config.kernel // 2
    for _ in config.channels:
        shape = tuple((s + 2 * pad - k) // 2 + 1 for s in shape)
    return shape  # always >= 1 for an odd kernel and positive sizes


def build_model(config: ClassifierConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """The classifier for inputs of ``input_shape`` (Z, Y, X) voxels: the template grid shrunk
    by ``config.input_shrink`` (:func:`sscflow.methods.classify.data.shrunk_shape`).

    Returns a module taking (N, 1, Z, Y, X) float32 and giving (N, 2) logits, parameters
    initialised from torch's global random generator (seed it for a reproducible start).

    >>> m = build_model(ClassifierConfig(channels=(4, 8, 16)), (16, 16, 16))
    >>> tuple(m(torch.zeros(2, 1, 16, 16, 16)).shape)
    (2, 2)
    """
    config.validate("classifier")
    return WorseningCNN(config, input_shape)


def resolve_device(config_device: str, device: str | None = None) -> torch.device:
    """``device`` if given, else ``config_device``; "auto" is CUDA when available, else CPU.

    Raises ValueError for "cuda" on a machine without a CUDA device.
    """
    name = device or config_device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"classifier: device {name!r} was asked for but torch sees no CUDA device; "
            "use device 'cpu' or 'auto'"
        )
    return dev


def config_to_dict(config: ClassifierConfig) -> dict:
    """JSON-ready fields of ``config`` (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}  # fmt: skip


def config_from_dict(d: dict) -> ClassifierConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(ClassifierConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"classifier metadata: unknown config key(s) {', '.join(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    config = ClassifierConfig(**kwargs)
    config.validate("classifier")
    return config
