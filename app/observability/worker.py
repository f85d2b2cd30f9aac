"""The workers' Prometheus metrics. Celery's prefork pool runs jobs in child processes, so
``task2vec worker`` with a metrics port runs prometheus_client in multiprocess mode: every
process writes its values to files in a private directory (``multiprocess.enable``, before
this module is imported) and the worker's main process merges them when scraped.

- ``t2v_worker_jobs_started_total{kind}``: attempts claimed;
- ``t2v_worker_job_duration_seconds{kind, outcome}``: an attempt from claim to end; outcome
  ``succeeded``, ``failed``, ``lease-lost`` or ``retried`` (a database error, retried);
- ``t2v_worker_job_stage_duration_seconds{kind, stage}``: the stages an attempt timed (their
  names come from the code: ``loading dataset``, ``fisher``, ``ranking (logme)``, ...);
- ``t2v_worker_jobs_running{kind}``: attempts running now (live processes only);
- ``t2v_worker_webhook_tries_total{outcome}`` and
  ``t2v_worker_webhook_try_duration_seconds{outcome}``: tries at webhook deliveries, from
  claim to record; outcome ``delivered``, ``retried`` (tried again later), ``failed`` (given
  up), ``dropped`` (a message with no try due), ``deferred`` (its tenant had every delivery
  slot it may hold: sent again shortly, no try made);
- ``t2v_worker_sweep_jobs_total{action}``: what the sweeps did: ``expired`` (a lease expired:
  back to the queue, re-sent), ``resent`` (queued too long and its message no longer in the
  broker: lost, re-sent), ``failed`` (out of attempts: failed as lost);
- ``t2v_worker_sweep_jobs_waiting``: jobs queued longer than the re-send delay whose message
  still waits in the broker (a backlog, not a loss: left alone), at this worker's last sweep.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

#: Outcomes of an attempt.
SUCCEEDED, FAILED, LEASE_LOST, RETRIED = "succeeded", "failed", "lease-lost", "retried"
#: From a ranking of a few seconds to an embedding or a publish of many minutes.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

JOBS_STARTED = Counter("t2v_worker_jobs_started", "Attempts at jobs claimed", ("kind",))
JOB_DURATION = Histogram(
    "t2v_worker_job_duration_seconds",
    "An attempt at a job, from its claim to its end, by kind and outcome",
    ("kind", "outcome"),
    buckets=DURATION_BUCKETS,
)
STAGE_DURATION = Histogram(
    "t2v_worker_job_stage_duration_seconds",
    "The stages of an attempt (loading dataset, features, fisher, matrix, publishing, ...)",
    ("kind", "stage"),
    buckets=DURATION_BUCKETS,
)
JOBS_RUNNING = Gauge(
    "t2v_worker_jobs_running",
    "Attempts running now",
    ("kind",),
    multiprocess_mode="livesum",
)
SWEEP_JOBS = Counter(
    "t2v_worker_sweep_jobs",
    "Jobs the sweeps acted on: expired (lease expired, re-sent), resent (queued too long and "
    "the message lost, re-sent), failed (out of attempts, failed as lost)",
    ("action",),
)
SWEEP_WAITING = Gauge(
    "t2v_worker_sweep_jobs_waiting",
    "Jobs queued longer than the re-send delay whose message still waits in the broker "
    "(behind a backlog, not lost: not re-sent), at the last sweep",
    multiprocess_mode="mostrecent",
)


WEBHOOK_TRIES = Counter(
    "t2v_worker_webhook_tries",
    "Tries at webhook deliveries by outcome: delivered, retried (tried again later), failed "
    "(given up), dropped (no try due), deferred (the tenant's delivery slots were taken)",
    ("outcome",),
)
WEBHOOK_DURATION = Histogram(
    "t2v_worker_webhook_try_duration_seconds",
    "A try at a webhook delivery, from its claim to its record, by outcome",
    ("outcome",),
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def webhook_tried(outcome: str, seconds: float) -> None:
    WEBHOOK_TRIES.labels(outcome).inc()
    WEBHOOK_DURATION.labels(outcome).observe(seconds)


def job_finished(kind: str, outcome: str, seconds: float, stages: Mapping[str, float]) -> None:
    JOB_DURATION.labels(kind, outcome).observe(seconds)
    for stage, stage_seconds in stages.items():
        STAGE_DURATION.labels(kind, stage).observe(stage_seconds)


def swept(expired: int, resent: int, failed: int, waiting: int = 0) -> None:
    for action, n in (("expired", expired), ("resent", resent), ("failed", failed)):
        if n:
            SWEEP_JOBS.labels(action).inc(n)
    SWEEP_WAITING.set(waiting)
