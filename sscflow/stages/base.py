"""What a stage is: :class:`Stage`, the declaration the pipeline reads, and :class:`Context`,
what every task of a run gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sscflow.config import Config
from sscflow.flow.status import COHORT, FAILED, FINISHED, PATIENT  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Context:
    """What every task of one run gets: where, with which settings, and how."""

    store: str
    results: str
    cfg: Config
    force: bool = False
    truth_dir: str | None = None
    rebuild_template: bool = False
    stages: tuple = ()  # the run's stage table (the report reads every stage's status)


@dataclass(frozen=True)
class Stage:
    """One stage of the dataflow.

    name : the stage's name (task keys, records, progress, ``sscflow status``)
    scope : "patient" (one task per patient) or "cohort" (one task for the run)
    after : the stages whose records it gets (``ups``), in the table before it: a patient stage
        gets its own patient's record of a patient stage and the record of a cohort stage; a
        cohort stage gets every patient's
    reads, writes : store paths relative to ``patients/<id>`` (patient scope) or the store root
        (cohort scope); ``@name`` is an attribute of the patient group. ``writes`` complete
        means done (``sscflow status``)
    params : the config section(s) it depends on (``cfg -> dict``); with its inputs' hashes they
        make the hash its output records
    run : ``(ctx, patient, ups) -> dict`` (``patient`` a ``cohort.Patient``, None for a cohort
        stage): the stage's result, whose ``status`` is "done" or "skipped" (or
        "upstream_failed" with a ``message``); a bad patient's error is raised
    needs : the stages of ``after`` whose failure makes this one ``upstream_failed`` without
        running (all of ``after`` by default; a cohort stage is never held up by patients)
    gpu : ``cfg -> bool``: it runs on a GPU worker when the cluster has one (registration
        with the torch backend, say); never by default
    """

    name: str
    scope: Literal["patient", "cohort"]
    after: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    params: Callable[[Config], dict]
    run: Callable[[Context, object, list[dict]], dict]
    needs: tuple[str, ...] | None = None
    gpu: Callable[[Config], bool] = lambda cfg: False

    @property
    def blocking(self) -> tuple[str, ...]:
        return self.after if self.needs is None else self.needs


def torch_backend(cfg: Config) -> bool:
    """Whether the registration backend resolves to torch (which a GPU speeds up)."""
    from sscflow.errors import SscflowError
    from sscflow.methods.registration import resolve_backend

    try:
        return resolve_backend(cfg.registration.backend) == "torch"
    except SscflowError:
        return False


def always(cfg: Config) -> bool:
    return True


def worker_scheduler() -> str:
    """Blockwise work inside a task: one thread on a one-thread worker, else threads."""
    from sscflow.methods.registration.common import n_threads

    return "synchronous" if n_threads() <= 1 else "threads"


def cohort_ids(ups: list[dict], *, primary: bool = True) -> list[str]:
    """The patients of a cohort stage's upstream records, in plan order, once each: with
    ``primary`` (what the cohort statistics use) one pair per patient, its primary pair
    (``sscflow.cohort.primary_units``); else every pair's unit id."""
    from sscflow.cohort import primary_units

    ids = list(dict.fromkeys(u["patient_id"] for u in ups if u["patient_id"] is not None))
    return primary_units(ids) if primary else ids
