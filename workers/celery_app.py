"""The Celery application. Messages carry a job id only; the job row holds everything else.

Queues: ``embed`` (Task2Vec embeddings, of uploads and of tasks added to the zoo: put GPU
workers here) and ``evaluate`` (LogME and brute force over the zoo's experts, and a newly
registered expert's evaluation on every zoo task). ``acks_late`` with one prefetched message
per process: a worker that dies mid-job leaves the message to another worker instead of
losing it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from celery import Celery

from app.settings import get_settings

EMBED_QUEUE = "embed"
EVALUATE_QUEUE = "evaluate"


@cache
def celery_for(broker: str) -> Celery:
    """The Celery app for a broker URL (one per URL and process)."""
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    celery = Celery("task2vec", broker=broker, include=["workers.tasks"])
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=EMBED_QUEUE,
        task_ignore_result=True,  # results go to the job rows
        broker_connection_retry_on_startup=True,
        # A publisher facing a dead broker gives up within seconds; the API then fails the
        # job and answers 503 instead of hanging the request.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        broker_connection_timeout=3,
        task_routes={
            "workers.embed": {"queue": EMBED_QUEUE},
            "workers.rank": {"queue": EVALUATE_QUEUE},
            "workers.evaluate_expert": {"queue": EVALUATE_QUEUE},
            "workers.add_zoo_task": {"queue": EMBED_QUEUE},
        },
    )
    return celery


app = celery_for(get_settings().resolved_broker_url())
