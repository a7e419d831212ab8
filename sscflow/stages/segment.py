"""segment: lung masks and labels from the stored canonical scans (never the input files)."""

from dataclasses import asdict

from sscflow.ingest import LABELS, SCANS, segment_patient
from sscflow.stages.base import PATIENT, Stage


def run(ctx, patient, ups) -> dict:
    cfg = ctx.cfg
    out = segment_patient(ctx.store, patient.patient_id, cfg.segment, chunk=cfg.ingest.chunk,
                          compression_level=cfg.ingest.compression_level,
                          force=ctx.force,
                          sources={w: patient.scan(w)[0] for w in SCANS})  # fmt: skip
    return {"status": out["status"], "seconds": out["seconds"],
            "lung_volume_ml": out["lung_volume_ml"].get("baseline")}  # fmt: skip


STAGE = Stage("segment", PATIENT, after=("ingest",), reads=tuple(SCANS),
              writes=tuple(SCANS.values()) + tuple(LABELS.values()),
              params=lambda cfg: asdict(cfg.segment), run=run)  # fmt: skip
