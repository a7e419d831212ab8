"""The optional learned lung segmentation: the lungmask package's U-net (R231, the usual choice in
ILD research) on a local weights file.

``segment.backend: lungmask`` with ``segment.lungmask_weights: /path/to/unet_r231-d5c2fb8b.pth``.
sscflow never downloads weights: the file must exist. The package is an extra:
``pip install "sscflow[lungmask]"`` (it needs torch, which sscflow pins: install torch==2.13.0
first). No accuracy claim is made for it here; sscflow's tests check only its plumbing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sscflow.core.geometry import Geometry, to_itk
from sscflow.errors import MissingDependencyError, MissingInputError, SegmentationError

INSTALL = 'pip install "sscflow[lungmask]"'


def segment_lungmask(hu: np.ndarray, spacing, *, weights) -> np.ndarray:
    """The labels lungmask's model gives ``hu`` ((Z, Y, X) HU, identity direction (LPS),
    ``spacing`` mm along z, y, x) with the weights in the local file ``weights``: a (Z, Y, X)
    uint8 array on the same grid (1 right lung, 2 left lung, as R231 gives them; other values
    as the model gives them). :func:`sscflow.methods.segment.segment_lungs` makes it a ``LungMask``.

    Raises
    ------
    MissingDependencyError (an ImportError) when lungmask is not installed;
    SegmentationError (a ValueError) when ``weights`` is not set or the model's output does
    not match the volume;
    MissingInputError (a FileNotFoundError) when the file does not exist.
    """
    if weights is None or str(weights) == "":
        raise SegmentationError(
            "segment.backend: lungmask needs segment.lungmask_weights, the path of a local "
            "weights file (e.g. unet_r231-d5c2fb8b.pth); sscflow never downloads weights"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingInputError(
            f"segment.lungmask_weights: {path} does not exist; point it at a local lungmask "
            "weights file (sscflow never downloads weights)"
        )
    try:
        from lungmask import LMInferer
    except ImportError as exc:
        raise MissingDependencyError(
            f"segment.backend: lungmask needs the lungmask package ({exc}): {INSTALL}, or set "
            "segment.backend: threshold"
        ) from None
    hu = np.asarray(hu, dtype=np.int16)
    image = to_itk(hu, Geometry(hu.shape, spacing, (0.0, 0.0, 0.0)))  # LPS, as lungmask wants
    inferer = LMInferer(modelpath=str(path), force_cpu=True, tqdm_disable=True)
    labels = np.asarray(inferer.apply(image), dtype=np.uint8)
    if labels.shape != hu.shape:
        raise SegmentationError(
            f"lungmask returned shape {labels.shape} for a volume of shape {hu.shape}"
        )
    return labels
