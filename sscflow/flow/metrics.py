"""sscflow's Prometheus counters, served on the Dask scheduler's ``/metrics`` beside Dask's own.

The client reports each finished patient-stage as a Dask event (``client.log_event``, topic
``sscflow``); a scheduler plugin counts them in the scheduler process, whose dashboard serves
``/metrics``. The same path works for a LocalCluster, a remote ``dask scheduler`` and Kubernetes,
as long as sscflow is installed where the scheduler runs.

Metrics (a Grafana board can follow a cohort with these):

- ``sscflow_patients_total{stage, status}``: patients finished per stage, status ``done``,
  ``skipped`` (output current), ``failed`` or ``upstream_failed``;
- ``sscflow_stage_seconds_total{stage}``: seconds spent in each stage, summed over patients;
- ``sscflow_runs_total{status}``: runs started / finished;
- ``sscflow_stage_tasks_total{stage, where}``: tasks finished per stage on ``GPU`` or ``CPU``
  workers (where each stage ran).
"""

from __future__ import annotations

TOPIC = "sscflow"
_METRICS: dict = {}


def counters() -> dict:
    """The sscflow counters in this process's default Prometheus registry (created once)."""
    if not _METRICS:
        from prometheus_client import Counter

        _METRICS["patients"] = Counter(
            "sscflow_patients", "Patients finished per stage and status", ["stage", "status"]
        )
        _METRICS["seconds"] = Counter(
            "sscflow_stage_seconds", "Seconds spent per stage, summed over patients", ["stage"]
        )
        _METRICS["runs"] = Counter("sscflow_runs", "sscflow runs by status", ["status"])
        _METRICS["where"] = Counter(
            "sscflow_stage_tasks", "Tasks finished per stage on GPU or CPU workers",
            ["stage", "where"],
        )
    return _METRICS


def record(msg: dict) -> None:
    """Count one event: ``{"stage", "status", "seconds", "where"}`` or ``{"run": status}``."""
    c = counters()
    if "run" in msg:
        c["runs"].labels(status=str(msg["run"])).inc()
        return
    stage = str(msg.get("stage", "unknown"))
    c["patients"].labels(stage=stage, status=str(msg.get("status", "unknown"))).inc()
    if msg.get("where"):
        c["where"].labels(stage=stage, where=str(msg["where"])).inc()
    seconds = float(msg.get("seconds") or 0.0)
    if seconds > 0:
        c["seconds"].labels(stage=stage).inc(seconds)


def scheduler_plugin():
    """A SchedulerPlugin that feeds ``sscflow`` events into the counters."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class SscflowMetrics(SchedulerPlugin):
        name = "sscflow-metrics"
        idempotent = True  # one per scheduler, however many runs register it

        def log_event(self, topic, msg):
            if topic == TOPIC and isinstance(msg, dict):
                record(msg)

    return SscflowMetrics()
