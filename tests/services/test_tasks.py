"""A user's tasks after upload, below HTTP (``app.services.tasks``), on both databases.

A task and its embedding are the tenant's own (another tenant's id is not found, even once
this process holds the embedding in memory); the embedding is a 409 naming the job that makes
it until it exists; a ranking served is recorded once per task, method and zoo version (a rank
job's once per job); ``queue_rank`` commits and dispatches a rank job only for a task with
an embedding; ``rank_now`` answers in-process, cuts the answer to ``k`` but records the whole
order, once. Datasets are uploaded through ``uploads.register`` and embedded by the worker's
own code (``run_job``) on the tiny zoo; messages are recorded (``sent``), never sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from sqlalchemy import func, select

from app.db.models import Dataset, IndexVersionRow, Job, JobStatus, Recommendation, Task
from app.db.session import session_scope
from app.services import tasks, uploads
from app.services.layout import DataLayout
from app.services.problems import ProblemError
from app.services.publishing import ensure_published
from app.services.serving import DEFAULT_METHOD, ZooState
from app.services.storage import store_stream
from app.services.versions import Version
from app.settings import Settings
from app.task2vec.embedding import Embedding
from tests.helpers import job_row, npz_upload, run_job

HOOK = "https://example.com/hook"


@pytest.fixture
def version(settings: Settings) -> Version:
    """The tiny zoo, published in this test's database (as the API does on its first start)."""
    return ensure_published(settings, DataLayout.of(settings).zoo(settings.zoo))


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _upload(settings: Settings, version: Version, tenant: str = "acme") -> uploads.Submitted:
    """A tiny-zoo task's images uploaded as ``tenant``: its task and embedding job."""
    root = DataLayout.of(settings).uploads
    stored = asyncio.run(store_stream(_chunks(npz_upload(1)), root, settings.max_upload_bytes))
    try:
        config = version.embed_config
        data = uploads.validate(
            settings=settings, stored=stored, filename="a.npz", image_size=config.image_size
        )
        with session_scope(settings.resolved_database_url()) as session:
            return uploads.register(
                session,
                settings=settings,
                stored=stored,
                filename="a.npz",
                data=data,
                config=config,
                tenant=tenant,
            )
    finally:
        stored.discard()


def _embedded(settings: Settings, version: Version, tenant: str = "acme") -> str:
    """A task of ``tenant`` with its embedding made; its id."""
    submitted = _upload(settings, version, tenant)
    run_job(settings, submitted.job_id)
    assert job_row(settings, submitted.job_id).status == JobStatus.succeeded
    return submitted.task_id


def _problem(call: Callable[[], object]) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        call()
    return raised.value


def _recommendations(
    settings: Settings, methods: tuple[str, ...] | None = None
) -> list[Recommendation]:
    """The recorded rankings, oldest first (of ``methods`` only, when given)."""
    query = select(Recommendation).order_by(Recommendation.id)
    if methods is not None:
        query = query.where(Recommendation.method.in_(methods))
    with session_scope(settings.resolved_database_url()) as session:
        return list(session.scalars(query))


def test_a_task_is_its_tenants_own(settings: Settings, version: Version, sent: list[str]) -> None:
    submitted = _upload(settings, version, "acme")
    assert sent == [submitted.job_id]
    with session_scope(settings.resolved_database_url()) as session:
        task = tasks.get(session, task_id=submitted.task_id, tenant="acme")
        assert (task.id, task.tenant) == (submitted.task_id, "acme")

        def refused(task_id: str, tenant: str) -> list[ProblemError]:
            return [
                _problem(lambda: tasks.get(session, task_id=task_id, tenant=tenant)),
                _problem(lambda: tasks.embedding_of(session, task_id=task_id, tenant=tenant)),
            ]

        answers = set()
        for task_id, tenant in ((submitted.task_id, "globex"), ("0" * 32, "acme")):
            for error in refused(task_id, tenant):
                answers.add((error.status, error.kind, error.title))
                assert error.detail == f"task {task_id!r} does not exist"
    assert answers == {(404, "not-found", "No such task")}


def test_the_embedding_is_a_409_until_made_then_the_tenants_own(
    settings: Settings, version: Version, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks.EMBEDDINGS, "size", 16)  # an API sizes it from its settings
    submitted = _upload(settings, version, "acme")
    task_id, url = submitted.task_id, settings.resolved_database_url()
    with session_scope(url) as session:
        waiting = _problem(lambda: tasks.embedding_of(session, task_id=task_id, tenant="acme"))
    assert (waiting.status, waiting.kind) == (409, "embedding-not-ready")
    assert f"/v1/jobs/{submitted.job_id} (queued)" in waiting.detail

    run_job(settings, submitted.job_id)
    path = DataLayout.of(settings).task_embedding(task_id)
    with session_scope(url) as session:
        row = tasks.embedding_row(session, task_id=task_id)
        assert row is not None
        assert row.path == str(path)  # where the layout says
        embedding = tasks.embedding_of(session, task_id=task_id, tenant="acme")
        assert row.dim == embedding.dim
    on_disk = Embedding.load(path)
    np.testing.assert_array_equal(embedding.hessian, on_disk.hessian)
    np.testing.assert_array_equal(embedding.scale, on_disk.scale)

    path.unlink()  # read before: answered from memory from now on
    with session_scope(url) as session:
        again = tasks.embedding_of(session, task_id=task_id, tenant="acme")
        assert again is embedding
        other = _problem(lambda: tasks.embedding_of(session, task_id=task_id, tenant="globex"))
    assert (other.status, other.kind) == (404, "not-found")  # the memory knows the tenant


def test_a_ranking_is_recorded_once_per_task_method_and_version(settings: Settings) -> None:
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        dataset = Dataset(tenant="acme", sha256="0" * 64, path="x", filename="a.npz", bytes=1)
        session.add(dataset)
        session.flush()
        task = Task(tenant="acme", dataset_id=dataset.id, probe="cnn", config_hash="h")
        rows = [
            IndexVersionRow(
                zoo=name, probe="cnn", dim=1, count=1, experts=1, config={}, content=name
            )
            for name in ("v1", "v2")
        ]
        session.add_all([task, *rows])
        session.flush()
        task_id, v1, v2 = task.id, rows[0].id, rows[1].id

    def record(method: str, version_id: int, expert: str, job_id: str | None = None) -> None:
        with session_scope(url) as session:
            tasks.record_ranking(
                session,
                tenant="acme",
                task_id=task_id,
                method=method,
                ranking=[{"rank": 1, "expert": expert}],
                version_id=version_id,
                job_id=job_id,
            )

    record("learned", v1, "first")
    record("learned", v1, "second")  # the same ranking, computed by another process
    record("task2vec-knn", v1, "knn")
    record("learned", v2, "v2")
    record("logme", v1, "job-a", job_id="a" * 32)
    record("logme", v1, "job-a again", job_id="a" * 32)  # the job ran again
    record("logme", v1, "job-b", job_id="b" * 32)  # another job: a ranking of its own
    found = [
        (r.method, r.index_version_id, r.job_id, r.ranking[0]["expert"], r.tenant, r.task_id)
        for r in _recommendations(settings)
    ]
    assert found == [
        ("learned", v1, None, "first", "acme", task_id),
        ("task2vec-knn", v1, None, "knn", "acme", task_id),
        ("learned", v2, None, "v2", "acme", task_id),
        ("logme", v1, "a" * 32, "job-a", "acme", task_id),
        ("logme", v1, "b" * 32, "job-b", "acme", task_id),
    ]


def test_queue_rank_sends_a_job_only_for_a_task_with_an_embedding(
    settings: Settings, version: Version, sent: list[str]
) -> None:
    submitted = _upload(settings, version, "acme")
    task_id, url = submitted.task_id, settings.resolved_database_url()

    def queue_rank(tenant: str) -> Job:
        with session_scope(url) as session:
            return tasks.queue_rank(
                session,
                settings=settings,
                task_id=task_id,
                method="logme",
                k=2,
                tenant=tenant,
                callback_url=HOOK,
            )

    assert _problem(lambda: queue_rank("acme")).status == 409  # not embedded yet
    run_job(settings, submitted.job_id)
    assert _problem(lambda: queue_rank("globex")).status == 404
    assert sent == [submitted.job_id]  # nothing sent for either
    # The embedding job ranked with the default method while it had the images.
    [default] = _recommendations(settings)
    assert (default.method, default.job_id, default.index_version_id) == (
        DEFAULT_METHOD,
        None,
        version.id,
    )
    assert len(default.ranking) == version.experts
    with session_scope(url) as session:
        ranks = session.scalar(select(func.count()).select_from(Job).where(Job.kind == "rank"))
    assert ranks == 0

    job = queue_rank("acme")
    assert sent == [submitted.job_id, job.id]
    # Asked again while it is queued: the same job, nothing sent.
    assert queue_rank("acme").id == job.id
    assert sent == [submitted.job_id, job.id]
    row = job_row(settings, job.id)  # committed
    assert (row.kind, row.status, row.tenant, row.task_id) == ("rank", "queued", "acme", task_id)
    assert (row.params, row.callback_url) == ({"method": "logme", "k": 2}, HOOK)
    assert row.sent_at is not None

    run_job(settings, job.id)
    done = job_row(settings, job.id)
    assert done.status == JobStatus.succeeded, done.error
    [recorded] = _recommendations(settings, ("logme",))
    assert (recorded.job_id, recorded.method, recorded.tenant) == (job.id, "logme", "acme")
    assert recorded.index_version_id == version.id
    assert len(recorded.ranking) == version.experts  # the whole order, whatever k
    assert done.result is not None
    assert done.result["ranking"] == recorded.ranking


def test_rank_now_answers_k_and_records_the_whole_order_once(
    settings: Settings, version: Version, sent: list[str]
) -> None:
    task_id, url = _embedded(settings, version, "acme"), settings.resolved_database_url()
    zoo = ZooState.load(version)

    def rank_now(
        state: ZooState, method: str = "learned", tenant: str = "acme"
    ) -> dict[str, object]:
        with session_scope(url) as session:
            return tasks.rank_now(
                session, zoo=state, task_id=task_id, method=method, k=2, tenant=tenant
            )

    first = rank_now(zoo)
    assert (first["task_id"], first["method"], first["cached"]) == (task_id, "learned", False)
    assert first["zoo_version"] == version.content
    answered = first["ranking"]
    assert isinstance(answered, list)
    assert [item["rank"] for item in answered] == [1, 2]
    in_process = ("learned", "task2vec-knn")
    [recorded] = _recommendations(settings, in_process)
    assert (recorded.method, recorded.index_version_id, recorded.job_id) == (
        "learned",
        version.id,
        None,
    )
    assert len(recorded.ranking) == version.experts > 2
    assert recorded.ranking[:2] == answered

    again = rank_now(zoo)
    assert (again["cached"], again["ranking"]) == (True, answered)
    elsewhere = rank_now(ZooState.load(version))  # another process computes it again
    assert (elsewhere["cached"], elsewhere["ranking"]) == (False, answered)
    assert len(_recommendations(settings, in_process)) == 1  # the same ranking: kept once

    assert rank_now(zoo, "task2vec-knn")["cached"] is False
    assert [r.method for r in _recommendations(settings, in_process)] == list(in_process)
    assert _problem(lambda: rank_now(zoo, tenant="globex")).status == 404
    assert len(_recommendations(settings, in_process)) == 2
