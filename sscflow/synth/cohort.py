"""Writing a synthetic cohort: images in three formats, the manifest, and the truth.

Layout under ``out_dir`` (contract)::

    manifest.csv                 one row per patient, paths relative to out_dir
    images/<pid>/baseline.nii.gz | baseline.mha | baseline/ (DICOM series), same for followup
    truth/truth.csv              planted and realised per-patient values
    truth/cohort.json            generator version, seed, spacing, n, group counts, Spearman rhos
    truth/<pid>/displacement.mha (vector, ITK x-y-z components), log_jacobian.mha, lung.mha,
                 lung_followup.mha, region.mha

The follow-up is the baseline anatomy (with follow-up disease density) warped by the known
field, plus new scanner noise: ``followup(x + u(x)) = baseline(x) + delta_density(x) + noise``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import hashlib
import json
import os
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


def simulate(
    row, spacing: float, seed: int, *, ribs: bool = True, noise_hu: float = 20.0, images=True
) -> Simulation:
    """Make one patient in memory: a pure function of (plan row, spacing, seed).

    With ``images=False`` only the truth (fields, masks, record) is made, which is what tests
    of the planted statistics need.
    """
    h = _check_spacing(spacing)
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
    offset = (mz, 0, 0)
    lung_fu = deform.warp(ph.lung.astype(np.float32), field.inverse, geometry, offset=offset)
    lung_fu = lung_fu >= 0.5

    delta = d_follow[crop] - d_base[crop]
    record = _record(row, geometry, lung, lung_fu, region, field, delta)
    record["inverse_error_mm"] = _inverse_error(field, geometry, lung)
    for side, s in zip(("r", "l"), sinks, strict=True):
        centre = np.asarray(s.centre) + np.asarray(phantom.FOV_CENTRE)
        for k, v in zip("zyx", centre, strict=True):
            record[f"sink_{k}_mm_{side}"] = round(float(v), 2)
    sim = Simulation(geometry, record, field, lung, lung_fu, region)
    if not images:
        return sim

    def psf(image):  # below 0.3 voxel the 3-tap kernel is an identity to 1e-3: skip it
        blur = PSF_MM / h
        return ndimage.gaussian_filter(image, blur, mode="nearest") if blur >= 0.3 else image

    base = psf(ph.hu + d_base)[crop]
    follow = psf(ph.hu + d_follow)
    del d_base, d_follow
    follow = deform.warp(follow, field.inverse, geometry, offset=offset, order=3)
    sim.baseline = _to_hu(base, streams["noise_baseline"], noise_hu)
    sim.followup = _to_hu(follow, streams["noise_followup"], noise_hu)
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


def _write_image(array, geometry, path: Path, fmt: str, *, pid, seed, which, date):
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
            series_number=1 if which == "baseline" else 2,
        )
    else:
        write_volume(image, path)


@contextlib.contextmanager
def _reuse_freed_memory():
    """Let glibc keep and reuse freed memory while one patient is made.

    Dask worker processes start with ``MALLOC_TRIM_THRESHOLD_=65536``, which makes glibc map
    every block over 128 kB afresh and unmap it when freed, so the ~1 GB of short-lived arrays
    of a patient are paid for in page faults (measured: 24 patients at 2.5 mm on two workers
    took 92 s instead of about 45 s). Inside this block blocks up to 32 MB come from the heap
    and stay there; on exit the worker's settings are restored and the heap is trimmed. A
    no-op where that variable is unset or the C library has no ``mallopt``.
    """
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = None
    if trim is not None and trim.isdigit():
        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-1, int(trim))
            libc.mallopt(-3, 128 << 10)  # glibc's default, fixed once the trim is set
            libc.malloc_trim(0)


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
) -> dict:
    """Make one patient's baseline and follow-up scans and truth files under ``out_dir``.

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

    Returns
    -------
    dict: the manifest fields (image paths relative to ``out_dir``) and the truth record.

    Raises
    ------
    ValueError for a spacing outside (0, 6] mm or an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"synth: fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    pid = str(row["patient_id"])
    with _reuse_freed_memory():
        return _synthesize_patient(row, out, pid, spacing, seed, fmt, ribs, noise_hu,
                                   acquisitions)  # fmt: skip


def draw_acquisitions(rng: np.random.Generator, geometry: Geometry, lung, lung_fu, h: float):
    """Each scan its own acquisition, as real scans of one patient are: grid spacing (in-plane
    0.86-1.14 h, slices 0.9-1.8 h, one scan in eight with thick slices of max(2.5, 2 h) or
    5 mm), field of view (0-40 mm beyond the lungs at the apex and at the base, the body
    in-plane), a direction other than the identity in a third of the files (RAS-like, a 180
    degree turn about z, or an oblique tilt of up to 8 degrees), and for the follow-up a new
    patient position (rotation up to 5 degrees about any axis, table shift up to 60 mm along z
    and 15 mm in-plane). Returns ``{which: dict(grid, matrix, offset, noise_scale, ...)}``.
    """
    from sscflow.synth import planted

    axes = [geometry.origin[k] + np.arange(n) * geometry.spacing[k]
            for k, n in enumerate(geometry.shape)]  # fmt: skip
    idx = np.argwhere(np.asarray(lung, bool))
    centre = np.array([axes[k][idx[:, k]].mean() for k in range(3)]) if len(idx) else (
        np.asarray(geometry.origin) + np.asarray(geometry.shape) * h / 2)  # fmt: skip
    out = {}
    for which, mask in (("baseline", lung), ("followup", lung_fu)):
        if which == "followup":
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
                                        direction=direction, matrix=matrix, offset=offset)
        out[which] = {
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
    return out


def _acquire(image, geometry: Geometry, acq: dict, h: float) -> np.ndarray:
    """A noise-free scan on its acquisition grid: slices thicker than the generator's grid
    are averaged over their thickness (a Gaussian of that FWHM along z) before sampling."""
    from sscflow.synth import planted

    src = np.asarray(image, np.float32)
    slice_mm = acq["grid"].spacing[0]
    if slice_mm > 1.5 * h:
        sigma = np.sqrt(max(slice_mm**2 - h**2, 0.0)) / 2.355 / h
        src = ndimage.gaussian_filter1d(src, sigma, axis=0, mode="nearest")
    return planted.render_on(src, geometry, acq["grid"], matrix=acq["matrix"],
                             offset=acq["offset"], order=3, fill=-1024.0)  # fmt: skip


def _synthesize_patient(row, out, pid, spacing, seed, fmt, ribs, noise_hu,
                        acquisitions=True) -> dict:  # fmt: skip
    sim = simulate(row, spacing, seed, ribs=ribs, noise_hu=0.0 if acquisitions else noise_hu)
    geom = sim.geometry
    grids = {"baseline": geom, "followup": geom}
    arrays = {"baseline": sim.baseline, "followup": sim.followup}
    displacement = sim.deformation.displacement
    lung_fu, fu_geom = sim.lung_followup.astype(np.uint8), geom
    if acquisitions:
        from sscflow.synth import planted

        streams = patient_streams(seed, int(row["index"]))
        rng = np.random.default_rng([int(seed), int(row["index"]), 12])  # the acquisitions
        acq = draw_acquisitions(rng, geom, sim.lung, sim.lung_followup, geom.spacing[0])
        for which in ("baseline", "followup"):
            image = _acquire(arrays[which], geom, acq[which], geom.spacing[0])
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

    tdir = out / "truth" / pid
    tdir.mkdir(parents=True, exist_ok=True)
    vec = to_itk(displacement, geom)
    # float fields barely compress: zlib level 1 is ~30% faster than the default, ~10% larger
    sitk.WriteImage(sitk.Cast(vec, sitk.sitkVectorFloat32), str(tdir / "displacement.mha"), True, 1)
    log_jac = to_itk(sim.deformation.log_jacobian, geom)
    sitk.WriteImage(log_jac, str(tdir / "log_jacobian.mha"), True, 1)
    for name, array, g in (
        ("lung", sim.lung.astype(np.uint8), geom),
        ("lung_followup", lung_fu, fu_geom),
        ("region", sim.region.astype(np.uint8), geom),
    ):
        write_volume(to_itk(array, g), tdir / f"{name}.mha")

    manifest = {k: row[k] for k in MANIFEST_COLUMNS if k not in ("baseline", "followup")}
    manifest |= {"baseline": rel["baseline"], "followup": rel["followup"]}
    manifest = {k: _plain(manifest[k]) for k in MANIFEST_COLUMNS}
    return manifest | {k: _plain(v) for k, v in sim.record.items()}


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

    Raises
    ------
    ValueError for n_patients < 1 or a spacing outside (0, 6] mm.
    """
    if int(n_patients) != n_patients or n_patients < 1:
        raise ValueError(f"synth: n_patients must be a whole number >= 1, got {n_patients!r}")
    h = _check_spacing(spacing)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_cohort(int(n_patients), seed)
    rows = [{k: _plain(v) for k, v in r.items()} for r in plan.to_dict("records")]
    kwargs = dict(spacing=h, seed=seed, ribs=ribs, noise_hu=noise_hu, acquisitions=acquisitions)
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
            f"{out.resolve()}|{h}|{ribs}|{noise_hu}|{acquisitions}".encode()
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
    return _write_tables(out, plan, records, seed=seed, spacing=h, ribs=ribs, noise_hu=noise_hu,
                         acquisitions=acquisitions)  # fmt: skip


def _write_tables(out: Path, plan, records, **settings) -> Path:
    frame = pd.DataFrame(records)
    manifest = out / "manifest.csv"
    frame[MANIFEST_COLUMNS].to_csv(manifest, index=False)
    manifest_only = set(MANIFEST_COLUMNS) - {"patient_id", "visual", "interval_months"}
    truth = frame[[c for c in frame.columns if c not in manifest_only]].copy()
    for k in ("fvc", "dlco", "tlc", "kco"):
        truth[f"delta_{k}"] = (plan[f"{k}_followup"] - plan[f"{k}_baseline"]).round(1).values
    (out / "truth").mkdir(exist_ok=True)
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
    """One patient's truth, read back from ``truth/<pid>/`` (arrays z-y-x).

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
    """Read one patient's truth files written by :func:`synthesize_cohort`.

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
