"""Registration of the follow-up scan to the baseline (fixed = baseline, moving = follow-up).

Public API::

    register(fixed, moving, spacing, *, mask=None, moving_mask=None, fixed_geometry=None,
             moving_geometry=None, backend="auto", **options) -> displacement

The displacement is (3, Z, Y, X) float32 in millimetres on the fixed (baseline) grid, component
k along array axis k, such that ``moving(x + u(x)) ~ fixed(x)`` with x + u(x) a physical point
read in the moving scan's own geometry (the two scans need not share a grid);
``log det(I + grad u) < 0`` where tissue shrinks from baseline to follow-up.

Backends live in a small registry (name -> module) and are imported only when used. Each
backend module has ``register(fixed, moving, spacing, *, mask, valid, options, return_affine)``
and ``Options``, a dataclass of its own settings with its own defaults (the config's
``registration.<name>`` section); a new backend is one module and one line in ``BACKENDS``.

- ``"torch"``: affine, then a stationary velocity field integrated by scaling and squaring
  (diffeomorphic) with a local NCC similarity, which a local density rise does not read as
  shrinkage. CPU, or CUDA when available. Needs the ``gpu`` extra.
- ``"sitk"``: SimpleITK affine, then multi-resolution diffeomorphic demons (an SSD similarity:
  a density rise where the lung shrinks biases the recovered shrinkage).

``"auto"`` (the configuration's default) is "torch" when PyTorch is installed, else "sitk".
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass

import numpy as np

from sscflow.core.geometry import Geometry, index_to_physical
from sscflow.errors import (
    ConfigError,
    MissingDependencyError,
    RegistrationInputError,
    UnknownBackendError,
)
from sscflow.methods.registration.common import check_inputs

__all__ = ["BACKENDS", "Backend", "backend_options", "options_class", "register",
           "resolve_backend"]


@dataclass(frozen=True)
class Backend:
    """Where a backend lives: its module (``register`` and ``Options`` in it), and the
    package it needs with the extra that installs it (None: always there)."""

    module: str
    needs: str | None = None
    extra: str | None = None


BACKENDS: dict[str, Backend] = {
    "torch": Backend("sscflow.methods.registration.torch", needs="torch", extra="gpu"),
    "sitk": Backend("sscflow.methods.registration.sitk"),
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


def options_class(name: str) -> type:
    """The ``Options`` dataclass of backend ``name`` (its module is imported; the package the
    backend needs, e.g. torch, is not).

    >>> options_class("sitk")().levels_mm
    (8.0, 4.0, 2.0)
    """
    return importlib.import_module(BACKENDS[resolve_backend(name)].module).Options


def backend_options(name: str, **options):
    """Backend ``name``'s ``Options`` with these keyword settings over its own defaults.

    Raises RegistrationInputError (a ValueError) naming an unknown or impossible setting.

    >>> backend_options("sitk", sigma_mm=6.0).sigma_mm
    6.0
    >>> backend_options("sitk", window=5)
    Traceback (most recent call last):
    ...
    sscflow.errors.RegistrationInputError: register: unknown option 'window' for backend 'sitk'; its options: margin_mm, levels_mm, iterations, sigma_mm, contrast_mm, affine, affine_iterations, threads, seed
    >>> backend_options("torch", window=5)
    Traceback (most recent call last):
    ...
    sscflow.errors.RegistrationInputError: register: torch.window is now torch.window_mm (the local NCC window at the finest level in mm; 5 at 2 mm is 10): settings are in millimetres, so that a cohort at 1 mm and at 2 mm gets the same regularisation
    """  # noqa: E501
    cls = options_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in known]
    renamed = [cls.moved_key(k, f"{name}.{k}") for k in unknown if hasattr(cls, "moved_key")]
    if any(renamed):
        raise RegistrationInputError(f"register: {next(m for m in renamed if m)}")
    if unknown:
        raise RegistrationInputError(
            f"register: unknown option {unknown[0]!r} for backend {name!r}; its options: "
            f"{', '.join(known)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    opts = cls(**values)
    try:
        opts.validate(name)
    except ConfigError as exc:
        raise RegistrationInputError(f"register: {exc}") from None
    return opts


def _load(name: str):
    backend = BACKENDS[name]
    if backend.needs is not None and importlib.util.find_spec(backend.needs) is None:
        raise MissingDependencyError(
            f"registration backend {name!r} needs {backend.needs}: pip install "
            f'"sscflow[{backend.extra}]" '
            "(or choose backend='sitk')"
        )
    return importlib.import_module(backend.module).register


def register(
    fixed,
    moving,
    spacing=None,
    *,
    mask=None,
    moving_mask=None,
    fixed_geometry: Geometry | None = None,
    moving_geometry: Geometry | None = None,
    backend: str = "auto",
    initial_alignment: str = "lungs",
    smooth_mm: float = 1.0,
    match_slices: bool | str = False,
    slice_mm: tuple[float | None, float | None] | None = None,
    profile_mm: tuple | None = None,
    match_resolution: bool = False,
    match_interpolation: bool = True,
    return_info: bool = False,
    resample_on_device: bool | None = None,
    moving_fov: Geometry | None = None,
    **options,
):
    """Register ``moving`` (follow-up) to ``fixed`` (baseline), in physical space.

    The two volumes may be on different grids (shape, origin, spacing, direction): they relate
    only through their geometries. The follow-up is first aligned rigidly from the lung masks
    (``initial_alignment="lungs"``; ``"none"`` trusts the geometries as they are) and resampled
    onto the baseline grid; the backend's affine stage refines that map; the follow-up is
    resampled again from its own grid through the refined map, and the backend's deformable
    stage registers that.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) arrays in HU
    spacing : (z, y, x) voxel size in mm of ``fixed`` (and of ``moving`` unless
        ``moving_geometry`` or the ``moving_spacing`` option says otherwise); may be omitted
        when ``fixed_geometry`` is given. Without geometries, voxel 0 of both is at 0 mm.
    mask : optional (Z, Y, X) baseline lung mask; the registration is cropped to its bounding
        box plus a margin and the field outside is the affine part
    moving_mask : optional follow-up lung mask (on the follow-up grid); with ``mask``, it
        drives the initial alignment (without it the geometries are trusted as they are)
    fixed_geometry, moving_geometry : ``sscflow.core.geometry.Geometry`` of each volume; the baseline
        grid must have an identity direction (sscflow's canonical grid), the follow-up's may be
        any
    backend : "auto" (the default, as in ``sscflow run``), "torch" or "sitk"
    initial_alignment : "lungs" (rigid, from ``mask`` and ``moving_mask``) or "none"
    smooth_mm : Gaussian s.d. (mm) applied to both volumes before the backend, after the
        follow-up's resampling onto the baseline grid: a common blur that hides the different
        interpolation blur of two grids; at least half a voxel of the baseline grid along each
        axis (:data:`SMOOTH_MIN_VOXELS`) (0: none)
    match_slices, slice_mm : ``slice_mm`` is (baseline, follow-up) slice thickness in mm (None
        where unknown); with ``match_slices`` (true or the config's ``"auto"``; off by default
        here, where nothing says whether ``slice_mm`` are thicknesses or spacings), the scan
        of thinner slices is blurred along z, before the backend, to the other's slice profile
        (:func:`matched_slice_sigma_mm`; the baseline's lung mask, where the map is measured,
        stays as it was drawn). The registration stage passes ``profile_mm`` instead: each
        scan's effective profile on every axis, from the slice thickness both scans' headers
        gave and their original grids (:func:`sscflow.methods.registration.stage.slice_profiles`)
    profile_mm : (baseline, follow-up) profiles along the baseline grid's (z, y, x), in mm
        (:func:`slice_profile_mm`; 0 where unknown or not to be matched), matched axis by axis
        as ``slice_mm`` is along z; given, it replaces ``slice_mm`` (a coronal or sagittal
        series' slices stack along y or x)
    match_resolution : measure each scan's blur on its own lung outline, along z and in-plane
        (:mod:`sscflow.methods.registration.resolution`; needs ``mask`` and ``moving_mask``,
        and a follow-up grid of identity direction), and blur the sharper scan along each
        axis to the blurrier one's before the backend; where both widths are measured it
        replaces ``match_slices``. Off by default, here and in the config
        (``registration.match_resolution``): README says where it fails
    match_interpolation : the baseline given, for the deformable stage, the blur the follow-up
        got from its resampling onto the baseline grid, voxel by voxel
        (:mod:`sscflow.methods.registration.interpolation`); a pair on one grid in register
        is left as it is
    return_info : also return a dict: the initial alignment (and its seconds), the matched
        resolution (``resolution``: both scans' edge widths and the blur each was given, or
        None), the seconds spent
        resampling the follow-up onto the baseline grid (both times) and blurring it, the
        total seconds, the torch device of that work (None: SimpleITK on the CPU) and the
        seconds of its one-off warm-up (0 after the process's first registration)
    resample_on_device : the follow-up's resampling, the common blur and the composition of
        the maps in torch on the backend's device: None (the default) when the torch backend
        runs on CUDA (the pair then crosses to the device once and back once), True also on
        CPU, False never
    moving_fov : the part of the follow-up that was imaged (a ``Geometry``, any direction: the
        scan's own grid, or the sub-grid :func:`sscflow.methods.ingest.imaged_field_of_view`
        found); only points inside it count in the similarity, so a follow-up that stops short
        (air or padding past the cut) is not matched against what it did not image. None: the
        follow-up's grid
    **options : the backend's settings over its own defaults: the fields of its ``Options``
        (``sscflow.methods.registration.torch.Options``, ``sscflow.methods.registration.sitk.Options``; in the
        config, the ``registration.torch`` and ``registration.sitk`` sections)

    Returns
    -------
    (3, Z, Y, X) float32 displacement u in mm on the fixed grid, component k along axis k:
    ``moving(x + u(x)) ~ fixed(x)``, x + u(x) a physical point in the follow-up's own
    geometry. With ``return_info``, ``(u, info)``.

    Raises
    ------
    RegistrationInputError (ValueError) for volumes that are not 3-D, NaN / inf values, a bad
    spacing or geometry, an empty mask, an option the backend does not have or an impossible
    value of one; UnknownBackendError (ValueError) for an unknown backend;
    MissingDependencyError (ImportError) naming the extra to install.

    Examples
    --------
    >>> z = np.zeros((8, 8, 8), np.float32)
    >>> register(z, z, (1.0, 1.0, 1.0), backend="nope")
    Traceback (most recent call last):
    ...
    sscflow.errors.UnknownBackendError: unknown registration backend 'nope'; choose one of: auto, torch, sitk
    """  # noqa: E501
    import time

    from sscflow.methods.registration.align import align_masks, identity
    from sscflow.methods.registration.frame import compose_rigid, imaged_on, resample_moving

    name = resolve_backend(backend)
    if initial_alignment not in ("lungs", "none"):
        raise RegistrationInputError(
            f"register: initial_alignment must be 'lungs' or 'none', got {initial_alignment!r}"
        )
    inputs = check_inputs(fixed, moving, spacing, mask, moving_mask=moving_mask,
                          fixed_geometry=fixed_geometry, moving_geometry=moving_geometry,
                          moving_spacing=options.pop("moving_spacing", None))  # fmt: skip
    opts = backend_options(name, **options)
    func = _load(name)
    fg, mg = inputs.fixed_geometry, inputs.moving_geometry
    t0 = time.perf_counter()
    dev = _torch_device(name, opts, resample_on_device)
    warm = 0.0
    if dev is not None:
        from sscflow.methods.registration import torch_resample as tr

        warm = tr.warm_up(dev)  # once per process
    t1 = time.perf_counter()
    alignment = identity()
    if initial_alignment == "lungs" and inputs.mask is not None and inputs.moving_mask is not None:
        alignment = _snap(align_masks(inputs.mask, fg, inputs.moving_mask, mg), fg)
    t_align = time.perf_counter() - t1
    t_resample = 0.0
    extra = {}  # what the backend is also told: on the device, return the map's parts
    resolution = None
    blur_f = blur_m = (0.0, 0.0, 0.0)
    if match_resolution:
        resolution = _match_resolution(inputs, fg, mg)
        if resolution is not None:
            blur_f, blur_m = resolution["blur_baseline_mm"], resolution["blur_followup_mm"]
    extra_f = extra_m = (0.0, 0.0, 0.0)
    if match_slices and (resolution is None or resolution["followup"]["z_mm"] is None
                         or resolution["baseline"]["z_mm"] is None):  # fmt: skip
        if profile_mm is None:
            thick_f, thick_m = slice_mm or (None, None)
            profile_mm = ((thick_f or 0.0, 0.0, 0.0), (thick_m or 0.0, 0.0, 0.0))
        extra_m = matched_profile_sigma_mm(*profile_mm)
        extra_f = matched_profile_sigma_mm(*profile_mm[::-1])
    sigma_f = _blur_sigma_vox(smooth_mm, fg.spacing, _quadrature(blur_f, extra_f))
    sigma_m = _blur_sigma_vox(smooth_mm, fg.spacing, _quadrature(blur_m, extra_m))
    if dev is None:
        blur = _common_blur(sigma_m)
        fixed_in = _common_blur(sigma_f)(inputs.fixed)

        def resample(mapping, cubic=True):
            nonlocal t_resample
            t = time.perf_counter()
            moved, valid = resample_moving(inputs.moving, mg, fg, mapping, cubic=cubic)
            if moving_fov is not None:
                valid = valid * imaged_on(fg, mapping, moving_fov, margin_mm=reach)
            moved = blur(moved)
            t_resample += time.perf_counter() - t
            return moved, valid
    else:
        # The pair goes to the device once; the resampling, the common blur, the backend and
        # the composition of the maps run there, and the displacement comes back once.
        t = time.perf_counter()
        blur = (lambda a: tr.gaussian_blur(a, sigma_m)) if sigma_m else (lambda a: a)
        fixed_in = tr.to_device(inputs.fixed, dev)
        fixed_in = tr.gaussian_blur(fixed_in, sigma_f) if sigma_f else fixed_in
        moving_t = tr.to_device(inputs.moving, dev)
        coefficients = []
        _sync(dev)
        t_resample += time.perf_counter() - t
        extra = {"as_tensor": True}

        def resample(mapping, cubic=True):
            nonlocal t_resample
            t = time.perf_counter()
            if mg == fg and _is_identity(mapping):  # a pair in register: copied exactly
                moved, valid = moving_t, None
            else:
                if cubic and not coefficients:  # once, for every cubic resampling
                    coefficients.append(tr.bspline_coefficients(moving_t))
                coef = coefficients[0] if cubic else None
                moved, valid = tr.resample(moving_t, mg, fg, mapping.matrix, mapping.offset,
                                           cubic=cubic, coefficients=coef)  # fmt: skip
            if moving_fov is not None:
                imaged = tr.to_device(imaged_on(fg, mapping, moving_fov, margin_mm=reach), dev)
                valid = imaged if valid is None else valid * imaged
            moved = blur(moved)
            _sync(dev)
            t_resample += time.perf_counter() - t
            return moved, valid

    # what the follow-up imaged, less the reach of the interpolation and the common blur: the
    # points next to a cut carry the air or padding past it into their values
    reach = 3.0 * max(v * sp for v, sp in zip(sigma_m or (0.0,) * 3, fg.spacing, strict=True)) \
        + max(mg.spacing)
    mapping = alignment
    affine_only = opts.affine_stage()
    # linear for the affine pass alone (its coarse levels do not see the difference)
    moved, valid = resample(alignment, cubic=affine_only is None)
    if affine_only is not None:
        # First pass: the backend's affine stage alone. The follow-up is then resampled again,
        # from its own grid, through rigid o affine, and the deformable stage runs on that with
        # no affine of its own. Resampling once at the coarse rigid map and correcting it in
        # the backend left the correction to the backend's linear interpolation: a scan on
        # another grid showed up to 5 mm and 0.4 deg of mask-alignment error that way, and
        # p99 |log-Jacobian| 0.011 (0.004 with this pass).
        first = func(fixed_in, moved, fg.spacing, mask=inputs.mask, valid=valid,
                     options=affine_only, return_affine=True, **extra)  # fmt: skip
        matrix, offset = first[-1]
        mapping = _snap(_then_affine(alignment, matrix, offset, fg), fg)
        moved, valid = resample(mapping)
        opts = opts.deformable_stage()
    # the deformable stage's baseline, filtered as the follow-up was by its resampling
    fixed_def = fixed_in
    interpolation_matched = False
    if match_interpolation and not (mg == fg and _is_identity(mapping)):
        from sscflow.methods.registration.interpolation import match_resampling

        t = time.perf_counter()
        fixed_def = match_resampling(fixed_in, mg, fg, mapping.matrix, mapping.offset)
        interpolation_matched = fixed_def is not fixed_in
        if dev is not None:
            _sync(dev)
        t_resample += time.perf_counter() - t
    local = func(fixed_def, moved, fg.spacing, mask=inputs.mask, valid=valid, options=opts,
                 **extra)  # fmt: skip
    if dev is None:
        u = compose_rigid(local, fg, mapping)
    else:
        w, box, (matrix, offset) = local
        u = tr.compose(w, box, fg, matrix, offset, mapping.matrix, mapping.offset)
        u = u.cpu().numpy()
    if not return_info:
        return u
    info = {"initial_alignment": {**alignment.to_dict(), "seconds": round(t_align, 3)},
            "resolution": resolution,
            "slices_matched": bool(any(extra_m) or any(extra_f)),
            "interpolation_matched": interpolation_matched,
            "resample_seconds": round(t_resample, 3),
            "seconds": round(time.perf_counter() - t0, 3),
            "device": str(dev) if dev is not None else None,
            "warm_up_seconds": round(warm, 3)}  # fmt: skip
    return u, info


def _torch_device(name, opts, on_device):
    """The torch device the resampling, blur and composition run on, or None (SimpleITK and
    numpy on the CPU): the torch backend's device when it is CUDA (``on_device`` None), or
    whenever ``on_device`` is True."""
    if name != "torch" or on_device is False:
        return None
    from sscflow.methods.registration.torch import _device

    dev = _device(opts.device)
    return dev if on_device or dev.type == "cuda" else None


def _sync(dev):
    """Wait for the device's queued work (so that the phases' seconds are the device's)."""
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def _is_identity(alignment) -> bool:
    return bool(np.allclose(alignment.matrix, np.eye(3), atol=1e-9)
                and np.allclose(alignment.offset, 0.0, atol=1e-9))  # fmt: skip


#: FWHM of a Gaussian over its s.d.
FWHM = float(2.0 * np.sqrt(2.0 * np.log(2.0)))


def matched_slice_sigma_mm(other_slice_mm, own_slice_mm) -> float:
    """The extra s.d. (mm) along z that gives a scan of thinner slices (``own_slice_mm``) the
    other scan's slice profile: a Gaussian of FWHM sqrt(thick^2 - thin^2) (a slice profile of
    FWHM its thickness; Gaussians add in quadrature). 0 when either is unknown or its slices
    are as thick or thicker. ``register`` asks it for both scans: the thinner one is blurred,
    baseline or follow-up.

    Both ways by measurement (``benchmarks/timepoints.py``, 12 synthetic patients x 3 scans at
    4 mm, 36 pairs): the lower third's error against the truth follows the follow-up's slices
    less the baseline's, +0.015 per mm (r = 0.88; a thicker follow-up reads as expansion of
    the bases, a thinner one as shrinkage), and the rind's alike (r = 0.89). Blurring the
    follow-up alone: pair-zones within 0.01 of the truth 86% (none: 84%); the thinner scan of
    either: 92%, the largest zone error 0.021 (0.044). (An earlier generator, whose later
    scans were blurrier in-plane, had made blurring a thinner baseline look harmful.)

    >>> round(matched_slice_sigma_mm(5.0, 3.0), 3)
    1.699
    >>> matched_slice_sigma_mm(3.0, 5.0), matched_slice_sigma_mm(2.0, None)
    (0.0, 0.0)
    """
    if not other_slice_mm or not own_slice_mm or own_slice_mm >= other_slice_mm:
        return 0.0
    a, b = float(other_slice_mm), float(own_slice_mm)
    return float(np.sqrt(a * a - b * b)) / FWHM


def matched_profile_sigma_mm(other_mm, own_mm) -> tuple[float, float, float]:
    """Per axis (z, y, x), the extra s.d. (mm) that gives a scan of slice profile ``own_mm``
    the other scan's, where the other's is wider: :func:`matched_slice_sigma_mm` on each axis
    (profiles from :func:`slice_profile_mm`; 0 or None where unknown).

    >>> [round(v, 3) for v in matched_profile_sigma_mm((0.0, 5.0, 0.0), (0.0, 3.0, 0.0))]
    [0.0, 1.699, 0.0]
    """
    return tuple(matched_slice_sigma_mm(a, b) for a, b in zip(other_mm, own_mm, strict=True))


#: A scan's effective profile (the FWHM of the Gaussian it is matched as: ``slice_profile_mm``
#: times these): along its slice axis 1.22 x its slice thickness, along its pixels 0.55 x the
#: pixel spacing. Measured (``benchmarks/NOTES.md``, "Effective profiles"): on synthetic 3-scan
#: cohorts at 4 mm, the error of the lungs' outer band against the truth grows with the
#: difference of the two scans' squared thicknesses and of their squared pixel sizes. 1.22
#: takes 86-91% of the slices' slope away on two cohorts and 69% on a third (a Gaussian of
#: the thickness's own FWHM left all of it); 0.55 nulls the pixels' slope on the mean of the
#: three (it varies from cohort to cohort more than the slices', and either sign remains).
SLICE_PROFILE_SCALE = 1.22
PIXEL_PROFILE_SCALE = 0.55


def slice_axis(geometry) -> int:
    """The canonical axis (0 z, 1 y, 2 x) a scan's slices stack along: the one its own slice
    axis runs closest to (an axial series': z; a coronal one's: y; a sagittal one's: x).
    ``geometry`` is the scan's own grid as acquired (``source.geometry`` in the store)."""
    d = np.asarray(geometry.direction, float)  # ITK (x, y, z): column j is index axis j
    return 2 - int(np.argmax(np.abs(d[:, 2])))


def slice_profile_mm(geometry, thickness_mm=None) -> tuple[float, float, float]:
    """A scan's profile along the canonical grid's (z, y, x), in mm: ``thickness_mm`` (else its
    slice spacing) along the axis its slices stack along (:func:`slice_axis`), its pixel
    spacing along the other two; each of its own axes goes to the patient axis it runs
    closest to.

    >>> from sscflow.core.geometry import Geometry
    >>> slice_profile_mm(Geometry((10, 20, 20), (2.5, 0.7, 0.8), (0, 0, 0)), 3.0)
    (3.0, 0.7, 0.8)
    >>> coronal = Geometry((20, 10, 20), (5.0, 0.7, 0.6), (0, 0, 0),
    ...                    ((1, 0, 0), (0, 0, 1), (0, -1, 0)))  # slices along y
    >>> slice_profile_mm(coronal)
    (0.7, 5.0, 0.6)
    """
    d = np.asarray(geometry.direction, float)
    own = list(geometry.spacing)  # (z, y, x) of the scan's own index axes
    if thickness_mm:
        own[0] = float(thickness_mm)
    out = [0.0, 0.0, 0.0]
    for j in range(3):  # index axis j (x, y, z) -> the patient axis it runs closest to
        out[2 - int(np.argmax(np.abs(d[:, j])))] = float(own[2 - j])
    return tuple(out)


def _quadrature(a, b) -> tuple[float, float, float]:
    return tuple(float(np.hypot(x, y)) for x, y in zip(a, b, strict=True))


#: the common blur is at least this many voxels: on coarse grids a blur fixed in millimetres is
#: a fraction of a voxel, and interpolating the follow-up's noise between voxels then pulls the
#: map towards shrinkage (one chest, unchanged, 20 HU noise on the follow-up alone, 4 mm grid:
#: mean log-Jacobian -0.0038, -0.013 in the bases). Half a voxel leaves 1 and 2 mm grids as they
#: were (1 mm is half a 2 mm voxel)
SMOOTH_MIN_VOXELS = 0.5


def _blur_sigma_vox(smooth_mm, spacing, extra_mm=(0.0, 0.0, 0.0)) -> list | None:
    """Per-axis s.d. in voxels of the common blur ``smooth_mm`` (at least
    :data:`SMOOTH_MIN_VOXELS`; none for 0) with ``extra_mm`` (z, y, x) added in quadrature
    (None: no blur).

    >>> _blur_sigma_vox(1.0, (4.0, 2.0, 1.0))
    [0.5, 0.5, 1.0]
    >>> _blur_sigma_vox(0.0, (2.0, 2.0, 2.0), (3.0, 0.0, 0.0))
    [1.5, 0.0, 0.0]
    """
    vox = [max(float(smooth_mm) / s, SMOOTH_MIN_VOXELS) if smooth_mm and smooth_mm > 0 else 0.0
           for s in spacing]  # fmt: skip
    vox = [float(np.hypot(v, e / s)) for v, e, s in zip(vox, extra_mm, spacing, strict=True)]
    return vox if any(vox) else None


def _match_resolution(inputs, fg, mg) -> dict | None:
    """Both scans' edge widths on their own lung outlines and the blur (mm, z y x) that matches
    them (:mod:`sscflow.methods.registration.resolution`), or None without both masks or with
    a follow-up grid whose axes are not the baseline's (its z would not be the patient's)."""
    from sscflow.methods.registration.resolution import match_blur

    if inputs.mask is None or inputs.moving_mask is None:
        return None
    if not (fg.is_canonical and mg.is_canonical):
        return None
    wf, wm, blur_f, blur_m = match_blur(inputs.fixed, inputs.mask, fg.spacing, inputs.moving,
                                        inputs.moving_mask, mg.spacing)  # fmt: skip
    return {"baseline": wf.to_dict(), "followup": wm.to_dict(),
            "blur_baseline_mm": [round(v, 3) for v in blur_f],
            "blur_followup_mm": [round(v, 3) for v in blur_m]}


def _common_blur(sigma_vox):
    """The Gaussian of per-axis s.d. ``sigma_vox`` (voxels; identity for None)."""
    if not sigma_vox:
        return lambda a: a
    from scipy import ndimage

    return lambda a: ndimage.gaussian_filter(a, sigma_vox, mode="nearest")


def _then_affine(alignment, matrix, offset, fixed_geometry):
    """The physical map p -> R(A(p)): ``alignment`` R after the backend's affine A, given as
    ``y = matrix @ x + offset`` in mm about the baseline's voxel 0."""
    from sscflow.methods.registration.align import Alignment

    r, t = np.asarray(alignment.matrix, float), np.asarray(alignment.offset, float)
    o = np.asarray(fixed_geometry.origin, float)
    m = np.asarray(matrix, float)
    return Alignment(r @ m, r @ (np.asarray(offset, float) + o - m @ o) + t, alignment.dice,
                     f"{alignment.method} + affine", alignment.seconds)  # fmt: skip


def _snap(alignment, geometry: Geometry, tol_mm: float = 0.01):
    """An alignment that moves no corner of ``geometry``'s grid by more than ``tol_mm`` is the
    identity (a scan and itself stay exactly in register: no resampling at all)."""
    from sscflow.methods.registration.align import Alignment

    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    pts = index_to_physical(corners * (np.asarray(geometry.shape, float) - 1), geometry)
    if float(np.abs(alignment.apply(pts) - pts).max()) <= tol_mm:
        return Alignment(np.eye(3), np.zeros(3), alignment.dice, alignment.method,
                         alignment.seconds)  # fmt: skip
    return alignment
