"""classifier: both targets' CNN beside the ILD-extent baseline, ``RESULTS/classifier/<target>``;
its record is ``STORE/cohort/classifier``."""

from dataclasses import asdict
from pathlib import Path

from sscflow.core import store as st
from sscflow.stages.base import COHORT, Stage, always, cohort_ids

RECORD = "cohort/classifier"
MAP = "log_jacobian_template"
VERSION = 1  # sscflow.methods.analysis.STAGE_VERSION (a test keeps them equal)


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.analysis import TARGETS, classify_cohort  # loads on the worker
    from sscflow.methods.groups import cohort_table

    root = st.open_store(ctx.store)
    in_store = set(st.patient_ids(root))
    ids = [p for p in cohort_ids(ups) if p in in_store]
    table = cohort_table(ctx.store, ids)
    with_map = [p for p in table["patient_id"]
                if st.output_state(root[f"{st.PATIENTS}/{p}"], MAP) == "complete"]
    maps = [root[f"{st.PATIENTS}/{p}/{MAP}"].attrs["sscflow"] for p in with_map]
    cols = [c for c in ("patient_id", "functional", "visual", "delta_haa") if c in table]
    key = st.upstream_hash(maps, with_map, table[cols].astype(str).values.tolist())
    params = STAGE.params(ctx.cfg)
    meta = None if ctx.force else st.current_record(root, (RECORD,), key, params)
    results = Path(ctx.results) / "classifier"
    if meta is not None and all((results / t / "metrics.json").is_file()
                                for t in TARGETS if meta["qa"].get(f"{t}_status") != "not_trained"):
        flat = dict(meta["qa"])
        for t in TARGETS:
            if flat.get(f"{t}_status") == "done":
                flat[f"{t}_status"] = "skipped"
        return {**flat, "status": "skipped"}
    st.drop_record(root, RECORD)
    out = classify_cohort(ctx.store, ctx.results, ctx.cfg.classifier, patient_ids=ids)
    flat = {}
    for t, r in out.items():
        flat[f"{t}_status"] = r["status"]
        if r.get("cnn"):
            cnn = r["cnn"]
            flat[f"{t}_accuracy"] = cnn.get("accuracy")
            flat[f"{t}_n_test"] = n = int(cnn.get("n") or 0)
            pos = int(cnn.get("tp", 0)) + int(cnn.get("fn", 0))
            flat[f"{t}_majority_accuracy"] = max(pos, n - pos) / n if n else None
        if r.get("reason"):
            flat[f"{t}_reason"] = r["reason"]
    st.write_record(root, RECORD, stage="classifier", params=params, input_hash=key,
                    extra={"qa": flat})  # fmt: skip
    return {**flat, "status": "done"}


STAGE = Stage("classifier", COHORT, after=("to_template", "group_means"),
              needs=("group_means",), reads=(MAP,), writes=(RECORD,),
              params=lambda cfg: {**asdict(cfg.classifier), "version": VERSION},
              run=run, gpu=always)  # fmt: skip
