"""The registration stage: ``patients/<id>/{baseline, followup, lung_mask}`` -> ``displacement``.

Writes ``STORE/patients/<id>/displacement``, a (3, Z, Y, X) float32 field in mm on the baseline
grid (an NGFF image group with a channel axis), with a QA record in its ``sscflow.qa``
attribute: backend, parameters, runtime, similarity before and after (inside the lung mask),
folded fraction, and, given the synthetic cohort's folder, the errors against the truth.
Skipped when the output is current (same inputs and parameters).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from sscflow import store as st
from sscflow.config import RegistrationConfig
from sscflow.errors import IncompleteOutputError
from sscflow.registration import register, resolve_backend
from sscflow.registration.common import folded_fraction, similarity, truth_errors

STAGE = "registration"
STAGE_VERSION = 1
OUTPUT = "displacement"
INPUTS = ("baseline", "followup", "lung_mask")
CONVENTION = "followup(x + u(x)) ~ baseline(x); u (3, Z, Y, X) mm, component k along axis k"


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

    Parameters
    ----------
    store : path (or URL) of the cohort store
    patient_id : reads ``patients/<id>/baseline``, ``followup`` and ``lung_mask``
    config : backend and its parameters (``RegistrationConfig``; defaults when None)
    truth_dir : optional folder of a synthetic cohort (``sscflow.synth``); its true field for
        this patient is compared with the result in the QA record
    chunk, compression_level : storage of the field
    force : recompute even when the stored field is current

    Returns
    -------
    dict: ``patient_id``, ``status`` ("done" or "skipped"), ``seconds`` and the QA record.

    Raises
    ------
    IncompleteOutputError (a FileNotFoundError) naming the missing input;
    RegistrationInputError (a ValueError) when the scans' grids differ.
    """
    cfg = config or RegistrationConfig()
    t0 = time.perf_counter()
    backend = resolve_backend(cfg.backend)
    root = st.open_store(store)
    group = st.patient_group(root, patient_id, create=False)
    images = {}
    for name in INPUTS:
        try:
            images[name] = st.read_image(group, name)
        except IncompleteOutputError as exc:
            raise IncompleteOutputError(
                f"patient {patient_id}: {exc}; ingest the patient first"
            ) from None
    base, follow, mask = (images[n] for n in INPUTS)
    options = cfg.options(backend)
    params = {"backend": backend, "options": options, "version": STAGE_VERSION}
    input_hash = st.hash_values(*[(images[n].meta.get("input_hash"), images[n].meta.get("params"))
                                  for n in INPUTS])  # fmt: skip
    row = {"patient_id": patient_id}
    if not force and st.is_current(group, OUTPUT, input_hash, params):
        qa = dict(group[OUTPUT].attrs["sscflow"].get("qa", {}))
        return {**row, "status": "skipped", "seconds": time.perf_counter() - t0, **qa}

    spacing = base.geometry.spacing
    fixed = np.asarray(base.array[...], np.float32)
    moving = np.asarray(follow.array[...], np.float32)
    lung = np.asarray(mask.array[...]).astype(bool)
    t1 = time.perf_counter()
    u = register(fixed, moving, spacing, mask=lung if lung.any() else None, backend=backend,
                 moving_spacing=follow.geometry.spacing, **options)  # fmt: skip
    runtime = time.perf_counter() - t1
    qa = {
        "backend": backend,
        "parameters": options,
        "config": asdict(cfg),
        "runtime_s": round(runtime, 3),
        "folded_fraction": folded_fraction(u, spacing, lung if lung.any() else None),
        **similarity(fixed, moving, u, spacing, lung if lung.any() else None),
    }
    if truth_dir is not None:
        from sscflow.synth import read_truth

        truth = read_truth(truth_dir, patient_id)
        qa["truth"] = truth_errors(u, spacing, truth.displacement, truth.log_jacobian,
                                   truth.lung, truth.region)  # fmt: skip
    st.write_image(group, OUTPUT, u, base.geometry, stage=STAGE, params=params,
                   input_hash=input_hash, chunk=chunk, compression_level=compression_level,
                   extra={"qa": qa, "convention": CONVENTION})  # fmt: skip
    return {**row, "status": "done", "seconds": time.perf_counter() - t0, **qa}
