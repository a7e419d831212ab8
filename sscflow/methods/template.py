"""The template space: one common grid where every patient's log-Jacobian map is compared.

Two steps, both resumable (an output whose input hash and parameters match is skipped):

1. :func:`build_template` (once per cohort) writes the template:

   - from a file (``TemplateConfig.image``): the CT is resampled onto the canonical grid at the
     voxel size of the cohort's stored baselines; its lung mask comes from
     ``TemplateConfig.lung_mask`` or is segmented with the default ``SegmentConfig``;
   - ``method="median"``: a copy of the baseline (and lung mask) of the patient whose baseline
     lung volume is nearest the cohort median (:func:`choose_template`);
   - ``method="average"``: starts from the median choice, then ``iterations`` times registers
     every baseline to the current template and replaces it by the voxelwise mean intensity and
     the majority vote of the warped lung masks (on the median patient's grid).

2. :func:`to_template_patient` (once per patient) registers the template (fixed) to the
   patient's baseline (moving) and warps the patient's log-Jacobian map into template space.

Registration between two patients' grids: ``sscflow.methods.registration.register`` needs both
volumes
on one grid, and the physical coordinates of two scans (table position, field of view) do not
correspond. So the baseline is first translated so that its lung centroid falls on the template's
(``prealign_mm``) and resampled onto the template grid; the registration then refines that. The
stored field is the whole map, translation included.

Convention: ``u`` is (3, Zt, Yt, Xt) float32 mm on the template grid, component k along axis k,
such that ``baseline(x + u(x)) ~ template(x)`` for the physical point x of a template voxel. A
template-space map is ``log_jacobian(x + u(x))``, sampled trilinearly on the patient's baseline
grid at index ``(template_origin + index * template_spacing + u - patient_origin) /
patient_spacing`` and 0.0 outside that grid.

Store layout::

    STORE/template/image                          int16 HU, the template grid
    STORE/template/lung_mask                      uint8, 1 = lung; written last
    STORE/patients/<id>/template_displacement     (3, Zt, Yt, Xt) float32 mm
    STORE/patients/<id>/log_jacobian_template     (Zt, Yt, Xt) float32; written last, with the
                                                  QA record in ``sscflow.views.qa``
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
from scipy import ndimage

from sscflow.config import RegistrationConfig, SegmentConfig, TemplateConfig
from sscflow.core import store as st
from sscflow.core.geometry import Geometry, resample
from sscflow.errors import IncompleteOutputError, InputImageError, SscflowError

__all__ = ["build_template", "choose_template", "describe_provenance", "template_provenance",
           "to_template_patient"]

STAGE = "template"
STAGE_VERSION = 1
TO_TEMPLATE_STAGE = "to_template"
TO_TEMPLATE_VERSION = 2  # 2: the rigid lung-mask alignment of sscflow.methods.registration
GROUP = "template"
IMAGE = "image"
MASK = "lung_mask"
DISPLACEMENT = "template_displacement"
OUTPUT = "log_jacobian_template"
HU_MIN = -1024
NO_TEMPLATE = "the store has no template yet"
CONVENTION = (
    "baseline(x + u(x)) ~ template(x); u (3, Zt, Yt, Xt) mm on the template grid, component k "
    "along axis k; log_jacobian_template(x) = log_jacobian(x + u(x)), 0 outside the baseline grid"
)


def choose_template(lung_volumes: dict[str, float]) -> str:
    """The patient whose baseline lung volume is nearest the median of ``lung_volumes``.

    Parameters
    ----------
    lung_volumes : {patient id: baseline lung volume in mL}

    Returns
    -------
    The patient id; on a tie (two volumes equally near the median) the smallest id.

    Raises
    ------
    ValueError when ``lung_volumes`` is empty.

    Examples
    --------
    >>> choose_template({"P1": 4100.0, "P2": 3600.0, "P3": 5200.0})
    'P1'
    >>> choose_template({"B": 3000.0, "A": 1000.0})  # median 2000, both 1000 away
    'A'
    """
    if not lung_volumes:
        raise ValueError(
            "choose_template: no lung volume given; ingest at least one patient (its lung mask "
            "records lung_volume_ml)"
        )
    median = float(np.median([float(v) for v in lung_volumes.values()]))
    return min(sorted(lung_volumes), key=lambda pid: abs(float(lung_volumes[pid]) - median))


# --- building the template


def build_template(
    store,
    patient_ids,
    config: TemplateConfig | None = None,
    *,
    force: bool = False,
    rebuild: bool = False,
) -> dict:
    """Build ``STORE/template/{image, lung_mask}`` once (see the module docstring for the methods).

    The template is an artefact: once a complete one is in the store it is used as it is,
    whatever patients were added or removed since (``action`` "reused"). It is built again only
    when ``rebuild`` or ``force`` asks, when the ``template`` section of the config differs from
    the one it was built with, when its template file's content changed, or when the stored one
    is incomplete (an interrupted build); ``reason`` says which. Each build has a new
    ``generation``, part of the template's input hash, so every template-space map made from an
    older template is redone (and nothing upstream of it).

    Parameters
    ----------
    store : path (or URL) of the cohort store
    patient_ids : the patients to build from (their ``baseline`` and ``lung_mask``); None means
        every patient in the store. A patient whose baseline or lung mask is absent or
        incomplete is left out. With a template file, only the first usable patient is read,
        for the voxel size. Read only when the template is (re)built.
    config : ``TemplateConfig`` (defaults when None: the cohort-median baseline)
    force : rebuild even when the stored template is current (``sscflow run --force``)
    rebuild : rebuild even when the stored template is current (``--rebuild-template``)

    Returns
    -------
    dict: ``status`` ("done" or "skipped"), ``action`` ("built", "rebuilt" or "reused"),
    ``reason`` (why it was built; "" when reused), ``source`` ("cohort-median",
    "cohort-average" or "file"), ``patient_id`` (the median choice, None for a file),
    ``patients_used``, ``left_out`` (ids), ``left_out_reasons`` ({id: why}), ``seconds``,
    ``lung_volume_ml``, ``provenance`` (see :func:`template_provenance`) and, when reused and
    built from the cohort, ``added`` / ``removed``: how many patients of ``patient_ids`` are not
    in the cohort it was built from, and how many of that cohort are not in ``patient_ids``
    (patients: another pair of a patient in that cohort is neither).

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) when no patient is usable;
    MissingInputError / InputImageError for an unreadable template file, a lung mask file on
    another grid, or an image that is not CT in HU; SegmentationError when its lungs cannot be
    segmented; RegistrationInputError for the "average" method's registrations.
    """
    cfg = config or TemplateConfig()
    t0 = time.perf_counter()
    root = st.open_store(store)
    ids = st.patient_ids(root) if patient_ids is None else [str(p) for p in patient_ids]
    group = st.require_group(root, GROUP)
    params = _build_params(cfg)
    reason = _rebuild_reason(group, cfg, params, force=force, rebuild=rebuild)
    if reason is None:
        return _reused(dict(group[MASK].attrs["sscflow"]), ids, t0)
    action = "built" if reason == NO_TEMPLATE else "rebuilt"
    used, left_out = _usable_patients(root, ids, first_only=cfg.image is not None)
    if not used:
        why = "; ".join(f"{p}: {r}" for p, r in left_out.items()) or "no patient given"
        raise IncompleteOutputError(
            f"template: no patient has a complete baseline and lung mask ({why}); ingest the "
            "cohort first"
        )
    generation = _generation(group) + 1
    if cfg.image is not None:
        source, chosen = "file", None
        spacing = used[next(iter(used))]["baseline"].geometry.spacing
        file_hashes = (st.hash_input(cfg.image),
                       st.hash_input(cfg.lung_mask) if cfg.lung_mask is not None else None)
        input_hash = st.hash_values(*file_hashes, list(spacing), generation)
    else:
        source = "cohort-median" if cfg.method == "median" else "cohort-average"
        volumes = {pid: _lung_volume(images[MASK]) for pid, images in used.items()}
        chosen = choose_template(volumes)
        input_hash = st.hash_values(*[
            (images["baseline"].meta.get("input_hash"), images["baseline"].meta.get("params"),
             images[MASK].meta.get("input_hash"), images[MASK].meta.get("params"))
            for _, images in sorted(used.items())
        ], generation)  # fmt: skip

    row = {"left_out": sorted(left_out), "left_out_reasons": left_out}
    if source == "file":
        hu, lungs, geometry = _template_from_file(cfg, spacing)
    else:
        base = used[chosen]["baseline"]
        hu = np.asarray(base.array[...])
        lungs = np.asarray(used[chosen][MASK].array[...]).astype(np.uint8)
        geometry = base.geometry
        if source == "cohort-average":
            hu, lungs = _average(hu, lungs, geometry, used, cfg)
    if not lungs.any():
        raise SscflowError(f"template: the {source} template's lung mask is empty")
    hu, lungs = hu.astype(np.int16), lungs.astype(np.uint8)
    volume = float(lungs.sum()) * geometry.voxel_volume_ml
    provenance = {
        "source": source,
        "method": "file" if source == "file" else cfg.method,
        "patient_id": chosen,
        "file": str(cfg.image) if source == "file" else None,
        "file_sha256": file_hashes[0] if source == "file" else None,
        "lung_mask_file": str(cfg.lung_mask) if cfg.lung_mask is not None else None,
        "lung_mask_sha256": file_hashes[1] if source == "file" else None,
        "built_from": None if source == "file" else len(used),
        "cohort_sha256": None if source == "file" else st.hash_values(sorted(used)),
        "iterations": cfg.iterations if source == "cohort-average" else None,
        "content_sha256": _content_hash(hu, lungs, geometry),
        "generation": generation,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason,
    }
    extra = {"source": source, "patient_id": chosen, "patients_used": sorted(used),
             "lung_volume_ml": volume, "generation": generation,
             "provenance": provenance}  # fmt: skip
    if source == "file":
        extra["file"] = str(cfg.image)
        extra["lung_mask_file"] = str(cfg.lung_mask) if cfg.lung_mask is not None else None
    if MASK in group:  # a build interrupted after the image must never look complete
        del group[MASK]
    st.write_image(group, IMAGE, hu, geometry, stage=STAGE, params=params,
                   input_hash=input_hash, extra=extra, fill_value=HU_MIN)  # fmt: skip
    st.write_image(group, MASK, lungs, geometry, stage=STAGE, params=params,
                   input_hash=input_hash, extra=extra)  # fmt: skip
    return {"status": "done", "action": action, "reason": reason, "source": source,
            "patient_id": chosen, "patients_used": sorted(used), **row,
            "seconds": time.perf_counter() - t0, "lung_volume_ml": volume,
            "provenance": provenance}  # fmt: skip


def _build_params(cfg: TemplateConfig) -> dict:
    """The parameters a template records: its whole config section (and what it resolves to)."""
    params = {**asdict(cfg), "version": STAGE_VERSION}
    if cfg.image is not None and cfg.lung_mask is None:
        params["segment"] = asdict(SegmentConfig())
    if cfg.image is None and cfg.method == "average":
        from sscflow.methods.registration import resolve_backend

        params["backend"] = resolve_backend(cfg.registration.backend)
    return params


def _generation(group) -> int:
    """The generation of the stored template (0 when none was ever written)."""
    found = 0
    for name in (IMAGE, MASK):
        try:
            found = max(found, int(dict(group[name].attrs.get("sscflow", {})).get("generation")
                                   or 1))  # a template from before generations counts as 1
        except (KeyError, ValueError, TypeError, OSError):
            continue
    return found


def _rebuild_reason(group, cfg: TemplateConfig, params: dict, *, force: bool,
                    rebuild: bool) -> str | None:  # fmt: skip
    """Why the template must be built now, or None to reuse the stored one."""
    states = (st.output_state(group, IMAGE), st.output_state(group, MASK))
    if states == ("absent", "absent"):
        return NO_TEMPLATE
    if states != ("complete", "complete"):
        return "the stored template is incomplete (an interrupted build)"
    if force:
        return "asked for (--force)"
    if rebuild:
        return "asked for (--rebuild-template)"
    meta = dict(group[MASK].attrs["sscflow"])
    old, new = dict(meta.get("params") or {}), st._jsonable(params)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        def show(k):
            a, b = old.get(k), new.get(k)
            if isinstance(a, dict) or isinstance(b, dict):
                return f"template.{k}"
            return f"template.{k}: {a!r} -> {b!r}"

        return ("the template section of the config changed since it was built ("
                + "; ".join(show(k) for k in changed) + ")")  # fmt: skip
    prov = dict(meta.get("provenance") or {})
    for key, path in (("file_sha256", cfg.image), ("lung_mask_sha256", cfg.lung_mask)):
        recorded = prov.get(key)
        if path is not None and recorded is not None and st.hash_input(path) != recorded:
            return f"the template file {path} changed since the template was built"
    if cfg.image is not None and not prov:  # a file template from before provenance: compare
        spacing = st.read_image(group, IMAGE).geometry.spacing  # its inputs' hash directly
        old_hash = st.hash_values(st.hash_input(cfg.image), st.hash_input(cfg.lung_mask)
                                  if cfg.lung_mask is not None else None, list(spacing))
        if old_hash != meta.get("input_hash"):
            return f"the template file {cfg.image} changed since the template was built"
    return None


def _reused(meta: dict, ids: list[str], t0: float) -> dict:
    prov = template_provenance_of(meta)
    used = list(meta.get("patients_used") or [])
    out = {"status": "skipped", "action": "reused", "reason": "", "source": meta.get("source"),
           "patient_id": meta.get("patient_id"), "patients_used": used, "left_out": [],
           "left_out_reasons": {}, "seconds": time.perf_counter() - t0,
           "lung_volume_ml": meta.get("lung_volume_ml"), "provenance": prov}  # fmt: skip
    if meta.get("source") != "file":
        from sscflow.cohort import parse_unit

        # patients, not pairs: a new timepoint moves a patient's first -> last pair from
        # ``<pid>`` to ``<pid>/pairs/0-2`` without adding or removing anyone
        have, now = ({parse_unit(p)[0] for p in units} for units in (used, ids))
        out["added"] = len(now - have)
        out["removed"] = len(have - now)
    return out


def _content_hash(hu: np.ndarray, lungs: np.ndarray, geometry: Geometry) -> str:
    """sha256 of the template's voxels (image, then mask) and its grid."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(hu, "<i2").tobytes())
    h.update(np.ascontiguousarray(lungs, np.uint8).tobytes())
    h.update(st.hash_values(geometry.to_dict()).encode())
    return h.hexdigest()


def template_provenance_of(meta: dict) -> dict:
    """The provenance record of a template from its ``sscflow`` metadata (older templates,
    written before provenance was recorded, get what their metadata says)."""
    prov = dict(meta.get("provenance") or {})
    prov.setdefault("source", meta.get("source"))
    prov.setdefault("patient_id", meta.get("patient_id"))
    prov.setdefault("file", meta.get("file"))
    prov.setdefault("generation", meta.get("generation") or 1)
    if prov.get("built_from") is None and prov["source"] != "file":
        prov["built_from"] = len(meta.get("patients_used") or [])
    return prov


def template_provenance(store) -> dict | None:
    """How the store's template was made, or None when it has no complete template.

    Keys: ``source`` ("cohort-median", "cohort-average" or "file"), ``method``, ``patient_id``
    (the median choice), ``file`` / ``file_sha256`` and ``lung_mask_file`` /
    ``lung_mask_sha256`` (a template file), ``built_from`` (how many patients the cohort
    template was built from), ``cohort_sha256`` (of their sorted ids), ``content_sha256`` (of
    the template's voxels and grid), ``generation`` (1 for the first build, + 1 per rebuild),
    ``built`` (UTC time) and ``reason`` (why it was built).
    """
    root = store if hasattr(store, "attrs") else st.open_store(store, mode="r")
    if GROUP not in root or st.output_state(root[GROUP], MASK) != "complete":
        return None
    return template_provenance_of(dict(root[GROUP][MASK].attrs["sscflow"]))


def describe_provenance(prov: dict | None) -> str:
    """One line for people: ``sscflow status``, the run summary and the report."""
    if not prov:
        return "no template yet"
    if prov.get("source") == "file":
        what = f"the file {prov.get('file')}"
        if prov.get("lung_mask_file"):
            what += f" with the lung mask {prov['lung_mask_file']}"
    elif prov.get("source") == "cohort-average":
        what = (f"the average of {prov.get('built_from')} baselines ({prov.get('iterations')} "
                f"iterations from patient {prov.get('patient_id')})")  # fmt: skip
    else:
        what = (f"the baseline of patient {prov.get('patient_id')} (lung volume nearest the "
                f"median of {prov.get('built_from')} patients)")  # fmt: skip
    parts = [what]
    if prov.get("built"):
        parts.append(f"built {prov['built']}")
    parts.append(f"generation {prov.get('generation')}")
    if prov.get("content_sha256"):
        parts.append(f"content sha256 {prov['content_sha256'][:12]}")
    return ", ".join(parts)


def _usable_patients(root, ids, *, first_only: bool) -> tuple[dict, dict]:
    """{id: {"baseline": StoredImage, "lung_mask": StoredImage}} of the patients whose inputs
    are complete (arrays opened, not read), and {id: reason} of the others."""
    used, left_out = {}, {}
    for pid in ids:
        try:
            group = st.patient_group(root, pid, create=False)
            images = {name: st.read_image(group, name) for name in ("baseline", MASK)}
        except IncompleteOutputError as exc:
            left_out[pid] = str(exc)
            continue
        b, m = images["baseline"].geometry, images[MASK].geometry
        if b.shape != m.shape:
            left_out[pid] = f"lung mask shape {m.shape} differs from the baseline's {b.shape}"
            continue
        used[pid] = images
        if first_only:
            break
    return used, left_out


def _lung_volume(mask: st.StoredImage) -> float:
    """The mask's recorded ``lung_volume_ml``, else its voxel count times the voxel volume."""
    v = mask.meta.get("lung_volume_ml")
    if v is None:
        v = float(np.count_nonzero(mask.array[...])) * mask.geometry.voxel_volume_ml
    return float(v)


def _template_from_file(cfg: TemplateConfig, spacing) -> tuple[np.ndarray, np.ndarray, Geometry]:
    from sscflow.core.imageio import read_volume
    from sscflow.methods.ingest import to_canonical
    from sscflow.methods.segment import segment_lungs

    hu, geometry = to_canonical(read_volume(cfg.image), float(spacing[0]))
    if hu.min() > -500:
        raise InputImageError(
            f"template {cfg.image} holds no air (lowest value {int(hu.min())} HU); a chest CT in "
            "Hounsfield units has air below -900 HU"
        )
    if cfg.lung_mask is not None:
        lungs, mgeom = to_canonical(read_volume(cfg.lung_mask), float(spacing[0]), label=True)
        if not mgeom.same_grid(geometry):
            raise InputImageError(
                f"template lung mask {cfg.lung_mask} is on another grid than the image "
                f"{cfg.image} (canonical shape {mgeom.shape}, origin {mgeom.origin} vs shape "
                f"{geometry.shape}, origin {geometry.origin}); give a mask of the same scan"
            )
        if not lungs.any():
            raise InputImageError(f"template lung mask {cfg.lung_mask} has no voxel set")
    else:
        try:
            lungs = segment_lungs(hu, geometry.spacing, **asdict(SegmentConfig())).mask
        except SscflowError as exc:
            raise type(exc)(f"template {cfg.image}: {exc}; give its lung mask") from None
    return hu, lungs, geometry


def _average(hu, lungs, geometry, used, cfg: TemplateConfig):
    """``cfg.iterations`` rounds of: register every baseline to the template, then the mean
    intensity and the majority-vote lung mask. Running sums: one warped volume at a time."""
    from sscflow.methods.registration import resolve_backend

    backend = resolve_backend(cfg.registration.backend)
    options = cfg.registration.options(backend)
    for _ in range(cfg.iterations):
        total = np.zeros(geometry.shape, np.float64)
        votes = np.zeros(geometry.shape, np.float32)
        for _pid, images in sorted(used.items()):
            base = np.asarray(images["baseline"].array[...])
            mask = np.asarray(images[MASK].array[...])
            bgeom = images["baseline"].geometry
            u, _ = _align(hu, lungs, geometry, base, mask, bgeom, backend, options)
            total += resample(base, bgeom, geometry, u, fill=HU_MIN)
            votes += resample(mask, bgeom, geometry, u, fill=0.0) >= 0.5
        n = len(used)
        hu = np.clip(np.rint(total / n), HU_MIN, 3071).astype(np.int16)
        lungs = (votes / n >= 0.5).astype(np.uint8)
        if not lungs.any():
            raise SscflowError(
                "template: the average lung mask is empty (the baselines disagree where the "
                "lungs are); use method 'median' or check the registrations"
            )
    return hu, lungs


# --- one patient into template space


def to_template_patient(
    store,
    patient_id: str,
    config: TemplateConfig | None = None,
    *,
    force: bool = False,
) -> dict:
    """Register the template to one patient's baseline and warp its log-Jacobian map.

    Parameters
    ----------
    store : path (or URL) of the cohort store
    patient_id : reads ``patients/<id>/{baseline, lung_mask, log_jacobian}`` (baseline grid)
        and ``template/{image, lung_mask}``
    config : ``TemplateConfig``; its ``registration`` section is the backend and parameters
    force : recompute even when the stored outputs are current

    Returns
    -------
    dict: ``patient_id``, ``status`` ("done" or "skipped"), ``seconds`` and the QA record:
    ``backend``, ``parameters``, ``runtime_s``, ``prealign_mm`` (the lung-centroid translation,
    (z, y, x) mm), ``dice`` (template lung mask vs the warped patient lung mask),
    ``mean_template`` (the warped map's mean inside the template lung mask), ``mean_patient``
    (the patient's own map's mean inside its lung mask, to compare), ``ncc_before`` and
    ``ncc_after`` (template vs baseline inside the template lung, after the centroid
    translation and after the registration) and ``folded_fraction`` (inside the template lung).

    Writes ``patients/<id>/template_displacement`` ((3, Zt, Yt, Xt) float32 mm) and then
    ``patients/<id>/log_jacobian_template`` ((Zt, Yt, Xt) float32, QA in ``sscflow.views.qa``).

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) naming the patient and the stage to run first
    when an input is absent or incomplete; ValueError when the baseline, its lung mask and its
    log-Jacobian map are not on one grid; RegistrationInputError (a ValueError) from the
    registration.
    """
    from sscflow.methods.registration import resolve_backend
    from sscflow.methods.registration.common import folded_fraction, ncc

    cfg = config or TemplateConfig()
    reg_cfg: RegistrationConfig = cfg.registration
    t0 = time.perf_counter()
    backend = resolve_backend(reg_cfg.backend)
    root = st.open_store(store)
    try:
        tgroup = root[GROUP]
    except KeyError:
        raise IncompleteOutputError(
            f"patient {patient_id}: the store has no template; build the template first "
            "(build_template)"
        ) from None
    who = f"patient {patient_id}"
    tpl = st.read_inputs(tgroup, (IMAGE, MASK), who, "build the template first (build_template)")
    inputs = {"template": tpl[IMAGE], "template_mask": tpl[MASK]}
    group = st.patient_group(root, patient_id, create=False)
    inputs.update(st.read_inputs(group, ("baseline", MASK), who, "ingest the patient first"))
    inputs.update(st.read_inputs(group, ("log_jacobian",), who,
                                 "run the registration and jacobian stages for it first"))
    pgeom = inputs["baseline"].geometry
    for name in (MASK, "log_jacobian"):
        g = inputs[name].geometry
        if not g.same_grid(pgeom):
            raise ValueError(
                f"patient {patient_id}: {name} grid (shape {g.shape}, origin {g.origin}) differs "
                f"from the baseline's (shape {pgeom.shape}, origin {pgeom.origin}); rerun the "
                "stage that wrote it"
            )

    options = reg_cfg.options(backend)
    params = {"backend": backend, "options": options, "version": TO_TEMPLATE_VERSION}
    input_hash = st.upstream_hash(inputs[k] for k in ("template", "template_mask", "baseline",
                                                      MASK, "log_jacobian"))  # fmt: skip
    row = {"patient_id": patient_id}
    meta = None if force else st.current_record(group, (DISPLACEMENT, OUTPUT), input_hash, params)
    if meta is not None:
        qa = dict(meta.get("qa", {}))
        return {**row, "status": "skipped", "seconds": time.perf_counter() - t0, **qa}

    tgeom = inputs["template"].geometry
    timg = np.asarray(inputs["template"].array[...])
    tmask = np.asarray(inputs["template_mask"].array[...]).astype(bool)
    base = np.asarray(inputs["baseline"].array[...])
    pmask = np.asarray(inputs[MASK].array[...]).astype(bool)
    lj = np.asarray(inputs["log_jacobian"].array[...], np.float32)

    # the field depends on the template and the baseline scan only: another pair of the same
    # patient from the same scan (its pair 0 -> 1 when timepoint 2 is added) has it already
    field_hash = st.upstream_hash(inputs[k] for k in ("template", "template_mask", "baseline",
                                                      MASK))  # fmt: skip
    t1 = time.perf_counter()
    reused = _sibling_field(root, patient_id, field_hash, params)
    if reused is not None:
        source, u, shift = reused
    else:
        source = None
        u, shift = _align(timg, tmask, tgeom, base, pmask, pgeom, backend, options)
    runtime = time.perf_counter() - t1
    warped_lj = resample(lj, pgeom, tgeom, u, fill=0.0)
    warped_mask = resample(pmask, pgeom, tgeom, u, fill=0.0) >= 0.5
    timg_f = timg.astype(np.float32)
    sel = tmask if tmask.any() else None
    qa = {
        "backend": backend,
        "parameters": options,
        "runtime_s": round(runtime, 3),
        "prealign_mm": [round(float(s), 3) for s in shift],
        "dice": _dice(tmask, warped_mask),
        "mean_template": _nanmean(warped_lj[tmask]) if tmask.any() else None,
        "mean_patient": _nanmean(lj[pmask]) if pmask.any() else None,
        "ncc_before": round(ncc(timg_f, resample(base, pgeom, tgeom, affine=(np.eye(3), shift),
                                                 fill=HU_MIN), sel), 5),
        "ncc_after": round(ncc(timg_f, resample(base, pgeom, tgeom, u, fill=HU_MIN), sel), 5),
        "folded_fraction": folded_fraction(u, tgeom.spacing, sel),
        **({"reused_from": source} if source else {}),
    }  # fmt: skip
    if OUTPUT in group:  # an interrupted run must not leave an old map beside a new field
        del group[OUTPUT]
    st.write_image(group, DISPLACEMENT, u, tgeom, stage=TO_TEMPLATE_STAGE, params=params,
                   input_hash=input_hash, step=st.FIELD_STEP_MM,
                   extra={"convention": CONVENTION, "field_hash": field_hash,
                          "prealign_mm": [float(s) for s in shift]})  # fmt: skip
    st.write_image(group, OUTPUT, warped_lj, tgeom, stage=TO_TEMPLATE_STAGE, params=params,
                   input_hash=input_hash, extra={"qa": qa, "convention": CONVENTION},
                   step=st.LOG_JACOBIAN_STEP)  # fmt: skip
    return {**row, "status": "done", "seconds": time.perf_counter() - t0, **qa}


def _sibling_field(root, unit: str, field_hash: str, params: dict):
    """(unit, field, shift) of another pair of the same patient whose stored template field was
    made from the same template, baseline scan and mask (``field_hash``) with the same
    parameters; None when there is none. Pairs are ``<pid>`` and ``<pid>/pairs/<t0>-<t1>``."""
    for other in st.sibling_units(root, unit):
        group = root[f"{st.PATIENTS}/{other}"]
        if st.output_state(group, DISPLACEMENT) != "complete":
            continue
        meta = dict(group[DISPLACEMENT].attrs["sscflow"])
        if meta.get("field_hash") != field_hash or meta.get("params") != st._jsonable(params):
            continue
        field = st.read_image(group, DISPLACEMENT)
        shift = tuple(meta.get("prealign_mm") or (0.0, 0.0, 0.0))
        return other, np.asarray(field.array[...], np.float32), shift
    return None


# --- shared numerics


def _align(timg, tmask, tgeom: Geometry, base, bmask, bgeom: Geometry, backend, options):
    """The map template -> baseline: u (3, Zt, Yt, Xt) float32 mm with
    ``baseline(x + u(x)) ~ template(x)``, and the shift it starts from at the template's lung
    centre (mm).

    The same registration as follow-up -> baseline (``sscflow.methods.registration.register``, fixed
    = template, mask = template lungs): the rigid initial alignment from the two lung masks, the
    backend's affine pass, the baseline resampled through both onto the template grid, then the
    deformable stage.
    """
    from sscflow.methods.registration import register

    tmask = np.asarray(tmask, bool)
    bmask = np.asarray(bmask, bool)
    u, info = register(timg.astype(np.float32), np.asarray(base, np.float32),
                       fixed_geometry=tgeom, moving_geometry=bgeom,
                       mask=tmask if tmask.any() else None,
                       moving_mask=bmask if bmask.any() else None, backend=backend,
                       return_info=True, **options)  # fmt: skip
    shift = np.zeros(3)
    if tmask.any():
        c = _centroid_mm(tmask, tgeom)
        a = info["initial_alignment"]
        shift = np.asarray(a["matrix"]) @ c + np.asarray(a["offset_mm"]) - c
    return np.asarray(u, np.float32), shift


def _centroid_mm(mask, geometry: Geometry) -> np.ndarray:
    """Physical (z, y, x) mm of a mask's centre of mass."""
    c = np.asarray(ndimage.center_of_mass(np.asarray(mask, bool)), float)
    return np.asarray(geometry.origin) + c * np.asarray(geometry.spacing)


def _nanmean(values) -> float | None:
    """Mean of the measured (finite) values; None when none is."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    den = int(a.sum()) + int(b.sum())
    return round(2.0 * int((a & b).sum()) / den, 5) if den else 1.0
