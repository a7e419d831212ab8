"""The density baseline of the paper: extent of interstitial lung disease by attenuation.

The high-attenuation area (HAA, :func:`high_attenuation_area`) is the percentage of lung voxels
in an HU band, bounds included: classically -600 to -250 HU (ground glass and fine
reticulation). The lung masks keep dense subpleural disease (reticulation, honeycomb walls,
fibrosis up to soft-tissue density) since sscflow.methods.segment's chest-wall boundary, so the
stage counts the wider ILD band -600 to 0 HU by default (``ILD_LOW_HU``, ``ILD_HIGH_HU``): dense
fibrosis now inside the mask is counted, vessels (about +40 HU) mostly are not. Its change
between the baseline and the follow-up CT is the visual-free density measure the log-Jacobian
is compared against.

:func:`extent_patient` stores its result as the attribute ``extent`` of the patient group
``patients/<id>`` (beside, not inside, the ``sscflow`` attribute that ingest owns)::

    {"stage": "extent", "params": {"low_hu", "high_hu", "version"}, "input_hash": ...,
     "band_hu": [low, high], "haa_baseline": %, "haa_followup": %,
     "delta_haa": percentage points, "lung_voxels_baseline": n, "lung_voxels_followup": n}
"""

from __future__ import annotations

import time

import numpy as np
import zarr

from sscflow.core import store as st
from sscflow.errors import IncompleteOutputError

STAGE = "extent"
STAGE_VERSION = 2  # 2: the ILD band -600..0 HU (was -600..-250) over masks that keep fibrosis
ATTRIBUTE = "extent"
HAA_LOW_HU = -600.0
HAA_HIGH_HU = -250.0
ILD_LOW_HU = -600.0  # what the stage counts: ground glass, reticulation, dense fibrosis
ILD_HIGH_HU = 0.0
SCANS = {"baseline": "lung_mask", "followup": "followup_lung_mask"}


def high_attenuation_area(hu, mask, low: float = HAA_LOW_HU, high: float = HAA_HIGH_HU) -> float:
    """Percentage of the voxels in ``mask`` whose value lies in [low, high] HU, bounds included.

    Parameters
    ----------
    hu : array (Z, Y, X) in Hounsfield units, numpy or dask
    mask : array of the same shape, numpy or dask; non-zero = lung
    low, high : HU bounds, both inclusive (low <= HU <= high), low <= high

    With a dask input the two counts are dask reductions computed together, chunk by chunk
    (the mask is rechunked like ``hu``); nothing is materialised whole.

    Returns
    -------
    float in [0, 100].

    Raises
    ------
    ValueError when the shapes differ, low > high, or the mask holds no voxel.

    Examples
    --------
    >>> hu = np.array([[[-700, -600, -400, -250, -100]]])
    >>> float(high_attenuation_area(hu, np.ones_like(hu)))
    60.0
    """
    count, total = _counts(hu, mask, low, high)
    return 100.0 * count / total


def _counts(hu, mask, low: float, high: float) -> tuple[int, int]:
    """(voxels of the mask in [low, high], voxels of the mask); ValueError on bad input."""
    if hu.shape != mask.shape:
        raise ValueError(
            f"high_attenuation_area: hu has shape {hu.shape} but mask has {mask.shape}; "
            "both must be on the same grid"
        )
    if not low <= high:
        raise ValueError(f"high_attenuation_area: low ({low}) must not exceed high ({high})")
    if _is_dask(hu) or _is_dask(mask):
        import dask
        import dask.array as da

        hu = da.asarray(hu)
        inside = da.asarray(mask).rechunk(hu.chunks) != 0
        hit = inside & (hu >= low) & (hu <= high)
        count, total = dask.compute(hit.sum(), inside.sum())
    else:
        hu, inside = np.asarray(hu), np.asarray(mask) != 0
        count, total = (inside & (hu >= low) & (hu <= high)).sum(), inside.sum()
    if int(total) == 0:
        raise ValueError(
            "high_attenuation_area: the lung mask is empty (no non-zero voxel); HAA is a "
            "percentage of the lung and needs at least one lung voxel"
        )
    return int(count), int(total)


def extent_patient(
    store,
    patient_id: str,
    *,
    force: bool = False,
    low: float = ILD_LOW_HU,
    high: float = ILD_HIGH_HU,
    scheduler: str | None = "threads",
) -> dict:
    """Compute and store one patient's HAA at baseline and follow-up and its change.

    Parameters
    ----------
    store : path (or URL) of the cohort store, or its open root ``zarr.Group``
    patient_id : reads ``patients/<id>/baseline`` with ``lung_mask`` and ``followup`` with
        ``followup_lung_mask`` (as written by ingest), lazily, chunk by chunk
    force : recompute even when the stored result is current (same inputs and parameters)
    low, high : HU bounds of :func:`high_attenuation_area`, inclusive (default -600 and 0:
        the ILD band, dense fibrosis included); stored as ``band_hu``
    scheduler : dask scheduler for the reductions ("threads", "synchronous" inside a one-thread
        Dask worker, or None for dask's current default)

    Returns
    -------
    dict: ``patient_id``, ``status`` ("done" or "skipped"), ``seconds``, ``haa_baseline`` and
    ``haa_followup`` (% of the lung mask of each scan) and ``delta_haa`` (follow-up minus
    baseline, percentage points; > 0 = more dense lung).

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) when the patient, a scan or a lung mask is absent
    or incomplete; ValueError when a scan and its mask differ in shape or a mask is empty.
    """
    t0 = time.perf_counter()
    if isinstance(store, zarr.Group):
        root = store
    else:
        st.open_store(store, mode="r")  # raises when the store does not exist: never create one
        root = st.open_store(store)
    try:
        group = st.patient_group(root, patient_id, create=False)
    except IncompleteOutputError:
        raise IncompleteOutputError(
            f"patient {patient_id} is not in the store; ingest the patient first"
        ) from None
    names = [name for pair in SCANS.items() for name in pair]
    images = st.read_inputs(group, names, f"patient {patient_id}", "ingest the patient first",
                            lazy=True)  # fmt: skip
    params = {"low_hu": float(low), "high_hu": float(high), "version": STAGE_VERSION}
    input_hash = st.upstream_hash(images.values())
    row = {"patient_id": patient_id}
    stored = dict(group.attrs.get(ATTRIBUTE, {}) or {})
    current = stored.get("input_hash") == input_hash and stored.get("params") == params
    if current and not force:
        haa = {k: stored[k] for k in ("haa_baseline", "haa_followup", "delta_haa")}
        return {**row, "status": "skipped", "seconds": time.perf_counter() - t0, **haa}

    result = {}
    context = _scheduler(scheduler)
    with context:
        for scan, mask in SCANS.items():
            hu, lung = images[scan].array, images[mask].array
            if hu.shape != lung.shape:
                raise ValueError(
                    f"patient {patient_id}: {scan} has shape {tuple(hu.shape)} but {mask} has "
                    f"{tuple(lung.shape)}; ingest the patient again"
                )
            try:
                count, total = _counts(hu, lung, low, high)
            except ValueError as exc:
                raise ValueError(f"patient {patient_id}: {mask}: {exc}") from None
            result[f"haa_{scan}"] = 100.0 * count / total
            result[f"lung_voxels_{scan}"] = total
    result["delta_haa"] = result["haa_followup"] - result["haa_baseline"]
    group.attrs[ATTRIBUTE] = st._jsonable({
        "stage": STAGE, "params": params, "input_hash": input_hash,
        "band_hu": [float(low), float(high)], **result,
    })  # fmt: skip
    haa = {k: result[k] for k in ("haa_baseline", "haa_followup", "delta_haa")}
    return {**row, "status": "done", "seconds": time.perf_counter() - t0, **haa}


def _is_dask(array) -> bool:
    return hasattr(array, "dask") and hasattr(array, "chunks")


def _scheduler(name: str | None):
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    import dask

    return dask.config.set(scheduler=name)
