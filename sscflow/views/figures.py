"""Figures from the store: the paper's Figure 5, sagittal projections of the group-mean maps.

matplotlib is imported inside the functions (``import sscflow`` stays light); figures are drawn
on a plain ``matplotlib.figure.Figure`` with the Agg canvas, so no display is needed and the
caller's pyplot backend is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sscflow.core import store as st
from sscflow.core.store import zarr_store
from sscflow.methods.groups import GROUPINGS, OUTPUT, _quiet_consolidation

COLORBAR_LABEL = "mean log-Jacobian (< 0: shrinkage)"
DPI = 120


def sagittal_projection(mean, lung_mask) -> np.ndarray:
    """Mean of a (z, y, x) map along x (left-right) over the voxels inside ``lung_mask``.

    Parameters
    ----------
    mean : (Z, Y, X) array (numpy, dask or xarray), e.g. one group's mean log-Jacobian
    lung_mask : (Z, Y, X) array, nonzero inside the lungs

    Returns
    -------
    (Z, Y) float64 numpy array: for each (z, y), the mean of ``mean[z, y, x]`` over the x where
    the mask is set and the value is finite; NaN where there is none (the mask projects to
    nothing there, or the group has no patients).

    Examples
    --------
    >>> m = np.array([[[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]])
    >>> mask = np.array([[[1, 1, 0], [0, 0, 0]]])
    >>> sagittal_projection(m, mask).tolist()
    [[2.0, nan]]
    """
    values = np.asarray(mean, dtype=np.float64)
    inside = np.asarray(lung_mask) != 0
    if values.ndim != 3 or values.shape != inside.shape:
        raise ValueError(
            f"sagittal_projection: mean and lung_mask must be (z, y, x) arrays of one shape, got "
            f"{values.shape} and {inside.shape}"
        )
    use = inside & np.isfinite(values)
    total = np.where(use, values, 0.0).sum(axis=2)
    count = use.sum(axis=2)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def coronal_projection(mean, lung_mask) -> np.ndarray:
    """Mean of a (z, y, x) map along y (anterior-posterior) inside ``lung_mask``: (Z, X).

    >>> m = np.array([[[1.0, 3.0], [5.0, 2.0]]])
    >>> coronal_projection(m, np.ones_like(m)).tolist()
    [[3.0, 2.5]]
    """
    values = np.moveaxis(np.asarray(mean, dtype=np.float64), 1, 2)
    return sagittal_projection(values, np.moveaxis(np.asarray(lung_mask), 1, 2))


def save_figure(fig, path) -> Path:
    """Write ``fig`` as ``path`` (PNG, DPI dots per inch) and beside it as SVG; return the PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    out = Path(path).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    fig.savefig(out.with_suffix(".svg"))
    return out


def symmetric_limit(values, *, floor: float = 0.01) -> float:
    """A symmetric colour limit holding every finite value: max |value| rounded up to two
    significant digits (no saturation), at least ``floor``.

    >>> symmetric_limit(np.array([-0.0123, 0.004, np.nan]))
    0.013
    """
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    m = float(v.max()) if v.size else 0.0
    if m <= floor:
        return floor
    step = 10.0 ** (np.floor(np.log10(m)) - 1)
    return float(np.round(np.ceil(m / step - 1e-9) * step, 12))


def group_panels(ds) -> list[tuple[str, int, np.ndarray]]:
    """(title, n, (z, y, x) mean map) of every group with patients, then every patient."""
    panels = []
    for grouping, names in GROUPINGS.items():
        if f"{grouping}_mean" not in ds:
            continue
        for name in names:
            n = int(ds[f"{grouping}_count"].sel({grouping: name}).values)
            if n > 0:
                panels.append((f"{grouping}: {name}", n, ds[f"{grouping}_mean"].sel(
                    {grouping: name}).values))  # fmt: skip
    if "all_mean" in ds:
        panels.append(("all patients", int(ds["all_count"].values), ds["all_mean"].values))
    return panels


def plot_group_means(store, path) -> Path:
    """Draw the group-mean log-Jacobian maps over the template anatomy (the paper's Figure 5).

    Reads ``<store>/group_means`` (written by :func:`sscflow.methods.groups.group_means`) and the
    template CT. One column per group that has patients (functional: worsening, stable; visual:
    worsened, stable, improved) and a last column with every patient (so a cohort without labels
    still has a map); top row sagittal, bottom row coronal. Each panel is the mean of the group's
    map along x (sagittal; :func:`sagittal_projection`) or along y (coronal;
    :func:`coronal_projection`) over the voxels inside the template lung mask, drawn over the
    template CT's slice through the middle of the lungs; titled with the group and its n.

    Orientation: arrays are (z, y, x) in LPS (z increases superior, y posterior, x to the
    patient's left). Sagittal panels: superior up, anterior left; coronal panels: superior up,
    patient's right on the left (radiological view); axes in millimetres, physical aspect.

    Colours: diverging (blue < 0: shrinkage from baseline to follow-up, red > 0), centred at 0,
    symmetric limits that hold every projected value (:func:`symmetric_limit`), one colour bar.

    Returns
    -------
    The path of the PNG (an SVG is written beside it).
    """
    import xarray as xr
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    with _quiet_consolidation():
        ds = xr.open_zarr(zarr_store(f"{os.fspath(store).rstrip('/')}/{OUTPUT}",
                                     read_only=True))  # fmt: skip
    mask = ds["lung_mask"].values != 0
    anatomy = _template_ct(st, store, mask.shape)
    z, y, x = ds["z"].values, ds["y"].values, ds["x"].values
    dz, dy, dx = (float(v) for v in ds.attrs["spacing"])
    sag_ext = (y[0] - dy / 2, y[-1] + dy / 2, z[0] - dz / 2, z[-1] + dz / 2)
    cor_ext = (x[0] - dx / 2, x[-1] + dx / 2, z[0] - dz / 2, z[-1] + dz / 2)
    _, cy, cx = (int(np.round(np.mean(i))) for i in np.nonzero(mask)) if mask.any() else (
        s // 2 for s in mask.shape)  # fmt: skip

    panels = [(t, n, sagittal_projection(m, mask), coronal_projection(m, mask))
              for t, n, m in group_panels(ds)]  # fmt: skip
    vmax = symmetric_limit(np.concatenate([np.ravel(p) for *_, s, c in panels for p in (s, c)])
                           if panels else [])  # fmt: skip
    norm = Normalize(vmin=-vmax, vmax=vmax)
    cmap = colormaps["RdBu_r"].with_extremes(bad=(0, 0, 0, 0))
    ncols = max(1, len(panels))
    fig = Figure(figsize=(max(6.5, 2.9 * ncols + 1.4), 7.6), layout="constrained")
    axes = fig.subplots(2, ncols, squeeze=False)
    image = None
    for col, (title, n, sag, cor) in enumerate(panels):
        for row, (proj, ext, ct) in enumerate(((sag, sag_ext, anatomy[:, :, cx]),
                                               (cor, cor_ext, anatomy[:, cy, :]))):  # fmt: skip
            ax = axes[row, col]
            ax.imshow(ct, origin="lower", extent=ext, cmap="gray", vmin=-1000, vmax=300,
                      aspect="equal", interpolation="nearest")  # fmt: skip
            image = ax.imshow(proj, origin="lower", extent=ext, cmap=cmap, norm=norm,
                              aspect="equal", interpolation="nearest", alpha=0.85)  # fmt: skip
            ax.set_title(f"{title} (n = {n})\n{'sagittal' if row == 0 else 'coronal'}",
                         fontsize=9)  # fmt: skip
            ax.set_xlabel("anterior \u2190 y (mm) \u2192 posterior" if row == 0
                          else "right \u2190 x (mm) \u2192 left", fontsize=7)  # fmt: skip
            if col == 0:
                ax.set_ylabel("inferior \u2190 z (mm) \u2192 superior", fontsize=7)
            ax.tick_params(labelsize=6)
    if image is None:
        for ax in axes.ravel():
            ax.set_axis_off()
        axes[0, 0].text(0.5, 0.5, "no patient reached template space", ha="center")
    else:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7)
        bar.set_label(COLORBAR_LABEL)
    fig.suptitle(
        f"Group-mean log-Jacobian over the template CT ({int(ds.attrs.get('n_patients', 0))} "
        "patients)\nmean along left-right (sagittal) or front-back (coronal) inside the template "
        f"lungs; colour range \u00b1{vmax:g}",
        fontsize=9,
    )
    return save_figure(fig, path)


def _template_ct(st, store, shape) -> np.ndarray:
    """The template CT as a (z, y, x) array; air (-1000 HU) when it cannot be read."""
    try:
        image = st.read_image(st.template_group(st.open_store(store, mode="r")), "image")
        ct = np.asarray(image.array[...], dtype=np.float32)
        if ct.shape == tuple(shape):
            return ct
    except (FileNotFoundError, KeyError, ValueError):
        pass
    return np.full(shape, -1000.0, np.float32)


def plot_trajectories(pairs, labels: dict, path, *, title: str = "") -> Path | None:
    """A spaghetti plot (cumulative mean log-J and FVC% against months, one line per patient,
    coloured by ``labels[patient_id]``) written to ``path``; None when no patient has more than
    one pair in time."""
    from sscflow.methods.trajectories import trajectory_points

    points = trajectory_points(pairs)
    if points.empty:
        return None
    from matplotlib.figure import Figure

    colours = {"worsening": "#c0392b", "stable": "#2471a3", None: "#7f8c8d"}
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    seen = set()
    for pid, part in points.groupby("patient_id", sort=True):
        group = labels.get(pid)
        c = colours.get(group, colours[None])
        name = group or "no label"
        kw = {"label": name} if name not in seen else {}
        seen.add(name)
        axes[0].plot(part["months"], part["logjac_cumulative"], "-o", ms=3, lw=1, color=c,
                     alpha=0.8, **kw)  # fmt: skip
        if part["fvc"].notna().any():
            axes[1].plot(part["months"], part["fvc"], "-o", ms=3, lw=1, color=c, alpha=0.8)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xlabel("months since the first scan")
    axes[0].set_ylabel("cumulative mean log-Jacobian")
    axes[1].set_xlabel("months since the first scan")
    axes[1].set_ylabel("FVC (% predicted)")
    axes[0].legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_patient_trajectory(points, path, *, title: str = "") -> Path | None:
    """One patient's trajectory (the rows of :func:`sscflow.methods.trajectories.
    trajectory_points` for that patient): the cumulative mean log-Jacobian and FVC / DLCO
    (% predicted) against months since the first scan, each timepoint labelled; written to
    ``path``. None with fewer than three timepoints (one pair is no trajectory)."""
    if len(points) < 3:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    axes[0].plot(points["months"], points["logjac_cumulative"], "-o", ms=4, color="#34495e")
    for r in points.itertuples():
        axes[0].annotate(f"t{r.timepoint}", (r.months, r.logjac_cumulative), fontsize=8,
                         textcoords="offset points", xytext=(3, 3))  # fmt: skip
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("cumulative mean log-Jacobian")
    drawn = False
    for name, colour in (("fvc", "#c0392b"), ("dlco", "#2471a3")):
        values = points[name].astype(float)
        if values.notna().any():
            axes[1].plot(points["months"], values, "-o", ms=4, color=colour, label=name.upper())
            drawn = True
    if drawn:
        axes[1].legend(fontsize=8, frameon=False)
    else:
        axes[1].text(0.5, 0.5, "no PFT values in the manifest", ha="center", va="center",
                     transform=axes[1].transAxes, fontsize=9)  # fmt: skip
    axes[1].set_ylabel("% predicted")
    for ax in axes:
        ax.set_xlabel("months since the first scan")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
