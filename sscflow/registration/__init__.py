"""Registration of the follow-up scan to the baseline (fixed = baseline, moving = follow-up).

Public API::

    register(fixed, moving, spacing, *, mask=None, backend="sitk", **options) -> displacement

The displacement is (3, Z, Y, X) float32 in millimetres on the fixed (baseline) grid, component
k along array axis k, such that ``moving(x + u(x)) ~ fixed(x)``; ``log det(I + grad u) < 0``
where tissue shrinks from baseline to follow-up.

Backends live in a small registry (name -> "module:function") and are imported only when used:

- ``"torch"``: affine, then a stationary velocity field integrated by scaling and squaring
  (diffeomorphic) with a local NCC similarity, which a local density rise does not read as
  shrinkage. CPU, or CUDA when available. Needs the ``gpu`` extra.
- ``"sitk"``: SimpleITK affine, then multi-resolution diffeomorphic demons (an SSD similarity:
  a density rise where the lung shrinks biases the recovered shrinkage towards zero).

``"auto"`` (the configuration's default) is "torch" when PyTorch is installed, else "sitk".
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np

from sscflow.errors import MissingDependencyError, UnknownBackendError
from sscflow.registration.common import check_inputs

__all__ = ["BACKENDS", "register", "resolve_backend"]

# name -> ("module:function", the extra that installs its dependency, the module it needs)
BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "sitk": ("sscflow.registration.sitk:register", None, None),
    "torch": ("sscflow.registration.torch:register", "gpu", "torch"),
}


def resolve_backend(name: str) -> str:
    """The backend a name stands for: "auto" is "torch" when PyTorch imports, else "sitk".

    Raises UnknownBackendError (a ValueError) listing the choices for an unknown name.
    """
    if name == "auto":
        return "torch" if importlib.util.find_spec("torch") is not None else "sitk"
    if name not in BACKENDS:
        choices = ", ".join(["auto", *BACKENDS])
        raise UnknownBackendError(
            f"unknown registration backend {name!r}; choose one of: {choices}"
        )
    return name


def _load(name: str):
    target, extra, needs = BACKENDS[name]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise MissingDependencyError(
            f'registration backend {name!r} needs {needs}: pip install "sscflow[{extra}]" '
            f"(or choose backend='sitk')"
        )
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def register(fixed, moving, spacing, *, mask=None, backend: str = "sitk", **options) -> np.ndarray:
    """Register ``moving`` (follow-up) to ``fixed`` (baseline).

    Parameters
    ----------
    fixed, moving : (Z, Y, X) arrays in HU on the same canonical grid
    spacing : (z, y, x) voxel size in mm, each > 0
    mask : optional (Z, Y, X) baseline lung mask; the registration is cropped to its bounding
        box plus a margin and the field outside is the affine part
    backend : "sitk", "torch" or "auto" (see the module docstring)
    **options : backend parameters (see ``sscflow.config.RegistrationConfig``); a
        ``moving_spacing`` option is checked against ``spacing``

    Returns
    -------
    (3, Z, Y, X) float32 displacement in mm on the fixed grid.

    Raises
    ------
    RegistrationInputError (ValueError) for mismatched shapes or spacing, NaN / inf values or
    an empty mask; UnknownBackendError (ValueError) for an unknown backend;
    MissingDependencyError (ImportError) naming the extra to install.

    Examples
    --------
    >>> z = np.zeros((8, 8, 8), np.float32)
    >>> register(z, z, (1.0, 1.0, 1.0), backend="nope")
    Traceback (most recent call last):
    ...
    sscflow.errors.UnknownBackendError: unknown registration backend 'nope'; choose one of: auto, sitk, torch
    """  # noqa: E501
    name = resolve_backend(backend)
    inputs = check_inputs(
        fixed, moving, spacing, mask, moving_spacing=options.pop("moving_spacing", None)
    )
    func = _load(name)
    return func(inputs.fixed, inputs.moving, inputs.spacing, mask=inputs.mask, **options)
