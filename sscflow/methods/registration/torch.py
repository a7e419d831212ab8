"""PyTorch backend: affine, then a diffeomorphic stationary velocity field with local NCC.

Runs on CPU, or on CUDA when available (``device="auto"``). PyTorch is imported inside the
functions, so ``import sscflow`` does not load it. Settings: ``Options`` (the config's
``registration.torch`` section), every size in millimetres: ``Options.per_level`` turns them
into voxels of the grid at hand, so that a cohort at 1 mm and at 2 mm gets the same
regularisation (at 1 mm the defaults run the same 8, 4 and 2 mm levels as at 2 mm, on
averages of 8, 4 and 2 voxels). Figures below: ``benchmarks/registration.py`` (real CT at
2 mm with planted changes); what was tried and not kept is in ``benchmarks/NOTES.md``.

1. Intensities: HU clipped to [-1000, 400] (air to soft tissue) and scaled to [0, 1]. Every
   level finer than the coarsest registers them less their local mean (``detrend_mm``,
   default 4 mm, a Gaussian s.d.; 0 turns it off), computed over the voxels the follow-up
   imaged (normalised convolution, the same operation on both, so a scan and itself stay
   equal and a field-of-view cut is no edge): structure is kept, the level of density taken
   out, so that fibrosis growing denser where the lung shrinks is not read as motion. The
   coarsest level, where the affine stage starts, keeps the level (detrending it too made
   unchanged pairs noisier). lung1 at 2 mm, shrinkage under a textured rise (before the
   quality term of 6.): +180 HU 94 % of the shrinkage recovered (88 % without), +450 HU 69 %
   (51 %); see ``benchmarks/NOTES.md``.
2. Crop: the fixed (baseline) volume is cropped to the lung bounding box plus ``margin_mm``,
   grown to whole pyramid blocks. The moving volume (already resampled onto the fixed grid by
   ``register``) is used over that crop plus 30 mm, so the warped crop rarely samples outside
   it; only voxels the follow-up imaged (``valid``) count in the similarity.
3. Pyramid: box-averaged images, each level's shrink factor ``round(level_mm / spacing)``
   (``levels_mm``, default 8, 4, 2 mm: shrink 4, 2, 1 at 2 mm). The moving crop
   starts on the same block grid as the fixed one, so both average the same voxel blocks:
   blocks out of phase read as a deformation (log-Jacobian blobs of +-0.05 on a scan
   registered to itself).
4. Affine ``y = c + (I + L)(x - c) + t`` about the crop centre, by Adam on ``1 - LNCC`` on the
   two coarsest levels (``affine_iterations``, default 100 and 50), with a cosine-annealed
   step and Adam's eps at a tenth of the gradient a one-voxel shift gives, so steps vanish
   with the gradient once the images are in register. It absorbs the inspiration and
   position change; the second level is needed for the scale (the coarsest alone left a 0.5 %
   scale error on a scan written on another grid). ``sscflow.methods.registration.register`` runs
   this stage alone first (``Options.affine_stage``), resamples the follow-up through it, then
   the deformable stage without it (``Options.deformable_stage``).
5. Deformable: the map is ``x -> A(exp(v)(x))`` with a stationary velocity field ``v`` (mm) on
   a grid ``velocity_spacing_mm`` apart at the finest level (default 4 mm, 2 voxels at 2 mm;
   coarser levels in proportion, never finer than the level), integrated by scaling and
   squaring (at least ``squarings`` steps, more while the scaled velocity's largest vector
   exceeds half a velocity-grid voxel, the condition for each composition to stay
   invertible), so the result is a diffeomorphism up to interpolation. ``v`` is multiplied by
   a cosine taper, 1 over the lung bounding box and 0 at the crop border: outside the crop
   the field is exactly the affine part and continuous with the inside.
6. Similarity: ``1 - LNCC`` (squared local correlation over a box of ``window_mm`` at the
   finest level, the same voxel count at coarser ones: 5 voxels at 2 mm). Local NCC is
   invariant to a local linear intensity change, so a fibrosis-like density rise where the
   lung shrinks is not read as less shrinkage (an SSD or demons similarity is). Each window
   is weighted by ``va^2 / (va^2 + (ncc_floor_hu / 1400)^4)``, ``va`` the fixed image's local
   variance: windows much flatter than ``ncc_floor_hu`` HU count little. The weight depends
   on the fixed image only, so every window's optimum stays at ``moving ~ fixed``.
   Normalised as it is, local NCC^2 still rewards a window for reading the follow-up from
   wherever the follow-up matches better; next to a zone it shows worse than the baseline
   (dense disease: new texture, cysts, vessels losing their contrast) the windows at the
   zone's edge read it from outside, and the zone's shrinkage is under-read even from the
   true map. ``quality_sigma_mm`` (default 5 mm) takes that pull out: the lungs' local NCC^2
   averaged over a Gaussian of that s.d. is the match quality ``q``, and a term whose
   gradient is ``-cc grad log q`` cancels the part of each window's gradient that comes from
   q's slope (``_quality_pull``), where the follow-up's local density changed by
   ``quality_gate_hu`` (100 HU) or more: elsewhere q's slope is the anatomy's, in both scans
   alike. lung1 at 2 mm, +450 HU with cysts: 82 % of the shrinkage read (69 % without), +180
   HU 96 % (94 %), every unchanged pair as without it; see ``benchmarks/NOTES.md``, "The
   match quality's pull".
7. Optimiser: gradient descent on ``v``. The similarity gradient is taken with respect to the
   displacement ``exp(v)`` on the velocity grid and used as the velocity's (``d exp(v)/dv ~
   I``, as in log-domain demons), which skips the backward pass through the squarings; the
   warped image is linearised in the displacement (value from ``grid_sample``, slope from
   central differences), which skips ``grid_sample``'s backward pass, the most expensive step
   on CPU. The gradient is smoothed (``gradient_sigma_mm``, fluid-like) and scaled so that the
   largest update is ``learning_rate_mm`` (in proportion to the velocity grid's actual
   spacing) while the gradient is at least
   ``full_step_at`` times the one a one-voxel shift of the fixed image against itself gives
   (measured once per level), and proportionally smaller below it: a pair already in register
   is left alone, not jittered by full-size steps. Optionally ``diffusion`` times the mean
   squared velocity gradient is added to the loss.
8. Regulariser: after each step, the part of ``v`` added at the current level is smoothed by
   ``2G - GG`` (``smoothing_order=2``, ``G`` a Gaussian of ``velocity_sigma_mm``; ``G``
   alone with ``smoothing_order=1``); the coarser levels' result is not smoothed again, which
   would damp a regional change's peak. ``2G - GG`` penalises long wavelengths as k^4 rather
   than k^2, so a 20 mm regional change is damped far less for the same suppression of
   fine-scale noise: with ``velocity_sigma_mm`` 8 (at 2 mm) the planted region's mean
   log-Jacobian error was +0.011 (order 1: +0.025), the moved pair's +0.014 (+0.035), rigid
   p95 |log-Jacobian| 0.023 and regridded p99 0.022 (order 1 and 2 alike); at 6 mm the
   region error fell to +0.004 but rigid p95 rose to 0.049. ``velocity_sigma_mm`` and
   ``gradient_sigma_mm`` may also be given per level (mm, as given).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from sscflow.errors import ConfigError
from sscflow.methods.registration.common import (
    check_common_options,
    compose,
    crop_box,
    n_threads,
    renamed_message,
    shrink_factor,
)

HU_RANGE = (-1000.0, 400.0)
MOVING_PAD_MM = 30.0  # the moving image is used over the fixed crop grown by this much
QUALITY_DENSITY_MM = 8.0  # the local density change that gates the quality term: its scale
QUALITY_FLOOR = 0.02  # the match quality's lowest value (quality_sigma_mm): a finite log


# Settings of earlier versions given in voxels, and the millimetre settings that replaced them:
# a config or a ``register`` call that still names one is refused with the new name.
RENAMED = {
    "levels": ("levels_mm", "the voxel size of each pyramid level in mm; [4, 2, 1] at 2 mm "
                            "is [8, 4, 2]"),
    "window": ("window_mm", "the local NCC window at the finest level in mm; 5 at 2 mm is 10"),
    "velocity_sigma": ("velocity_sigma_mm", "mm at the finest level; 2.0 with velocity_shrink 2 "
                                            "at 2 mm is 8"),
    "gradient_sigma": ("gradient_sigma_mm", "mm at the finest level; 1.0 with velocity_shrink 2 "
                                            "at 2 mm is 4"),
    "learning_rate": ("learning_rate_mm", "mm at the finest level; 0.6 with velocity_shrink 2 at "
                                          "2 mm is 2.4"),
    "velocity_shrink": ("velocity_spacing_mm", "the velocity grid's spacing at the finest level "
                                               "in mm; 2 at 2 mm is 4"),
}


@dataclass
class Options:
    """The torch backend's settings (the ``registration.torch`` section of the config).

    Every size is in millimetres, so that 1 mm and 2 mm grids get the same regularisation (the
    defaults are the former voxel settings at 2 mm). A pyramid
    level's shrink factor is ``round(level_mm / spacing)`` (at least 1; the mean of the three
    spacings); ``window_mm``, ``velocity_spacing_mm`` and the ``*_mm`` widths and step are their
    values at the finest level, and each coarser level scales them by its ``levels_mm`` over the
    finest (the same count of its own, larger voxels). ``velocity_sigma_mm`` and
    ``gradient_sigma_mm`` may also be given per level (mm, used as given).
    """

    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    margin_mm: float = 15.0  # crop to the lung bounding box plus this margin
    levels_mm: tuple[float, ...] = (8.0, 4.0, 2.0)  # voxel size of each level, coarse to fine
    iterations: tuple[int, ...] = (40, 30, 10)  # deformable iterations per level
    affine_iterations: tuple[int, ...] = (100, 50)  # affine iterations, coarsest levels first
    window_mm: float = 10.0  # local NCC window at the finest level (an odd voxel count >= 3)
    ncc_floor_hu: float = 32.0  # local NCC: windows with local s.d. well below this are flat
    velocity_sigma_mm: float = 8.0  # Gaussian smoothing of each level's velocity increment
    smoothing_order: int = 2  # increments smoothed by G (1) or by 2G - GG (2)
    gradient_sigma_mm: float = 4.0  # Gaussian smoothing of each update
    diffusion: float = 0.0  # weight of a diffusion penalty on the velocity
    learning_rate_mm: float = 2.4  # largest update per step (on the velocity grid's scale)
    velocity_spacing_mm: float = 4.0  # the velocity grid's spacing at the finest level
    squarings: int = 2  # scaling-and-squaring steps (at least; more for large velocities)
    threads: int = 0  # CPU threads; 0 = the cores available to this process
    full_step_at: float = 1.0  # full steps down to the gradient of a 1-voxel shift
    detrend_mm: float = 4.0  # finer levels: each image less its local mean (Gaussian s.d., mm)
    quality_sigma_mm: float = 5.0  # the match quality's scale, its pull taken out (0: off)
    quality_gate_hu: float = 100.0  # ... where the local density changed this much (0: all)
    adaptive_sigma_mm: float = 4.0  # the increment's smoothing where the change is strong
    adaptive_logj: float = 0.0  # |log-J| of an increment above which it is (0: off; 0.01)
    adaptive_ncc: float = 0.5  # ... where the local NCC^2 reaches this (none below half)

    @staticmethod
    def inactive(options: dict) -> set[str]:
        """The keys of ``options`` (these settings, as a dict) that change nothing as set: the
        adaptive smoothing's while it is off, the quality term's gate while the term is off. A
        stored result's parameters leave them out, so that a store registered before the
        setting existed stays current.

        >>> sorted(Options.inactive(dataclasses.asdict(Options())))
        ['adaptive_logj', 'adaptive_ncc', 'adaptive_sigma_mm']
        >>> Options.inactive(dataclasses.asdict(Options(adaptive_logj=0.01)))
        set()
        >>> sorted(Options.inactive(dataclasses.asdict(Options(adaptive_logj=0.01,
        ...                                                    quality_sigma_mm=0.0))))
        ['quality_gate_hu']
        """
        off = set()
        if not options.get("adaptive_logj"):
            off |= {k for k in options if k.startswith("adaptive_")}
        if not options.get("quality_sigma_mm", 1.0):
            off |= {k for k in options if k == "quality_gate_hu"}
        return off

    @classmethod
    def moved_key(cls, key: str, keypath: str) -> str | None:
        """The config's message for a setting renamed to millimetres (``window`` ->
        ``window_mm``), or None."""
        return renamed_message(key, keypath, RENAMED)

    def validate(self, where: str) -> None:
        """Raise ConfigError naming the key (``where.window_mm``) for an impossible value."""
        check_common_options(self, where)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{where}.device must be auto, cpu or cuda, got {self.device!r}")
        if any(n < 0 for n in self.affine_iterations):
            raise ConfigError(f"{where}.affine_iterations must be >= 0, got "
                              f"{list(self.affine_iterations)}")  # fmt: skip
        if not self.ncc_floor_hu > 0:
            raise ConfigError(f"{where}.ncc_floor_hu must be > 0, got {self.ncc_floor_hu}")
        if not self.window_mm > 0:
            raise ConfigError(f"{where}.window_mm must be > 0, got {self.window_mm}")
        for key in ("velocity_sigma_mm", "gradient_sigma_mm"):
            values = _values(getattr(self, key))
            if len(values) not in (1, len(self.levels_mm)) or min(values) < 0:
                raise ConfigError(f"{where}.{key} must be one number >= 0 or one per level, got "
                                  f"{getattr(self, key)}")  # fmt: skip
        if self.diffusion < 0:
            raise ConfigError(f"{where}.diffusion must be >= 0, got {self.diffusion}")
        for key in ("learning_rate_mm", "velocity_spacing_mm"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{where}.{key} must be > 0, got {getattr(self, key)}")
        if self.smoothing_order not in (1, 2):
            raise ConfigError(f"{where}.smoothing_order must be 1 or 2, got "
                              f"{self.smoothing_order!r}")  # fmt: skip
        if not 0 <= self.squarings <= 12:
            raise ConfigError(f"{where}.squarings must be within 0..12, got {self.squarings}")
        if not self.detrend_mm >= 0:
            raise ConfigError(f"{where}.detrend_mm must be >= 0, got {self.detrend_mm}")
        if not self.quality_gate_hu >= 0:
            raise ConfigError(f"{where}.quality_gate_hu must be >= 0, got "
                              f"{self.quality_gate_hu}")  # fmt: skip
        if not self.quality_sigma_mm >= 0:
            raise ConfigError(f"{where}.quality_sigma_mm must be >= 0, got "
                              f"{self.quality_sigma_mm}")  # fmt: skip
        if not self.full_step_at > 0:
            raise ConfigError(f"{where}.full_step_at must be > 0, got {self.full_step_at}")
        if not self.adaptive_sigma_mm >= 0:
            raise ConfigError(f"{where}.adaptive_sigma_mm must be >= 0, got "
                              f"{self.adaptive_sigma_mm}")  # fmt: skip
        if not self.adaptive_logj >= 0:
            raise ConfigError(f"{where}.adaptive_logj must be >= 0, got {self.adaptive_logj}")
        if not 0 <= self.adaptive_ncc <= 1:
            raise ConfigError(f"{where}.adaptive_ncc must be within 0..1, got "
                              f"{self.adaptive_ncc}")  # fmt: skip

    def affine_stage(self) -> Options | None:
        """These options with the affine stage alone (no deformable iterations), or None
        without an affine stage."""
        if not any(self.affine_iterations):
            return None
        return dataclasses.replace(self, iterations=(0,) * len(self.levels_mm))

    def deformable_stage(self) -> Options:
        """These options without the affine stage."""
        return dataclasses.replace(self, affine_iterations=(0,))

    def per_level(self, spacing) -> list[Level]:
        """The settings of each pyramid level on a grid of ``spacing`` (z, y, x) mm, in voxels:
        what the registration runs. At 2 mm the defaults give shrink factors 4, 2, 1, a
        5-voxel window, a velocity grid 2 voxels coarser than each level, smoothing of 2 and 1
        velocity-grid voxels and steps of 0.6 of one; at 1 mm the same millimetres.

        >>> [(lv.factor, lv.window, lv.velocity_mm) for lv in Options().per_level((1, 1, 1))]
        [(8, 5, 16.0), (4, 5, 8.0), (2, 5, 4.0)]
        """
        mean = float(np.mean(np.asarray(spacing, dtype=np.float64)))
        finest = min(float(x) for x in self.levels_mm)
        n = len(self.levels_mm)
        vsigmas = _per_level_mm(self.velocity_sigma_mm, self.levels_mm, finest, "velocity_sigma_mm")
        gsigmas = _per_level_mm(self.gradient_sigma_mm, self.levels_mm, finest, "gradient_sigma_mm")
        out = []
        # every level runs, also two on the scan's own voxels (3 and 4 mm scans): leaving
        # the finer one out, as the sitk backend does (common.levels_run), halved the noise
        # of a 4 mm no-change pair but doubled a 3 mm planted region's error (0.030 -> 0.058)
        for k in range(n):
            scale = float(self.levels_mm[k]) / finest  # this level's sizes over the finest's
            factor = shrink_factor(self.levels_mm[k], spacing)
            window = max(3, 2 * int(math.floor(self.window_mm * scale / (factor * mean) / 2)) + 1)
            # never finer than the level's own voxels, which could not resolve it
            velocity_mm = max(float(self.velocity_spacing_mm) * scale, factor * mean)
            out.append(Level(factor, window, velocity_mm, vsigmas[k] / velocity_mm,
                             gsigmas[k] / velocity_mm,
                             float(self.learning_rate_mm) * scale / velocity_mm,
                             float(self.adaptive_sigma_mm) * scale / velocity_mm))  # fmt: skip
        return out


@dataclass(frozen=True)
class Level:
    """One pyramid level's settings in voxels (``Options.per_level``): the shrink factor, the
    local NCC window (image voxels of the level), the velocity grid's nominal spacing (mm), and
    the velocity and gradient smoothing, the largest step and the velocity's smoothing where
    the change is strong (``Options.adaptive_sigma_mm``), in velocity-grid voxels."""

    factor: int
    window: int
    velocity_mm: float
    velocity_sigma: float
    gradient_sigma: float
    learning_rate: float
    adaptive_sigma: float = 0.0


def _per_level_mm(value, levels_mm, finest, name) -> list[float]:
    """mm per level: one number, at the finest level and scaled with each level's size, or one
    number per level, as given."""
    if isinstance(value, (int, float)):
        return [float(value) * float(level) / finest for level in levels_mm]
    out = [float(x) for x in value]
    if len(out) != len(levels_mm):
        raise ValueError(f"torch backend: {name} needs one value or one per level, got {value}")
    return out


def _values(x) -> tuple[float, ...]:
    """A number, or one per level, as a tuple of floats."""
    return (float(x),) if isinstance(x, (int, float)) else tuple(float(v) for v in x)


def register(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing,
    *,
    mask=None,
    valid=None,
    options: Options | None = None,
    return_affine: bool = False,
    as_tensor: bool = False,
):
    """See :func:`sscflow.methods.registration.register` (inputs already checked).

    ``options`` are this backend's settings (``Options()`` when None). With ``return_affine``
    also returns the affine ``(matrix, offset)`` (zyx mm about voxel 0). ``valid`` (Z, Y, X) in
    [0, 1], on the same grid, says where the moving scan was imaged (``register`` resampled it
    onto the fixed grid); the similarity counts only those voxels. ``fixed``, ``moving`` and
    ``valid`` may be numpy arrays or tensors (on the device: nothing is copied). With
    ``as_tensor``, returns the parts of the map instead of the displacement: ``(w, box, (matrix,
    offset))``, w the deformable part (3, *box shape) mm on the device (or None) on the crop
    ``box``, for ``torch_resample.compose``.
    """
    o = options if options is not None else Options()
    device, margin_mm, iterations = o.device, o.margin_mm, o.iterations
    affine_iterations, ncc_floor_hu = o.affine_iterations, o.ncc_floor_hu
    diffusion, squarings = o.diffusion, o.squarings
    threads, full_step_at, smoothing_order = o.threads, o.full_step_at, o.smoothing_order
    import torch

    dev = _device(device)
    if dev.type == "cpu":
        torch.set_num_threads(n_threads(threads))
    if smoothing_order not in (1, 2):
        raise ValueError(f"torch backend: smoothing_order must be 1 or 2, got {smoothing_order!r}")
    # the millimetre settings in voxels of this grid, per level
    per_level = o.per_level(spacing)
    levels = tuple(lv.factor for lv in per_level)
    iterations = tuple(int(n) for n in iterations)
    if len(iterations) != len(levels):
        raise ValueError(f"torch backend: iterations needs one count per level "
                         f"{tuple(o.levels_mm)} mm, got {iterations}")  # fmt: skip
    shape = fixed.shape
    sp = torch.tensor(spacing, dtype=torch.float32, device=dev)
    box = _whole_blocks(crop_box(mask, spacing, margin_mm, shape), shape, math.lcm(*levels))
    inner = crop_box(mask, spacing, 0.0, shape) if mask is not None else box

    def prep(a):
        if isinstance(a, torch.Tensor):
            a = a.to(dev, torch.float32).clamp(*HU_RANGE)
            return ((a - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])).contiguous()[None, None]
        a = np.clip(a, *HU_RANGE)
        a = (a - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)[None, None]

    # The moving image: the crop grown by ``MOVING_PAD_MM``, its start congruent to the fixed
    # crop's modulo every shrink factor, so that both pyramids average the same voxel blocks
    # (blocks out of phase by a fraction of a coarse voxel read as a deformation).
    period = math.lcm(*levels)
    mbox = []
    for b, s, n in zip(box, spacing, shape, strict=True):
        pad = int(math.ceil(MOVING_PAD_MM / s))
        lo = b.start - period * (min(pad, b.start) // period)
        mbox.append(slice(lo, min(n, b.stop + pad)))
    mbox = tuple(mbox)
    v_full = None
    if valid is not None:
        if isinstance(valid, torch.Tensor):
            v = valid[mbox].to(dev, torch.float32).contiguous()
        else:
            v = torch.from_numpy(np.ascontiguousarray(np.asarray(valid, np.float32)[mbox]))
        if float(v.min()) < 1.0:
            v_full = v.to(dev)[None, None]
    def level_images():
        """Shrink factor -> (fixed, moving) images of that level, full resolution: the coarsest
        level (the affine stage's first) the clipped intensities, whose level of density aligns
        the whole lung; with ``detrend_mm``, every finer level the images less their local mean,
        computed on the moving crop's extent over the voxels the follow-up imaged, the same
        operation on both (a scan and itself stay equal). Detrending the coarsest level too
        left too little there: rigid and regridded pairs came out noisier (benchmarks/NOTES.md).
        Where the follow-up was imaged rides along as the moving image's second channel: one
        grid_sample call interpolates both. Also returns the clipped intensities themselves,
        (fixed crop, moving crop), for the quality term's gate."""

        def with_seen(m):
            return m if v_full is None else torch.cat([m, v_full], dim=1)

        m_full = prep(moving[mbox])
        detrended = set()
        if o.detrend_mm > 0:
            detrended = {f for f in levels if f < max(levels)} or set(levels)
            g = _gauss_kernels(torch, o.detrend_mm / float(np.mean(spacing)))
            f_ext = prep(fixed[mbox])  # the fixed crop is this less the moving crop's margin
            crop = (..., *(slice(b.start - m.start, b.stop - m.start)
                           for b, m in zip(box, mbox, strict=True)))  # fmt: skip
            dt = (_detrend(torch, f_ext, g, v_full)[crop],
                  with_seen(_detrend(torch, m_full, g, v_full)))  # fmt: skip
        f_raw = f_ext[crop].contiguous() if detrended else prep(fixed[box])
        if set(levels) - detrended:
            raw = (f_raw, with_seen(m_full))
        return {f: dt if f in detrended else raw for f in set(levels)}, (f_raw, m_full)

    images, raw_pair = level_images()
    lung_crop = None  # the baseline's lungs on the crop: where the quality term is used
    if mask is not None and o.quality_sigma_mm > 0:
        lung_crop = torch.from_numpy(
            np.ascontiguousarray(np.asarray(mask)[box], dtype=np.float32)).to(dev)[None, None]
    if not (o.quality_sigma_mm > 0 and o.quality_gate_hu > 0):
        raw_pair = None  # only the quality term's gate reads the intensities themselves
    start = torch.tensor([b.start for b in box], dtype=torch.float32, device=dev)
    crop_n = [b.stop - b.start for b in box]
    centre = (start + (torch.tensor(crop_n, device=dev) - 1) / 2) * sp  # mm

    # local NCC's stabiliser: windows whose local standard deviations (in both images) are
    # below ~ncc_floor_hu count as flat, so noise there is not matched as structure
    eps = (float(ncc_floor_hu) / (HU_RANGE[1] - HU_RANGE[0])) ** 4
    reg = _Registration(
        torch, dev, sp, start, crop_n, centre, window=per_level[0].window, shape=shape, eps=eps,
        moving_start=[b.start for b in mbox],
    )
    window_of = {}  # a shrink factor's window (the coarsest level of that factor's)
    for lv in per_level:
        window_of.setdefault(lv.factor, lv.window)
    pyramid = {f: (reg.pool(fi, f), reg.pool(mi, f)) for f, (fi, mi) in images.items()}
    del images

    def sample(m_img, where):
        """(value, seen): the moving image and its imaged fraction (None: all) at ``where``."""
        out = reg.sample(m_img, where)
        return out[:, :1], (out[:, 1:] if v_full is not None else None)

    # --- affine, on the coarsest levels
    lin = torch.zeros(3, 3, device=dev, requires_grad=True)
    trans = torch.zeros(3, device=dev, requires_grad=True)
    aff_levels = sorted(set(levels), reverse=True)[: len(affine_iterations)]
    for factor, n_iter in zip(aff_levels, affine_iterations, strict=False):
        if n_iter == 0:
            continue
        f_img, m_img = pyramid[factor]
        pts = reg.points(factor, f_img.shape[2:])  # (3, D, H, W) mm
        reg.window = window_of[factor]
        stats = reg.fixed_stats(f_img)
        level_mm = [float(x) * factor for x in spacing]
        c = centre.view(3, 1, 1, 1)
        # Adam's eps at a tenth of the gradient a one-voxel shift gives: steps stay full-size
        # while the images are apart, and vanish with the gradient when they are in register
        # (with a tiny eps, Adam turns the rounding noise of a zero gradient into full steps)
        g_lin, g_trans = _affine_reference(torch, reg, f_img, stats, pts, c, level_mm)
        opt = _Adam(torch, [(lin, 0.01, 0.1 * g_lin), (trans, 1.0, 0.1 * g_trans)], n_iter)
        for _ in range(n_iter):
            lin.grad = trans.grad = None
            mat = torch.eye(3, device=dev) + lin
            y = c + torch.einsum("ij,j...->i...", mat, pts - c) + trans.view(3, 1, 1, 1)
            with torch.no_grad():
                base, _ = reg.moving_grid(m_img, factor, pts, lin, trans)
                value, seen = sample(m_img, base)
                # the moving image's slope at y: grad_x warped = (I + L)^T grad_y moving
                slope = torch.stack(torch.gradient(value[0, 0], spacing=level_mm))
                slope = torch.einsum("ij,j...->i...", torch.linalg.inv(mat.T), slope)[None]
            # linearised in y, as in the deformable stage (no grid_sample backward pass)
            warped = value + ((y - y.detach())[None] * slope).sum(1, keepdim=True)
            loss = 1.0 - reg.lncc(stats, warped, seen)
            loss.backward()
            opt.step()
    lin = lin.detach()
    trans = trans.detach()

    # --- deformable (SVF)
    vel = None
    taper = None
    for lv, n_iter in zip(per_level, iterations, strict=True):
        if n_iter == 0:  # nothing at this level: the velocity carries on to the next one
            continue
        factor = lv.factor
        f_img, m_img = pyramid[factor]
        pts = reg.points(factor, f_img.shape[2:])
        reg.window = lv.window
        # the velocity grid: ``lv.velocity_mm`` apart (or a little less: it spans the crop)
        vshape = [max(2, math.ceil((n - 1) * s / lv.velocity_mm - 1e-9) + 1)
                  for n, s in zip(crop_n, spacing, strict=True)]  # fmt: skip
        vspacing = torch.tensor(
            [(n - 1) * s / (m - 1) for n, s, m in zip(crop_n, spacing, vshape, strict=True)],
            device=dev,
        )
        if vel is None:
            vel = torch.zeros(1, 3, *vshape, device=dev)
        elif list(vel.shape[2:]) != vshape:
            vel = torch.nn.functional.interpolate(
                vel, size=vshape, mode="trilinear", align_corners=True
            )
        vel = vel.detach().requires_grad_(True)
        vel_start = vel.detach().clone()  # the coarser levels' result: not smoothed again
        taper = reg.taper(vshape, box, inner)
        grid_f = reg.velocity_grid(factor, f_img.shape[2:])  # fixed-level points, normalised
        stats = reg.fixed_stats(f_img)
        with torch.no_grad():
            base, to_grid = reg.moving_grid(m_img, factor, pts, lin, trans)
        kernel = _gauss_kernels(torch, lv.velocity_sigma)
        # where the change is strong, the increment keeps its shape (see _filter_increment), on
        # the finest level only: the coarser velocity grids (8 and 16 mm at the defaults) do
        # not resolve a region that narrow, and narrowing them too followed dense disease's
        # texture (benchmarks/NOTES.md, "Narrow sinks kept narrow")
        sharp = _gauss_kernels(torch, lv.adaptive_sigma)
        adaptive_logj = o.adaptive_logj if lv is per_level[-1] else 0.0
        gkernel = _gauss_kernels(torch, lv.gradient_sigma)
        vox = float(vspacing.mean())
        step = lv.learning_rate * vox
        level_mm = [float(x) * factor for x in spacing]
        ref = reg.reference_gradient(f_img, stats, grid_f, factor, vshape, taper, gkernel, level_mm)
        ref = ref.clamp(min=1e-12)
        qkernel = _gauss_kernels(torch, o.quality_sigma_mm / float(np.mean(level_mm)))
        lung_l = None if lung_crop is None or qkernel is None else reg.pool(lung_crop, factor)
        qgate = None
        if qkernel is not None and raw_pair is not None:
            with torch.no_grad():  # the coarser levels' map, as this level starts
                w0 = reg.upsample(reg.exp(vel * taper, vspacing, squarings), grid_f, factor)
            qgate = _density_gate(torch, reg, raw_pair, factor, pts, lin, trans, w0, lung_l,
                                  level_mm, o.quality_gate_hu)  # fmt: skip
        for _ in range(n_iter):
            vel.grad = None
            # The similarity gradient is taken with respect to the displacement exp(v) and
            # used as the velocity's (d exp(v)/dv ~ I, as in log-domain demons): this skips
            # the backward pass through the squarings, a third of an iteration's cost.
            with torch.no_grad():
                disp = reg.exp(vel * taper, vspacing, squarings)
            disp.requires_grad_(True)
            w = reg.upsample(disp, grid_f, factor)  # (1, 3, D, H, W) mm at the level's voxels
            with torch.no_grad():
                where = base + w[0].detach().permute(1, 2, 3, 0) @ to_grid
                value, seen = sample(m_img, where)
                slope = torch.stack(torch.gradient(value[0, 0], spacing=level_mm))[None]
            # The warped image, linearised in w: its value, and the gradient of the warped
            # image as d(warped)/dw (exact up to a factor I + grad u). Much cheaper than
            # differentiating the resampling (grid_sample's backward pass on CPU).
            warped = value + ((w - w.detach()) * slope).sum(1, keepdim=True)
            loss = 1.0 - reg.lncc(stats, warped, seen)
            if qkernel is not None:
                loss = loss + _quality_pull(torch, reg, w, qkernel, level_mm, lung_l, qgate)
            loss.backward()
            gate = None
            if adaptive_logj and o.adaptive_ncc > 0:
                # where the two images still match locally: a dense zone shows nothing to match
                # (its local NCC^2 about 0.1), a narrow sink under a light texture does (0.7)
                gate = torch.nn.functional.interpolate(
                    reg.local, size=vshape, mode="trilinear", align_corners=True)
                gate = ((gate - 0.5 * o.adaptive_ncc) / (0.5 * o.adaptive_ncc)).clamp(0.0, 1.0)
            if diffusion > 0:
                (diffusion * _diffusion(vel / vspacing.view(1, 3, 1, 1, 1))).backward()
            with torch.no_grad():
                grad = disp.grad * taper
                if vel.grad is not None:
                    grad = grad + vel.grad
                if gkernel is not None:
                    grad = _smooth(torch, grad, gkernel)
                norm = grad.square().sum(1).sqrt().amax().clamp(min=1e-12)
                # the largest update is ``learning_rate`` voxels while the gradient is at least
                # ``full_step_at`` times that of a one-voxel misregistration, and shrinks with
                # it below that: a pair already in register (a scan and itself) is left alone
                # instead of jittered by full steps
                vel -= grad * (step / torch.maximum(norm, ref * full_step_at))
                if kernel is not None:
                    inc = _filter_increment(torch, vel - vel_start, kernel, sharp,
                                            smoothing_order, adaptive_logj, vspacing, gate)
                    vel.copy_(vel_start + inc)
    with torch.no_grad():
        matrix = (torch.eye(3, device=dev) + lin).double().cpu().numpy()
        offset = (centre.double() + trans.double() - (torch.eye(3, device=dev) + lin).double()
                  @ centre.double()).cpu().numpy()  # fmt: skip
        local = None
        if vel is not None:
            disp = reg.exp(vel * taper, vspacing, squarings)
            grid = reg.velocity_grid(1, crop_n)
            local = torch.nn.functional.grid_sample(
                disp, grid, mode="bilinear", padding_mode="border", align_corners=True
            )[0]
            if as_tensor:
                return local, box, (matrix, offset)
            local = local.cpu().numpy()
    if as_tensor:
        return None, box, (matrix, offset)
    u = compose(local, box, shape, spacing, matrix, offset)
    return (u, (matrix, offset)) if return_affine else u


class _Adam:
    """Adam (betas 0.9, 0.999) with a cosine-annealed learning rate over ``n`` steps, for
    ``(tensor, lr, eps)`` groups: as ``torch.optim.Adam`` with ``CosineAnnealingLR``, without
    importing ``torch.optim``, which loads TorchDynamo (2.4 s of a worker's first
    registration)."""

    def __init__(self, torch, groups, n):
        self.torch = torch
        self.groups = [(p, lr, eps, p.detach().clone().zero_(), p.detach().clone().zero_())
                       for p, lr, eps in groups]  # fmt: skip
        self.n = max(int(n), 1)
        self.t = 0

    def step(self):
        b1, b2 = 0.9, 0.999
        self.t += 1
        anneal = 0.5 * (1.0 + math.cos(math.pi * (self.t - 1) / self.n))
        with self.torch.no_grad():
            for p, lr, eps, m, v in self.groups:
                g = p.grad
                if g is None:
                    continue
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**self.t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr * anneal / (1 - b1**self.t))


def _affine_reference(torch, reg, f_img, stats, pts, c, level_mm):
    """Largest |gradient| of the loss w.r.t. the linear part and the translation when the
    fixed image is matched against itself shifted by one voxel along z."""
    lin = torch.zeros(3, 3, device=f_img.device, requires_grad=True)
    trans = torch.zeros(3, device=f_img.device, requires_grad=True)
    y = c + torch.einsum("ij,j...->i...", torch.eye(3, device=f_img.device) + lin, pts - c)
    y = y + trans.view(3, 1, 1, 1)
    with torch.no_grad():
        b = torch.roll(f_img, 1, dims=2)
        slope = torch.stack(torch.gradient(b[0, 0], spacing=level_mm))[None]
    warped = b + ((y - y.detach())[None] * slope).sum(1, keepdim=True)
    (1.0 - reg.lncc(stats, warped)).backward()
    return (max(float(lin.grad.abs().max()), 1e-12), max(float(trans.grad.abs().max()), 1e-12))


def _whole_blocks(box, shape, period):
    """The crop grown (or, at the image's edge, trimmed) to a whole number of ``period``
    voxels per axis: no partial block at its end, whose average the moving image's pyramid
    would not share."""
    out = []
    for b, n in zip(box, shape, strict=True):
        size = b.stop - b.start
        want = -(-size // period) * period
        stop = b.start + want
        if stop > n:
            stop = b.start + (size // period) * period if size >= period else n
        out.append(slice(b.start, stop))
    return tuple(out)


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("torch backend: device='cuda' but no CUDA device is available; "
                         "use device='cpu' or 'auto'")  # fmt: skip
    return torch.device(device)


class _Registration:
    """Grids and operators shared by the affine and deformable stages of one registration."""

    def __init__(self, torch, dev, sp, start, crop_n, centre, *, window, shape, eps,
                 moving_start=(0, 0, 0)):  # fmt: skip
        self.torch = torch
        self.F = torch.nn.functional
        self.dev = dev
        self.sp = sp
        self.start = start
        self.crop_n = crop_n
        self.centre = centre
        self.window = int(window)
        self.eps = float(eps)
        self.tiny = 1e-12  # only keeps 0 / 0 finite; larger values bias the optimum off b ~ a
        self.shape = shape
        self.moving_start = torch.tensor(moving_start, dtype=torch.float32, device=dev)
        self._box = torch.ones(1, 1, self.window, device=dev) / self.window

    # -- pyramid and grids
    def pool(self, image, factor):
        if factor == 1:
            return image
        return self.F.avg_pool3d(image, factor, factor, ceil_mode=True)

    def points(self, factor, size):
        """mm (zyx, about full voxel 0) of the fixed-level crop voxels, (3, D, H, W)."""
        torch = self.torch
        axes = [
            (self.start[k] + (factor - 1) / 2 + factor * torch.arange(n, device=self.dev))
            * self.sp[k]
            for k, n in enumerate(size)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))

    def velocity_grid(self, factor, size):
        """Normalised (xyz, for grid_sample) positions of fixed-level crop voxels in the
        velocity grid, which spans the crop from its first to its last full-resolution voxel."""
        torch = self.torch
        axes = []
        for k, n in enumerate(size):
            idx = (factor - 1) / 2 + factor * torch.arange(n, device=self.dev, dtype=torch.float32)
            axes.append(2 * idx / max(self.crop_n[k] - 1, 1) - 1)
        g = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return g.flip(-1)[None]

    def taper(self, vshape, box, inner):
        """1 over the lung bounding box, a cosine ramp to 0 at the crop border (velocity grid)."""
        torch = self.torch
        out = torch.ones(vshape, device=self.dev)
        for k, m in enumerate(vshape):
            n = self.crop_n[k]
            pos = torch.linspace(0, n - 1, m, device=self.dev)  # crop voxel index
            lo = float(inner[k].start - box[k].start)
            hi = float(inner[k].stop - 1 - box[k].start)
            a = torch.clamp(pos / max(lo, 1e-6), 0, 1) if lo > 0 else torch.ones_like(pos)
            room = (n - 1) - hi
            b = torch.clamp(((n - 1) - pos) / room, 0, 1) if room > 0 else torch.ones_like(pos)
            ramp = 0.5 - 0.5 * torch.cos(math.pi * torch.minimum(a, b))
            shp = [1, 1, 1]
            shp[k] = m
            out = out * ramp.view(shp)
        return out[None, None]

    def reference_gradient(self, f_img, stats, grid_f, factor, vshape, taper, gkernel, level_mm):
        """The largest smoothed velocity-grid gradient that a one-voxel shift (along z) of the
        fixed image against itself produces: the scale of "a voxel out of register" at this
        level (one iteration's cost)."""
        torch = self.torch
        out = []
        for axis in (0,):  # one axis: the lung's texture is about isotropic
            disp = torch.zeros(1, 3, *vshape, device=self.dev, requires_grad=True)
            w = self.upsample(disp, grid_f, factor)
            with torch.no_grad():
                b = torch.roll(f_img, 1, dims=2 + axis)
                slope = torch.stack(torch.gradient(b[0, 0], spacing=level_mm))[None]
            warped = b + (w * slope).sum(1, keepdim=True)
            (1.0 - self.lncc(stats, warped)).backward()
            with torch.no_grad():
                g = disp.grad * taper
                if gkernel is not None:
                    g = _smooth(torch, g, gkernel)
                out.append(g.square().sum(1).sqrt().amax())
        return torch.stack(out).mean().clamp(min=1e-12)

    # -- transforms
    def moving_grid(self, m_img, factor, pts, lin, trans):
        """Where A(pts) falls in the moving level image, normalised for grid_sample.

        Returns ``base`` (1, D, H, W, 3) (x, y, z order) and ``to_grid`` (3, 3), such that a
        displacement w (mm, zyx, channels last) moves the sample to ``base + w @ to_grid``.
        """
        torch = self.torch
        mat = torch.eye(3, device=self.dev) + lin
        c = self.centre.view(3, 1, 1, 1)
        y = c + torch.einsum("ij,j...->i...", mat, pts - c) + trans.view(3, 1, 1, 1)
        n = torch.tensor(m_img.shape[2:], device=self.dev, dtype=torch.float32)
        scale = 2.0 / (self.sp * factor * (n - 1).clamp(min=1))  # mm -> normalised, per axis
        # pooled voxel j of the moving image (which starts at full voxel ``moving_start``) is
        # centred at full voxel moving_start + factor j + (factor - 1) / 2
        offset = 2 * (-self.moving_start - (factor - 1) / 2) / (factor * (n - 1).clamp(min=1)) - 1
        norm = y * scale.view(3, 1, 1, 1) + offset.view(3, 1, 1, 1)
        base = norm.permute(1, 2, 3, 0).flip(-1)[None]
        to_grid = (mat * scale.view(3, 1)).T.flip(-1)  # w_zyx @ to_grid -> xyz normalised
        return base, to_grid

    def upsample(self, disp, grid_f, factor):
        """The velocity-grid displacement at the level's crop voxels (trilinear)."""
        if factor == 1:  # the velocity grid spans the crop corner to corner
            return self.F.interpolate(disp, size=self.crop_n, mode="trilinear", align_corners=True)
        return self.F.grid_sample(
            disp, grid_f, mode="bilinear", padding_mode="border", align_corners=True
        )

    def sample(self, m_img, grid):
        return self.F.grid_sample(
            m_img, grid, mode="bilinear", padding_mode="border", align_corners=True
        )

    def exp(self, vel, vspacing, squarings):
        """Scaling and squaring: the displacement (mm) of exp(v) on the velocity grid.

        At least ``squarings`` steps, and as many more (up to 12) as it takes for the first
        step's largest vector to be at most half a velocity-grid voxel, the condition for
        each composition to stay invertible. (Six fixed steps were a third of an iteration's
        cost; on real CT at 2 mm, two plus this rule gave the same fields to 4 decimals.)
        """
        torch = self.torch
        shape = vel.shape[2:]
        scale = (2.0 / ((torch.tensor(shape, device=self.dev) - 1) * vspacing)).view(1, 3, 1, 1, 1)
        largest = float((vel / vspacing.view(1, 3, 1, 1, 1)).square().sum(1).sqrt().amax())
        need = math.ceil(math.log2(largest / 0.5)) if largest > 0.5 else 0
        squarings = min(12, max(int(squarings), need))
        ident = self._identity(tuple(shape))
        disp = vel / (2**squarings)
        for _ in range(squarings):
            grid = ident + (disp * scale).permute(0, 2, 3, 4, 1).flip(-1)
            disp = disp + self.F.grid_sample(
                disp, grid, mode="bilinear", padding_mode="border", align_corners=True
            )
        return disp

    def _identity(self, shape):
        torch = self.torch
        axes = [torch.linspace(-1, 1, n, device=self.dev) for n in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)[None]

    # -- similarity
    def fixed_stats(self, a):
        """Local mean and variance of the fixed image (constant during optimisation)."""
        with self.torch.no_grad():
            m = _box_filter(self.torch, self.torch.cat([a, a * a], dim=1), self.window)
            ma, maa = m[:, :1], m[:, 1:]
            va = (maa - ma * ma).clamp(min=0)
            # a weight from the fixed image alone: windows flatter than the floor count less.
            # It must not depend on the moving image, or the optimum moves off b ~ a.
            weight = va * va / (va * va + self.eps)
            return a, ma, va, weight

    def lncc(self, stats, b, seen=None):
        """Mean squared local correlation of the fixed image (``stats``) and ``b``, each window
        weighted by the fixed image's local variance against the floor; with ``seen`` (where the
        moving scan imaged each point, in [0, 1]), windows not wholly imaged count for nothing."""
        a, ma, va, weight = stats
        parts = [b, b * b, a * b] if seen is None else [b, b * b, a * b, seen.detach()]
        m = _box_filter(self.torch, self.torch.cat(parts, dim=1), self.window)
        mb, mbb, mab = m[:, :1], m[:, 1:2], m[:, 2:3]
        cov = mab - ma * mb
        vb = (mbb - mb * mb).clamp(min=0)
        if seen is not None:
            # only windows the follow-up imaged whole: a window reaching past the end of its
            # field of view (air or padding there) would match the lungs against that edge
            weight = weight * (m[:, 3:] > 0.999)
        r2 = cov * cov / (va * vb + self.tiny)
        cc = weight * r2
        self.local = cc.detach()  # the adaptive smoothing's gate (register's loop)
        self.r2, self.weight = r2.detach(), weight.detach()  # the quality's (register's loop)
        return cc.mean()


def _density_gate(torch, reg, raw_pair, factor, pts, lin, trans, w, lung, level_mm, gate_hu):
    """Where the follow-up's density changed: in [0, 1], 1 where its local mean (a Gaussian of
    ``QUALITY_DENSITY_MM``, through the current map) differs from the baseline's by
    ``gate_hu`` or more, less the lungs' median difference (another inspiration changes the
    whole lung's density, not a zone's). Computed once per level, from the intensities."""
    with torch.no_grad():
        fr, mr = reg.pool(raw_pair[0], factor), reg.pool(raw_pair[1], factor)
        base, to_grid = reg.moving_grid(mr, factor, pts, lin, trans)
        warped = reg.sample(mr, base + w[0].permute(1, 2, 3, 0) @ to_grid)
        d = _smooth(torch, warped - fr, _gauss_kernels(torch, QUALITY_DENSITY_MM / float(
            np.mean(level_mm))))  # fmt: skip
        if lung is not None and bool((lung > 0.5).any()):
            d = d - d[lung > 0.5].median()
        return (d.abs() * ((HU_RANGE[1] - HU_RANGE[0]) / gate_hu)).clamp(0.0, 1.0)


def _quality_pull(torch, reg, w, kernel, level_mm, lung=None, gate=None):
    """The term that takes out the match quality's pull (``quality_sigma_mm``).

    Local NCC^2 rewards a window for reading the follow-up from wherever it matches better:
    next to a zone that the follow-up shows worse than the baseline (dense disease: new
    texture, cysts, vessels and pleura losing their contrast), the windows at its edge read
    the follow-up from outside the zone, so the zone's shrinkage is under-read, even with the
    images in register (lung1 at 2 mm, +450 HU and cysts, started from the true map: the
    region drifted by +0.055 of a true -0.26). ``q``, the quality, is the lung's local NCC^2
    averaged over ``kernel`` (each window weighted as in the similarity), taken to belong to
    the follow-up near x + w(x); the term's gradient is ``cc * grad log q``, which cancels
    the part of the similarity's gradient that comes from q's slope, not from the windows'
    own alignment. It is 0 where q is flat: a scan against itself (q = 1) stays exact.

    The pull to take out is the part of q that belongs to the follow-up alone. Where both
    scans show the same anatomy, q also varies with it (from the lungs' vessels to the flat
    chest wall, from the core to the rind), in both alike, and the raw similarity pulls by only
    half that slope; taking out all of it read the synthetic cohort's rind as expansion and
    its core as shrinkage in every patient (+0.002 and -0.003). So with ``lung`` (the
    baseline's lung fraction of each voxel of the level) q is the lungs' alone, and with
    ``gate`` (``_density_gate``) the term acts only where the follow-up's density changed,
    which is where it shows the zone worse than the baseline does.
    """
    with torch.no_grad():
        weight = reg.weight if lung is None else reg.weight * lung
        q = _smooth(torch, reg.r2 * weight, kernel)
        q = (q / _smooth(torch, weight, kernel).clamp(min=1e-6)).clamp(min=QUALITY_FLOOR)
        slope = torch.stack(torch.gradient(q.log()[0, 0], spacing=level_mm))[None]
        cc = reg.local if lung is None else reg.local * lung
        if gate is not None:
            cc = cc * gate
    return (cc * ((w - w.detach()) * slope).sum(1, keepdim=True)).mean()


def _box_filter(torch, x, k):
    """Separable moving average of width ``k`` over the last three axes (edge replicated)."""
    r = k // 2
    x = torch.nn.functional.pad(x, (r, r, r, r, r, r), mode="replicate")
    return _box_valid(torch).apply(x, k)


def _box_sum(torch, x, k, pad):
    """Separable mean of width ``k`` over the last three axes, after zero padding ``pad`` per
    side ('valid' otherwise)."""
    if pad:
        x = torch.nn.functional.pad(x, (pad,) * 6)
    return _separable(x, [1.0 / k] * k)


def _separable(x, taps):
    """Correlate the last three axes of ``x`` with the 1-D ``taps`` (floats), 'valid' mode.

    As sums of shifted views rather than depthwise ``conv3d``: on CPU PyTorch's depthwise
    3-D convolution was 2 (box of 5, full-size level) to 9 (Gaussian of 13 taps, velocity grid)
    times slower than these additions, and it was half of a registration's time. Same result
    up to float rounding.
    """
    k = len(taps)
    for dim in (2, 3, 4):
        n = x.shape[dim] - k + 1
        acc = x.narrow(dim, 0, n) * taps[0]
        for i in range(1, k):
            acc.add_(x.narrow(dim, i, n), alpha=taps[i])
        x = acc
    return x


_BOX = []


def _box_valid(torch):
    """An autograd function: the 'valid' box mean, whose backward pass is the same box mean of
    the zero-padded gradient (the filter is symmetric). conv3d's own backward for depthwise
    kernels is several times slower than its forward on CPU."""
    if not _BOX:

        class BoxValid(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, k):
                ctx.k = k
                return _box_sum(torch, x, k, 0)

            @staticmethod
            def backward(ctx, g):
                return _box_sum(torch, g, ctx.k, ctx.k - 1), None

        _BOX.append(BoxValid)
    return _BOX[0]


def _gauss_kernels(torch, sigma):
    """The normalised 1-D Gaussian taps (floats, radius 3 sigma), or None for ``sigma`` 0."""
    if sigma <= 0:
        return None
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).tolist()


def _smooth(torch, x, g):
    """Separable Gaussian (taps ``g``) over the last three axes of (1, C, D, H, W), edge
    replicated."""
    r = (len(g) - 1) // 2
    x = torch.nn.functional.pad(x, (r, r, r, r, r, r), mode="replicate")
    return _separable(x, g)


def _detrend(torch, x, g, seen=None):
    """``x`` (1, 1, D, H, W) less its Gaussian mean (taps ``g``): the local level of density
    taken out, its structure kept. With ``seen`` (the same shape, in [0, 1]), the mean is of
    the imaged voxels only (normalised convolution)."""
    if seen is None:
        return (x - _smooth(torch, x, g)).contiguous()
    m = _smooth(torch, torch.cat([x * seen, seen], dim=1), g)
    return (x - m[:, :1] / m[:, 1:].clamp(min=1e-3)).contiguous()


def _filter(torch, x, g, order):
    """``x`` smoothed by the Gaussian taps ``g`` (order 1), or by 2 G - G G (order 2: 1 - (1 -
    G)^2, flatter in the pass band)."""
    once = _smooth(torch, x, g)
    return 2.0 * once - _smooth(torch, once, g) if order == 2 else once


def _filter_increment(torch, inc, wide, sharp, order, logj, vspacing, gate=None):
    """A level's velocity increment (1, 3, D, H, W) mm, regularised: smoothed by ``wide`` (the
    taps of ``velocity_sigma_mm``) where the change it makes is weak, by ``sharp`` (of
    ``adaptive_sigma_mm``; None: not at all) where it is strong (``logj`` 0: nowhere).

    The change is the divergence of the widely smoothed increment (its log-Jacobian to first
    order): the weight of the sharp filter rises from 0 at ``|div| = logj`` to 1 at twice
    that, then is smoothed by ``wide`` itself so that it changes over the same distances as
    the field. Noise in a pair without change stays below ``logj`` and is smoothed as wide as
    ever, while a narrow, strong change (a region of 10 mm shrinking by a fifth) is no longer
    spread over the wide filter's reach: the choice of the widest smoothing that the data do
    not contradict, as in adaptive-bandwidth (Lepski) estimation. ``gate`` (1, 1, D, H, W) in
    [0, 1], where given, multiplies that weight: where the images do not match locally (dense
    disease, new structure) the field stays as smooth as ever. Measured in
    benchmarks/NOTES.md, "Narrow sinks kept narrow".
    """
    smooth = _filter(torch, inc, wide, order)
    if not logj:
        return smooth
    div = _divergence(torch, smooth, vspacing)
    weight = (div.abs() / logj - 1.0).clamp(0.0, 1.0)
    if gate is not None:
        weight = weight * gate
    if float(weight.amax()) == 0.0:  # no strong change (a pair in register)
        return smooth
    weight = _smooth(torch, weight, wide).clamp(0.0, 1.0)
    narrow = inc if sharp is None else _filter(torch, inc, sharp, order)
    return smooth + weight * (narrow - smooth)


def _divergence(torch, v, vspacing):
    """div v (1, 1, D, H, W) of a (1, 3, D, H, W) field (mm, components z, y, x) on a grid of
    ``vspacing`` mm (central differences, one-sided at the edges)."""
    sp = [float(x) for x in vspacing]
    return sum(torch.gradient(v[0, i], spacing=sp[i], dim=i)[0] for i in range(3))[None, None]


def _diffusion(v):
    """Mean squared forward difference of a (1, 3, D, H, W) field (per voxel units)."""
    dz = v[:, :, 1:] - v[:, :, :-1]
    dy = v[:, :, :, 1:] - v[:, :, :, :-1]
    dx = v[..., 1:] - v[..., :-1]
    return (dz * dz).mean() + (dy * dy).mean() + (dx * dx).mean()
