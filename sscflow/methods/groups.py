"""Cohort tables and template-space group means: the paper's Table 1 inputs and Figure 5 maps.

:func:`cohort_table` gathers, one row per patient, the clinical values, PFT changes, labels, lung
volumes, the log-Jacobian summary and the QA records the stages wrote. :func:`group_means` averages
the patients' template-space log-Jacobian maps (``patients/<id>/log_jacobian_template``) per
functional group (worsening, stable) and per visual group (worsened, stable, improved), streaming:
the maps are stacked lazily along a ``patient`` dimension and reduced chunk by chunk, so memory is
set by the chunk size, not by the number of patients. The result is ``STORE/group_means``, an
xarray-readable Zarr v3 group (``xarray.open_zarr(STORE + "/group_means")``).

Sign convention: log_jac = log det(I + grad u), u on the baseline grid; tissue that shrinks from
baseline to follow-up has log_jac < 0.

This module imports pandas and xarray; ``import sscflow`` does not import it.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from sscflow.cohort import PFT, PFT_COLUMNS
from sscflow.core import store as st
from sscflow.errors import IncompleteOutputError
from sscflow.methods.zones import per_year

STAGE = "group_means"
STAGE_VERSION = 1
OUTPUT = "group_means"
TEMPLATE = st.TEMPLATE
MAP = "log_jacobian_template"
GROUPINGS: dict[str, tuple[str, ...]] = {
    "functional": ("worsening", "stable"),
    "visual": ("worsened", "stable", "improved"),
}
UNITS = "log-Jacobian (log det(I + grad u)); < 0 = shrinkage"
CLINICAL = (*PFT_COLUMNS, "interval_months", "age", "sex")
REG_COLUMNS = ("backend", "runtime_s", "folded_fraction", "ncc_before", "ncc_after",
               "lncc_before", "lncc_after", "mad_hu_before", "mad_hu_after",
               "lung_coverage", "unmeasured_lung_ml", "unmeasured_lung_pct",
               "unmeasured_where")  # fmt: skip
REG_SKIP = ("parameters", "config")  # the settings, not QA; lists that do not fit a CSV cell


# --- the cohort table -------------------------------------------------------------------------


def cohort_table(store, patient_ids=None) -> pd.DataFrame:
    """One row per patient: clinical data, PFT changes, labels, volumes, log-Jacobian and QA.

    Parameters
    ----------
    store : path (or URL) of the cohort store, or its open root ``zarr.Group``
    patient_ids : the patients to list, in this order; every patient in the store when None

    Returns
    -------
    DataFrame with a default integer index and these columns, in order:

    - ``patient_id``
    - the manifest's clinical columns ``fvc_baseline`` ... ``kco_followup`` (% predicted),
      ``interval_months``, ``age``, ``sex`` (always present, NaN when not given), and any other
      clinical key the store holds
    - ``delta_fvc, delta_dlco, delta_tlc, delta_kco``: follow-up minus baseline, percentage points
    - ``functional`` ("worsening" | "stable"), ``visual`` ("worsened" | "stable" | "improved")
    - ``lung_volume_baseline_ml``, ``lung_volume_followup_ml`` (from the lung masks)
    - ``logjac_mean``, ``logjac_median``, ``folded_fraction`` and the other numbers of the
      ``log_jacobian`` summary as ``logjac_<key>`` (inside the baseline lung mask; < 0 = shrinkage)
    - ``logjac_per_year``: ``logjac_mean`` x 12 / ``interval_months`` (NaN without an interval)
    - ``reg_<key>``: the registration QA record (``reg_backend``, ``reg_runtime_s``,
      ``reg_folded_fraction``, ``reg_ncc_before`` ... always present), nested records flattened
      (``reg_truth_mean_error_mm``, ...)
    - ``tpl_<key>``: the QA record of ``log_jacobian_template`` (e.g. ``tpl_dice``)

    A value whose output is absent or incomplete is NaN (numeric columns are float64); missing
    outputs never raise.

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) when the store does not exist or a patient in
    ``patient_ids`` is not in it.
    """
    root = _root(store)
    ids = st.patient_ids(root) if patient_ids is None else [str(p) for p in patient_ids]
    rows = [_patient_row(root, pid) for pid in ids]
    base = ["patient_id", *CLINICAL, *(f"delta_{m}" for m in PFT), "functional", "visual",
            "lung_volume_baseline_ml", "lung_volume_followup_ml"]  # fmt: skip
    sections = {"": base, "logjac": ["logjac_mean", "logjac_per_year", "logjac_median",
                                     "folded_fraction"],
                "reg": [f"reg_{k}" for k in REG_COLUMNS], "tpl": []}  # fmt: skip
    known = {c for cols in sections.values() for c in cols}
    for row in rows:  # keys only some patients have, in the order first seen, by section
        for key in row:
            if key not in known:
                section = key.split("_", 1)[0]
                sections[section if section in sections else ""].append(key)
                known.add(key)
    columns = [c for cols in sections.values() for c in cols]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({c: "float64" for c in columns if _numeric(table[c])})


def write_cohort_table(table: pd.DataFrame, folder) -> Path:
    """Write ``table`` to ``folder/patients.csv`` (folder created); return the file's path.

    Numbers are rounded to their precision (:func:`column_decimals`: 1 decimal for mL, 2 for
    PFT points, 5 for log-Jacobian values, ...), and ``patients_columns.csv`` beside it
    documents every column (name, unit, description: :func:`describe_column`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "patients.csv"
    table = _with_pair_columns(table)
    out = table.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            d = column_decimals(c)
            out[c] = out[c].round(d) if d is not None else out[c].map(_significant)
    rows = [(c, *describe_column(c)) for c in table.columns]
    columns = pd.DataFrame(rows, columns=["column", "unit", "description"])
    for target, frame in ((path, out), (folder / "patients_columns.csv", columns)):
        text = frame.to_csv(index=False)
        # unchanged: not rewritten
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    return path


def _significant(v, digits: int = 6):
    return v if not np.isfinite(v) or v == 0 else float(f"{v:.{digits}g}")


def column_decimals(column: str) -> int | None:
    """Decimals kept in patients.csv for a column (None: six significant digits).

    >>> column_decimals("delta_fvc"), column_decimals("logjac_mean"), column_decimals("x_y")
    (2, 5, None)
    """
    c = column
    if c.endswith("_ml") or "mad_hu" in c or c in ("age", "interval_months"):
        return 1
    if c.startswith(("fvc", "dlco", "tlc", "kco", "delta_", "haa")):
        return 2
    if "fraction" in c or "coverage" in c:
        return 6
    if "ncc" in c or "dice" in c:
        return 4
    if c.endswith("_s"):
        return 2
    if c.endswith("_mm"):
        return 3
    if c.startswith("logjac_") and c not in ("logjac_voxels", "logjac_floor") or c.startswith(
            "tpl_mean_"):  # fmt: skip
        return 5
    return None


_COLUMNS = {
    "patient_id": ("", "the manifest's patient id"),
    "interval_months": ("months", "interval between the two CT scans (manifest)"),
    "age": ("years", "age (manifest)"), "sex": ("", "F or M (manifest)"),
    "functional": ("", "functional change by the ATS/ERS rule: worsening (FVC -10 or DLCO -15 "
                   "points) or stable; empty without the PFT values the rule needs"),
    "visual": ("", "visual (morphologic) change from the manifest: worsened, stable, improved"),
    "lung_volume_baseline_ml": ("mL", "lung-mask volume at baseline"),
    "lung_volume_followup_ml": ("mL", "lung-mask volume at follow-up"),
    "haa_baseline": ("%", "ILD extent at baseline: high-attenuation area, % of the lungs"),
    "haa_followup": ("%", "ILD extent at follow-up (high-attenuation area)"),
    "delta_haa": ("points", "change in ILD extent, follow-up minus baseline"),
    "logjac_mean": ("log-Jacobian", "mean log det(I + grad u) in the baseline lungs; < 0: "
                    "the lung shrank from baseline to follow-up"),
    "logjac_per_year": ("log-Jacobian per year", "logjac_mean x 12 / interval_months: the "
                        "change as a yearly rate (empty without an interval)"),
    "logjac_median": ("log-Jacobian", "median log-Jacobian in the baseline lungs"),
    "folded_fraction": ("fraction", "lung voxels whose Jacobian determinant is <= 0 (folding)"),
    "logjac_voxels": ("voxels", "lung voxels measured"),
    "logjac_floor": ("", "determinants at or below this are set to it before the log"),
    "logjac_log_floor": ("log-Jacobian", "the log of the floor"),
}


def describe_column(column: str) -> tuple[str, str]:
    """(unit, description) of a cohort-table column, for patients_columns.csv.

    >>> describe_column("delta_dlco")
    ('% predicted points', 'DLCO change, follow-up minus baseline')
    """
    c = column
    if c in _COLUMNS:
        return _COLUMNS[c]
    for m in PFT:
        if c == f"delta_{m}":
            return ("% predicted points", f"{m.upper()} change, follow-up minus baseline")
        for t in ("baseline", "followup"):
            if c == f"{m}_{t}":
                return ("% predicted", f"{m.upper()} at {t.replace('followup', 'follow-up')} "
                        "(manifest)")  # fmt: skip
    if c.startswith("logjac_p"):
        return ("log-Jacobian", f"{c[8:]}th percentile of the log-Jacobian in the lungs")
    if c.startswith("logjac_"):
        return ("", f"log-Jacobian summary: {c[7:].replace('_', ' ')}")
    unit = ("mm" if c.endswith("_mm") else "s" if c.endswith("_s") else "HU" if "hu" in c
            else "fraction" if "fraction" in c or "coverage" in c else "")  # fmt: skip
    what = c.split("_", 1)[1].replace("_", " ") if "_" in c else c
    if c.startswith("reg_truth_"):
        return (unit, f"registration against the synthetic truth: {c[10:].replace('_', ' ')}")
    if c.startswith("reg_"):
        return (unit, f"follow-up -> baseline registration QA: {what} (ncc: normalised cross-"
                "correlation in the lungs, lncc: local NCC, mad_hu: mean absolute difference; "
                "before / after registration)")  # fmt: skip
    if c.startswith("tpl_"):
        return (unit, f"baseline -> template registration QA: {what} (dice: lung overlap in "
                "template space; mean_*: mean log-Jacobian before / after the warp)")
    return (unit, "clinical value from the manifest" if c in CLINICAL else "")


def _with_pair_columns(table: pd.DataFrame) -> pd.DataFrame:
    """A table of a long manifest's pairs (unit ids ``P001/pairs/0-2``): ``patient_id`` as the
    manifest's, then ``t0, t1`` (the pair); a two-scan cohort's table as it is."""
    from sscflow.cohort import parse_unit

    ids = table["patient_id"].astype(str) if "patient_id" in table else pd.Series([], dtype=str)
    parsed = [parse_unit(u) for u in ids]
    if all(p[1:] == (0, 1) for p in parsed):
        return table
    out = table.copy()
    out["patient_id"] = [p[0] for p in parsed]
    out.insert(1, "t0", [p[1] for p in parsed])
    out.insert(2, "t1", [p[2] for p in parsed])
    return out


def _patient_row(root, pid: str) -> dict:
    group = st.patient_group(root, pid, create=False)
    attrs = dict(group.attrs.get("sscflow", {}) or {})
    clinical = dict(attrs.get("clinical", {}) or {})
    row: dict = {"patient_id": pid}
    for key in CLINICAL:
        row[key] = clinical.get(key, np.nan)
    for key, value in clinical.items():
        if key not in row and key != "visual":
            row[key] = value
    for m in PFT:
        b, f = clinical.get(f"{m}_baseline"), clinical.get(f"{m}_followup")
        row[f"delta_{m}"] = float(f) - float(b) if _number(b) and _number(f) else np.nan
    row["functional"] = attrs.get("functional") or None
    row["visual"] = clinical.get("visual") or None

    for which, name in (("baseline", "lung_mask"), ("followup", "followup_lung_mask")):
        meta = _meta(group, name)
        row[f"lung_volume_{which}_ml"] = _float(meta.get("lung_volume_ml"))

    # sscflow.methods.extent: ILD extent (HAA, %)
    extent = dict(group.attrs.get("extent", {}) or {})
    for key in ("haa_baseline", "haa_followup", "delta_haa"):
        row[key] = _float(extent.get(key))

    summary = _meta(group, "log_jacobian").get("summary") or {}
    row["logjac_mean"] = _float(summary.get("mean"))
    row["logjac_per_year"] = per_year(row["logjac_mean"], clinical.get("interval_months"))
    row["logjac_median"] = _float(summary.get("median"))
    row["folded_fraction"] = _float(summary.get("folded_fraction"))
    for key, value in summary.items():
        if key not in ("mean", "median", "folded_fraction") and _number(value):
            row[f"logjac_{key}"] = value

    qa = _meta(group, "displacement").get("qa") or {}
    for key in REG_COLUMNS:
        row[f"reg_{key}"] = qa.get(key, np.nan)
    row.update(_flatten({k: v for k, v in qa.items() if k not in REG_SKIP}, "reg_"))
    tpl_qa = _meta(group, MAP).get("qa") or {}
    row.update(_flatten({k: v for k, v in tpl_qa.items() if k not in REG_SKIP}, "tpl_"))
    return row


def _meta(group, name) -> dict:
    """The ``sscflow`` attribute of a complete output; {} when it is absent or incomplete."""
    if st.output_state(group, name) != "complete":
        return {}
    return dict(group[name].attrs["sscflow"])


def _flatten(d: dict, prefix: str) -> dict:
    """Scalars of a nested dict as ``<prefix><key>`` / ``<prefix><key>_<sub>``; lists dropped."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}_"))
        elif _scalar(value):
            out[f"{prefix}{key}"] = np.nan if value is None else value
    return out


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def _number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and (
        math.isfinite(float(value)))


def _float(value) -> float:
    return float(value) if _number(value) else np.nan


def _numeric(column: pd.Series) -> bool:
    values = column.dropna()
    return len(values) == 0 or all(_number(v) or isinstance(v, bool) for v in values)


# --- group means in template space ------------------------------------------------------------


def patient_maps(store, table: pd.DataFrame | None = None, *, chunk: int | None = None,
                 batch: int | None = None) -> xr.Dataset:  # fmt: skip
    """The template-space log-Jacobian maps of the cohort, stacked lazily along ``patient``.

    Parameters
    ----------
    store : path (or URL) of the cohort store, or its open root ``zarr.Group``
    table : a :func:`cohort_table` (columns ``patient_id``, ``functional``, ``visual``) naming
        the patients and their labels; the whole store, labels from its attributes, when None
    chunk : spatial chunk edge in voxels; the stored chunks of the first map when None (of the
        template lung mask when no patient has a map)
    batch : patients per chunk along ``patient``; by default as many as fit in about 16 MiB of
        float32 for one spatial chunk. A task reads one spatial block of ``batch`` patients, so
        the number of tasks is (patients / batch) x (spatial blocks), not patients x blocks.

    Returns
    -------
    xarray.Dataset with ``log_jacobian`` (patient, z, y, x), float32, a dask array that reads the
    stored maps block by block when computed (nothing is loaded here), the template's
    ``lung_mask`` (z, y, x) uint8, also lazy, coordinates ``patient``, ``functional_label`` and
    ``visual_label`` (per patient; None without a label) and ``z, y, x`` in mm (origin + index *
    spacing of the template image). Attributes: ``left_out`` (patients of ``table`` without a
    complete map), ``spacing`` and ``origin`` (z, y, x mm), ``units``.

    Raises
    ------
    IncompleteOutputError when the store or its template is absent or incomplete; ValueError when
    a map is not on the template grid, a label is unknown or ``chunk`` / ``batch`` is not >= 1.
    """
    import dask.array as da

    for name, value in (("chunk", chunk), ("batch", batch)):
        if value is not None and int(value) < 1:
            raise ValueError(f"patient_maps: {name} must be a positive integer, got {value}")
    root = _root(store)
    image, mask = _template(root)
    geometry = image.geometry
    if mask.geometry.shape != geometry.shape:
        raise ValueError(
            f"{TEMPLATE}/lung_mask shape {mask.geometry.shape} differs from {TEMPLATE}/image "
            f"shape {geometry.shape}; rerun the template stage"
        )
    if table is None:
        table = cohort_table(root)
    ids, labels = _labels(table)

    arrays, included, left_out = [], [], []
    for pid in ids:
        try:
            group = st.patient_group(root, pid, create=False)
            stored = st.read_image(group, MAP)
        except IncompleteOutputError:
            left_out.append(pid)
            continue
        _check_grid(pid, stored.geometry, geometry)
        arrays.append(stored.array)
        included.append(pid)
    if chunk is not None:
        spatial = tuple(min(int(chunk), s) for s in geometry.shape)
    elif arrays:
        spatial = tuple(arrays[0].chunks[-3:])
    else:
        spatial = tuple(mask.array.chunks[-3:])
    if batch is None:
        batch = max(1, (16 << 20) // (4 * int(np.prod(spatial))))
    batch = max(1, min(int(batch), len(arrays)))
    reader = _PatientStack(arrays, geometry.shape)
    name = "patient-maps-" + st.hash_values(
        [(a.store_path.path, str(a.store)) for a in arrays], spatial, batch
    )[:16]
    stack = da.from_array(reader, chunks=(batch, *spatial), name=name, lock=False,
                          asarray=False, meta=np.empty((0,) * 4, np.float32))  # fmt: skip
    lung = da.from_zarr(mask.array, chunks=spatial).astype(np.uint8)
    keep = [ids.index(p) for p in included]
    coords = {
        "patient": np.array(included, dtype=object),
        **{f"{g}_label": ("patient", np.array([labels[g][i] for i in keep], dtype=object))
           for g in GROUPINGS},  # fmt: skip
        **_spatial_coords(geometry),
    }
    return xr.Dataset(
        {"log_jacobian": (("patient", "z", "y", "x"), stack),
         "lung_mask": (("z", "y", "x"), lung)},  # fmt: skip
        coords=coords,
        attrs={
            "left_out": left_out,
            "spacing": list(geometry.spacing),
            "origin": list(geometry.origin),
            "units": UNITS,
        },
    )


class _PatientStack:
    """A read-only (P, Z, Y, X) float32 array-like over P stored maps on one grid.

    Indexing reads only the asked region of the asked patients, so ``dask.array.from_array`` on it
    gives one task per (batch of patients, spatial block). Picklable: it holds ``zarr.Array``
    handles, which open their store again on a Dask worker.
    """

    def __init__(self, arrays, shape):
        self.arrays = list(arrays)
        self.shape = (len(self.arrays), *(int(s) for s in shape))
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (4 - len(key))
        if not all(isinstance(k, slice) for k in key):
            raise IndexError(f"_PatientStack takes slices only, got {key}")
        patients = range(self.shape[0])[key[0]]
        spatial = key[1:]
        shape = tuple(len(range(n)[k]) for n, k in zip(self.shape[1:], spatial, strict=True))
        out = np.empty((len(patients), *shape), np.float32)
        for j, i in enumerate(patients):
            out[j] = self.arrays[i][spatial]
        return out


def group_mean_dataset(maps: xr.Dataset) -> xr.Dataset:
    """Lazy per-group means of :func:`patient_maps` (nothing is computed here).

    For each grouping (``functional``: worsening, stable; ``visual``: worsened, stable, improved)
    and each group, the voxel-wise mean over the group's patients: the float64 sum of the
    members' maps divided by the number of members with a finite value at that voxel (a NaN voxel
    of one map, e.g. outside its field of view, is skipped; maps without NaN give the plain
    mean). One pass over the maps for both groupings: each block of ``batch`` patients is read
    once and turned into per-group sums and counts (a masked weighted sum), and those are summed
    over the patient blocks by a dask tree reduction, so memory is set by the chunk size, not by
    the number of patients. A group without patients has count 0 and an all-NaN mean; a patient
    without a label for a grouping is left out of that grouping only.

    Returns
    -------
    xarray.Dataset: ``<grouping>_mean`` (grouping, z, y, x) float32, ``<grouping>_count``
    (grouping) int64, ``all_mean`` (z, y, x) float32 and ``all_count``: the mean of every
    patient, labelled or not (what a cohort without labels can show), ``lung_mask`` (z, y, x)
    uint8; coordinates: the group names and z, y, x mm;
    attributes ``n_patients``, ``patients``, ``left_out``, ``units``, ``spacing``, ``origin``.
    """
    import dask.array as da

    stack = maps["log_jacobian"].data
    n_groups = sum(len(names) for names in GROUPINGS.values()) + 1  # + every patient ("all")
    codes = np.full((stack.shape[0], len(GROUPINGS) + 1), -1, np.int64)  # group offset, -1: none
    codes[:, -1] = n_groups - 1
    counts, offset = {}, 0
    for g, (grouping, names) in enumerate(GROUPINGS.items()):
        labels = np.asarray(maps[f"{grouping}_label"].values, dtype=object)
        counts[grouping] = []
        for i, name in enumerate(names):
            codes[labels == name, g] = offset + i
            counts[grouping].append(int(np.count_nonzero(labels == name)))
        offset += len(names)

    if stack.shape[0]:
        codes_da = da.from_array(codes, chunks=(stack.chunks[0], len(GROUPINGS) + 1))
        partial = da.blockwise(
            _accumulate, "pqzyx", stack, "pzyx", codes_da, "pg",
            new_axes={"q": 2 * n_groups}, adjust_chunks={"p": 1}, dtype=np.float64,
            concatenate=True, n_groups=n_groups,
            meta=np.empty((0,) * 5, np.float64),
        )  # fmt: skip
        totals = partial.sum(axis=0, split_every=4)  # (2 * groups, z, y, x): sums, then counts
    else:
        spatial = stack.chunks[1:]
        totals = da.zeros((2 * n_groups, *stack.shape[1:]), np.float64,
                          chunks=((2 * n_groups,), *spatial))  # fmt: skip
    variables, offset = {}, 0
    for grouping, names in GROUPINGS.items():
        sums = totals[offset : offset + len(names)]
        n = totals[n_groups + offset : n_groups + offset + len(names)]
        mean = da.map_blocks(_divide, sums, n, dtype=np.float32)
        group_names = np.array(names, dtype=object)
        variables[f"{grouping}_mean"] = xr.DataArray(
            mean.rechunk({0: 1}), dims=(grouping, "z", "y", "x"),
            coords={grouping: group_names}, attrs={"units": UNITS},
        )  # fmt: skip
        variables[f"{grouping}_count"] = xr.DataArray(
            np.array(counts[grouping], dtype=np.int64), dims=(grouping,),
            coords={grouping: group_names},
        )  # fmt: skip
        offset += len(names)
    everyone = n_groups - 1  # the mean of every patient, labelled or not
    variables["all_mean"] = xr.DataArray(
        da.map_blocks(_divide, totals[everyone], totals[n_groups + everyone], dtype=np.float32),
        dims=("z", "y", "x"), attrs={"units": UNITS, "description": "mean of every patient"})
    variables["all_count"] = xr.DataArray(np.int64(stack.shape[0]))
    variables["lung_mask"] = xr.DataArray(maps["lung_mask"].data, dims=("z", "y", "x"),
                                          attrs={"description": "template lung mask, 1 inside"})
    out = xr.Dataset(variables, coords={c: maps[c].variable for c in ("z", "y", "x")})
    out.attrs = {
        "n_patients": int(maps.sizes["patient"]),
        "patients": [str(p) for p in maps["patient"].values],
        "left_out": list(maps.attrs.get("left_out", [])),
        "units": UNITS,
        "spacing": list(maps.attrs["spacing"]),
        "origin": list(maps.attrs["origin"]),
        "axes": "z, y, x in mm, LPS: y increases posterior, z increases superior",
    }
    return out


def _accumulate(block: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group sums (float64) and finite counts of one block of patients' maps.

    block (k, z, y, x) float32; codes (k, groupings): each patient's group index per grouping,
    -1 for none. Returns (1, 2 * n_groups, z, y, x): sums of groups 0.., then their counts.
    """
    out = np.zeros((1, 2 * n_groups, *block.shape[1:]), np.float64)
    for j in range(block.shape[0]):
        wanted = codes[j][codes[j] >= 0]
        if wanted.size == 0:
            continue
        values = block[j]
        finite = np.isfinite(values)
        values = np.where(finite, values, 0.0)
        for c in wanted:
            out[0, c] += values
            out[0, n_groups + c] += finite
    return out


def _divide(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sums / n as float32, NaN where n is 0 (no warning)."""
    out = np.full(sums.shape, np.nan, np.float32)
    np.divide(sums, n, out=out, where=n > 0, casting="unsafe")
    return out


def group_means(store, table: pd.DataFrame | None, *, client=None, chunk: int | None = None,
                left_out=(), input_hash: str | None = None,
                params: dict | None = None) -> dict:  # fmt: skip
    """Stream the per-group mean log-Jacobian maps into ``STORE/group_means``.

    Parameters
    ----------
    store : path (or URL) of the cohort store (the output is written at ``<store>/group_means``)
    table : a :func:`cohort_table` (``patient_id``, ``functional``, ``visual``) naming the
        patients and labels to use; the whole store when None. Patients of ``table`` without a
        complete ``log_jacobian_template`` are listed in ``left_out``.
    client : a ``distributed.Client`` to compute on; otherwise dask's default scheduler (the
        current default client if there is one)
    chunk : spatial chunk edge (voxels) for reading and writing; the maps' stored chunks if None
    left_out : patients the caller left out before ``table`` (failed at an earlier stage, say);
        recorded in ``left_out`` with those of ``table`` that have no map
    input_hash, params : what the output records as made from (the group-means stage passes
        its own, ``sscflow.stages.group_means``); by default the maps' and labels' hash and
        ``chunk``

    Returns
    -------
    dict: ``path`` (str), ``n_patients`` (with a map), ``left_out`` (list of ids), ``counts``
    ({"functional": {"worsening": n, "stable": n}, "visual": {...}}), ``seconds``.

    The output group (readable with ``xarray.open_zarr(path)``) holds ``functional_mean``
    (functional, z, y, x) and ``visual_mean`` (visual, z, y, x), float32, NaN for a group
    without patients; ``functional_count``, ``visual_count``; the template ``lung_mask``;
    coordinates z, y, x in mm and the group names; attributes ``n_patients``, ``patients``,
    ``left_out``, ``units``, ``spacing``, ``origin`` and ``sscflow`` (stage, parameters, input
    hash, ``complete``: true only once every chunk is written).

    Raises
    ------
    IncompleteOutputError when the store or its template is absent; ValueError when a map is not
    on the template grid or a label is unknown.
    """
    t0 = time.perf_counter()
    if isinstance(store, zarr.Group):
        raise TypeError("group_means: store must be the store's path or URL (the output is "
                        "written at <store>/group_means), got an open zarr.Group")
    root = _root(store)
    maps = patient_maps(root, table, chunk=chunk)
    out = group_mean_dataset(maps)
    out.attrs["left_out"] = [str(p) for p in left_out if str(p) not in out.attrs["left_out"]] + \
        list(out.attrs["left_out"])
    if params is None:
        params = {"chunk": chunk, "version": STAGE_VERSION}
    if input_hash is None:
        input_hash = st.hash_values(
            [(str(p), _input_of(root, str(p))) for p in maps["patient"].values],
            {g: [str(v) for v in maps[f"{g}_label"].values] for g in GROUPINGS},
        )
    meta = {"stage": STAGE, "params": params, "input_hash": input_hash, "complete": False}
    out.attrs["sscflow"] = meta
    path = st.zarr_store(f"{os.fspath(store).rstrip('/')}/{OUTPUT}")
    with _quiet_consolidation():
        delayed = out.to_zarr(path, mode="w", zarr_format=3, compute=False)
    if client is not None:
        client.compute(delayed).result()
    else:
        delayed.compute()
    # The completion mark is written after every chunk, then the consolidated metadata that
    # xarray.open_zarr reads is refreshed.
    counts = {
        g: {str(k): int(v) for k, v in zip(out[g].values, out[f"{g}_count"].values, strict=True)}
        for g in GROUPINGS
    }
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    group.attrs["sscflow"] = {**meta, "counts": counts, "complete": True}
    with _quiet_consolidation():
        zarr.consolidate_metadata(path, zarr_format=3)
    return {
        "path": path,
        "n_patients": int(out.attrs["n_patients"]),
        "left_out": list(out.attrs["left_out"]),
        "counts": counts,
        "seconds": time.perf_counter() - t0,
    }


def _root(store):
    if isinstance(store, zarr.Group):
        return store
    return st.open_store(store, mode="r")


def _template(root):
    group = st.template_group(root)
    out = []
    for name in ("image", "lung_mask"):
        try:
            out.append(st.read_image(group, name))
        except IncompleteOutputError as exc:
            raise IncompleteOutputError(f"{exc}; run the template stage first") from None
    return tuple(out)


def _labels(table: pd.DataFrame) -> tuple[list[str], dict[str, list[str | None]]]:
    """Patient ids of ``table`` and their labels per grouping (None for no label)."""
    missing = [c for c in ("patient_id", *GROUPINGS) if c not in table.columns]
    if missing:
        raise ValueError(
            f"group_means: the table lacks column(s) {', '.join(missing)}; pass a cohort_table()"
        )
    ids = [str(p) for p in table["patient_id"]]
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise ValueError(f"group_means: patient(s) {', '.join(dup)} appear more than once")
    labels: dict[str, list[str | None]] = {}
    for grouping, names in GROUPINGS.items():
        values = []
        for pid, v in zip(ids, table[grouping], strict=True):
            if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v == "":
                values.append(None)
            elif str(v) in names:
                values.append(str(v))
            else:
                raise ValueError(
                    f"patient {pid}: {grouping} label {v!r} is unknown (use {', '.join(names)} "
                    "or leave it empty)"
                )
        labels[grouping] = values
    return ids, labels


def _check_grid(pid, g, template) -> None:
    if not g.same_grid(template):
        raise ValueError(
            f"patient {pid}: {MAP} grid (shape {g.shape}, spacing {g.spacing}, origin {g.origin})"
            f" differs from the template's (shape {template.shape}, spacing {template.spacing}, "
            f"origin {template.origin}); rerun the template stage for this patient"
        )


def _spatial_coords(geometry) -> dict:
    coords = {}
    for axis, n, h, o in zip("zyx", geometry.shape, geometry.spacing, geometry.origin,
                             strict=True):  # fmt: skip
        coords[axis] = xr.Variable(axis, o + np.arange(n) * h, attrs={"units": "mm"})
    return coords


def _input_of(root, pid) -> list:
    meta = dict(root[f"{st.PATIENTS}/{pid}/{MAP}"].attrs["sscflow"])
    return [meta.get("input_hash"), meta.get("params")]


class _quiet_consolidation(warnings.catch_warnings):
    """Consolidated metadata is not (yet) in the Zarr v3 spec and zarr says so on every write;
    xarray.open_zarr reads it without a warning, which is why it is written."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return out
