"""segment: lung masks and labels from the stored canonical scans (never the input files)."""

from dataclasses import asdict

from sscflow.stages.base import PATIENT, Stage


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.ingest import SCANS, segment_patient  # its numerics load on the worker

    cfg = ctx.cfg
    sources = {w: patient.scan(w)[0] for w in SCANS}  # named in error messages only
    out = segment_patient(ctx.store, patient.patient_id, cfg.segment, chunk=cfg.ingest.chunk,
                          compression_level=cfg.ingest.compression_level, force=ctx.force,
                          sources=sources)  # fmt: skip
    return {"status": out["status"], "seconds": out["seconds"],
            "lung_volume_ml": out["lung_volume_ml"].get("baseline")}  # fmt: skip


STAGE = Stage("segment", PATIENT, after=("ingest",), reads=("baseline", "followup"),
              writes=("lung_mask", "followup_lung_mask", "lung_labels", "followup_lung_labels"),
              params=lambda cfg: asdict(cfg.segment), run=run)  # fmt: skip
