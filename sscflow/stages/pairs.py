"""pairs: every registered pair of every patient, ``RESULTS/pairs.csv``, the consistency of a
patient's consecutive pairs with its first -> last pair, and the trajectory figure; recorded in
``STORE/cohort/pairs`` (``sscflow.methods.trajectories``)."""

from pathlib import Path

from sscflow.core import store as st
from sscflow.stages.base import COHORT, FINISHED, Stage, cohort_ids

RECORD = "cohort/pairs"
FIGURE = Path("figures") / "trajectories.png"
#: one patient's trajectory, for the QA pages of the patient's pairs (three timepoints or more)
PATIENT_FIGURES = Path("figures") / "trajectories"
VERSION = 2  # sscflow.methods.trajectories.VERSION (a test keeps them equal)


def run(ctx, patient, ups) -> dict:
    from sscflow.methods.groups import cohort_table  # pandas and the numerics load on the worker
    from sscflow.methods.trajectories import (
        chains,
        consistency_patient,
        pair_table,
        trajectory_points,
        write_pair_table,
    )
    from sscflow.views.figures import plot_patient_trajectory, plot_trajectories

    root = st.open_store(ctx.store)
    in_store = set(st.patient_ids(root))
    every = [p for p in cohort_ids(ups, primary=False) if p in in_store]
    done = {u["patient_id"] for u in ups if u["status"] in FINISHED}
    consistency, failed = {}, []
    for pid, chain in chains([u for u in every if u in done]).items():
        rec = consistency_patient(ctx.store, pid, chain["direct"], chain["steps"],
                                  force=ctx.force)  # fmt: skip
        if rec.get("status") in ("done", "skipped"):
            consistency[pid] = rec
        else:
            failed.append(pid)
    table = pair_table(cohort_table(root, every), consistency)
    results = Path(ctx.results)
    path = write_pair_table(table, results)
    primary = cohort_table(root, cohort_ids(ups)) if every else None
    labels = {} if primary is None else {
        pid: lab for pid, lab in zip((p.split("/")[0] for p in primary["patient_id"]),
                                     primary["functional"], strict=True)}  # fmt: skip
    means = [r["mean_mm"] for r in consistency.values() if r.get("mean_mm") == r.get("mean_mm")]
    params = STAGE.params(ctx.cfg)
    n_patients = int(table["patient_id"].nunique()) if len(table) else 0
    key = st.upstream_hash([], table.to_csv(index=False), sorted(labels.items()))
    meta = None if ctx.force else st.current_record(root, (RECORD,), key, params)
    figure = results / FIGURE
    points = trajectory_points(table)
    each = {pid: part for pid, part in points.groupby("patient_id", sort=True) if len(part) >= 3}
    paths = {pid: patient_figure(ctx.results, pid) for pid in each}
    if meta is not None and (figure.is_file() or not meta["qa"].get("figure")) and all(
            p.is_file() for p in paths.values()):  # fmt: skip
        state = "skipped"
        figure = figure if meta["qa"].get("figure") else None
    else:
        state = "done"
        figure = plot_trajectories(table, labels, figure,
                                   title="Trajectories by functional change")  # fmt: skip
        for pid, part in each.items():
            plot_patient_trajectory(part, paths[pid], title=f"patient {pid}: trajectory")
        st.write_record(root, RECORD, stage="pairs", params=params, input_hash=key,
                        extra={"qa": {"pairs": len(table), "patients": n_patients,
                                      "chains": len(consistency), "failed": failed,
                                      "figure": figure is not None}})  # fmt: skip
    return {"status": state, "pairs": len(table), "patients": n_patients,
            "chains": len(consistency),
            "composition_max_mean_mm": max(means) if means else None, "table": str(path),
            "figure": str(figure) if figure else None}  # fmt: skip


def patient_figure(results, subject: str) -> Path:
    """``RESULTS/figures/trajectories/<patient>.png``: a patient's trajectory figure."""
    return Path(results) / PATIENT_FIGURES / f"{subject}.png"


STAGE = Stage("pairs", COHORT, after=("jacobian",), needs=(), reads=("displacement", "coverage"),
              writes=(RECORD,), params=lambda cfg: {"version": VERSION, "pairs": cfg.pairs},
              run=run)  # fmt: skip
