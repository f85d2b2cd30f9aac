"""The worker side of the jobs, registered on the queue's Celery app under the names of the
job table (``app.services.jobs.JobKind``): embed an uploaded dataset; rank the zoo's experts on
it with the methods that need its images (LogME, brute force); evaluate a newly registered
expert on the zoo; add a task to the zoo. Also a try at a webhook delivery, retried by Celery
after the delay the try asks for.

Each process loads the probe and the zoo once and keeps them. Each step that writes rows opens
its own short session; progress goes through the job's recorder. A problem with the user's
data or request fails the job with a problem document and is not retried; a database outage
or a full or failing disk (``app.services.environment``) is retried with backoff; anything
else is an internal error, recorded the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from app.db.models import Expert, Job, Task, ZooTask
from app.db.session import UNAVAILABLE, dispose_engines, session_scope
from app.observability import context, multiprocess
from app.observability import worker as metrics
from app.services import bundles, deliveries, environment, leases, objects, tasks, zoo_admin
from app.services.jobs import JobKind, JobRecorder, LeaseLostError
from app.services.layout import DataLayout
from app.services.problems import problem, redact
from app.services.publishing import current_version
from app.services.queue import DELIVERY_TASK, WARM_UP_SETTING, WARMED_UP, celery_for
from app.services.serving import PRERANKED, WORKER_METHODS, ZooStates
from app.services.versions import Version
from app.settings import Settings, get_settings
from app.task2vec.datasets import LabelledImages, from_arrays
from app.task2vec.embedding import EmbedConfig, Embedding, embed
from app.task2vec.errors import DatasetError, Task2VecError
from app.task2vec.probes import ProbeNetwork
from workers import execution
from workers.pool_signals import leave_signals_to_the_main_process
from workers.ranking import dataset, prerank, rank_and_record
from workers.tenant_slots import TenantSlots

log = logging.getLogger(__name__)
celery = celery_for(get_settings().resolved_broker_url())
ZOOS = ZooStates(background=False, fitted=WORKER_METHODS)  # the API answers the others
_PROBES: dict[tuple[str, str, int, int], ProbeNetwork] = {}
_PROBES_LOCK = threading.Lock()


def _probe(config: EmbedConfig) -> ProbeNetwork:
    """The probe, loaded once per worker process."""
    key = (config.probe, config.probe_weights, config.image_size, config.seed)
    with _PROBES_LOCK:
        if key not in _PROBES:
            _PROBES[key] = config.load_probe()
        return _PROBES[key]


def _job_row(url: str, job_id: str) -> tuple[str, dict[str, Any], str | None]:
    """The job's kind, parameters and the request that created it."""
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        return job.kind, dict(job.params), job.request_id


def _task_context(url: str, job_id: str) -> tuple[str, str, str]:
    """The id, dataset file and tenant of the user task a job is about."""
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None or job.task_id is None:
            raise LookupError(f"job {job_id} does not exist or names no task")
        task = session.get(Task, job.task_id)
        assert task is not None
        return task.id, task.dataset.path, task.tenant


#: Errors of the database, not of the job: retried with backoff.
TRANSIENT = UNAVAILABLE
#: ... and of the data directory's disk, once the attempt has put its job back in the queue.
RETRIED = (*TRANSIENT, environment.StorageUnavailableError)
Body = Callable[[JobRecorder, dict[str, Any]], None]


def _execute(
    job_id: str,
    settings: Settings,
    doing: str,
    body: Body,
    on_fail: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    invalid: str = "invalid-dataset",
) -> None:
    """Claim the job and run ``body`` under its lease. A user-fixable error fails the job with
    422 (no retry), anything unforeseen with 500 (and a log); ``on_fail`` also gets the error,
    with the job's parameters (an expert or zoo task records it on its own row). A database
    error propagates, for Celery to retry, and so does a full or failing disk once the job is
    back in the queue; a lost lease ends the attempt without a write.

    Every log line of the job carries its id and the id of the request that created it; the
    attempt is counted and timed (``app.observability.worker``)."""
    with context.bound(job=job_id):
        attempt = leases.claim(settings, job_id)
        if attempt is None:
            log.info("job %s is finished or running under a live lease: message dropped", job_id)
            return
        url = settings.resolved_database_url()
        kind, params, request_id = _job_row(url, job_id)
        with context.bound(request=request_id):
            recorder = JobRecorder(
                url,
                job_id,
                attempt,
                settings.job_lease_seconds,
                broker_url=settings.resolved_broker_url(),
            )
            log.info("job %s (%s): attempt %d started", job_id, kind, attempt)
            metrics.JOBS_STARTED.labels(kind).inc()
            running = metrics.JOBS_RUNNING.labels(kind)
            running.inc()
            started = time.perf_counter()
            outcome = metrics.RETRIED  # unless the attempt returns: an error left for Celery
            try:
                outcome = _attempt(recorder, params, doing, body, on_fail, invalid)
            finally:
                running.dec()
                seconds = time.perf_counter() - started
                metrics.job_finished(kind, outcome, seconds, recorder.timings)
                log.info("job %s: attempt %d %s in %.2f s", job_id, attempt, outcome, seconds)


def _attempt(
    recorder: JobRecorder,
    params: dict[str, Any],
    doing: str,
    body: Body,
    on_fail: Callable[[dict[str, Any], dict[str, Any]], None] | None,
    invalid: str,
) -> str:
    """Run ``body`` for the claimed attempt; its outcome."""
    job_id, attempt = recorder.job_id, recorder.attempt
    try:
        with recorder.heartbeat(), environment.raised_as_unavailable():
            body(recorder, params)
        return metrics.SUCCEEDED
    except LeaseLostError:
        log.warning("job %s: attempt %d lost its lease to another", job_id, attempt)
        return metrics.LEASE_LOST
    except TRANSIENT:
        log.warning("job %s: attempt %d hit a database error; retried", job_id, attempt)
        raise
    except environment.StorageUnavailableError as exc:
        log.warning("job %s: attempt %d met a storage error (%s); retried", job_id, attempt, exc)
        try:
            recorder.requeue(environment.WAITING)
        except LeaseLostError:
            return metrics.LEASE_LOST
        raise
    except Task2VecError as exc:
        kind = exc.kind if isinstance(exc, DatasetError) else invalid
        error = problem(422, kind, f"Failed while {doing}", redact(str(exc)))
    except Exception:
        # The exception's text can name hosts, credentials and paths: it goes to the log.
        log.exception("job %s failed while %s", job_id, doing)
        detail = "the worker failed on this job; the error is logged with the job's id"
        error = problem(500, "internal", f"Internal error while {doing}", detail)
    try:
        recorder.fail(error)
    except LeaseLostError:
        return metrics.LEASE_LOST
    if on_fail is not None:
        on_fail(error, params)
    return metrics.FAILED


def run_embed(job_id: str, settings: Settings) -> None:
    def body(recorder: JobRecorder, params: dict[str, Any]) -> None:
        url = settings.resolved_database_url()
        task_id, dataset_path, tenant = _task_context(url, job_id)
        path = DataLayout.of(settings).task_embedding(task_id)
        state = ZOOS.current(settings)
        with session_scope(url) as session:
            done = tasks.embedding_row(session, task_id=task_id)
        data: LabelledImages | None = None
        if done is None:  # an earlier attempt may have stored it before it was cut off
            config = replace(state.zoo.embed_config, device=settings.device)
            recorder.stage("loading dataset")
            data = dataset(settings, state, dataset_path)
            started = time.perf_counter()
            embedding = execution.embed_here(data, config, _probe(config), recorder.progress)
            seconds = time.perf_counter() - started
            state.zoo.check_compatible(embedding)
            recorder.stage("saving")
            embedding.save(path)
            objects.share(settings, path)  # before the row naming it commits
            with session_scope(url) as session:
                recorder.hold(session)
                tasks.save_embedding(
                    session, task_id=task_id, path=path, embedding=embedding, seconds=seconds
                )
        else:
            embedding = Embedding.load(objects.local(settings, done.path))
        # A job queued before jobs named their methods ranks with the default.
        methods = tuple(params.get("prerank", PRERANKED))
        task = (task_id, tenant, dataset_path)
        ranked = prerank(recorder, settings, state, task, embedding, data, methods)
        recorder.succeed({"task": task_id, "embedding_dim": embedding.dim, "ranked": ranked})

    _execute(job_id, settings, "embedding", body)


def run_rank(job_id: str, settings: Settings) -> None:
    def body(recorder: JobRecorder, params: dict[str, Any]) -> None:
        url = settings.resolved_database_url()
        task_id, dataset_path, tenant = _task_context(url, job_id)
        state = ZOOS.current(settings)
        recorder.stage("loading dataset")
        data = dataset(settings, state, dataset_path)
        embedding = Embedding.load(
            objects.local(settings, DataLayout.of(settings).task_embedding(task_id))
        )
        method = params["method"]
        task = (task_id, tenant)
        items = rank_and_record(recorder, url, state, task, method, embedding, data, job_id)
        recorder.succeed(
            {
                "task": task_id,
                "method": method,
                "ranking": items,
                "novelty": state.assess(embedding),
                "zoo_version": state.version.content,
            }
        )

    _execute(job_id, settings, "ranking", body)


def _version_result(version: Version) -> dict[str, Any]:
    return {"zoo_version": version.content, "tasks": version.tasks, "experts": version.experts}


def run_expert(job_id: str, settings: Settings) -> None:
    """A registered expert: its column of the matrix, then a new zoo version."""

    def failed(error: dict[str, Any], params: dict[str, Any]) -> None:
        zoo_admin.fail_item(settings, Expert, params["expert"], error)

    def body(recorder: JobRecorder, params: dict[str, Any]) -> None:
        name = params["expert"]
        ZOOS.current(settings)  # the zoo is published before anything is added to it
        version = zoo_admin.evaluate_expert(settings, name, recorder.progress)
        recorder.succeed({"expert": name, **_version_result(version)})

    _execute(job_id, settings, "evaluating the expert", body, failed, invalid="invalid-expert")


def run_zoo_task(job_id: str, settings: Settings) -> None:
    """A task added to the zoo: its embedding and row of the matrix, then a new version."""

    def failed(error: dict[str, Any], params: dict[str, Any]) -> None:
        zoo_admin.fail_item(settings, ZooTask, params["zoo_task"], error)

    def body(recorder: JobRecorder, params: dict[str, Any]) -> None:
        name = params["zoo_task"]

        def embed_with_probe(data: LabelledImages, config: EmbedConfig) -> Embedding:
            config = replace(config, device=settings.device)
            return execution.embed_here(data, config, _probe(config), recorder.progress)

        ZOOS.current(settings)
        version = zoo_admin.add_zoo_task(settings, name, embed_with_probe, recorder.progress)
        recorder.succeed({"zoo_task": name, **_version_result(version)})

    _execute(job_id, settings, "adding the zoo task", body, failed)


def run_zoo_import(job_id: str, settings: Settings) -> None:
    """An uploaded zoo bundle, verified when it was accepted: verified again, imported, and
    a new version published. The bundle file goes once imported or refused (a database error
    keeps it for the retry)."""

    def body(recorder: JobRecorder, params: dict[str, Any]) -> None:
        path = bundles.stored_bundle(settings, params["bundle"])
        if not path.is_file():
            raise DatasetError("the uploaded bundle is no longer stored", "bundle-missing")
        try:
            version = bundles.import_bundle(settings, path, recorder.progress)
        except DatasetError as exc:
            if environment.storage_error(exc) is None:  # a full disk keeps it for the retry
                bundles.discard(settings, path)
            raise
        bundles.discard(settings, path)
        recorder.succeed(_version_result(version))

    _execute(job_id, settings, "importing the zoo bundle", body, invalid="invalid-bundle")


#: The body of each kind of job.
RUNNERS: dict[JobKind, Callable[[str, Settings], None]] = {
    JobKind.embed: run_embed,
    JobKind.rank: run_rank,
    JobKind.expert: run_expert,
    JobKind.zoo_task: run_zoo_task,
    JobKind.zoo_import: run_zoo_import,
}


def _register(kind: JobKind) -> None:
    def run(job_id: str) -> None:
        RUNNERS[kind](job_id, get_settings())

    run.__name__ = run.__qualname__ = f"{kind.name}_task"
    # A database or broker error is retried with backoff, starting after a lease, so that the
    # retry can claim the job (the sweep would re-send it too; a claim lets one of them run).
    lease = max(1, round(get_settings().job_lease_seconds))
    celery.task(
        name=kind.task,
        autoretry_for=RETRIED,
        retry_backoff=lease,
        retry_backoff_max=600,
        retry_jitter=False,
        max_retries=20,
    )(run)


for _kind in JobKind:
    _register(_kind)


@celery.task(
    name=DELIVERY_TASK,
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=False,
    max_retries=20,
)
def deliver_webhook(self: Any, delivery_id: str) -> None:
    """One try at a webhook delivery; an answer worth retrying sends the next try's message
    with Celery's countdown (the delivery's row, not a count of retries, decides when to give
    up). A database error is retried like a job's. A tenant whose deliveries hold their
    share of this process's slots waits: the message is sent again a moment later."""
    settings = get_settings()
    tenant = deliveries.tenant_of(settings, delivery_id) or ""
    with DELIVERY_SLOTS.hold(tenant, settings.webhook_tenant_concurrency) as held:
        if not held:
            metrics.webhook_tried(DEFERRED, 0.0)
            raise self.retry(countdown=DEFER_SECONDS, max_retries=None)
        started = time.perf_counter()
        outcome = deliveries.try_once(settings, delivery_id)
        metrics.webhook_tried(outcome.name, time.perf_counter() - started)
    if outcome.delay is not None:
        raise self.retry(countdown=outcome.delay, max_retries=None)


DELIVERY_SLOTS = TenantSlots()
#: A delivery whose tenant holds its share of the slots is sent again this many seconds later.
DEFER_SECONDS = 2.0
DEFERRED = "deferred"


@worker_ready.connect
def _start_sweeping(**_: Any) -> None:
    """Every worker sweeps for jobs that would otherwise wait forever (``leases.sweep``)."""
    leases.Sweeper(get_settings(), on_report=_count_sweep).start()


def _count_sweep(report: leases.SweepReport) -> None:
    metrics.swept(len(report.expired), len(report.resent), len(report.failed), len(report.waiting))


@worker_process_init.connect
def _prepare_pool_process(**_: Any) -> None:
    """A forked pool process must not share its parent's database connections. It takes its
    share of the cores for torch, and loads the published zoo and the probe in the
    background, so that the first job does not wait for them. Signals that reach it with
    its whole process group are left to the main process (``pool_signals``)."""
    leave_signals_to_the_main_process()  # first: before any thread starts
    dispose_engines()
    settings = get_settings()
    execution.set_threads(worker_torch_threads(settings, celery.conf.worker_concurrency))
    if celery.conf.get(WARM_UP_SETTING, True):  # not for a worker of webhook deliveries alone
        threading.Thread(target=_warm_up, args=(settings,), name="t2v-warm-up", daemon=True).start()


def worker_torch_threads(settings: Settings, processes: int | None) -> int:
    """``T2V_WORKER_TORCH_THREADS``, or the cores this process may use shared out among the
    worker's ``processes``."""
    if settings.worker_torch_threads:
        return settings.worker_torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, processes or 1))


def _warm_up(settings: Settings) -> None:
    """The current zoo version and its probe, as soon as one is published, then one small
    embedding of noise (a first pass through every kernel the probe uses is slower). Jobs
    that arrive meanwhile wait on the same loads instead of repeating them; a first start
    that has no zoo yet imports or builds it in the first job, as before."""
    try:
        while current_version(settings) is None:
            time.sleep(max(settings.zoo_poll_seconds, 0.5))
        started = time.perf_counter()
        state = ZOOS.current(settings)
        zoo = state.zoo
        config = replace(zoo.embed_config, device=settings.device)
        probe = _probe(config)
        execution.measure(settings, state, config, probe)
        size = config.image_size
        noise = np.random.default_rng(0).integers(0, 256, (2 * config.batch_size, size, size))
        labels = np.arange(len(noise)) % 2
        small = replace(config, max_samples=len(noise), fisher_samples=len(noise), head_epochs=1)
        noisy = from_arrays(noise.astype(np.uint8), labels)
        embed(noisy, small, probe=probe, plan=execution.plan())
        log.info(
            "%s: zoo version %s and probe %s loaded and run in %.1f s (%s)",
            WARMED_UP,
            state.version.content[:12],
            config.probe,
            time.perf_counter() - started,
            execution.plan().name,
        )
    except Exception:
        log.warning("loading the zoo ahead of the first job failed", exc_info=True)


@worker_process_shutdown.connect
def _metrics_of_a_process_gone(pid: int, **_: Any) -> None:
    """A pool process that exits drops its live gauges (metrics in multiprocess mode)."""
    multiprocess.process_exited(pid)
