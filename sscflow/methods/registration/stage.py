"""The registration stage: ``patients/<id>/{baseline, followup, lung_mask}`` -> ``displacement``.

Writes ``STORE/patients/<id>/displacement``, a (3, Z, Y, X) float32 field in mm on the baseline
grid (an NGFF image group with a channel axis), with a QA record in its ``sscflow.views.qa``
attribute: backend, parameters, runtime, the initial alignment, the lung coverage (the fraction
of the baseline lung whose x + u(x) the follow-up imaged), each scan's original slice
thickness, similarity before and after (inside the lung mask), folded fraction, and, given the
synthetic cohort's folder, the errors against the truth. Beside it,
``STORE/patients/<id>/coverage`` marks the baseline voxels that were measured.
Skipped when the output is current (same inputs and parameters).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict

import numpy as np

from sscflow.config import RegistrationConfig
from sscflow.core import store as st
from sscflow.core.geometry import Geometry
from sscflow.errors import RegistrationFailedError
from sscflow.methods.registration import (
    PIXEL_PROFILE_SCALE,
    SLICE_PROFILE_SCALE,
    options_class,
    register,
    resolve_backend,
    slice_axis,
    slice_profile_mm,
)
from sscflow.methods.registration.common import folded_fraction, similarity, truth_errors
from sscflow.methods.registration.frame import coverage_mask, unmeasured_parts

STAGE = "registration"
STAGE_VERSION = 3  # 3: the follow-up's imaged field of view in the similarity and the map
OUTPUT = "displacement"
COVERAGE = "coverage"
INPUTS = ("baseline", "followup", "lung_mask")
MOVING_MASK = "followup_lung_mask"
CONVENTION = ("followup(x + u(x)) ~ baseline(x); u (3, Z, Y, X) mm on the baseline grid, "
              "component k along axis k; x + u(x) a physical point of the follow-up")  # fmt: skip


def slice_thickness(image: st.StoredImage) -> float | None:
    """The source scan's slice spacing (mm) before ingest, from the stored original geometry."""
    geom = (image.meta.get("source") or {}).get("geometry")
    if not geom:
        return None
    return round(float(Geometry.from_dict(geom).spacing[0]), 4)


def header_thickness(image: st.StoredImage) -> float | None:
    """The source scan's slice thickness (mm) as its headers gave it (DICOM SliceThickness, or
    a NIfTI file's sidecar: ``imageio.slice_thickness_of``), recorded at ingest; None where
    none did, or for a store ingested before."""
    v = (image.meta.get("source") or {}).get("slice_thickness_mm")
    return None if v is None else float(v)


def matched_thickness(base: st.StoredImage, follow: st.StoredImage,
                      mode) -> tuple[float | None, float | None] | None:  # fmt: skip
    """(baseline, follow-up) slice thickness in mm that ``registration.match_slices`` matches, or
    None (no matching). ``"auto"``: the header slice thickness of both scans, when both have one
    (a file's slice spacing is not trusted: a resampled scan or overlapping slices have a spacing
    finer than their slices); ``True``: that, else the slice spacing; ``False``: None."""
    if mode is False:
        return None
    header = (header_thickness(base), header_thickness(follow))
    if mode == "auto":
        return header if None not in header else None
    spacing = (slice_thickness(base), slice_thickness(follow))
    return tuple(h if h is not None else sp for h, sp in zip(header, spacing, strict=True))


def slice_profiles(base: st.StoredImage, follow: st.StoredImage, matched):
    """(baseline, follow-up) effective profiles along the canonical (z, y, x) in mm that
    ``registration.match_slices`` matches, or None (no matching): each scan's slice thickness
    ``matched`` (:func:`matched_thickness`) along the axis its slices stack along in its
    original grid (:func:`sscflow.methods.registration.slice_axis`) and its pixel spacing
    along the other two (:func:`sscflow.methods.registration.slice_profile_mm`), times
    :data:`SLICE_PROFILE_SCALE` and :data:`PIXEL_PROFILE_SCALE`; a store ingested before
    sscflow kept that grid: the thickness along z alone."""
    if matched is None:
        return None
    out = []
    for image, thick in zip((base, follow), matched, strict=True):
        geom = (image.meta.get("source") or {}).get("geometry")
        if geom:
            geometry = Geometry.from_dict(geom)
            nominal, axis = slice_profile_mm(geometry, thick), slice_axis(geometry)
        else:
            nominal, axis = (thick or 0.0, 0.0, 0.0), 0
        out.append(tuple(round(v * (SLICE_PROFILE_SCALE if ax == axis else PIXEL_PROFILE_SCALE), 4)
                         for ax, v in enumerate(nominal)))  # fmt: skip
    return tuple(out)


def source_geometry(image: st.StoredImage) -> Geometry:
    """What the scan imaged: the part of its original grid that shows the patient
    (:func:`sscflow.methods.ingest.imaged_field_of_view`), else its original grid (stores
    ingested before sscflow kept it), else the stored grid."""
    source = image.meta.get("source") or {}
    geom = source.get("imaged") or source.get("geometry")
    return Geometry.from_dict(geom) if geom else image.geometry


def register_patient(
    store,
    patient_id: str,
    config: RegistrationConfig | None = None,
    *,
    truth_dir=None,
    chunk: int = 64,
    compression_level: int = 3,
    force: bool = False,
) -> dict:
    """Register one patient's follow-up to its baseline and store the displacement.

    The two scans are on their own grids (as ingested: each its own extent and origin); they
    relate through physical coordinates only. Writes ``patients/<id>/coverage`` (uint8 on the
    baseline grid: 1 where x + u(x) lies inside the follow-up's original field of view), then
    ``patients/<id>/displacement``.

    Parameters
    ----------
    store : path (or URL) of the cohort store
    patient_id : reads ``patients/<id>/baseline``, ``followup``, ``lung_mask`` and
        ``followup_lung_mask`` (the initial alignment's; segmented again when absent)
    config : backend and its parameters (``RegistrationConfig``; defaults when None)
    truth_dir : optional folder of a synthetic cohort (``sscflow.synth``); its true field for
        this patient is compared with the result in the QA record
    chunk, compression_level : storage of the field
    force : recompute even when the stored field is current

    Returns
    -------
    dict: ``patient_id``, ``status`` ("done" or "skipped"), ``seconds``, ``warnings`` and the
    QA record (``lung_coverage``, ``slice_thickness_mm``, ``initial_alignment``, similarity
    before and after, folded fraction, ...).

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) naming the missing input;
    RegistrationFailedError (a ValueError) when the lungs cannot be aligned or the follow-up
    covers less of the baseline lung than ``config.min_lung_coverage``.
    """
    cfg = config or RegistrationConfig()
    t0 = time.perf_counter()
    backend = resolve_backend(cfg.backend)
    root = st.open_store(store)
    group = st.patient_group(root, patient_id, create=False)
    images = st.read_inputs(group, INPUTS, f"patient {patient_id}", "ingest the patient first")
    base, follow, mask = (images[n] for n in INPUTS)
    moving_mask = None
    if st.output_state(group, MOVING_MASK) == "complete":
        moving_mask = st.read_image(group, MOVING_MASK)
    options = cfg.options(backend)
    # an opt-in setting that is off keeps the parameters of the versions before it, so that
    # stores registered then stay current: each backend names its own (``Options.inactive``)
    inactive = getattr(options_class(backend), "inactive", None)
    dropped = inactive(options) if inactive is not None else set()
    keyed = {k: v for k, v in options.items() if k not in dropped}
    params = {"backend": backend, "options": keyed, "version": STAGE_VERSION,
              "min_lung_coverage": cfg.min_lung_coverage, "fov_margin_mm": cfg.fov_margin_mm,
              "min_alignment_dice": cfg.min_alignment_dice}  # fmt: skip
    matched = matched_thickness(base, follow, cfg.match_slices)
    profiles = slice_profiles(base, follow, matched)
    if profiles is not None:
        # what is matched, in the parameters: the profile model of 2026-12-07 (slices along
        # their own axis, pixels too, each scaled as measured) registers every matched pair
        # once more; pairs without matching stay current
        params["slice_profiles_mm"] = [list(p) for p in profiles]
    input_hash = st.upstream_hash(images[n] for n in INPUTS)
    row = {"patient_id": patient_id}
    meta = None if force else st.current_record(group, (COVERAGE, OUTPUT), input_hash, params)
    if meta is not None:
        qa = dict(meta.get("qa", {}))
        return {**row, "status": "skipped", "seconds": time.perf_counter() - t0,
                "warnings": thick_slice_warnings(patient_id, qa, cfg), **qa}  # fmt: skip

    fg, mg = base.geometry, follow.geometry
    spacing = fg.spacing
    fixed = np.asarray(base.array[...], np.float32)
    moving = np.asarray(follow.array[...], np.float32)
    lung = np.asarray(mask.array[...]).astype(bool)
    mmask = None if moving_mask is None else np.asarray(moving_mask.array[...]).astype(bool)
    if mmask is not None and not mmask.any():
        mmask = None
    thickness = {"baseline": slice_thickness(base), "followup": slice_thickness(follow)}
    fov = source_geometry(follow)
    t1 = time.perf_counter()
    with _device_memory(backend, options, fixed.size + moving.size, patient_id):
        u, info = register(fixed, moving, mask=lung if lung.any() else None, moving_mask=mmask,
                           fixed_geometry=fg, moving_geometry=mg, backend=backend,
                           moving_fov=fov, return_info=True,
                           profile_mm=profiles,
                           **{**options, "match_slices": matched is not None})  # fmt: skip
    runtime = time.perf_counter() - t1
    align = info["initial_alignment"]
    dice = align.get("dice")
    if dice is not None and np.isfinite(dice) and dice < cfg.min_alignment_dice:
        raise RegistrationFailedError(
            f"patient {patient_id}: the follow-up's lungs could not be aligned with the "
            f"baseline's (lung-mask Dice {dice:.2f} after the initial alignment, below "
            f"registration.min_alignment_dice {cfg.min_alignment_dice:g}); check that both "
            "scans are chest CTs of this patient and that both lung masks look right"
        )
    # measured: x + u(x) imaged by the follow-up, fov_margin_mm inside its edge (the map is NaN
    # elsewhere); what the follow-up imaged at all decides min_lung_coverage
    covered = coverage_mask(u, fg, fov, margin_mm=cfg.fov_margin_mm)
    imaged = coverage_mask(u, fg, fov) if cfg.fov_margin_mm > 0 else covered
    coverage = float(imaged[lung].mean()) if lung.any() else 0.0
    if coverage < cfg.min_lung_coverage:
        raise RegistrationFailedError(
            f"patient {patient_id}: the follow-up covers {coverage:.0%} of the baseline lung "
            f"(registration.min_lung_coverage is {cfg.min_lung_coverage:g}); its field of view "
            "misses the rest (for instance the apices or the bases). Use a follow-up series "
            "that covers the whole chest, or lower registration.min_lung_coverage"
        )
    sel = lung if lung.any() else None
    qa = {
        "backend": backend,
        "parameters": options,
        "config": asdict(cfg),
        "runtime_s": round(runtime, 3),
        "initial_alignment": align,
        "lung_coverage": round(coverage, 5),
        **_unmeasured(u, fg, fov, lung, covered, cfg.fov_margin_mm),
        "slice_thickness_mm": thickness,
        "slice_thickness_from_headers_mm": {"baseline": header_thickness(base),
                                            "followup": header_thickness(follow)},
        "matched_slices_mm": dict(zip(("baseline", "followup"), matched, strict=True))
        if matched is not None and info.get("slices_matched") else None,
        "resolution": info.get("resolution"),
        "interpolation_matched": info.get("interpolation_matched"),
        "baseline_grid": fg.to_dict(),
        "followup_grid": mg.to_dict(),
        "folded_fraction": folded_fraction(u, spacing, sel),
        **similarity(fixed, moving, u, spacing, sel, fixed_geometry=fg, moving_geometry=mg,
                     covered=covered),
    }
    if truth_dir is not None:
        from sscflow.cohort import parse_unit
        from sscflow.synth import read_truth

        try:
            truth = read_truth(truth_dir, patient_id).on(fg)
        except FileNotFoundError:  # a pair the synthetic cohort has no truth for
            if parse_unit(patient_id)[1:] == (0, 1):
                raise
            truth = None
        if truth is not None:
            qa["truth"] = truth_errors(u, spacing, truth.displacement, truth.log_jacobian,
                                       truth.lung & covered, truth.region & covered)  # fmt: skip
    write = dict(stage=STAGE, params=params, input_hash=input_hash, chunk=chunk,
                 compression_level=compression_level)  # fmt: skip
    st.write_image(group, COVERAGE, covered.astype(np.uint8), fg,
                   extra={"lung_coverage": qa["lung_coverage"],
                          "meaning": "1: x + u(x) inside the follow-up's field of view"},
                   **write)  # fmt: skip
    st.write_image(group, OUTPUT, u, fg, extra={"qa": qa, "convention": CONVENTION},
                   step=st.displacement_step(fg.spacing), **write)  # fmt: skip
    return {**row, "status": "done", "seconds": time.perf_counter() - t0,
            "warnings": thick_slice_warnings(patient_id, qa, cfg), **qa}  # fmt: skip


def _unmeasured(u, fg: Geometry, fov: Geometry, lung, covered, margin_mm: float) -> dict:
    """The baseline lung left without a measure (the map is NaN there): mL, % of the lung, and
    where it left the follow-up's field of view (``unmeasured_where``: the parts holding at least
    a tenth of it, largest first, e.g. "base"; "" when none)."""
    missing = lung & ~covered
    n = int(lung.sum())
    ml = float(missing.sum()) * fg.voxel_volume_ml
    parts = unmeasured_parts(u, fg, fov, missing, margin_mm)
    total = sum(parts.values())
    where = [p for p, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.1 * total > 0]
    pct = 100.0 * float(missing.sum()) / n if n else 0.0
    return {"unmeasured_lung_ml": round(ml, 1), "unmeasured_lung_pct": round(pct, 2),
            "unmeasured_where": ", ".join(where),
            "unmeasured_parts_ml": parts}


def _device_memory(backend: str, options: dict, voxels: int, patient_id: str):
    """The pair's share of the GPU (:func:`sscflow.flow.gpu.reserve`) when the torch backend may
    run on CUDA: it waits for room beside the pairs running on this worker, or fails alone when
    the GPU is too small for it. Nothing to hold on CPU."""
    if backend != "torch" or options.get("device", "auto") == "cpu":
        return contextlib.nullcontext()
    from sscflow.flow.gpu import reserve

    return reserve(voxels, f"patient {patient_id}")


#: slice spacings this far apart (mm, and a quarter of the thinner) with no header thickness
#: to match them get a warning: 2 mm of difference reads as about 0.03 in the lung bases
UNMATCHED_SLICES_MM = 0.5


def thick_slice_warnings(patient_id: str, qa: dict, cfg: RegistrationConfig) -> list[str]:
    """One line per patient whose scans' slices are thicker than ``cfg.thick_slice_mm``, and
    one whose two scans' slice spacings differ while ``match_slices: auto`` could not match
    them (a header thickness missing: a NIfTI without its sidecar, an MHA or NRRD file)."""
    out = []
    spacing = qa.get("slice_thickness_mm") or {}
    thick = {k: v for k, v in spacing.items() if v is not None and v > cfg.thick_slice_mm}
    if thick:
        which = ", ".join(f"{k.replace('followup', 'follow-up')} {v:.3g} mm"
                          for k, v in thick.items())  # fmt: skip
        out.append(f"patient {patient_id}: slices thicker than {cfg.thick_slice_mm:g} mm "
                   f"({which}); registered, but detail along z is lost")  # fmt: skip
    headers = qa.get("slice_thickness_from_headers_mm")
    a, b = spacing.get("baseline"), spacing.get("followup")
    if (cfg.match_slices == "auto" and not cfg.match_resolution and headers is not None
            and None in headers.values() and a and b
            and abs(a - b) > max(UNMATCHED_SLICES_MM, 0.25 * min(a, b))):  # fmt: skip
        out.append(f"patient {patient_id}: slice spacings differ (baseline {a:.3g} mm, "
                   f"follow-up {b:.3g} mm) and no DICOM header or NIfTI sidecar gives both "
                   "thicknesses, so they were not matched; a difference in slice thickness "
                   "reads as change at the lung bases, see README, Thick slices")
    return out
