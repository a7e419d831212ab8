"""Lung zones in physical space on the baseline, and the log-Jacobian per zone.

The paper's central finding is regional (worsening shows as shrinkage of the posterior lung
bases), so each patient's map is reduced to one number per zone as well as to the whole-lung
mean. Every zone is a set of baseline lung voxels, cut in physical space (LPS, millimetres: +x
patient's left, +y posterior, +z superior; any grid direction), never by voxel counts:

- ``whole``: the lung mask;
- ``left`` / ``right``: the segmentation's lung labels when they hold both lungs (each at least
  :data:`MIN_SIDE_FRACTION` of the lung), else the mask's two largest connected components when
  each holds that share (the one of larger mean x is the left lung; a mask without labels: one
  given by the user, the synthetic truth). Both follow the lungs themselves: a lung pushed
  across the body's midline (a mediastinal shift, common when one lung loses volume) stays
  whole, and the lungs' unequal widths (the heart narrows the left) do not move lung from one
  side to the other. Only when neither finds two lungs (lungs that touch, unlabelled; one lung)
  does the physical left-right axis decide: +x of the midline, the middle of the lungs' x
  extent, is the patient's left (so a lone lung is halved: ``sides`` in the record says which
  rule was used). Voxels outside the two lungs (small components, unlabelled mask voxels) go by
  that axis too;
- ``upper`` / ``middle`` / ``lower``: thirds of the lungs' superior-inferior extent (both lungs
  together, from the lowest slice's lower face to the highest slice's upper face, counting the
  slices whose lung area is at least :data:`MIN_SLICE_FRACTION` of the largest slice's, so a
  trachea left in the mask does not stretch the height), by voxel centre;
- ``ventral`` / ``dorsal``: the anterior and posterior halves of the lungs' anterior-posterior
  extent (the same rule along y);
- ``rind`` / ``core``: the subpleural rind is every lung voxel whose centre lies within
  ``rind_mm`` of the nearest voxel centre outside the lung (scipy's Euclidean distance transform
  with the voxel spacing; the grid's edge counts as outside), the core is the rest. A rind of
  10 mm on a 2 mm grid is the 5 outer voxel layers: exactly 10 mm of a flat surface;
- ``lower_dorsal``: lower third and dorsal half, the paper's posterior bases.

The zones are stored as one uint8 code per voxel (:func:`zone_codes`: bit 0 lung, bit 1 left,
bits 2-3 the third, bit 4 dorsal, bit 5 rind), from which every zone's mask is one comparison
(:func:`zone_mask`), and the per-zone sums come from one ``bincount`` over the codes.

Per zone (:func:`zone_stats`): ``volume_ml``, ``measured_fraction`` (the zone's voxels whose
log-Jacobian is finite: the map is NaN where the follow-up did not image the lung),
``logjac_mean`` (over the measured voxels) and ``logjac_per_year`` (``logjac_mean`` x 12 /
months between the scans, :func:`per_year`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from sscflow.core.geometry import Geometry

ZONES = ("whole", "left", "right", "upper", "middle", "lower", "ventral", "dorsal", "rind",
         "core", "lower_dorsal")  # fmt: skip
RIND_MM = 10.0
MIN_SIDE_FRACTION = 0.1  # labels count as two lungs when each holds this share of the mask
# a slice counts in the lung's height when its lung area is this share of the largest slice's:
# the synthetic apices' last 4 mm slices hold 1-10% of it, a trachea left in a mask 0.7%
MIN_SLICE_FRACTION = 0.02
RIGHT_LABEL, LEFT_LABEL = 1, 2  # sscflow.methods.segment's lung labels
LUNG, LEFT, THIRD_SHIFT, DORSAL, RIND = 1, 2, 2, 16, 32  # bits of a zone code
THIRDS = ("upper", "middle", "lower")
TABLE_COLUMNS = ("patient_id", "t0", "t1", "zone", "volume_ml", "measured_fraction",
                 "logjac_mean", "logjac_per_year")  # fmt: skip


def physical_axis(geometry: Geometry, axis: int, box=None) -> np.ndarray:
    """Physical coordinate (mm) along LPS axis ``axis`` (0 z, 1 y, 2 x) of every voxel centre of
    ``geometry`` (or of the sub-box ``box``, a tuple of three slices), float64, broadcast from
    three 1-D terms: any direction, no (3, Z, Y, X) array."""
    box = box or tuple(slice(0, n) for n in geometry.shape)
    d = np.asarray(geometry.direction, float)  # ITK (x, y, z) rows and columns
    row = 2 - axis  # physical axis in ITK order
    out = np.asarray(geometry.origin[axis], float)
    for j, sl in enumerate(box):  # array axis j (z, y, x) is ITK column 2 - j
        idx = np.arange(sl.start, sl.stop, dtype=float) * geometry.spacing[j]
        shape = [1, 1, 1]
        shape[j] = idx.size
        out = out + (d[row, 2 - j] * idx).reshape(shape)
    return np.broadcast_to(out, tuple(s.stop - s.start for s in box))


def _half_extent(geometry: Geometry, axis: int) -> float:
    """Half a voxel's extent along physical axis ``axis`` (its centre to its faces)."""
    d = np.asarray(geometry.direction, float)
    return 0.5 * sum(abs(d[2 - axis, 2 - j]) * geometry.spacing[j] for j in range(3))


def _bands(coord: np.ndarray, lung: np.ndarray, half: float, parts: int) -> np.ndarray:
    """Which of ``parts`` equal bands of the lung's extent along ``coord`` each voxel centre
    falls in (0 = the band of the smallest coordinate).

    The extent runs over the slices across ``coord`` (one voxel thick: ``2 half``) whose lung
    area is at least :data:`MIN_SLICE_FRACTION` of the largest slice's, from the first one's
    lower face to the last one's upper face: a trachea or a main bronchus left in the mask (a
    few cm^2 per slice, far above the apices) does not stretch the lung's height. Voxels beyond
    it join the nearest band."""
    inside = coord[lung]
    width = 2.0 * half
    lo0 = float(inside.min()) - half
    counts = np.bincount(np.floor((inside - lo0) / width).astype(np.intp))
    kept = np.nonzero(counts >= MIN_SLICE_FRACTION * counts.max())[0]
    lo, hi = lo0 + kept[0] * width, lo0 + (kept[-1] + 1) * width
    band = np.floor((coord - lo) / ((hi - lo) / parts)).astype(np.int16)
    return np.clip(band, 0, parts - 1)


def lung_box(lung: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice]:
    """The lung's bounding box grown by ``margin`` voxels, inside the grid."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(lung.any(axis=other))[0]
        out.append(slice(max(int(idx[0]) - margin, 0),
                         min(int(idx[-1]) + 1 + margin, lung.shape[axis])))  # fmt: skip
    return tuple(out)


def zone_codes(lung, geometry: Geometry, labels=None, *,
               rind_mm: float = RIND_MM) -> tuple[np.ndarray, dict]:  # fmt: skip
    """Each voxel's zone code (uint8, 0 outside the lung; see the module notes) and how left and
    right were told apart.

    Parameters
    ----------
    lung : (Z, Y, X) baseline lung mask (non-zero = lung)
    geometry : its grid (physical space; any direction)
    labels : the segmentation's lung labels on the same grid (1 right, 2 left), or None
    rind_mm : depth of the subpleural rind, mm (> 0)

    Returns
    -------
    (codes, info): ``info["sides"]`` is "labels", "components" or "midline" (see the module
    notes), ``info["midline_x_mm"]`` the physical x of the midline (None when no voxel needed
    it).

    Raises
    ------
    ValueError when the mask is empty, its shape is not the geometry's, or rind_mm <= 0.
    """
    lung = np.asarray(lung) != 0
    if lung.shape != geometry.shape:
        raise ValueError(f"zone_codes: mask shape {lung.shape} differs from its grid's "
                         f"{geometry.shape}")  # fmt: skip
    if not lung.any():
        raise ValueError("zone_codes: the lung mask is empty")
    if not rind_mm > 0:
        raise ValueError(f"zone_codes: rind_mm must be > 0, got {rind_mm}")
    box = lung_box(lung)
    sub = lung[box]
    codes = np.zeros(sub.shape, np.uint8)
    codes[sub] = LUNG

    side, rest, info = None, sub, {"sides": "midline", "midline_x_mm": None}
    x = physical_axis(geometry, 2, box)
    if labels is not None:
        lab = np.asarray(labels)[box]
        right, left = (lab == RIGHT_LABEL) & sub, (lab == LEFT_LABEL) & sub
        if min(right.sum(), left.sum()) >= MIN_SIDE_FRACTION * sub.sum():
            side, rest, info["sides"] = left, sub & ~(right | left), "labels"
    if side is None:
        side = _by_components(sub, x)
        if side is not None:
            side, rest = side
            info["sides"] = "components"
    if rest.any():  # no two lungs found, or lung voxels outside them: the physical axis
        inside = x[sub]
        mid = 0.5 * (float(inside.min()) + float(inside.max()))
        info["midline_x_mm"] = mid
        by_axis = x > mid  # LPS: +x is the patient's left
        side = by_axis if side is None else side | (rest & by_axis)
    del x
    codes[sub & side] |= LEFT

    z = physical_axis(geometry, 0, box)
    third = 2 - _bands(z, sub, _half_extent(geometry, 0), 3)  # +z superior: band 2 is upper
    codes[sub] |= (third[sub] << THIRD_SHIFT).astype(np.uint8)
    del z, third
    y = physical_axis(geometry, 1, box)
    dorsal = _bands(y, sub, _half_extent(geometry, 1), 2) == 1  # +y posterior
    codes[sub & dorsal] |= DORSAL
    del y, dorsal

    padded = np.pad(sub, 1)  # the grid's edge is outside the lung
    depth = ndimage.distance_transform_edt(padded, sampling=geometry.spacing)[1:-1, 1:-1, 1:-1]
    codes[sub & (depth <= rind_mm)] |= RIND
    out = np.zeros(lung.shape, np.uint8)
    out[box] = codes
    return out, info


def _by_components(sub: np.ndarray, x: np.ndarray):
    """(left, rest) from the mask's two largest 6-connected components when each holds at least
    :data:`MIN_SIDE_FRACTION` of it (left: the one of larger mean physical x), rest the voxels
    of the other components; None when the mask is not two such parts."""
    comps, n = ndimage.label(sub)
    if n < 2:
        return None
    sizes = np.bincount(comps.ravel())[1:]
    a, b = np.argsort(sizes)[::-1][:2] + 1
    if sizes[b - 1] < MIN_SIDE_FRACTION * sub.sum():
        return None
    xa, xb = float(x[comps == a].mean()), float(x[comps == b].mean())
    left = comps == (a if xa > xb else b)
    return left, sub & (comps != a) & (comps != b)


def zone_mask(codes: np.ndarray, zone: str) -> np.ndarray:
    """The voxels of ``zone`` (one of :data:`ZONES`) from zone codes."""
    return _zone_of_codes(np.asarray(codes), zone)


def _zone_of_codes(c, zone: str):
    """Works on a code array or on the 64 possible codes at once (for the sums)."""
    lung = (c & LUNG) != 0
    third = (c >> THIRD_SHIFT) & 3
    rules = {
        "whole": lung,
        "left": lung & ((c & LEFT) != 0),
        "right": lung & ((c & LEFT) == 0),
        "upper": lung & (third == 0),
        "middle": lung & (third == 1),
        "lower": lung & (third == 2),
        "ventral": lung & ((c & DORSAL) == 0),
        "dorsal": lung & ((c & DORSAL) != 0),
        "rind": lung & ((c & RIND) != 0),
        "core": lung & ((c & RIND) == 0),
        "lower_dorsal": lung & (third == 2) & ((c & DORSAL) != 0),
    }
    if zone not in rules:
        raise ValueError(f"unknown zone {zone!r}; zones are {', '.join(ZONES)}")
    return rules[zone]


def zone_stats(codes: np.ndarray, logjac: np.ndarray, geometry: Geometry,
               months: float | None = None) -> list[dict]:  # fmt: skip
    """One row per zone of :data:`ZONES`: ``zone, voxels, volume_ml, measured_fraction,
    logjac_mean, logjac_per_year``.

    ``logjac`` is the log-Jacobian map on the codes' grid (NaN where not measured). The sums are
    float64 per code, then per zone: a zone's mean is its measured voxels' exact mean. A zone
    without a voxel has volume 0 and NaN fraction and mean; one without a measured voxel NaN
    mean.
    """
    codes = np.asarray(codes)
    lj = np.asarray(logjac)
    if codes.shape != lj.shape:
        raise ValueError(f"zone_stats: codes {codes.shape} and map {lj.shape} differ in shape")
    c = codes.ravel().astype(np.intp)
    values = lj.ravel()
    measured = np.isfinite(values)
    n = np.bincount(c, minlength=64)
    m = np.bincount(c[measured], minlength=64)
    s = np.bincount(c[measured], weights=values[measured].astype(np.float64), minlength=64)
    every = np.arange(64)
    rows = []
    for zone in ZONES:
        pick = _zone_of_codes(every, zone)
        voxels, count, total = int(n[pick].sum()), int(m[pick].sum()), float(s[pick].sum())
        mean = total / count if count else math.nan
        rows.append({"zone": zone, "voxels": voxels,
                     "volume_ml": voxels * geometry.voxel_volume_ml,
                     "measured_fraction": count / voxels if voxels else math.nan,
                     "logjac_mean": mean, "logjac_per_year": per_year(mean, months)})
    return rows


def per_year(value: float, months) -> float:
    """``value`` x 12 / ``months``: a change over the interval as a change per year (NaN when
    the interval is unknown, not a number or not > 0).

    >>> per_year(-0.06, 8.0), per_year(-0.06, None)
    (-0.09, nan)
    """
    try:
        months = float(months)
    except (TypeError, ValueError):
        return math.nan
    if not (math.isfinite(months) and months > 0) or value is None:
        return math.nan
    return float(value) * 12.0 / months


# --- the stage: patients/<id>/zones -------------------------------------------------------------

STAGE = "zones"
STAGE_VERSION = 1
OUTPUT = "zones"
MASK, LABELS, MAP = "lung_mask", "lung_labels", "log_jacobian"


def zones_patient(store, patient_id: str, *, rind_mm: float = RIND_MM, force: bool = False,
                  t0: int = 0, t1: int = 1) -> dict:  # fmt: skip
    """Compute and store one patient's zones on the baseline and the log-Jacobian per zone.

    Reads ``patients/<id>/lung_mask``, ``lung_labels`` (when complete) and ``log_jacobian``, and
    the interval ``interval_months`` of the patient's clinical record (the manifest's); writes
    ``patients/<id>/zones``: the zone codes (uint8, on the baseline grid) whose ``sscflow``
    attribute holds ``zones`` (one row per zone: :func:`zone_stats` with ``t0``, ``t1``),
    ``sides`` and ``months``. Skipped when current (same inputs, interval and parameters).

    Returns ``{"status": done|skipped, "seconds", "sides", "<zone>_logjac_mean" ...}``.

    Raises IncompleteOutputError when an input is absent or incomplete; ValueError when the
    grids differ or the mask is empty.
    """
    import time

    from sscflow.core import store as st

    start = time.perf_counter()
    root = st.open_store(store)
    group = st.patient_group(root, patient_id, create=False)
    who = f"patient {patient_id}"
    inputs = st.read_inputs(group, (MASK,), who, "segment the patient first")
    inputs |= st.read_inputs(group, (MAP,), who, "run the jacobian stage for it first")
    if st.output_state(group, LABELS) == "complete":
        inputs[LABELS] = st.read_image(group, LABELS)
    geometry = st.stored_geometry(inputs[MASK])
    for name, image in inputs.items():
        if not image.geometry.same_grid(inputs[MASK].geometry):
            raise ValueError(f"{who}: {name} is not on the baseline {MASK}'s grid; run the "
                             "stages before zones again")  # fmt: skip
    clinical = dict((group.attrs.get("sscflow", {}) or {}).get("clinical", {}) or {})
    months = clinical.get("interval_months")
    months = float(months) if isinstance(months, int | float) and math.isfinite(months) else None
    params = {"rind_mm": float(rind_mm), "version": STAGE_VERSION}
    key = st.upstream_hash(list(inputs.values()), months, t0, t1)
    meta = None if force else st.current_record(group, (OUTPUT,), key, params)
    if meta is not None:
        return {"status": "skipped", "seconds": time.perf_counter() - start,
                **_flat(meta["zones"], meta.get("sides"))}  # fmt: skip

    lung = np.asarray(inputs[MASK].array[...])
    labels = np.asarray(inputs[LABELS].array[...]) if LABELS in inputs else None
    codes, info = zone_codes(lung, geometry, labels, rind_mm=rind_mm)
    del lung, labels
    box = lung_box(codes)
    logjac = np.asarray(inputs[MAP].array[box])  # the lung's box only
    rows = [{"t0": t0, "t1": t1, **r} for r in zone_stats(codes[box], logjac, geometry, months)]
    st.write_image(group, OUTPUT, codes, geometry, stage=STAGE, params=params, input_hash=key,
                   extra={"zones": rows, "sides": info["sides"],
                                               "midline_x_mm": info["midline_x_mm"],
                                               "months": months, "codes": CODE_NOTE})
    return {"status": "done", "seconds": time.perf_counter() - start,
            **_flat(rows, info["sides"])}  # fmt: skip


CODE_NOTE = ("uint8 per voxel, 0 outside the lung: bit 0 lung, bit 1 left, bits 2-3 third "
             "(0 upper, 1 middle, 2 lower), bit 4 dorsal, bit 5 subpleural rind")


def _flat(rows: list[dict], sides) -> dict:
    """The run record's figures: each zone's mean log-Jacobian."""
    return {"sides": sides, **{f"{r['zone']}_logjac_mean": r["logjac_mean"] for r in rows}}


def zone_table(store, patient_ids=None):
    """``results/zones.csv`` as a DataFrame (contract: :data:`TABLE_COLUMNS`): one row per
    patient, pair and zone, from each pair's stored ``zones`` output (``patient_ids``: unit
    ids, ``sscflow.cohort.unit_id``; ``patient_id`` in the table is the manifest's); pairs
    without one are left out."""
    import pandas as pd

    from sscflow.cohort import parse_unit
    from sscflow.core import store as st

    root = store if hasattr(store, "attrs") else st.open_store(store, mode="r")
    ids = st.patient_ids(root) if patient_ids is None else [str(p) for p in patient_ids]
    in_store = set(st.patient_ids(root))
    rows = []
    for pid in ids:
        if pid not in in_store:
            continue
        meta = st.stored_record(root[f"{st.PATIENTS}/{pid}"], OUTPUT)
        for r in (meta or {}).get("zones", []):
            rows.append({"patient_id": parse_unit(pid)[0],
                         **{k: r.get(k) for k in TABLE_COLUMNS[1:]}})  # fmt: skip
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    for c in TABLE_COLUMNS[4:]:
        table[c] = pd.to_numeric(table[c], errors="coerce").astype("float64")
    return table


def write_zone_table(table, folder):
    """Write ``folder/zones.csv`` (volumes to 0.001 mL, fractions to 1e-6, log-Jacobians to
    1e-6); unchanged, the file is not rewritten. Returns its path."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "zones.csv"
    out = table.copy()
    out["volume_ml"] = out["volume_ml"].round(3)
    for c in ("measured_fraction", "logjac_mean", "logjac_per_year"):
        out[c] = out[c].round(6)
    text = out.to_csv(index=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def zone_group_means(zones, labels, *, column: str = "logjac_mean", by: str = "functional",
                     groups=("worsening", "stable"), level: float = 0.95):  # fmt: skip
    """Per zone, each group's mean of ``column`` with its ``level`` confidence interval
    (Student's t, :func:`sscflow.methods.stats.mean_ci`) and the comparison of the groups
    (:func:`sscflow.methods.stats.compare_groups`: Mann-Whitney U for two).

    ``zones`` is a :func:`zone_table`; ``labels`` a table with ``patient_id`` (unit ids) and
    ``by`` (the cohort table): only the pairs it lists count.
    Returns a DataFrame, one row per zone of :data:`ZONES` present, with columns
    ``zone``, ``<group>_n``, ``<group>_mean``, ``<group>_low``, ``<group>_high`` for each group,
    ``test`` and ``p``.
    """
    import pandas as pd

    from sscflow.cohort import unit_id
    from sscflow.methods.stats import compare_groups, mean_ci

    label = dict(zip(labels["patient_id"].astype(str), labels[by], strict=True)) if (
        by in labels) else {}  # fmt: skip
    units = [unit_id(str(p), int(a), int(b)) for p, a, b in
             zip(zones["patient_id"], zones["t0"], zones["t1"], strict=True)]  # fmt: skip
    frame = zones.assign(group=pd.Series(units, index=zones.index, dtype=object).map(label))
    rows = []
    for zone in ZONES:
        part = frame[frame["zone"] == zone]
        if not len(part):
            continue
        values = {g: pd.to_numeric(part.loc[part["group"] == g, column], errors="coerce")
                  .dropna().to_numpy(float) for g in groups}  # fmt: skip
        row = {"zone": zone}
        for g, v in values.items():
            mean, low, high = mean_ci(v, level)
            row |= {f"{g}_n": int(v.size), f"{g}_mean": mean, f"{g}_low": low,
                    f"{g}_high": high}  # fmt: skip
        test = compare_groups(values)
        rows.append({**row, "test": test["test"], "p": test["p"]})
    columns = ["zone", *(f"{g}_{k}" for g in groups for k in ("n", "mean", "low", "high")),
               "test", "p"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
