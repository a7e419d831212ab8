"""Writing a synthetic cohort: images in three formats, the manifest, and the truth.

Layout under ``out_dir`` with two scans per patient (the default; contract)::

    manifest.csv                 one row per patient, paths relative to out_dir
    images/<pid>/baseline.nii.gz | baseline.mha | baseline/ (DICOM series), same for followup
    truth/truth.csv              planted and realised per-patient values
    truth/cohort.json            generator version, seed, spacing, n, group counts, Spearman rhos
    truth/<pid>/displacement.mha (vector, ITK x-y-z components), log_jacobian.mha, lung.mha,
                 lung_followup.mha, region.mha

The follow-up is the baseline anatomy (with follow-up disease density) warped by the known
field, plus new scanner noise: ``followup(x + u(x)) = baseline(x) + delta_density(x) + noise``.

With ``timepoints=N >= 3`` scans per patient (contract)::

    manifest.csv                 one row per scan, in time order: patient_id, timepoint (0..N-1),
                                 scan (path relative to out_dir), months (since timepoint 0),
                                 fvc, dlco, tlc, kco, visual (empty at timepoint 0, else the
                                 label of the change since the previous scan), age, sex
    images/<pid>/t<k>.nii.gz | t<k>.mha | t<k>/ (DICOM series), k = 0 .. N-1
    truth/<pid>/                 the truth of the pair (0, 1), unit id <pid>: the five files above
    truth/<pid>/pairs/<a>-<b>/   the truth of every other pair a < b, unit id <pid>/pairs/<a>-<b>
                                 (:func:`pair_unit_id`): the same five files
    truth/pairs.csv              one row per pair: patient_id, t0, t1, unit_id, months,
                                 mean_logjac (over the lung of scan a), region_mean_logjac,
                                 logjac_per_year (= mean_logjac * 12 / months), min_det_jacobian
    truth/truth.csv              per patient, first to last scan (as for two scans), acquisition
                                 columns t<k>_* per scan
    truth/cohort.json            as for two scans, with ``timepoints: N``

A pair's five files mean what they mean for (0, 1), with scan a as the baseline and scan b as
the follow-up: ``displacement`` lives on scan a's physical space (a canonical grid covering the
generator's grid as scan a's patient position moved it; the generator's grid for a = 0), and
``x + u(x)`` is the point of scan b showing the tissue scan a shows at ``x`` (mm);
``log_jacobian`` is log det(I + grad u) of it; ``lung`` and ``region`` are scan a's lung and
planted region there; ``lung_followup`` is scan b's lung on scan b's own grid.
:func:`read_truth` reads any of them by unit id. The disease progresses at a constant rate
(:class:`Progression`): the change from scan 0 to scan k is the planned first-to-last change
taken for the fraction months_k / months_(N-1) of the time, so the PFTs are linear in time and
every pair's truth is exact, made from the flow itself, never from another pair's field.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from sscflow.core.geometry import Geometry, from_itk, resample, to_itk
from sscflow.core.imageio import deterministic_uid, write_dicom_series, write_volume
from sscflow.synth import deform, phantom
from sscflow.synth.plan import FORMATS, TARGET_RHO, patient_streams, plan_cohort, spearman

GENERATOR_VERSION = "2"  # 2: each scan its own acquisition
MAX_SPACING = 6.0
MANIFEST_COLUMNS = [
    "patient_id", "baseline", "followup",
    "fvc_baseline", "fvc_followup", "dlco_baseline", "dlco_followup",
    "tlc_baseline", "tlc_followup", "kco_baseline", "kco_followup",
    "visual", "interval_months", "age", "sex",
]  # fmt: skip
SUFFIX = {"nifti": ".nii.gz", "mha": ".mha", "dicom": ""}
PSF_MM = 0.6
NOISE_SMOOTH_VOX = 0.5
TRUTH_FILES = ("displacement", "log_jacobian", "lung", "lung_followup", "region")
MAX_TIMEPOINTS = 12  # months of 0.1 stay distinct (steps >= 0.4 months), pairs stay few (66)
#: the long manifest of a cohort with three or more scans per patient, one row per scan
SERIES_MANIFEST_COLUMNS = ["patient_id", "timepoint", "scan", "months", "fvc", "dlco", "tlc",
                           "kco", "visual", "age", "sex"]  # fmt: skip
#: truth/pairs.csv, one row per pair of scans of a patient (every a < b)
PAIRS_COLUMNS = ["patient_id", "t0", "t1", "unit_id", "months", "mean_logjac",
                 "region_mean_logjac", "logjac_per_year", "min_det_jacobian"]  # fmt: skip


def _check_spacing(spacing) -> float:
    try:
        h = float(spacing)
    except (TypeError, ValueError):
        raise ValueError(f"synth: spacing must be a number of mm, got {spacing!r}") from None
    if not 0 < h <= MAX_SPACING:
        raise ValueError(
            f"synth: spacing must be in (0, {MAX_SPACING:g}] mm, got {spacing!r}; "
            "use e.g. 2.5 (demo) or 1.0 (full resolution)"
        )
    return h


@dataclass
class Simulation:
    """Everything made for one patient (arrays on the baseline grid unless noted)."""

    geometry: Geometry
    record: dict
    deformation: deform.Deformation
    lung: np.ndarray  # bool
    lung_followup: np.ndarray  # bool, follow-up grid
    region: np.ndarray  # bool
    baseline: np.ndarray | None = None  # int16 HU
    followup: np.ndarray | None = None  # int16 HU
    world: Geometry | None = None  # the images' grid when made with images="world"


@dataclass
class _Prepared:
    """The first half of a patient, shared by every number of timepoints: the phantom on its
    world grid, the planted sinks, the first-to-last field and the disease densities."""

    h: float
    streams: dict
    geometry: Geometry
    world: Geometry
    mz: int  # the world grid's extra slices below (and above) the generator's grid
    crop: slice  # the generator's grid inside the world grid, along z
    anatomy: object
    ph: object  # phantom.render_baseline's result, on the world grid
    lung: np.ndarray  # bool, generator grid
    sinks: list  # the two planted sinks (zero strength for a stable patient)
    active: list  # the sinks that act (none for a stable patient)
    field: deform.Deformation  # first to last, generator grid
    d_base: np.ndarray | None  # disease density (HU) at the first scan, world grid
    d_follow: np.ndarray | None  # ... at the last scan
    bump: np.ndarray  # the sinks' divergence profile, world grid
    region: np.ndarray  # bool, generator grid


def _prepare(row, h: float, seed: int, *, ribs: bool = True) -> _Prepared:
    index = int(row["index"])
    streams = patient_streams(seed, index)
    geometry = phantom.grid_geometry(h)
    axes = phantom.frame_axes(geometry)
    world, mz = phantom.world_geometry(geometry)
    crop = slice(mz, mz + geometry.shape[0])
    anatomy = phantom.draw_anatomy(streams["anatomy"])
    vessels = phantom.grow_vessels(anatomy, streams["vessels"])
    ph = phantom.render_baseline(anatomy, vessels, world, streams["texture"], ribs=ribs)
    lung = ph.lung[crop]

    sinks = []
    for side, lung_shape in zip(("r", "l"), anatomy.lungs, strict=True):
        centre = anatomy.sink_centre(
            lung_shape,
            row[f"sink_fy_{side}"],
            row[f"sink_fx_{side}"],
            row[f"sink_above_mm_{side}"],
        )
        sinks.append(
            deform.Sink(tuple(centre), float(row[f"sink_sigma_mm_{side}"]),
                        float(row["regional_strength"]))
        )  # fmt: skip
    strength = float(row["regional_strength"])
    active = sinks if strength != 0.0 else []
    field = deform.build_deformation(
        geometry,
        axes,
        lung,
        centre=anatomy.lung_centre(),
        sinks=active,
        planned_mean=float(row["planned_mean_logjac"]),
        rotation_axis=[row[f"rotation_axis_{k}"] for k in "zyx"],
        rotation_deg=float(row["rotation_deg"]),
        translation=[row[f"translation_{k}_mm"] for k in "zyx"],
    )
    d_base, d_follow, bump = deform.density_fields(
        ph.parenchyma,
        phantom.frame_axes(world),
        sinks,
        streams["texture"],
        h,
        ild_hu=float(row["baseline_ild_hu"]),
        extra_hu=float(row["baseline_extra_hu"]),
        change_hu=float(row["density_change_hu"]),
        fibrosis_margin=ph.fibrosis_margin,  # the subpleural fibrosis grows when worsening
    )
    region = lung & (bump[crop] > 0.5) if active else np.zeros_like(lung)
    return _Prepared(h, streams, geometry, world, mz, crop, anatomy, ph, lung, sinks, active,
                     field, d_base, d_follow, bump, region)  # fmt: skip


def _sink_record(sinks) -> dict:
    """The sinks' centres, physical mm."""
    record = {}
    for side, s in zip(("r", "l"), sinks, strict=True):
        centre = np.asarray(s.centre) + np.asarray(phantom.FOV_CENTRE)
        for k, v in zip("zyx", centre, strict=True):
            record[f"sink_{k}_mm_{side}"] = round(float(v), 2)
    return record


def _psf(image, h: float):
    """The scanner's blur: a Gaussian of PSF_MM; below 0.3 voxel the 3-tap kernel is an identity
    to 1e-3, so it is skipped."""
    blur = PSF_MM / h
    return ndimage.gaussian_filter(image, blur, mode="nearest") if blur >= 0.3 else image


def simulate(
    row, spacing: float, seed: int, *, ribs: bool = True, noise_hu: float = 20.0, images=True
) -> Simulation:
    """Make one patient in memory: a pure function of (plan row, spacing, seed).

    With ``images=False`` only the truth (fields, masks, record) is made, which is what tests
    of the planted statistics need. With ``images="world"`` the two images are the noise-free
    phantom on its world grid (``sim.world``), the follow-up's density but not yet warped,
    for :func:`_acquire` to image each in one interpolation.
    """
    h = _check_spacing(spacing)
    p = _prepare(row, h, seed, ribs=ribs)
    geometry, field, lung, region, crop, ph = p.geometry, p.field, p.lung, p.region, p.crop, p.ph
    d_base, d_follow = p.d_base, p.d_follow
    p.d_base = p.d_follow = None
    offset = (p.mz, 0, 0)
    lung_fu = deform.warp(ph.lung.astype(np.float32), field.inverse, geometry, offset=offset)
    lung_fu = lung_fu >= 0.5

    delta = d_follow[crop] - d_base[crop]
    record = _record(row, geometry, lung, lung_fu, region, field, delta)
    record["inverse_error_mm"] = _inverse_error(field, geometry, lung)
    record.update(_sink_record(p.sinks))
    sim = Simulation(geometry, record, field, lung, lung_fu, region)
    if not images:
        return sim

    base = _psf(ph.hu + d_base, h)
    follow = _psf(ph.hu + d_follow, h)
    del d_base, d_follow
    if images == "world":
        sim.baseline, sim.followup, sim.world = base, follow, p.world
        return sim
    base = base[crop]
    follow = deform.warp(follow, field.inverse, geometry, offset=offset, order=3)
    sim.baseline = _to_hu(base, p.streams["noise_baseline"], noise_hu)
    sim.followup = _to_hu(follow, p.streams["noise_followup"], noise_hu)
    return sim


def _to_hu(image: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """Add slightly smoothed Gaussian noise of s.d. ``noise_hu``; round and clip to int16 HU."""
    if noise_hu > 0:
        image = image + float(noise_hu) * phantom.smooth_noise(rng, image.shape, NOISE_SMOOTH_VOX)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _record(row, geometry, lung, lung_fu, region, field, delta) -> dict:
    vox = geometry.voxel_volume_ml
    lj = field.log_jacobian
    strength = float(row["regional_strength"])
    extreme = float("nan")
    if region.any():
        extreme = float(lj[region].min() if strength < 0 else lj[region].max())
    return {
        "patient_id": row["patient_id"],
        "index": int(row["index"]),
        "format": row["format"],
        "visual": row["visual"],
        "functional": row["functional"],
        "planned_mean_logjac": float(row["planned_mean_logjac"]),
        "realised_mean_logjac": float(lj[lung].mean(dtype=np.float64)),
        "global_log_volume_change": field.log_volume,
        "local_mean_logjac": field.local_mean,
        "regional_strength": strength,
        "regional_target": float(row["regional_target"]),
        "realised_extreme_logjac": extreme,
        "min_det_jacobian": field.min_det,
        "density_change_hu": float(row["density_change_hu"]),
        "density_change_mean_hu": float(delta[region].mean()) if region.any() else 0.0,
        "baseline_ild_hu": float(row["baseline_ild_hu"]),
        "region_volume_ml": float(region.sum() * vox),
        "lung_volume_ml": float(lung.sum() * vox),
        "lung_volume_followup_ml": float(lung_fu.sum() * vox),
        "spacing_mm": geometry.spacing[0],
    }


def _inverse_error(field: deform.Deformation, geometry: Geometry, lung, step: int = 3) -> float:
    """max |u(x) + inverse(x + u(x))| (mm) over every ``step``-th lung voxel: phi^-1 o phi - id."""
    idx = np.argwhere(lung)[::step]
    if idx.size == 0:
        return 0.0
    u = field.displacement[:, idx[:, 0], idx[:, 1], idx[:, 2]]
    at = idx.T + u / np.asarray(geometry.spacing)[:, None]
    back = np.stack(
        [ndimage.map_coordinates(field.inverse[k], at, order=1, mode="nearest") for k in range(3)]
    )
    return float(np.abs(u + back).max())


def _follow_date(months: float) -> str:
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=int(round(float(months) * 30.44)))
    return day.strftime("%Y%m%d")


def _write_image(array, geometry, path: Path, fmt: str, *, pid, seed, which, date, series=None):
    image = to_itk(array, geometry)
    if fmt == "dicom":
        if path.exists():
            shutil.rmtree(path)
        write_dicom_series(
            image,
            path,
            patient_id=pid,
            patient_name=f"SYNTHETIC^{pid}",
            series_uid=deterministic_uid(seed, pid, which),
            study_uid=deterministic_uid(seed, pid, which, "study"),
            series_description=f"sscflow synthetic {which}",
            study_date=date,
            birth_date="",
            series_number=series if series is not None else (1 if which == "baseline" else 2),
        )
    else:  # the slice thickness where dcm2niix would put it (DICOM: SliceThickness, above)
        write_volume(image, path, slice_thickness_mm=image.GetSpacing()[2])


def synthesize_patient(
    row,
    out_dir,
    *,
    spacing: float,
    seed: int,
    fmt: str,
    ribs: bool = True,
    noise_hu: float = 20.0,
    acquisitions: bool = True,
    timepoints: int = 2,
) -> dict:
    """Make one patient's scans and truth files under ``out_dir``.

    Parameters
    ----------
    row : a row of :func:`plan_cohort` (pandas Series or dict)
    out_dir : cohort folder; writes ``images/<pid>/`` and ``truth/<pid>/``
    spacing : isotropic voxel size in mm, in (0, 6]
    seed : the cohort seed (the patient's streams come from ``SeedSequence([seed, index])``)
    fmt : ``nifti``, ``mha`` or ``dicom``
    ribs : draw ribs, sternum and spine
    noise_hu : s.d. of the scanner noise added to each scan (0 for none; with acquisitions,
        each scan's is 0.75-1.25 times this)
    acquisitions : each scan on its own grid with its own field of view, direction, slice
        thickness and patient position (:func:`draw_acquisitions`); False writes both scans on
        the generator's grid, the patient unmoved
    timepoints : scans per patient: 2 (baseline and follow-up) or 3 to
        :data:`MAX_TIMEPOINTS` (scans ``t0`` ... in time order, the truth of every pair; the
        module docstring gives the layout)

    Returns
    -------
    dict: for two scans, the manifest fields (image paths relative to ``out_dir``) and the truth
    record; for more, the truth record (first to last scan) with ``scans`` (the rows of the long
    manifest) and ``pairs`` (the rows of truth/pairs.csv).

    Raises
    ------
    ValueError for a spacing outside (0, 6] mm, an unknown ``fmt`` or a number of timepoints
    outside [2, MAX_TIMEPOINTS].
    """
    if fmt not in FORMATS:
        raise ValueError(f"synth: fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    n = _check_timepoints(timepoints)
    out = Path(out_dir)
    pid = str(row["patient_id"])
    # on a Dask worker, the ~1 GB of short-lived arrays of a patient reuse the heap
    # (sscflow.flow.cluster.keep_freed_memory, set on every sscflow worker)
    if n > 2:
        return _synthesize_series(row, out, pid, spacing, seed, fmt, ribs, noise_hu,
                                  acquisitions, n)  # fmt: skip
    return _synthesize_patient(row, out, pid, spacing, seed, fmt, ribs, noise_hu,
                               acquisitions)  # fmt: skip


def _check_timepoints(timepoints) -> int:
    if isinstance(timepoints, bool) or int(timepoints) != timepoints or not (
            2 <= timepoints <= MAX_TIMEPOINTS):  # fmt: skip
        raise ValueError(f"synth: timepoints must be a whole number in [2, {MAX_TIMEPOINTS}], "
                         f"got {timepoints!r}")  # fmt: skip
    return int(timepoints)


def draw_acquisitions(rng: np.random.Generator, geometry: Geometry, lung, lung_fu, h: float,
                      phases: np.random.Generator | None = None):  # fmt: skip
    """Each scan its own acquisition, as real scans of one patient are: grid spacing (in-plane
    0.86-1.14 h, slices 0.9-1.8 h, one scan in eight with thick slices of max(2.5, 2 h) or
    5 mm), field of view (0-40 mm beyond the lungs at the apex and at the base, the body
    in-plane), a direction other than the identity in a third of the files (RAS-like, a 180
    degree turn about z, or an oblique tilt of up to 8 degrees), and for the follow-up a new
    patient position (rotation up to 5 degrees about any axis, table shift up to 60 mm along z
    and 15 mm in-plane). Each grid starts at a random fraction of a voxel (``phases``, a
    generator of its own so that the other draws stay as they were): the generator's lattice
    is no scanner's. Returns ``{which: dict(grid, matrix, offset, noise_scale, ...)}``.
    """
    centre = _lung_centre(geometry, lung, h)
    out = {}
    for which, mask in (("baseline", lung), ("followup", lung_fu)):
        phase = None if phases is None else phases.uniform(0.0, 1.0, 3)
        out[which] = _draw_acquisition(rng, which, mask, geometry, centre, h,
                                       moved=which == "followup", phase=phase)  # fmt: skip
    return out


def _lung_centre(geometry: Geometry, lung, h: float) -> np.ndarray:
    """Physical (z, y, x) mm of the lung's centroid (the grid's centre when there is none)."""
    axes = [geometry.origin[k] + np.arange(n) * geometry.spacing[k]
            for k, n in enumerate(geometry.shape)]  # fmt: skip
    idx = np.argwhere(np.asarray(lung, bool))
    return np.array([axes[k][idx[:, k]].mean() for k in range(3)]) if len(idx) else (
        np.asarray(geometry.origin) + np.asarray(geometry.shape) * h / 2)  # fmt: skip


def _draw_acquisition(rng: np.random.Generator, which: str, mask, geometry: Geometry, centre,
                      h: float, *, moved: bool, phase=None) -> dict:  # fmt: skip
    """One scan's acquisition (:func:`draw_acquisitions`); ``moved``: a new patient position
    about ``centre`` (physical mm), else the patient as on the generator's grid; ``phase``:
    the grid's start, in fractions of a voxel (``planted.acquisition_grid``)."""
    from sscflow.synth import planted

    if moved:
        axis = rng.normal(size=3)
        degrees = float(rng.uniform(0.0, 5.0))
        matrix = deform.rotation_matrix(axis, degrees)
        shift = np.array([rng.uniform(-60, 60), rng.uniform(-15, 15), rng.uniform(-15, 15)])
        offset = centre - matrix @ centre + shift
    else:
        axis, degrees, matrix, shift = np.array([1.0, 0, 0]), 0.0, np.eye(3), np.zeros(3)
        offset = np.zeros(3)
    inplane = h * float(rng.uniform(0.86, 1.14))
    thick = rng.random() < 0.125
    slice_mm = (float(rng.choice([max(2.5, 2 * h), max(5.0, 2 * h)])) if thick
                else h * float(rng.uniform(0.9, 1.8)))  # fmt: skip
    kind = rng.choice(["identity", "identity", "ras", "oblique"])
    if kind == "ras":  # x and y reversed: a proper rotation (DICOM can store it)
        direction = np.diag([-1.0, -1.0, 1.0])
    elif kind == "oblique":
        tilt = deform.rotation_matrix(rng.normal(size=3), float(rng.uniform(2.0, 8.0)))
        direction = tilt[::-1, ::-1]  # zyx rotation -> ITK xyz direction
    else:
        direction = np.eye(3)
    margins = (float(rng.uniform(0, 40)), float(rng.uniform(0, 40)))
    grid = planted.acquisition_grid(mask, geometry, spacing=(slice_mm, inplane, inplane),
                                    margin_mm=margins, inplane_margin_mm=10.0,
                                    direction=direction, matrix=matrix, offset=offset,
                                    phase=phase)  # fmt: skip
    return {
        "grid": grid, "matrix": matrix, "offset": offset,
        "noise_scale": float(rng.uniform(0.75, 1.25)),
        "record": {
            f"{which}_slice_mm": round(slice_mm, 4),
            f"{which}_pixel_mm": round(inplane, 4),
            f"{which}_direction": str(kind),
            f"{which}_shape": "x".join(str(n) for n in grid.shape),
            f"{which}_rotation_deg": round(degrees, 3),
            **{f"{which}_shift_{k}_mm": round(float(v), 3)
               for k, v in zip("zyx", shift, strict=True)},
        },
    }  # fmt: skip


def _acquire(image, world: Geometry, geometry: Geometry, acq: dict, h: float,
             inverse=None, slab: int = 8, *, mask: bool = False) -> np.ndarray:  # fmt: skip
    """A noise-free scan on its acquisition grid, in one interpolation from the phantom.

    ``image`` is on the phantom's ``world`` grid (``geometry``, the generator's grid, extended
    along z); ``inverse`` (3, Z, Y, X) mm on ``geometry``, or None for the first scan's anatomy:
    the generator point y shows the world image at ``y + inverse(y)``. A grid point q of the
    acquisition shows the generator point ``y = R^-1 (q - o)``, so the scan samples the world
    image once, at ``y + inverse(y)`` (cubic B-spline), whatever the anatomy's change: every
    scan of a patient has the same interpolation blur (a warp on the generator's grid followed
    by the acquisition's resampling blurred the later scans more than the first). Slices thicker
    than the generator's grid are averaged over their thickness first (a Gaussian of that FWHM
    along z). Outside ``geometry``: air (-1024 HU). ``mask``: a 0/1 image (the lung), sampled
    linearly with no slice averaging and 0 outside, for a threshold at 0.5.
    """
    from sscflow.synth import planted

    src = np.asarray(image, np.float32)
    grid = acq["grid"]
    slice_mm = grid.spacing[0]
    if slice_mm > 1.5 * h and not mask:
        sigma = np.sqrt(max(slice_mm**2 - h**2, 0.0)) / 2.355 / h
        src = ndimage.gaussian_filter1d(src, sigma, axis=0, mode="nearest")
    order, fill = (1, 0.0) if mask else (3, -1024.0)
    return planted.render_on(src, world, grid, matrix=acq["matrix"], offset=acq["offset"],
                             order=order, fill=fill, inverse=inverse, frame=geometry,
                             slab=slab)  # fmt: skip


def _synthesize_patient(row, out, pid, spacing, seed, fmt, ribs, noise_hu,
                        acquisitions=True) -> dict:  # fmt: skip
    sim = simulate(row, spacing, seed, ribs=ribs, noise_hu=noise_hu,
                   images="world" if acquisitions else True)  # fmt: skip
    geom = sim.geometry
    grids = {"baseline": geom, "followup": geom}
    arrays = {"baseline": sim.baseline, "followup": sim.followup}
    displacement = sim.deformation.displacement
    lung_fu, fu_geom = sim.lung_followup.astype(np.uint8), geom
    if acquisitions:
        from sscflow.synth import planted

        streams = patient_streams(seed, int(row["index"]))
        rng = np.random.default_rng([int(seed), int(row["index"]), 12])  # the acquisitions
        acq = draw_acquisitions(rng, geom, sim.lung, sim.lung_followup, geom.spacing[0],
                                np.random.default_rng([int(seed), int(row["index"]), 14]))
        for which, inverse in (("baseline", None), ("followup", sim.deformation.inverse)):
            image = _acquire(arrays[which], sim.world, geom, acq[which], geom.spacing[0],
                             inverse)  # fmt: skip
            arrays[which] = _to_hu(image, streams[f"noise_{which}"],
                                   noise_hu * acq[which]["noise_scale"])  # fmt: skip
            grids[which] = acq[which]["grid"]
            sim.record.update(acq[which]["record"])
        f = acq["followup"]
        displacement = planted.moved_field(displacement, geom, f["matrix"], f["offset"])
        lung_fu = (planted.render_on(sim.lung_followup.astype(np.float32), geom, f["grid"],
                                     matrix=f["matrix"], offset=f["offset"], order=1,
                                     fill=0.0) >= 0.5).astype(np.uint8)  # fmt: skip
        fu_geom = f["grid"]

    rel = {}
    for which, date in (("baseline", "20200101"),
                        ("followup", _follow_date(row["interval_months"]))):  # fmt: skip
        rel[which] = f"images/{pid}/{which}{SUFFIX[fmt]}"
        _write_image(arrays[which], grids[which], out / rel[which], fmt, pid=pid, seed=seed,
                     which=which, date=date)  # fmt: skip

    write_truth(out / "truth" / pid, geom, displacement, sim.deformation.log_jacobian,
                 sim.lung, sim.region, lung_fu, fu_geom)  # fmt: skip

    manifest = {k: row[k] for k in MANIFEST_COLUMNS if k not in ("baseline", "followup")}
    manifest |= {"baseline": rel["baseline"], "followup": rel["followup"]}
    manifest = {k: _plain(manifest[k]) for k in MANIFEST_COLUMNS}
    return manifest | {k: _plain(v) for k, v in sim.record.items()}


# ---------------------------------------------------------------------- N >= 3 timepoints


def pair_unit_id(patient_id: str, a: int, b: int) -> str:
    """The unit id of the pair of scans (a, b) of a patient, and so its truth folder under
    ``truth/``: the patient id for (0, 1), else ``<pid>/pairs/<a>-<b>``.

    >>> pair_unit_id("SYN001", 0, 1), pair_unit_id("SYN001", 1, 3)
    ('SYN001', 'SYN001/pairs/1-3')
    """
    a, b = int(a), int(b)
    if not 0 <= a < b:
        raise ValueError(f"pair_unit_id: need 0 <= a < b, got ({a}, {b})")
    return str(patient_id) if (a, b) == (0, 1) else f"{patient_id}/pairs/{a}-{b}"


def series_months(interval_months: float, seed: int, index: int, timepoints: int) -> np.ndarray:
    """Months since the first scan of each of ``timepoints`` scans, one decimal: 0 first, the
    plan's ``interval_months`` last, the steps between drawn 0.75-1.25 times their mean from
    the patient's own stream (``[seed, index, 14]``)."""
    rng = np.random.default_rng([int(seed), int(index), 14])
    steps = rng.uniform(0.75, 1.25, int(timepoints) - 1)
    months = np.round(float(interval_months) * np.concatenate([[0.0], np.cumsum(steps)])
                      / steps.sum(), 1)  # fmt: skip
    months[-1] = round(float(interval_months), 1)
    if not (np.diff(months) > 0).all():
        raise RuntimeError(f"series_months: months do not increase: {months.tolist()}")
    return months


@dataclass
class Progression:
    """The planted change at time fraction ``tau`` in [0, 1] of the first-to-last interval, in
    the anatomy frame (mm, :func:`sscflow.synth.phantom.frame_axes`)::

        phi_tau = A_tau o exp(tau v),  A_tau(x) = M_tau (x - c) + c + tau t,
        M_tau = R(axis, tau degrees) diag(exp(tau s (0.6, 0.2, 0.2)))

    with ``v`` the sinks' stationary velocity and ``s`` the global log-volume change of the
    first-to-last field (:func:`sscflow.synth.deform.build_deformation`), so ``phi_1`` is that
    field and ``phi_0`` the identity. The flow of a stationary field composes exactly,
    ``exp(b v) o exp(-a v) = exp((b - a) v)``, and ``v`` is linear in the sinks' strengths, so
    the map from scan a to scan b, ``phi_b o phi_a^-1 = A_b o exp((tau_b - tau_a) v) o
    A_a^-1``, is one integration of the exact velocity (RK4, no interpolation) whatever a
    and b are: no pair's truth is made from another's.
    """

    centre: np.ndarray
    sinks: list
    log_volume: float
    rotation_axis: np.ndarray
    rotation_deg: float
    translation: np.ndarray

    def matrix(self, tau: float) -> np.ndarray:
        return deform.global_matrix(tau * self.log_volume, self.rotation_axis,
                                    tau * self.rotation_deg)  # fmt: skip

    def shift(self, tau: float) -> np.ndarray:
        return tau * self.translation

    def sinks_for(self, dtau: float) -> list:
        """The sinks whose time-1 flow is exp(dtau v)."""
        if dtau == 0:
            return []
        return [deform.Sink(s.centre, s.sigma, s.strength * dtau) for s in self.sinks]


def _anatomy_position(matrix, offset) -> tuple[np.ndarray, np.ndarray]:
    """A patient position ``y = R x + o`` (physical mm) in the anatomy frame: (R, R F + o - F)."""
    r = np.asarray(matrix, float)
    f = np.asarray(phantom.FOV_CENTRE, float)
    return r, r @ f + np.asarray(offset, float) - f


def _map_field(grid: Geometry, lin, const, post, shift, sinks, *, backward=False) -> np.ndarray:
    """The displacement ``F(p) - p`` on ``grid`` (canonical, float32 (3, Z, Y, X) mm) of

        F(p) = post (r + w(r)) + shift,  r = lin p + const,  w(r) = exp(+-v)(r) - r

    (anatomy-frame points; a displacement is the same in the physical frame). The affine part
    is exact on every voxel; ``w`` is integrated on the exact velocity on a coarse grid over
    ``grid`` and upsampled with cubic splines, as :func:`deform.build_deformation` does."""
    lin, const = np.asarray(lin, float), np.asarray(const, float)
    post, shift = np.asarray(post, float), np.asarray(shift, float)
    f = phantom.FOV_CENTRE
    axes = [grid.origin[k] - f[k] + np.arange(n) * grid.spacing[k]
            for k, n in enumerate(grid.shape)]  # fmt: skip
    linear = post @ lin - np.eye(3)
    base = post @ const + shift
    local = None
    if sinks:
        up = deform._Upsampler(axes, max(deform.COARSE_MM, max(grid.spacing)))
        pts = up.points()
        r = pts @ lin.T + const
        w = deform.flow(r, sinks, backward=backward) - r
        local = [up(w[..., k]) for k in range(3)]
    views = (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])
    u = np.empty((3, *grid.shape), np.float32)
    for k in range(3):
        acc = np.zeros(grid.shape, np.float32)
        acc += (base[k] + linear[k, 0] * axes[0]).astype(np.float32)[views[0]]
        for j in (1, 2):
            acc += (linear[k, j] * axes[j]).astype(np.float32)[views[j]]
        if local is not None:
            for j in range(3):
                acc += np.float32(post[k, j]) * local[j]
        u[k] = acc
    return u


def _pullback(prog: Progression, tau: float, position, grid: Geometry) -> np.ndarray:
    """On ``grid`` (the physical space of a scan at ``tau`` taken in ``position``, anatomy
    frame (R, o)): ``x(p) - p``, x(p) = phi_tau^-1(P^-1(p)) the first scan's point imaged at p."""
    r, o = position
    m_inv = np.linalg.inv(prog.matrix(tau))
    r_inv = np.linalg.inv(r)
    c = prog.centre
    lin = m_inv @ r_inv
    const = c - m_inv @ (r_inv @ o + c + prog.shift(tau))
    return _map_field(grid, lin, const, np.eye(3), np.zeros(3), prog.sinks_for(tau),
                      backward=True)  # fmt: skip


def _pair_field(prog: Progression, tau_a: float, tau_b: float, pos_a, pos_b,
                grid: Geometry) -> np.ndarray:  # fmt: skip
    """The truth of the pair (a, b) on ``grid`` (scan a's physical space):
    ``u(p) = P_b(phi_b(phi_a^-1(P_a^-1(p)))) - p``, P the scans' positions (anatomy frame)."""
    (ra, oa), (rb, ob) = pos_a, pos_b
    c = prog.centre
    ma_inv = np.linalg.inv(prog.matrix(tau_a))
    ra_inv = np.linalg.inv(ra)
    lin = ma_inv @ ra_inv
    const = c - ma_inv @ (ra_inv @ oa + c + prog.shift(tau_a))
    post = rb @ prog.matrix(tau_b)
    shift = -post @ c + rb @ (c + prog.shift(tau_b)) + ob
    return _map_field(grid, lin, const, post, shift, prog.sinks_for(tau_b - tau_a))


def _scan_space(geometry: Geometry, world: Geometry, matrix, offset) -> Geometry:
    """The truth grid of a scan whose patient moved by ``y = matrix x + offset``: canonical, the
    generator's spacing, on the world grid's lattice, covering the moved generator grid
    (the generator grid itself when the patient did not move)."""
    matrix, offset = np.asarray(matrix, float), np.asarray(offset, float)
    if np.array_equal(matrix, np.eye(3)) and not offset.any():
        return geometry
    h = np.asarray(geometry.spacing)
    lo_g = np.asarray(geometry.origin)
    hi_g = lo_g + (np.asarray(geometry.shape) - 1) * h
    corners = np.array([[a, b, c] for a in (lo_g[0], hi_g[0]) for b in (lo_g[1], hi_g[1])
                        for c in (lo_g[2], hi_g[2])]) @ matrix.T + offset  # fmt: skip
    w0 = np.asarray(world.origin)
    start = np.floor((corners.min(axis=0) - w0) / h + 1e-6)
    stop = np.ceil((corners.max(axis=0) - w0) / h - 1e-6)
    shape = tuple(int(n) for n in stop - start + 1)
    return Geometry(shape, geometry.spacing, tuple(float(v) for v in w0 + start * h))


def _world_offset(grid: Geometry, world: Geometry) -> tuple[float, float, float]:
    """Voxel (0, 0, 0) of ``grid`` in world-grid voxels (same spacing), for :func:`deform.warp`."""
    return tuple(round((g - w) / s, 6) for g, w, s in zip(grid.origin, world.origin,
                                                          world.spacing, strict=True))  # fmt: skip


def _series_noise(streams, seed: int, index: int, k: int) -> np.random.Generator:
    if k < 2:
        return streams["noise_baseline" if k == 0 else "noise_followup"]
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 13, int(k)]))


def _synthesize_series(row, out: Path, pid: str, spacing, seed, fmt, ribs, noise_hu,
                       acquisitions, timepoints: int) -> dict:  # fmt: skip
    """N >= 3 scans of one patient and the truth of every pair (the module docstring's layout)."""
    h = _check_spacing(spacing)
    index = int(row["index"])
    p = _prepare(row, h, seed, ribs=ribs)
    geom, world, ph, crop = p.geometry, p.world, p.ph, p.crop
    offset = (p.mz, 0, 0)
    n = int(timepoints)
    months = series_months(row["interval_months"], seed, index, n)
    interval = float(months[-1])
    taus = [float(m) / interval for m in months]
    prog = Progression(np.asarray(p.anatomy.lung_centre(), float), list(p.active),
                       float(p.field.log_volume),
                       np.asarray([row[f"rotation_axis_{k}"] for k in "zyx"], float),
                       float(row["rotation_deg"]),
                       np.asarray([row[f"translation_{k}_mm"] for k in "zyx"], float))  # fmt: skip

    # the scans: scan k shows the first scan's anatomy through phi_tau_k, its disease density
    # d_base + tau_k (d_follow - d_base), then its own acquisition and noise
    d_base, d_follow = p.d_base, p.d_follow
    p.d_base = p.d_follow = None
    delta = d_follow[crop] - d_base[crop]
    hu_first = _psf(ph.hu + d_base, h)
    hu_change = _psf(d_follow - d_base, h)
    del d_base, d_follow
    rng = np.random.default_rng([int(seed), index, 12])  # the acquisitions
    phases = np.random.default_rng([int(seed), index, 14])  # where each grid starts
    centre = _lung_centre(geom, p.lung, h)
    identity = (np.eye(3), np.zeros(3))
    lung_world = ph.lung.astype(np.float32)
    record_acq, positions, scan_lungs, scans = {}, [], [], []
    lung_last = None
    for k, tau in enumerate(taus):
        which = f"t{k}"
        world_k = hu_first + np.float32(tau) * hu_change if k else hu_first
        inverse = None
        if k == 0:
            lung_k = p.lung
        else:
            inverse = _pullback(prog, tau, identity, geom)
            lung_k = deform.warp(lung_world, inverse, geom, offset=offset) >= 0.5
        if acquisitions:  # one interpolation from the phantom, as for the first scan
            acq = _draw_acquisition(rng, which, lung_k, geom, centre, h, moved=k > 0,
                                    phase=phases.uniform(0.0, 1.0, 3))  # fmt: skip
            image = _to_hu(_acquire(world_k, world, geom, acq, h, inverse),
                           _series_noise(p.streams, seed, index, k),
                           noise_hu * acq["noise_scale"])  # fmt: skip
            grid, matrix, moved = acq["grid"], acq["matrix"], acq["offset"]
            # the scan's lung from the phantom's in one interpolation, as its image
            lung_scan = _acquire(lung_world, world, geom, acq, h, inverse, mask=True) >= 0.5
            record_acq.update(acq["record"])
        else:
            image = (world_k[crop] if inverse is None else
                     deform.warp(world_k, inverse, geom, offset=offset, order=3))  # fmt: skip
            image = _to_hu(image, _series_noise(p.streams, seed, index, k), noise_hu)
            grid, matrix, moved, lung_scan = geom, np.eye(3), np.zeros(3), lung_k
        del world_k, inverse
        positions.append((np.asarray(matrix, float), np.asarray(moved, float)))
        scan_lungs.append((lung_scan.astype(np.uint8), grid))
        if k == n - 1:
            lung_last = lung_k
        rel = f"images/{pid}/{which}{SUFFIX[fmt]}"
        _write_image(image, grid, out / rel, fmt, pid=pid, seed=seed, which=which,
                     date=_follow_date(months[k]), series=k + 1)  # fmt: skip
        del image
        scans.append(_scan_row(row, k, rel, months[k], taus[k]))
    del hu_first, hu_change

    # the truth of every pair, each from the exact flow (Progression)
    pairs = []
    bump_world = p.bump.astype(np.float32)
    for a in range(n - 1):
        matrix, moved = positions[a]
        space = _scan_space(geom, world, matrix, moved) if acquisitions else geom
        pos_a = _anatomy_position(matrix, moved)
        if a == 0:
            lung_a, region_a = p.lung, p.region
        else:
            inverse = _pullback(prog, taus[a], pos_a, space)
            at = _world_offset(space, world)
            lung_a = deform.warp(lung_world, inverse, space, offset=at) >= 0.5
            region_a = (lung_a & (deform.warp(bump_world, inverse, space, offset=at) > 0.5)
                        if p.active else np.zeros_like(lung_a))  # fmt: skip
            del inverse
        for b in range(a + 1, n):
            u = _pair_field(prog, taus[a], taus[b], pos_a, _anatomy_position(*positions[b]),
                            space)  # fmt: skip
            det = deform.jacobian_determinant(u, space)
            min_det = float(det.min())
            if not np.isfinite(det).all() or min_det <= 0:
                raise RuntimeError(f"{pid} pair ({a}, {b}): the true field folds "
                                   f"(min det(I + grad u) = {min_det:.3g})")  # fmt: skip
            log_jac = np.log(det).astype(np.float32)
            del det
            unit = pair_unit_id(pid, a, b)
            lung_b, grid_b = scan_lungs[b]
            write_truth(out / "truth" / unit, space, u, log_jac, lung_a, region_a, lung_b,
                         grid_b)  # fmt: skip
            del u
            step = round(float(months[b] - months[a]), 1)
            mean = float(log_jac[lung_a].mean(dtype=np.float64)) if lung_a.any() else float("nan")
            regional = (float(log_jac[region_a].mean(dtype=np.float64)) if region_a.any()
                        else float("nan"))  # fmt: skip
            pairs.append({"patient_id": pid, "t0": a, "t1": b, "unit_id": unit, "months": step,
                          "mean_logjac": mean, "region_mean_logjac": regional,
                          "logjac_per_year": mean * 12.0 / step, "min_det_jacobian": min_det})

    # the patient's truth record: first to last, as for two scans
    record = _record(row, geom, p.lung, lung_last, p.region, p.field, delta)
    record["inverse_error_mm"] = _inverse_error(p.field, geom, p.lung)
    record.update(_sink_record(p.sinks))
    record["interval_months"] = float(interval)
    record.update(record_acq)
    return {"scans": [{k: _plain(v) for k, v in r.items()} for r in scans],
            "pairs": [{k: _plain(v) for k, v in r.items()} for r in pairs],
            **{k: _plain(v) for k, v in record.items()}}  # fmt: skip


def _scan_row(row, k: int, rel: str, months: float, tau: float) -> dict:
    """One row of the long manifest: PFTs linear in time from the plan's first to last values;
    ``visual`` empty for the first scan, else the patient's label (the planted change grows
    in every step, with the sign of the whole change)."""
    pft = {name: round(float(row[f"{name}_baseline"]) + tau * (float(row[f"{name}_followup"])
                       - float(row[f"{name}_baseline"])), 1)
           for name in ("fvc", "dlco", "tlc", "kco")}  # fmt: skip
    return {"patient_id": str(row["patient_id"]), "timepoint": k, "scan": rel,
            "months": float(months), **pft, "visual": "" if k == 0 else row["visual"],
            "age": row["age"], "sex": row["sex"]}  # fmt: skip


def write_truth(tdir: Path, geom: Geometry, displacement, log_jacobian, lung, region, lung_fu,
                 fu_geom: Geometry) -> None:  # fmt: skip
    """The five truth files of one pair (:data:`TRUTH_FILES`) in ``tdir``."""
    tdir.mkdir(parents=True, exist_ok=True)
    vec = to_itk(displacement, geom)
    # float fields barely compress: zlib level 1 is ~30% faster than the default, ~10% larger
    sitk.WriteImage(sitk.Cast(vec, sitk.sitkVectorFloat32), str(tdir / "displacement.mha"), True, 1)
    log_jac = to_itk(log_jacobian, geom)
    sitk.WriteImage(log_jac, str(tdir / "log_jacobian.mha"), True, 1)
    for name, array, g in (
        ("lung", lung.astype(np.uint8), geom),
        ("lung_followup", np.asarray(lung_fu).astype(np.uint8), fu_geom),
        ("region", region.astype(np.uint8), geom),
    ):
        write_volume(to_itk(array, g), tdir / f"{name}.mha")


def _plain(v):
    """numpy scalars to Python scalars (for CSV / JSON / pickling across processes)."""
    return v.item() if isinstance(v, np.generic) else v


def synthesize_cohort(
    n_patients: int,
    out_dir,
    *,
    spacing: float = 2.5,
    seed: int = 0,
    client=None,
    progress=None,
    ribs: bool = True,
    noise_hu: float = 20.0,
    acquisitions: bool = True,
    timepoints: int = 2,
) -> Path:
    """Plan and write a synthetic longitudinal cohort; returns the path of ``manifest.csv``.

    Parameters
    ----------
    n_patients : >= 1
    out_dir : folder to write (created; existing patient files are overwritten)
    spacing : isotropic voxel size in mm, in (0, 6]
    seed : fixes everything; the same seed gives byte-identical NIfTI / MHA files
    client : optional ``dask.distributed.Client``: one future per patient, else serial
    progress : optional ``callable(done, total, patient_id)``, called after each patient
    ribs, noise_hu, acquisitions : see :func:`synthesize_patient`
    timepoints : scans per patient; 2 writes the baseline / follow-up cohort (wide manifest),
        3 or more the series layout of the module docstring (long manifest, every pair's truth)

    Raises
    ------
    ValueError for n_patients < 1, a spacing outside (0, 6] mm or timepoints outside
    [2, MAX_TIMEPOINTS].
    """
    if int(n_patients) != n_patients or n_patients < 1:
        raise ValueError(f"synth: n_patients must be a whole number >= 1, got {n_patients!r}")
    h = _check_spacing(spacing)
    n_scans = _check_timepoints(timepoints)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_cohort(int(n_patients), seed)
    rows = [{k: _plain(v) for k, v in r.items()} for r in plan.to_dict("records")]
    kwargs = dict(spacing=h, seed=seed, ribs=ribs, noise_hu=noise_hu, acquisitions=acquisitions)
    if n_scans != 2:
        kwargs["timepoints"] = n_scans
    total = len(rows)
    records = []
    if client is None:
        for i, row in enumerate(rows):
            records.append(synthesize_patient(row, out, fmt=row["format"], **kwargs))
            if progress is not None:
                progress(i + 1, total, row["patient_id"])
    else:
        from distributed import as_completed

        token = hashlib.sha1(
            f"{out.resolve()}|{h}|{ribs}|{noise_hu}|{acquisitions}|{n_scans}".encode()
        ).hexdigest()[:8]
        futures = [
            client.submit(
                synthesize_patient,
                row,
                str(out),
                fmt=row["format"],
                **kwargs,
                key=f"synth-{row['patient_id']}-{seed}-{token}",
                pure=False,
            )  # fmt: skip
            for row in rows
        ]
        for done, fut in enumerate(as_completed(futures), start=1):
            rec = fut.result()
            records.append(rec)
            if progress is not None:
                progress(done, total, rec["patient_id"])
    records.sort(key=lambda r: r["index"])
    series = {"timepoints": n_scans} if n_scans != 2 else {}
    return _write_tables(out, plan, records, seed=seed, spacing=h, ribs=ribs, noise_hu=noise_hu,
                         acquisitions=acquisitions, **series)  # fmt: skip


def _write_tables(out: Path, plan, records, **settings) -> Path:
    manifest = out / "manifest.csv"
    (out / "truth").mkdir(exist_ok=True)
    if settings.get("timepoints", 2) > 2:  # the series layout: long manifest, pairs.csv
        scans = [row for r in records for row in r["scans"]]
        pd.DataFrame(scans, columns=SERIES_MANIFEST_COLUMNS).to_csv(manifest, index=False)
        pairs = [row for r in records for row in r["pairs"]]
        pd.DataFrame(pairs, columns=PAIRS_COLUMNS).to_csv(out / "truth" / "pairs.csv",
                                                          index=False)  # fmt: skip
        truth = pd.DataFrame([{k: v for k, v in r.items() if k not in ("scans", "pairs")}
                              for r in records])  # fmt: skip
    else:
        frame = pd.DataFrame(records)
        frame[MANIFEST_COLUMNS].to_csv(manifest, index=False)
        manifest_only = set(MANIFEST_COLUMNS) - {"patient_id", "visual", "interval_months"}
        truth = frame[[c for c in frame.columns if c not in manifest_only]].copy()
    for k in ("fvc", "dlco", "tlc", "kco"):
        truth[f"delta_{k}"] = (plan[f"{k}_followup"] - plan[f"{k}_baseline"]).round(1).values
    truth.to_csv(out / "truth" / "truth.csv", index=False)

    rhos = {"target": dict(TARGET_RHO), "planned": {}, "realised": {}}
    for k in TARGET_RHO:
        for which in ("planned", "realised"):
            rho = spearman(truth[f"{which}_mean_logjac"], truth[f"delta_{k}"])
            rhos[which][k] = None if np.isnan(rho) else round(rho, 4)
    summary = {
        "generator": "sscflow.synth",
        "generator_version": GENERATOR_VERSION,
        **settings,
        "n": len(records),
        "counts": {
            "visual": {v: int((truth["visual"] == v).sum()) for v in ("worsened", "stable",
                                                                       "improved")},
            "functional": {v: int((truth["functional"] == v).sum()) for v in ("worsening",
                                                                               "stable")},
            "format": {v: int((truth["format"] == v).sum()) for v in FORMATS},
        },
        "spearman_mean_logjac_vs_delta_pft": rhos,
        "max_abs_mean_logjac_error": float(
            (truth["realised_mean_logjac"] - truth["planned_mean_logjac"]).abs().max()
        ),
        "min_det_jacobian": float(truth["min_det_jacobian"].min()),
        "sign_convention": "log_jac < 0 where tissue shrinks from baseline to follow-up",
    }  # fmt: skip
    (out / "truth" / "cohort.json").write_text(json.dumps(summary, indent=2) + "\n",
        encoding="utf-8")
    return manifest


@dataclass
class Truth:
    """One pair's truth, read back from ``truth/<unit id>/`` (arrays z-y-x): a patient's baseline
    and follow-up, or scans a (the baseline here) and b (the follow-up) of a longer series.

    Attributes
    ----------
    displacement : (3, Z, Y, X) float32 mm, component k along array axis k
    log_jacobian : (Z, Y, X) float32, log det(I + grad u)
    lung : (Z, Y, X) uint8, baseline lung truth
    lung_followup : (Z, Y, X) uint8, lung truth on the follow-up grid
    region : (Z, Y, X) uint8, planted-change region (empty for stable patients)
    geometry : the grid of the baseline truth (physical space; the scans' own grids differ)
    followup_geometry : the grid of ``lung_followup`` (the follow-up's physical frame)
    """

    displacement: np.ndarray
    log_jacobian: np.ndarray
    lung: np.ndarray
    lung_followup: np.ndarray
    region: np.ndarray
    geometry: Geometry
    followup_geometry: Geometry | None = None

    def on(self, geometry: Geometry) -> Truth:
        """The baseline truth resampled onto another canonical grid (e.g. the stored baseline's):
        fields linearly, masks by nearest neighbour; NaN / 0 outside the truth's grid."""
        if geometry == self.geometry:
            return self

        def onto(array, interpolator, fill):
            return resample(array, self.geometry, geometry, interpolator=interpolator, fill=fill)

        disp = np.stack([onto(self.displacement[k], "linear", 0.0) for k in range(3)])
        lj = onto(self.log_jacobian, "linear", float("nan"))
        lung = onto(self.lung.astype(np.uint8), "nearest", 0.0).astype(bool)
        region = onto(self.region.astype(np.uint8), "nearest", 0.0)
        return Truth(disp.astype(np.float32), lj.astype(np.float32), lung, self.lung_followup,
                     region.astype(bool), geometry, self.followup_geometry)  # fmt: skip


def read_truth(out_dir, patient_id: str) -> Truth:
    """Read the truth files of one unit written by :func:`synthesize_cohort`: a patient id for
    its pair (0, 1), or ``<pid>/pairs/<a>-<b>`` for another pair of a cohort with three or more
    timepoints (:func:`pair_unit_id`), scan a then standing for the baseline, scan b for the
    follow-up.

    Raises
    ------
    FileNotFoundError naming the missing file (e.g. a wrong patient id or folder).
    """
    tdir = Path(out_dir) / "truth" / str(patient_id)
    arrays = {}
    geometry = None
    for name in TRUTH_FILES:
        path = tdir / f"{name}.mha"
        if not path.is_file():
            raise FileNotFoundError(
                f"read_truth: {path} does not exist; is {patient_id!r} a patient of the "
                f"synthetic cohort in {out_dir}?"
            )
        image = sitk.ReadImage(str(path))
        if name == "displacement":
            arrays[name] = from_itk(image)[0]
            geometry = Geometry.of(image)
        elif name == "lung_followup":
            arrays[name] = sitk.GetArrayFromImage(image)
            followup_geometry = Geometry.of(image)
        else:
            arrays[name] = sitk.GetArrayFromImage(image)
    arrays["log_jacobian"] = arrays["log_jacobian"].astype(np.float32, copy=False)
    for name in ("lung", "lung_followup", "region"):  # masks are bool, as Truth says
        arrays[name] = arrays[name].astype(bool)
    return Truth(geometry=geometry, followup_geometry=followup_geometry, **arrays)
