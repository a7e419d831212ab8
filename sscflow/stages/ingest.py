"""ingest: the scans onto the canonical grid, ``patients/<id>/{baseline, followup}``."""

from dataclasses import asdict

from sscflow.stages.base import PATIENT, Stage


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.ingest import ingest_images  # its numerics load on the worker

    r = ingest_images(patient, ctx.store, ctx.cfg.ingest, force=ctx.force)
    out = {"status": r.status, "seconds": r.seconds, "message": r.message}
    if r.traceback:
        out["traceback"] = r.traceback
    return out


STAGE = Stage("ingest", PATIENT, after=(), reads=(), writes=("baseline", "followup"),
              params=lambda cfg: asdict(cfg.ingest), run=run)  # fmt: skip
