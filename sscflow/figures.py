"""Figures from the store: the paper's Figure 5, sagittal projections of the group-mean maps.

matplotlib is imported inside the functions (``import sscflow`` stays light); figures are drawn
on a plain ``matplotlib.figure.Figure`` with the Agg canvas, so no display is needed and the
caller's pyplot backend is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sscflow.groups import GROUPINGS, OUTPUT
from sscflow.store import zarr_store

COLORBAR_LABEL = "mean log-Jacobian (< 0: shrinkage)"
DPI = 120
PERCENTILE = 99.0


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


def plot_group_means(store, path) -> Path:
    """Draw the group-mean log-Jacobian maps as sagittal projections (the paper's Figure 5).

    Reads ``<store>/group_means`` (written by :func:`sscflow.groups.group_means`) and draws one
    panel per group: top row functional (worsening, stable), bottom row visual (worsened, stable,
    improved), each titled with the group name and its number of patients. A panel is the mean of
    the group's map along x (left-right), over the voxels inside the template lung mask
    (:func:`sagittal_projection`); grey where the mask projects to nothing or the group is empty.

    Orientation: the arrays are (z, y, x) in LPS, so z increases superior (cranial) and y
    increases posterior. Each panel shows superior at the top and anterior on the left (the
    patient faces left), with axes in millimetres and the physical aspect ratio.

    Colours: a diverging map centred at 0 with symmetric limits +/- the 99th percentile of the
    absolute projected values of all panels: blue < 0 (shrinkage from baseline to follow-up),
    red > 0 (expansion); one shared colour bar.

    Parameters
    ----------
    store : path (or URL) of the cohort store
    path : where to write the PNG (its folder is created)

    Returns
    -------
    The path of the PNG (120 dpi).
    """
    import xarray as xr
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    ds = xr.open_zarr(zarr_store(f"{os.fspath(store).rstrip('/')}/{OUTPUT}", read_only=True))
    mask = ds["lung_mask"].values
    z, y = ds["z"].values, ds["y"].values
    dz, dy = (float(ds.attrs["spacing"][0]), float(ds.attrs["spacing"][1]))
    extent = (y[0] - dy / 2, y[-1] + dy / 2, z[0] - dz / 2, z[-1] + dz / 2)

    panels = []
    for grouping, names in GROUPINGS.items():
        for name in names:
            sel = {grouping: name}
            proj = sagittal_projection(ds[f"{grouping}_mean"].sel(sel).values, mask)
            n = int(ds[f"{grouping}_count"].sel(sel).values)
            panels.append((grouping, name, n, proj))
    finite = np.concatenate([np.abs(p[np.isfinite(p)]) for *_, p in panels])
    vmax = float(np.percentile(finite, PERCENTILE)) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 0.1
    norm = Normalize(vmin=-vmax, vmax=vmax)
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")

    ncols = max(len(names) for names in GROUPINGS.values())
    width_mm, height_mm = extent[1] - extent[0], extent[3] - extent[2]
    panel_w = 3.0
    panel_h = max(1.5, min(6.0, panel_w * height_mm / width_mm))
    fig = Figure(figsize=(panel_w * ncols + 1.4, (panel_h + 0.8) * len(GROUPINGS) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(GROUPINGS), ncols, squeeze=False)
    image = None
    for row, (grouping, names) in enumerate(GROUPINGS.items()):
        for col in range(ncols):
            ax = axes[row, col]
            if col >= len(names):
                ax.set_visible(False)
                continue
            _, name, n, proj = next(p for p in panels if p[0] == grouping and p[1] == names[col])
            image = ax.imshow(proj, origin="lower", extent=extent, cmap=cmap, norm=norm,
                              aspect="equal", interpolation="nearest")  # fmt: skip
            ax.set_title(f"{grouping}: {name} (n = {n})", fontsize=10)
            ax.set_xlabel("anterior \u2190 y (mm) \u2192 posterior", fontsize=8)
            if col == 0:
                ax.set_ylabel("inferior \u2190 z (mm) \u2192 superior", fontsize=8)
            ax.tick_params(labelsize=7)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7)
    bar.set_label(COLORBAR_LABEL)
    fig.suptitle(
        "Group-mean log-Jacobian, sagittal projection inside the template lungs "
        f"({int(ds.attrs.get('n_patients', 0))} patients)",
        fontsize=11,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out
