"""group_means: the per-group mean maps (``STORE/group_means``), the cohort table
(``RESULTS/patients.csv``), the zone table (``RESULTS/zones.csv``) and the figure."""

from pathlib import Path

from sscflow.core import store as st
from sscflow.stages.base import COHORT, FINISHED, Stage, cohort_ids, worker_scheduler

OUTPUT = "group_means"
MAP = "log_jacobian_template"
FIGURE = Path("figures") / "group_means_sagittal.png"
VERSION = 1  # sscflow.methods.groups.STAGE_VERSION (a test keeps them equal)


def run(ctx, patient, ups) -> dict:
    import dask  # xarray, matplotlib and their kin load on the worker

    from sscflow.methods.groups import cohort_table, group_means, write_cohort_table
    from sscflow.methods.zones import write_zone_table, zone_table
    from sscflow.views.figures import plot_group_means

    ids = cohort_ids(ups)
    status = {u["patient_id"]: u["status"] for u in ups if u["stage"] == "to_template"}
    done = [p for p in ids if status.get(p) in FINISHED]
    left_out = [p for p in ids if p not in done]
    results = Path(ctx.results)  # the zones need no template: written whatever it gave
    in_store = set(st.patient_ids(st.open_store(ctx.store, mode="r")))
    every = [p for p in cohort_ids(ups, primary=False) if p in in_store]  # every pair
    zones_path = write_zone_table(zone_table(ctx.store, every), results)
    if not done:
        return {"status": "upstream_failed", "message": "no patient reached template space",
                "left_out": len(left_out), "zones": str(zones_path)}  # fmt: skip
    table = cohort_table(ctx.store, ids)
    table_path = write_cohort_table(table, results)
    root = st.open_store(ctx.store)
    labels = [c for c in ("patient_id", "functional", "visual") if c in table]
    maps = [root[f"{st.PATIENTS}/{p}/{MAP}"].attrs["sscflow"] for p in done]
    key = st.upstream_hash(maps, done, table[labels].astype(str).values.tolist())
    params = STAGE.params(ctx.cfg)
    figure = results / FIGURE
    meta = None if ctx.force else st.current_record(root, (OUTPUT,), key, params)
    if meta is not None and figure.exists():
        counts, state = meta.get("counts", {}), "skipped"
    else:
        with dask.config.set(scheduler=worker_scheduler()):
            gm = group_means(ctx.store, table.loc[table["patient_id"].isin(done)],
                             left_out=left_out, input_hash=key, params=params)  # fmt: skip
        counts, state = gm["counts"], "done"
        plot_group_means(ctx.store, figure)
    return {"status": state, "patients": len(done), "left_out": len(left_out),
            "table": str(table_path), "zones": str(zones_path), "figure": str(figure),
            "path": f"{ctx.store}/{OUTPUT}", "counts": counts}  # fmt: skip


STAGE = Stage("group_means", COHORT, after=("to_template", "zones"), needs=(), reads=(MAP,),
              writes=(OUTPUT,), params=lambda cfg: {"version": VERSION},
              run=run)  # fmt: skip
