"""The log-Jacobian stage: ``patients/<id>/displacement`` -> ``patients/<id>/log_jacobian``.

Streams Zarr to Zarr block by block (memory set by ``JacobianConfig.chunk`` and the slice area,
not the number of slices), then stores the summary inside the baseline lung mask (the paper's
per-patient mean log-Jacobian) in the output's ``sscflow.summary`` attribute. Skipped when the
output is current (same upstream hashes and parameters, summary attached).
"""

from __future__ import annotations

import contextlib
import time

import dask.array as da
import numpy as np

from sscflow.config import JacobianConfig
from sscflow.core import store as st
from sscflow.methods.jacobian.core import log_jacobian_zarr
from sscflow.methods.jacobian.summary import summarize

STAGE = "jacobian"
STAGE_VERSION = 2  # 2: NaN where the follow-up did not image x + u(x)
DISPLACEMENT = "displacement"
COVERAGE = "coverage"
MASK = "lung_mask"
OUTPUT = "log_jacobian"
CONVENTION = "log det(I + grad u); u on the baseline grid; < 0 where tissue shrinks at follow-up"


def log_jacobian_patient(
    store,
    patient_id: str,
    config: JacobianConfig | None = None,
    *,
    scheduler: str | None = "threads",
    force: bool = False,
) -> dict:
    """Compute and store one patient's log-Jacobian map and its summary inside the lung mask.

    Parameters
    ----------
    store : path (or URL) of the cohort store
    patient_id : reads ``patients/<id>/displacement`` ((3, Z, Y, X) float32 mm, on the baseline
        grid), ``patients/<id>/lung_mask`` (the baseline lung mask) and, when the registration
        wrote it, ``patients/<id>/coverage``: the map is NaN where the coverage is 0 (x + u(x)
        outside the follow-up's field of view: not measured), and the summary leaves those
        voxels out (``unmeasured`` counts them)
    config : floor, chunk of the stored map, percentiles (the field is read chunk by chunk as
        stored, a few slabs of chunks at a time)
    scheduler : dask scheduler for the blockwise work: "threads" (all cores of this process),
        "synchronous" (one thread, e.g. inside a one-thread Dask worker), or None for dask's
        current default
    force : recompute even when the stored map is current

    Returns
    -------
    dict: ``patient_id``, ``status`` ("done" or "skipped"), ``seconds``, and the summary's keys
    (``voxels``, ``mean``, ``median``, ``p5`` ..., ``folded``, ``folded_fraction``, ...).

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) when the displacement or the lung mask is absent
    or incomplete; ValueError when their grids differ.
    """
    cfg = config or JacobianConfig()
    t0 = time.perf_counter()
    root = st.open_store(store)
    group = st.patient_group(root, patient_id, create=False)
    who = f"patient {patient_id}"
    disp = st.read_inputs(group, (DISPLACEMENT,), who, "run the registration stage for it first",
                          lazy=True)[DISPLACEMENT]  # fmt: skip
    mask = st.read_inputs(group, (MASK,), who, "ingest the patient first", lazy=True)[MASK]
    _check_grids(patient_id, disp, mask)
    coverage = None
    if st.output_state(group, COVERAGE) == "complete":
        coverage = st.read_image(group, COVERAGE, lazy=True)
        _check_grids(patient_id, disp, coverage)

    params = {"floor": cfg.floor, "percentiles": list(cfg.percentiles), "version": STAGE_VERSION}
    input_hash = st.upstream_hash([disp, mask], coverage is not None)
    row = {"patient_id": patient_id}
    meta = None if force else st.current_record(group, (OUTPUT,), input_hash, params)
    if meta is not None:
        summary = dict(meta["summary"])
        return {**row, "status": "skipped", "seconds": time.perf_counter() - t0, **summary}

    c = cfg.chunk
    field = group[DISPLACEMENT]["0"]  # read chunk by chunk, slab after slab along z
    lj = log_jacobian_zarr(field, disp.geometry.spacing, floor=cfg.floor)
    if coverage is not None:  # not measured where x + u(x) left the follow-up's field of view
        lj = da.where(coverage.array.rechunk(lj.chunks) > 0, lj, np.float32(np.nan))
    context = contextlib.nullcontext()
    if scheduler is not None:
        import dask

        context = dask.config.set(scheduler=scheduler)
    with context:
        # The map streams to the store first, left incomplete; the summary then reads it back
        # (a third of the field's bytes, no halo) and is attached with the completion mark in
        # one metadata write, so a run killed in between is redone.
        st.write_image(group, OUTPUT, lj, mask.geometry, stage=STAGE, params=params,
                       input_hash=input_hash, chunk=c, complete=False, step=st.LOG_JACOBIAN_STEP,
                       extra={"summary": None, "convention": CONVENTION})
        stored = da.from_zarr(group[OUTPUT]["0"])
        summary = summarize(stored, mask.array.rechunk(stored.chunks), floor=cfg.floor,
                            percentiles=cfg.percentiles)
    summary["mask"] = MASK
    st.finish_image(group, OUTPUT, {"summary": summary})
    return {**row, "status": "done", "seconds": time.perf_counter() - t0, **summary}


def _check_grids(patient_id, disp, mask) -> None:
    shape = tuple(disp.array.shape)
    if len(shape) != 4 or shape[0] != 3:
        raise ValueError(
            f"patient {patient_id}: {DISPLACEMENT} must have shape (3, Z, Y, X), got {shape}; "
            "write it as a (3, Z, Y, X) float32 field in mm"
        )
    dg, mg = disp.geometry, mask.geometry
    if not dg.same_grid(mg):
        raise ValueError(
            f"patient {patient_id}: {DISPLACEMENT} grid (shape {dg.shape}, spacing {dg.spacing}, "
            f"origin {dg.origin}) differs from the baseline {MASK}'s (shape {mg.shape}, spacing "
            f"{mg.spacing}, origin {mg.origin}); the field must be defined on the baseline grid"
        )
