"""``sscflow export``: a store's images as files that ITK-SNAP, 3D Slicer, ANTs and napari open.

Per patient, into ``OUT/<patient_id>/``: ``baseline``, ``followup`` (each on its own canonical
grid), ``followup_warped`` (the follow-up resampled at x + u(x) for every baseline voxel x, so
it lies on the baseline), ``lung_mask``, ``followup_lung_mask``, ``log_jacobian`` (baseline grid,
NaN where not measured), ``log_jacobian_template`` (template grid) and ``displacement``: the field
u as an ITK vector image (components x, y, z in mm, on the baseline grid), which ITK-SNAP, 3D
Slicer and ANTs read as a warp (``antsApplyTransforms -t displacement.nii.gz`` maps the follow-up
onto the baseline). Into ``OUT/template/``: the template ``image`` and ``lung_mask`` and the
group means (``<grouping>_<group>.<ext>``, ``all_patients.<ext>``). Every file carries its real
geometry (origin, spacing, direction), read from the store's OME-NGFF metadata.

Formats: ``nifti`` (``.nii.gz``), ``nrrd`` (``.nrrd``) or ``mha`` (``.mha``). NIfTI stores RAS
on disk; ITK converts from and to LPS, so the files open aligned in every ITK-based tool.
``dicom``: the baseline as a CT series, the lung mask as DICOM SEG and the log-Jacobian map as a
DICOM Parametric Map, per patient (:mod:`sscflow.views.dicom`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sscflow.core import store as st
from sscflow.core.geometry import Geometry, to_itk, warp_to_baseline  # noqa: F401 (re-exported)
from sscflow.errors import IncompleteOutputError, SscflowError
from sscflow.methods.groups import GROUPINGS, _quiet_consolidation

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
PATIENT_IMAGES = ("baseline", "followup", "lung_mask", "followup_lung_mask", "log_jacobian",
                  "log_jacobian_template")  # fmt: skip


def _write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".partial-" + path.name)
    sitk.WriteImage(image, str(tmp), useCompression=True)
    tmp.replace(path)  # a killed export leaves no half-written file under the final name
    return path


MAPS = ("log_jacobian", "log_jacobian_template")  # NaN where not measured


def export_patient(root, patient_id: str, out_dir, fmt: str = "nifti",
                   nan_value: float | None = None) -> list[Path]:  # fmt: skip
    """Write one patient's images (those that are complete) into ``out_dir/<patient_id>/``.

    Beside each log-Jacobian map, ``<map>_measured`` (uint8: 1 where the map has a value, 0 where
    it is NaN, not measured), since ITK's NIfTI reader (ITK-SNAP, 3D Slicer, SimpleITK) reads a
    NaN voxel as 0, which a viewer would show as "no change". ``nan_value`` writes that number
    instead of NaN into the maps, for viewers that cannot show NaN at all.
    """
    ext = FORMATS[fmt]
    group = st.patient_group(root, patient_id, create=False)
    folder = Path(out_dir) / patient_id
    written = []
    stored = {}
    for name in (*PATIENT_IMAGES, "displacement"):
        try:
            stored[name] = st.read_image(group, name)
        except IncompleteOutputError:
            continue
    for name in PATIENT_IMAGES:
        if name in stored:
            s = stored[name]
            values, geometry = s.array[...], st.stored_geometry(s)
            if name in MAPS:
                measured = np.isfinite(values)
                written.append(_write(to_itk(measured.astype(np.uint8), geometry),
                                      folder / f"{name}_measured{ext}"))  # fmt: skip
                if nan_value is not None:
                    values = np.where(measured, values, np.float32(nan_value))
            written.append(_write(to_itk(values, geometry), folder / f"{name}{ext}"))
    if "displacement" in stored:
        u, geom = stored["displacement"].array[...], st.stored_geometry(stored["displacement"])
        written.append(_write(to_itk(u, geom), folder / f"displacement{ext}"))
        if "followup" in stored:
            f = stored["followup"]
            warped = warp_to_baseline(f.array[...], st.stored_geometry(f), u, geom)
            written.append(_write(to_itk(warped, geom), folder / f"followup_warped{ext}"))
    return written


def export_cohort_images(store: str, root, out_dir, fmt: str = "nifti") -> list[Path]:
    """The template image and mask and the group-mean maps into ``out_dir/template/``."""
    ext = FORMATS[fmt]
    folder = Path(out_dir) / "template"
    written = []
    try:
        tpl = st.template_group(root)
    except IncompleteOutputError:
        return written
    geometry = None
    for name in ("image", "lung_mask"):
        try:
            s = st.read_image(tpl, name)
        except IncompleteOutputError:
            continue
        geometry = st.stored_geometry(s)
        written.append(_write(to_itk(s.array[...], geometry), folder / f"{name}{ext}"))
    if geometry is None or "group_means" not in root:
        return written
    import xarray as xr

    with _quiet_consolidation():
        ds = xr.open_zarr(st.zarr_store(f"{os.fspath(store).rstrip('/')}/group_means",
                                        read_only=True))  # fmt: skip
    for grouping, names in GROUPINGS.items():
        if f"{grouping}_mean" not in ds:
            continue
        for g in names:
            if int(ds[f"{grouping}_count"].sel({grouping: g})) > 0:
                arr = ds[f"{grouping}_mean"].sel({grouping: g}).values.astype(np.float32)
                written.append(_write(to_itk(arr, geometry),
                                      folder / f"{grouping}_{g}{ext}"))  # fmt: skip
    if "all_mean" in ds:
        arr = ds["all_mean"].values.astype(np.float32)
        written.append(_write(to_itk(arr, geometry), folder / f"all_patients{ext}"))
    return written


def export_store(store: str, out_dir, *, patients=None, fmt: str = "nifti",
                 progress: Callable[[str, int, int], None] | None = None,
                 nan_value: float | None = None) -> dict:  # fmt: skip
    """Export ``patients`` (every patient of the store when None) and the cohort images
    (``nan_value``: see :func:`export_patient`; not for DICOM, whose float maps keep NaN).

    Returns ``{"patients": {id: [paths]}, "template": [paths]}``. Raises SscflowError for an
    unknown format or a patient that is not in the store (naming the ones that are).
    """
    if fmt not in (*FORMATS, "dicom"):
        raise SscflowError(f"--format must be one of {', '.join(FORMATS)}, dicom; got {fmt!r}")
    root = st.open_store(store, mode="r")
    known = st.patient_ids(root)
    ids = list(patients) if patients else known
    unknown = [p for p in ids if p not in known]
    if unknown:
        raise SscflowError(f"store {store} has no patient {', '.join(unknown)} (it has "
                           f"{', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
    out = {"patients": {}, "template": []}
    if fmt == "dicom":
        from sscflow.views.dicom import export_patient_dicom as write
    else:
        def write(root, pid, out_dir):
            return export_patient(root, pid, out_dir, fmt, nan_value)
    for i, pid in enumerate(ids):
        out["patients"][pid] = write(root, pid, out_dir)
        if progress:
            progress(pid, i + 1, len(ids))
    if fmt == "dicom":  # the template as a CT series, the template-space maps over it
        from sscflow.views.dicom import export_template_dicom

        out["template"] = export_template_dicom(root, ids, out_dir)
    else:
        out["template"] = export_cohort_images(store, root, out_dir, fmt)
    return out


def as_dataarray(store: str, patient_id: str, name: str):
    """One stored patient image as a lazy ``xarray.DataArray`` with z, y, x in millimetres
    (e.g. ``as_dataarray("demo/cohort.zarr", "SYN001", "baseline").sel(z=-40, method="nearest")``
    is the axial slice nearest z = -40 mm)."""
    import xarray as xr

    s = st.read_image(st.patient_group(st.open_store(store, mode="r"), patient_id, create=False),
                      name, lazy=True)  # fmt: skip
    g = s.geometry
    coords = {a: (a, g.origin[k] + np.arange(g.shape[k]) * g.spacing[k], {"units": "mm"})
              for k, a in enumerate("zyx")}  # fmt: skip
    dims = ("c", "z", "y", "x") if s.array.ndim == 4 else ("z", "y", "x")
    return xr.DataArray(s.array, dims=dims, coords=coords, name=name,
                        attrs={"spacing_mm": list(g.spacing), "stage": s.meta.get("stage")})
