"""report: the cohort report, ``RESULTS/report/index.html``; recorded in ``STORE/cohort/report``."""

from pathlib import Path

from sscflow.core import store as st
from sscflow.flow.status import store_status
from sscflow.stages.base import COHORT, Stage

RECORD = "cohort/report"
VERSION = 1


def run(ctx, patient, ups) -> dict:
    from sscflow.views.report import (  # pages and figures load on the worker
        report_key,
        write_report,
    )

    root = st.open_store(ctx.store)
    state = store_status(ctx.store, ctx.stages)  # the table, from the pipeline: no circle
    key = report_key(ctx.store, ctx.results, state)
    params = STAGE.params(ctx.cfg)
    page = Path(ctx.results) / "report" / "index.html"
    if not ctx.force and page.is_file() and st.current_record(root, (RECORD,), key, params):
        return {"status": "skipped", "path": str(page)}
    st.drop_record(root, RECORD)
    path = write_report(ctx.store, ctx.results, state, rate=ctx.cfg.statistics.rate)
    st.write_record(root, RECORD, stage="report", params=params, input_hash=key)
    return {"status": "done", "path": str(path)}


STAGE = Stage("report", COHORT, after=("qa", "classifier"), needs=(), reads=(),
              writes=(RECORD,), run=run,
              params=lambda cfg: {"version": VERSION, "rate": cfg.statistics.rate})  # fmt: skip
