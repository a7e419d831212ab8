"""Per-patient QA pages: what each stage did to one patient, as pictures, offline.

``qa_patient(store, patient_id, results_dir)`` draws, from what the store holds for the patient:

- the baseline CT in axial and coronal slices through the lungs' centroid and a sagittal slice
  through each lung's own centroid, with the lung mask's contour;
- the lung zones of :mod:`sscflow.methods.zones` on the same slices, coloured by zone;
- the follow-up against the baseline on the same slices, before registration (the follow-up
  resampled onto the baseline grid by physical position) and after (resampled at x + u(x)), as
  checkerboards (alternating 4 cm squares of baseline and follow-up) and as the absolute
  difference in HU;
- the log-Jacobian map over the baseline CT (diverging colours centred at 0, fixed range
  ``LOGJAC_RANGE``, colour bar in log-Jacobian units; NaN where not measured is left clear);
- the template-space map over the template CT;

and writes ``results_dir/report/qa/<patient_id>.html``: one self-contained page (images embedded,
no scripts), with the patient's key figures and the QA flags (:data:`FLAG_RULES`) it raises.
The stage is resumable: the page records a hash of the inputs it was drawn from (every output's
input hash and parameters) in the patient group's ``qa_page`` attribute and is skipped when
they are unchanged and the page exists.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from sscflow.core import store as st
from sscflow.core.geometry import resample, warp_to_baseline
from sscflow.errors import IncompleteOutputError
from sscflow.methods.groups import cohort_table
from sscflow.views.pages import render, write_text

STAGE_VERSION = 1
LOGJAC_RANGE = 0.3  # colour limits +/- this, the same for every patient
CHECKER_MM = 40.0
TITLE_PT = 11  # panel titles, readable at 100% zoom
INPUTS = ("baseline", "followup", "lung_mask", "followup_lung_mask", "displacement",
          "log_jacobian", "log_jacobian_template", "zones")  # fmt: skip

#: (name, rule as shown to the reader, test on a cohort-table row: True raises the flag)
FLAG_RULES: list[tuple[str, str, object]] = [
    ("similarity", "local NCC inside the lungs did not improve with registration "
     "(lncc_after <= lncc_before)",
     lambda r: _lt_eq(r.get("reg_lncc_after"), r.get("reg_lncc_before"))),
    ("folding", "more than 0.1% of lung voxels fold (det J <= 0)",
     lambda r: _gt(r.get("folded_fraction"), 0.001)),
    ("coverage", "less than 95% of the baseline lungs map inside the follow-up's field of view",
     lambda r: _lt(r.get("reg_lung_coverage"), 0.95)),
    ("template", "template-space lung Dice below 0.80", lambda r: _lt(r.get("tpl_dice"), 0.80)),
    ("volume", "follow-up / baseline lung volume outside 0.67 to 1.5",
     lambda r: _outside(_ratio(r.get("lung_volume_followup_ml"), r.get("lung_volume_baseline_ml")),
                        0.67, 1.5)),
    ("log-Jacobian", "mean log-Jacobian in the lungs beyond +/-0.2 (an 18% volume change)",
     lambda r: _outside(r.get("logjac_mean"), -0.2, 0.2)),
]  # fmt: skip

#: (cohort-table column, heading, format) of the key figures on the page and in the report
KEY_FIGURES = [
    ("lung_volume_baseline_ml", "lung volume baseline (mL)", "{:.0f}"),
    ("lung_volume_followup_ml", "lung volume follow-up (mL)", "{:.0f}"),
    ("reg_lncc_before", "local NCC before", "{:.3f}"),
    ("reg_lncc_after", "local NCC after", "{:.3f}"),
    ("folded_fraction", "folded fraction", "{:.4%}"),
    ("reg_lung_coverage", "lung coverage", "{:.1%}"),
    ("reg_unmeasured_lung_ml", "unmeasured lung (mL)", "{:.0f}"),
    ("reg_unmeasured_lung_pct", "unmeasured lung (%)", "{:.1f}"),
    ("reg_unmeasured_where", "unmeasured at", "{}"),
    ("tpl_dice", "template Dice", "{:.3f}"),
    ("logjac_mean", "mean log-Jacobian", "{:+.4f}"),
]


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _lt(a, b):
    a = _num(a)
    return None if a is None else a < b


def _gt(a, b):
    a = _num(a)
    return None if a is None else a > b


def _lt_eq(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or b is None else a <= b


def _ratio(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or not b else a / b


def _outside(v, lo, hi):
    v = _num(v)
    return None if v is None else not lo <= v <= hi


def flags(row: dict) -> list[tuple[str, str]]:
    """The (name, rule) of every :data:`FLAG_RULES` entry the row raises (missing values: none).

    >>> flags({"tpl_dice": 0.5, "folded_fraction": 0.0})
    [('template', 'template-space lung Dice below 0.80')]
    """
    return [(name, rule) for name, rule, test in FLAG_RULES if test(row)]


def format_value(value, fmt: str) -> str:
    """``fmt`` applied to a finite number, else an en dash (never "nan" or "-0"); text (the
    format ``{}``) as it is, an en dash when empty.

    >>> format_value(-0.00001, "{:+.4f}"), format_value(float("nan"), "{:.1f}")
    ('+0.0000', '–')
    >>> format_value("base", "{}"), format_value("", "{}")
    ('base', '–')
    """
    if fmt == "{}":
        return str(value) if isinstance(value, str) and value else "–"
    v = _num(value)
    if v is None:
        return "–"
    text = fmt.format(v)
    if text.lstrip("+-").strip("0.%") == "" and text.startswith("-"):
        text = text[1:] if not fmt.startswith("{:+") else "+" + text[1:]
    return text


def page_path(results_dir, patient_id: str) -> Path:
    return Path(results_dir) / "report" / "qa" / f"{patient_id}.html"


def figures_path(results_dir, patient_id: str) -> Path:
    """The page's drawn figures and the hash of the store outputs they were drawn from, kept
    beside the results (not in the report folder one shares) so that a page whose trajectory
    alone changed (a new timepoint of the patient) is written again without drawing again."""
    return Path(results_dir) / ".cache" / "qa" / f"{patient_id}.json"


def _cached_figures(path: Path, key: str) -> list | None:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("input_hash") != key:
        return None
    figures = cached.get("figures")
    ok = isinstance(figures, list) and all(
        isinstance(f, list) and len(f) == 3 and all(isinstance(v, str) for v in f)
        for f in figures)  # fmt: skip
    return [tuple(f) for f in figures] if ok else None


def _inputs_key(group) -> dict:
    out = {}
    for name in INPUTS:
        if st.output_state(group, name) == "complete":
            meta = group[name].attrs["sscflow"]
            out[name] = [meta.get("input_hash"), meta.get("params")]
    return out


def qa_patient(store: str, patient_id: str, results_dir, *, force: bool = False,
               trajectory: Path | None = None) -> dict:  # fmt: skip
    """Draw the patient's QA page; returns ``{"status": done|skipped, "path", "flags"}``.
    ``trajectory``: the patient's trajectory figure (a PNG the pairs stage drew from every pair
    of the patient), shown on the page; the page is redrawn when it changes."""
    t0 = time.perf_counter()
    root = st.open_store(store, mode="r")
    group = st.patient_group(root, patient_id, create=False)
    if st.output_state(group, "baseline") != "complete":
        raise IncompleteOutputError(f"patient {patient_id}: no baseline in the store; ingest it")
    path = page_path(results_dir, patient_id)
    png = Path(trajectory).read_bytes() if trajectory is not None else None
    inputs = (_inputs_key(group), dict(group.attrs.get("sscflow", {})), STAGE_VERSION)
    key = st.hash_values(*inputs, *((hashlib.sha256(png).hexdigest(),) if png else ()))
    old = dict(group.attrs.get("qa_page", {}) or {})
    row = cohort_table(root, [patient_id]).iloc[0].to_dict()
    raised = flags(row)
    if not force and old.get("input_hash") == key and path.is_file():
        return {"status": "skipped", "path": str(path), "flags": len(raised),
                "seconds": time.perf_counter() - t0}
    drawn_key = st.hash_values(*inputs)
    cache = figures_path(results_dir, patient_id)
    figures = None if force else _cached_figures(cache, drawn_key)
    reused = figures is not None
    if figures is None:
        figures = draw_patient(root, patient_id)
        write_text(cache, json.dumps({"input_hash": drawn_key, "figures": figures}))
    figures = list(figures)
    if png is not None:
        figures.append(("Trajectory", "The patient's cumulative mean log-Jacobian (the sum of "
                        "its consecutive pairs' means) and FVC / DLCO (% predicted) at each "
                        "timepoint, from every pair registered so far.",
                        base64.b64encode(png).decode()))  # fmt: skip
    write_text(path, _page(patient_id, row, raised, figures))
    rw = st.open_store(store)
    st.patient_group(rw, patient_id, create=False).attrs["qa_page"] = {
        "input_hash": key, "path": str(path), "flags": [n for n, _ in raised]}  # fmt: skip
    return {"status": "done", "path": str(path), "flags": len(raised), "figures_reused": reused,
            "seconds": time.perf_counter() - t0}  # fmt: skip


# --- drawing ---------------------------------------------------------------------------------


def _read(group, name):
    try:
        s = st.read_image(group, name)
    except IncompleteOutputError:
        return None, None
    return np.asarray(s.array[...]), st.stored_geometry(s)


def _centre(mask, shape):
    """Where the views cut: (z, y, x) of the lungs' centroid, then the x of each lung's own
    centroid (patient's right first: x grows towards the patient's left). The centroid of both
    lungs lies on the mediastinum, so a sagittal view there shows almost no lung; each lung's
    half of the mask (either side of that centroid) gives its own.

    >>> m = np.zeros((4, 6, 20), bool); m[:, 1:5, 2:7] = True; m[:, 1:5, 12:18] = True
    >>> _centre(m, m.shape)[2:]  # the centroid of both on the gap, then each lung's
    (10, 4, 14)
    """
    if mask is None or not mask.any():
        c = tuple(s // 2 for s in shape)
        return (*c, c[2], c[2])
    idx = np.nonzero(mask)
    centre = tuple(int(round(float(np.mean(i)))) for i in idx)
    per_x = np.bincount(idx[2], minlength=shape[2]).astype(float)
    x = np.arange(shape[2], dtype=float)
    sides = []
    for part in (x < centre[2], x >= centre[2]):
        w = per_x * part
        sides.append(int(round(float((w @ x) / w.sum()))) if w.sum() else centre[2])
    return (*centre, *sides)


def _views(volume, centre, spacing):
    """(name, 2-D slice, extent) for axial and coronal through the lungs' centroid and one
    sagittal through each lung's centroid; every slice is shown with superior / anterior /
    patient's right conventions."""
    cz, cy, cx, x_right, x_left = centre
    dz, dy, dx = spacing
    nz, ny, nx = volume.shape[-3:]
    return [
        ("axial", volume[..., cz, :, :], (0, nx * dx, ny * dy, 0)),
        ("coronal", volume[..., :, cy, :], (0, nx * dx, 0, nz * dz)),
        ("sagittal, right lung", volume[..., :, :, x_right], (0, ny * dy, 0, nz * dz)),
        ("sagittal, left lung", volume[..., :, :, x_left], (0, ny * dy, 0, nz * dz)),
    ]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _row_figure(n=4, height=3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * n + 0.8, height))
    FigureCanvasAgg(fig)
    # fixed margins (no layout engine: constrained layout was a third of a page's time): each
    # panel's title in the band above it, no ticks, the colour bar (if any) beside the row
    w = fig.get_figwidth()
    fig.subplots_adjust(left=0.1 / w, right=1 - 0.7 / w, bottom=0.05 / height,
                        top=1 - 0.3 / height, wspace=0.06)
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _ct(ax, img, ext, title):
    ax.imshow(img, cmap="gray", vmin=-1000, vmax=300, extent=ext, origin="lower"
              if ext[2] < ext[3] else "upper", interpolation="nearest")  # fmt: skip
    ax.set_title(title, fontsize=TITLE_PT)
    ax.set_xticks([])
    ax.set_yticks([])


def _origin(ext):
    return "lower" if ext[2] < ext[3] else "upper"


def checkerboard(a, b, spacing2d, square_mm: float = CHECKER_MM) -> np.ndarray:
    """Alternating squares of ``a`` and ``b`` (2-D, same shape), ``square_mm`` wide.

    >>> checkerboard(np.zeros((2, 4)), np.ones((2, 4)), (1.0, 1.0), 2.0).tolist()
    [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    """
    iy = (np.arange(a.shape[0]) * spacing2d[0] // square_mm).astype(int)
    ix = (np.arange(a.shape[1]) * spacing2d[1] // square_mm).astype(int)
    pick = (iy[:, None] + ix[None, :]) % 2 == 1
    return np.where(pick, b, a)


def draw_patient(root, patient_id: str) -> list[tuple[str, str, str]]:
    """The page's figures: (title, caption, base64 PNG), for the outputs that exist."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    group = st.patient_group(root, patient_id, create=False)
    base, bgeom = _read(group, "baseline")
    mask, _ = _read(group, "lung_mask")
    follow, fgeom = _read(group, "followup")
    u, _ = _read(group, "displacement")
    lj, _ = _read(group, "log_jacobian")
    out = []
    centre = _centre(mask, base.shape)
    spacing = bgeom.spacing

    fig, axes = _row_figure()
    for ax, (name, img, ext) in zip(axes, _views(base, centre, spacing), strict=True):
        _ct(ax, img, ext, name)
        if mask is not None:
            m = dict((n, i) for n, i, _ in _views(mask, centre, spacing))[name]
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="#ffcc00", linewidths=0.8,
                           extent=ext, origin=_origin(ext))  # fmt: skip
    out.append(("Baseline and lung mask", "Baseline CT (W 1300, L -350) through the lungs' "
                "centroid, sagittal through each lung's; yellow: the lung-mask "
                "contour.", _png(fig)))  # fmt: skip

    codes, _ = _read(group, "zones")
    if codes is not None and codes.shape == base.shape:
        meta = st.stored_record(group, "zones") or {}
        out.append(("Lung zones on the baseline", "The zones the per-zone table is cut by, in "
                    "physical space: left / right lung (from the "
                    f"{'segmentation labels' if meta.get('sides') == 'labels' else 'midline'}),"
                    " thirds of the lung height, ventral / dorsal halves and the subpleural rind "
                    f"({(meta.get('params') or {}).get('rind_mm', '?')} mm); each panel colours "
                    "one cut (its legend), lower_dorsal is the paper's posterior bases.",
                    _zones_figure(base, codes, centre, spacing)))  # fmt: skip

    if follow is not None:
        before = resample(follow, fgeom, bgeom, fill=-1024.0)
        pairs = [("before registration", before)]
        if u is not None:
            pairs.append(("after registration", warp_to_baseline(follow, fgeom, u, bgeom)))
        for label, moved in pairs:
            fig, axes = _row_figure(8, 3.0)
            views_b = _views(base.astype(np.float32), centre, spacing)
            views_m = _views(moved, centre, spacing)
            for k, ((name, b, ext), (_, m, _)) in enumerate(zip(views_b, views_m, strict=True)):
                sp2 = [spacing[i] for i in {"axial": (1, 2), "coronal": (0, 2)}.get(name, (0, 1))]
                _ct(axes[k], checkerboard(b, m, sp2), ext, f"{name}: checkerboard")
                diff = np.abs(m - b)
                n = len(views_b)
                axes[n + k].imshow(diff, cmap="magma", vmin=0, vmax=400, extent=ext,
                                   origin=_origin(ext), interpolation="nearest")  # fmt: skip
                axes[n + k].set_title(f"{name}: |difference|", fontsize=TITLE_PT)
                axes[n + k].set_xticks([])
                axes[n + k].set_yticks([])
            inside = mask.astype(bool) if mask is not None and mask.any() else slice(None)
            mad = float(np.mean(np.abs(moved - base)[inside]))
            out.append((f"Follow-up {label}", f"Checkerboard of {CHECKER_MM:.0f} mm squares "
                        "(baseline and follow-up alternate) and absolute difference (0 to 400 "
                        f"HU); mean absolute difference in the lungs {mad:.0f} HU. Before: the "
                        "follow-up placed by its scanner coordinates only; after: resampled at "
                        "x + u(x).", _png(fig)))  # fmt: skip

    norm = Normalize(-LOGJAC_RANGE, LOGJAC_RANGE)
    cmap = colormaps["RdBu_r"].with_extremes(bad=(0, 0, 0, 0))
    if lj is not None:
        lung = mask.astype(bool) if mask is not None else np.ones(lj.shape, bool)
        shown = np.where(lung, lj, np.nan)
        unmeasured = lung & ~np.isfinite(lj)
        ml = float(unmeasured.sum()) * float(np.prod(spacing)) / 1000.0
        out.append(("Log-Jacobian over the baseline",
                    f"log det(I + grad u) inside the baseline lungs, fixed range "
                    f"\u00b1{LOGJAC_RANGE} (blue < 0: shrinkage from baseline to follow-up). "
                    f"Outlined in black, dashed: lung not measured (the follow-up did not image "
                    f"it), {ml:.1f} mL.",
                    _overlay(base, shown, centre, spacing, norm, cmap, unmeasured)))  # fmt: skip
    try:
        tpl = st.template_group(root)
        timg, tgeom = _read(tpl, "image")
        tmask, _ = _read(tpl, "lung_mask")
    except IncompleteOutputError:
        timg = None
    lj_t, _ = _read(group, "log_jacobian_template")
    if timg is not None and lj_t is not None:
        shown = np.where(tmask.astype(bool), lj_t, np.nan) if tmask is not None else lj_t
        out.append(("Template-space map", "The log-Jacobian map brought to the template, over "
                    "the template CT, inside the template lungs (same colours).",
                    _overlay(timg, shown, _centre(tmask, timg.shape), tgeom.spacing, norm,
                             cmap)))  # fmt: skip
    return out


#: per view, (categories' names, colours, category of a zone code) of the zone figure
ZONE_PANELS = {
    "axial": (("right ventral", "right dorsal", "left ventral", "left dorsal"),
              ("#9ecae1", "#2171b5", "#fdae6b", "#d94801"),
              lambda c: 2 * ((c >> 1) & 1) + ((c >> 4) & 1)),
    "coronal": (("right upper", "right middle", "right lower", "left upper", "left middle",
                 "left lower"), ("#c6dbef", "#6baed6", "#08519c", "#fdd0a2", "#fd8d3c",
                                 "#a63603"),
                lambda c: 3 * ((c >> 1) & 1) + ((c >> 2) & 3)),
    "sagittal, right lung": (("upper ventral", "upper dorsal", "middle ventral",
                              "middle dorsal", "lower ventral", "lower_dorsal"),
                             ("#e5f5e0", "#a1d99b", "#c7e9c0", "#74c476", "#fee391",
                              "#e31a1c"),
                             lambda c: 2 * ((c >> 2) & 3) + ((c >> 4) & 1)),
    "sagittal, left lung": (("core", "rind"), ("#bcbddc", "#54278f"),
                            lambda c: (c >> 5) & 1),
}  # fmt: skip


def _zones_figure(ct, codes, centre, spacing) -> str:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, axes = _row_figure()
    zones = dict((n, v) for n, v, _ in _views(codes, centre, spacing))
    for ax, (name, img, ext) in zip(axes, _views(ct, centre, spacing), strict=True):
        _ct(ax, img, ext, f"{name}: zones")
        names, colours, category = ZONE_PANELS[name]
        c = zones[name].astype(np.int32)
        shown = np.where(c > 0, category(c), np.nan).astype(float)
        ax.imshow(shown, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5,
                  alpha=0.6, extent=ext, origin=_origin(ext), interpolation="nearest")
        ax.legend(handles=[Patch(color=k, label=n) for n, k in zip(names, colours, strict=True)],
                  fontsize=6, loc="lower left", framealpha=0.7)
    return _png(fig)


def _overlay(ct, values, centre, spacing, norm, cmap, unmeasured=None) -> str:
    fig, axes = _row_figure()
    image = None
    vals = dict((n, v) for n, v, _ in _views(values, centre, spacing))
    gaps = {} if unmeasured is None else dict((n, v) for n, v, _ in
                                              _views(unmeasured, centre, spacing))  # fmt: skip
    for ax, (name, img, ext) in zip(axes, _views(ct, centre, spacing), strict=True):
        _ct(ax, img, ext, name)
        image = ax.imshow(vals[name], cmap=cmap, norm=norm, extent=ext, origin=_origin(ext),
                          interpolation="nearest")  # fmt: skip
        if name in gaps and gaps[name].any():  # the lung not measured, outlined
            ax.contour(gaps[name].astype(float), levels=[0.5], colors="black",
                       linestyles="dashed", linewidths=0.9, extent=ext, origin=_origin(ext))
    w = fig.get_figwidth()
    fig.subplots_adjust(right=1 - 1.2 / w)  # room for the colour bar, its ticks and its label
    bar = fig.colorbar(image, cax=fig.add_axes((1 - 1.05 / w, 0.12, 0.12 / w, 0.72)))
    bar.set_label("log-Jacobian (< 0: shrinkage)", fontsize=8)
    return _png(fig)


def _page(patient_id, row, raised, figures) -> str:
    cov = row.get("reg_slice_thickness_mm_baseline"), row.get("reg_slice_thickness_mm_followup")
    thickness = None
    if any(_num(v) is not None for v in cov):
        thickness = [format_value(v, "{:.2f}") for v in cov]
    return render(
        "qa.html",
        patient_id=patient_id,
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        heads=[h for _, h, _ in KEY_FIGURES],
        cells=[format_value(row.get(c), f) for c, _, f in KEY_FIGURES],
        thickness=thickness,
        raised=raised,
        figures=figures,
        rules=[(n, r) for n, r, _ in FLAG_RULES],
    )
