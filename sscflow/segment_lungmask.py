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

from sscflow.errors import MissingDependencyError, MissingInputError, SegmentationError
from sscflow.geometry import Geometry, to_itk

INSTALL = 'pip install "sscflow[lungmask]"'


def segment_lungmask(hu: np.ndarray, spacing, *, weights, min_lung_ml: float = 20.0):
    """Segment the lungs of ``hu`` ((Z, Y, X) HU, identity direction (LPS), ``spacing`` mm along
    z, y, x) with lungmask's model from the local file ``weights``.

    Returns a :class:`sscflow.segment.LungMask` on the same grid (labels 1 right, 2 left, as
    lungmask's R231 gives them). ``airway_ml`` is 0: the model leaves the airways out itself.

    Raises
    ------
    MissingDependencyError (an ImportError) when lungmask is not installed;
    SegmentationError (a ValueError) when ``weights`` is not set;
    MissingInputError (a FileNotFoundError) when the file does not exist.
    """
    from sscflow.segment import LEFT, RIGHT, LungMask

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
    labels[(labels != RIGHT) & (labels != LEFT)] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    right_ml, left_ml = counts[RIGHT] * voxel_ml, counts[LEFT] * voxel_ml
    found = [k for k in (RIGHT, LEFT) if counts[k] * voxel_ml >= min_lung_ml]
    if not found:
        raise SegmentationError(
            f"lungmask found no lung of at least min_lung_ml={min_lung_ml:g} mL "
            f"(right {right_ml:.1f} mL, left {left_ml:.1f} mL)"
        )
    warnings = ()
    if len(found) == 1:
        side = "right" if found[0] == RIGHT else "left"
        warnings = (f"one lung found (the {side}): a pneumonectomy, or a collapsed lung?",)
    return LungMask(
        mask=(labels > 0).astype(np.uint8),
        volume_ml=float(right_ml + left_ml),
        airway_ml=0.0,
        components=len(found),
        labels=labels,
        right_ml=float(right_ml),
        left_ml=float(left_ml),
        trachea_found=True,
        warnings=warnings,
    )
