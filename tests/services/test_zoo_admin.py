"""Zoo administration below HTTP (``app.services.zoo_admin``), on both databases.

The API's side: ``register`` commits a new expert or zoo task pending with the job that adds
it, and only then sends the job (a worker must never receive a job whose rows it cannot read);
a name in use by a pending or ready item is a 409 (a failed item is replaced, with its matrix
entries), also when the unique constraint decides a race; ``register_task`` keeps the uploaded
dataset and cleans the domain; when the broker refuses the job, the item fails with the 503
and its name is free again. The workers' side, run by the worker's own code
(``tests.helpers.run_job``) on the tiny zoo: ``evaluate_expert`` and ``add_zoo_task`` store the
item's matrix entries, mark it ready and publish a version with one more expert or task; an
expert that does not load fails, with why, and frees its name; ``fail_item`` marks an item
failed unless the current version serves it. Messages are recorded, never sent; the two
torch-heavy jobs (an expert's column, a task's embedding and row) run once per database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.db.models import Expert, Job, JobStatus, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.services import queue, uploads, weights, zoo_admin, zoo_items
from app.services.jobs import JobKind
from app.services.layout import DataLayout
from app.services.problems import ProblemError
from app.services.publishing import current_version, ensure_published
from app.services.storage import StoredFile, store_stream
from app.services.versions import Version
from app.services.zoo_admin import NewZooTask
from app.services.zoo_items import ItemModel
from app.settings import Settings
from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import ConfigError
from app.zoo.experts import ExpertSpec
from app.zoo.presets import recipe, tiny
from app.zoo.tasks import TaskSpec
from tests.helpers import cnn_weights, job_row, npz_upload, run_job

HOOK = "https://example.com/hook"
IMAGE_SIZE = recipe("tiny").embed_config.image_size


@pytest.fixture
def version(settings: Settings) -> Version:
    """The tiny zoo, published in this test's database (as on the service's first start)."""
    return ensure_published(settings, DataLayout.of(settings).zoo(settings.zoo))


def _spec(name: str, weights_at: str = "w.pt") -> ExpertSpec:
    return ExpertSpec(name=name, architecture="cnn-4x1", weights=weights_at, input_size=28)


def _task_spec(name: str) -> TaskSpec:
    base = tiny()[6]
    return TaskSpec(name, base.source, base.groups, base.group_names, base.size, seed=5)


def _register(settings: Settings, item: Expert | ZooTask, callback_url: str | None = None) -> str:
    """``zoo_admin.register`` in a request's session; the job's id."""
    with session_scope(settings.resolved_database_url()) as session:
        job = zoo_admin.register(
            session, settings=settings, item=item, tenant="acme", callback_url=callback_url
        )
        return job.id


def _add(settings: Settings, *rows: Expert | ZooTask | MatrixEntry) -> list[int]:
    with session_scope(settings.resolved_database_url()) as session:
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def _row(settings: Settings, model: ItemModel, name: str) -> Expert | ZooTask:
    with session_scope(settings.resolved_database_url()) as session:
        found = zoo_items.by_name(session, model, name)
        assert found is not None, name
        return found


def _count(settings: Settings, model: type[Expert | ZooTask | Job | MatrixEntry]) -> int:
    with session_scope(settings.resolved_database_url()) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _problem(call: Callable[[], object]) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        call()
    return raised.value


def _stored_upload(settings: Settings, data: bytes) -> StoredFile:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    root = DataLayout.of(settings).uploads
    return asyncio.run(store_stream(chunks(), root, settings.max_upload_bytes))


@pytest.fixture
def seen(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """What a worker would find as each message is sent: the job's id, kind and status, and
    its item's status, read in a transaction of their own (``sent``, with the rows)."""
    found: list[tuple[str, ...]] = []

    def dispatch(job_id: str, kind: JobKind, broker: str) -> None:
        job = job_row(settings, job_id)
        model: ItemModel = Expert if kind == JobKind.expert else ZooTask
        item = _row(settings, model, str(job.params[kind.replace("-", "_")]))
        found.append((job_id, kind, job.status, item.status, str(item.job_id)))

    monkeypatch.setattr(queue, "dispatch", dispatch)
    return found


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        (lambda: zoo_items.expert_row(_spec("cnn-new")), JobKind.expert),
        (lambda: zoo_items.zoo_task_row(_task_spec("task-new")), JobKind.zoo_task),
    ],
    ids=["expert", "zoo-task"],
)
def test_register_commits_the_item_and_its_job_then_sends_it(
    settings: Settings,
    seen: list[tuple[str, ...]],
    item: Callable[[], Expert | ZooTask],
    kind: JobKind,
) -> None:
    row = item()
    name, model = row.name, type(row)
    job_id = _register(settings, row, callback_url=HOOK)
    # The worker would have found both rows, committed, as the message left.
    assert seen == [(job_id, kind, JobStatus.queued, ZooItemStatus.pending, job_id)]
    job = job_row(settings, job_id)
    param = "expert" if kind == JobKind.expert else "zoo_task"
    assert (job.kind, job.params, job.tenant, job.task_id) == (kind, {param: name}, "acme", None)
    assert (job.callback_url, job.sent_at is not None) == (HOOK, True)
    stored = _row(settings, model, name)
    assert (stored.status, stored.job_id, stored.error) == (ZooItemStatus.pending, job_id, None)


@pytest.mark.parametrize("status", [ZooItemStatus.pending, ZooItemStatus.ready])
def test_a_name_in_use_is_refused_and_nothing_is_sent(
    settings: Settings, sent: list[str], status: str
) -> None:
    _add(settings, zoo_items.expert_row(_spec("taken"), status))
    _add(settings, zoo_items.zoo_task_row(_task_spec("taken-task"), status))
    expert = _problem(lambda: _register(settings, zoo_items.expert_row(_spec("taken"))))
    assert (expert.status, expert.kind) == (409, "expert-exists")
    assert expert.detail == f"expert 'taken' is already {status}"
    task = _problem(lambda: _register(settings, zoo_items.zoo_task_row(_task_spec("taken-task"))))
    assert (task.status, task.kind, task.title) == (409, "zoo-task-exists", "The zoo task exists")
    assert (sent, _count(settings, Job)) == ([], 0)
    assert _row(settings, Expert, "taken").status == status  # left as it was


def test_a_failed_item_is_replaced_with_its_entries(settings: Settings, sent: list[str]) -> None:
    failed = zoo_items.expert_row(_spec("again"), ZooItemStatus.failed)
    failed.error = {"status": 422, "detail": "did not load"}
    other = zoo_items.expert_row(_spec("other"), ZooItemStatus.ready)
    task = zoo_items.zoo_task_row(_task_spec("a-task"), ZooItemStatus.ready)
    old_id, other_id, task_id = _add(settings, failed, other, task)
    _add(
        settings,
        MatrixEntry(zoo_task_id=task_id, expert_id=old_id, error=0.5),
        MatrixEntry(zoo_task_id=task_id, expert_id=other_id, error=0.25),
    )
    job_id = _register(settings, zoo_items.expert_row(_spec("again", "new.pt")))
    assert sent == [job_id]
    again = _row(settings, Expert, "again")
    assert isinstance(again, Expert)
    assert again.id != old_id
    assert (again.status, again.error, again.weights) == (ZooItemStatus.pending, None, "new.pt")
    with session_scope(settings.resolved_database_url()) as session:
        left = session.execute(select(MatrixEntry.expert_id, MatrixEntry.error)).all()
    assert [tuple(r) for r in left] == [(other_id, 0.25)]  # the other expert's entry stays
    assert _count(settings, Expert) == 2


def test_the_unique_name_decides_a_race(settings: Settings, sent: list[str]) -> None:
    """Another request commits the same name after this one found it free: 409, not a 500."""
    url = settings.resolved_database_url()
    raced_by: list[str] = []

    def the_other_request_commits_first(session: Session, *_: object) -> None:
        if not raced_by:  # once, as this request first writes
            raced_by.append("other")
            with session_scope(url) as other:
                other.add(zoo_items.expert_row(_spec("raced")))

    with session_scope(url) as session:
        event.listen(session, "before_flush", the_other_request_commits_first)
        raced = _problem(
            lambda: zoo_admin.register(
                session,
                settings=settings,
                item=zoo_items.expert_row(_spec("raced")),
                tenant="acme",
            )
        )
        session.rollback()
    assert (raced.status, raced.kind) == (409, "expert-exists")
    assert raced.detail == "expert 'raced' was registered at the same time"
    assert raced_by == ["other"]
    assert sent == []
    assert (_count(settings, Expert), _count(settings, Job)) == (1, 0)


def test_check_name_free(settings: Settings) -> None:
    _add(
        settings,
        zoo_items.expert_row(_spec("pending-one")),
        zoo_items.expert_row(_spec("ready-one"), ZooItemStatus.ready),
        zoo_items.expert_row(_spec("failed-one"), ZooItemStatus.failed),
        zoo_items.zoo_task_row(_task_spec("task-one")),
    )
    for name, status in (("pending-one", "pending"), ("ready-one", "ready")):
        taken = _problem(partial(zoo_admin.check_name_free, settings, model=Expert, name=name))
        assert (taken.status, taken.kind) == (409, "expert-exists")
        assert taken.detail == f"expert {name!r} is already {status}"
    for name in ("failed-one", "free", "task-one"):
        zoo_admin.check_name_free(settings, model=Expert, name=name)
    taken = _problem(lambda: zoo_admin.check_name_free(settings, model=ZooTask, name="task-one"))
    assert (taken.status, taken.kind) == (409, "zoo-task-exists")


@pytest.mark.parametrize(
    ("domain", "stored"),
    [("  clothing ", "clothing"), (None, "uploaded"), ("   ", "uploaded"), ("d" * 80, "d" * 64)],
    ids=["trimmed", "none", "blank", "long"],
)
def test_register_task_keeps_the_dataset_and_cleans_the_domain(
    settings: Settings, sent: list[str], domain: str | None, stored: str
) -> None:
    upload = _stored_upload(settings, npz_upload(1))
    data = uploads.validate(
        settings=settings, stored=upload, filename="shoes.npz", image_size=IMAGE_SIZE
    )
    with session_scope(settings.resolved_database_url()) as session:
        job = zoo_admin.register_task(
            session,
            settings=settings,
            task=NewZooTask("shoes", domain),
            stored=upload,
            data=data,
            tenant="acme",
        )
        job_id = job.id
    assert sent == [job_id]
    assert upload.final.read_bytes() == npz_upload(1)  # kept under its content name
    row = _row(settings, ZooTask, "shoes")
    assert isinstance(row, ZooTask)
    assert (row.status, row.job_id, row.domain) == (ZooItemStatus.pending, job_id, stored)
    spec = zoo_items.task_spec(row)
    assert (spec.source, spec.dataset, spec.size) == ("upload", str(upload.final), len(data))
    assert spec.group_names == tuple(data.classes)
    assert job_row(settings, job_id).params == {"zoo_task": "shoes"}


def _dead_broker(job_id: str, kind: JobKind, broker: str) -> None:
    raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


def test_a_dead_broker_fails_the_item_and_frees_its_name(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "dispatch", _dead_broker)
    refused = _problem(lambda: _register(settings, zoo_items.expert_row(_spec("unsent"))))
    assert (refused.status, refused.kind) == (503, "broker-unavailable")
    item = _row(settings, Expert, "unsent")
    assert item.status == ZooItemStatus.failed
    assert item.error == refused.as_problem()
    assert item.job_id is not None
    assert job_row(settings, item.job_id).status == JobStatus.failed
    zoo_admin.check_name_free(settings, model=Expert, name="unsent")  # free again

    sent: list[str] = []
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: sent.append(job_id))
    job_id = _register(settings, zoo_items.expert_row(_spec("unsent")))
    assert sent == [job_id]
    assert _row(settings, Expert, "unsent").status == ZooItemStatus.pending


def test_fail_item_leaves_a_served_item_ready(settings: Settings, version: Version) -> None:
    served_expert, served_task = sorted(version.names("experts"))[0], tiny()[0].name
    _add(
        settings,
        zoo_items.expert_row(_spec("pending-one")),
        zoo_items.expert_row(_spec("ready-unpublished"), ZooItemStatus.ready),
        zoo_items.zoo_task_row(_task_spec("pending-task")),
    )
    error = {"type": "x", "title": "Failed", "status": 422, "detail": "why"}
    for model, name in (
        (Expert, "pending-one"),
        (Expert, "ready-unpublished"),  # ready, but its publish never happened
        (Expert, served_expert),  # a redelivered job failed: it stays in the zoo
        (ZooTask, "pending-task"),
        (ZooTask, served_task),
        (Expert, "nobody"),  # no row: nothing to mark
    ):
        zoo_admin.fail_item(settings, model, name, error)
    for model, name in ((Expert, "pending-one"), (Expert, "ready-unpublished")):
        item = _row(settings, model, name)
        assert (item.status, item.error) == (ZooItemStatus.failed, error), name
    assert _row(settings, ZooTask, "pending-task").status == ZooItemStatus.failed
    for model, name in ((Expert, served_expert), (ZooTask, served_task)):
        item = _row(settings, model, name)
        assert (item.status, item.error) == (ZooItemStatus.ready, None), name
    assert current_version(settings) == version


def test_the_workers_steps_refuse_what_they_cannot_add_to(settings: Settings) -> None:
    def no_embedding(data: LabelledImages, config: EmbedConfig) -> Embedding:
        raise AssertionError("nothing to embed")

    with pytest.raises(ConfigError, match="no published version"):
        zoo_admin.add_zoo_task(settings, "anything", no_embedding)
    with pytest.raises(LookupError, match="no expert named 'nobody'"):
        zoo_admin.evaluate_expert(settings, "nobody")


def test_an_expert_that_does_not_load_fails_with_why_and_frees_its_name(
    settings: Settings, sent: list[str], version: Version, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(cnn_weights(width=8))  # a cnn-8x1's weights: not a cnn-4x1's
    _register(settings, zoo_items.expert_row(_spec("misfit", str(junk))))
    run_job(settings, sent[-1])
    job = job_row(settings, sent[-1])
    assert job.status == JobStatus.failed
    assert job.error is not None
    item = _row(settings, Expert, "misfit")
    assert item.status == ZooItemStatus.failed
    assert item.error == job.error
    assert (item.error["status"], item.error["type"].rsplit("/", 1)[-1]) == (422, "invalid-expert")
    assert "misfit" in item.error["detail"]
    zoo_admin.check_name_free(settings, model=Expert, name="misfit")
    assert current_version(settings) == version  # nothing published
    assert _count(settings, MatrixEntry) == version.tasks * version.experts


def test_the_worker_adds_an_expert_and_a_task_and_publishes_each(
    settings: Settings, sent: list[str], version: Version, tmp_path: Path
) -> None:
    source = tmp_path / "w.pt"
    source.write_bytes(cnn_weights())
    stored = weights.store(settings, source)
    _register(settings, zoo_items.expert_row(_spec("cnn-added", str(stored))))
    run_job(settings, sent[-1])
    job = job_row(settings, sent[-1])
    assert job.status == JobStatus.succeeded, job.error
    with_expert = current_version(settings)
    assert with_expert is not None
    assert (with_expert.tasks, with_expert.experts) == (version.tasks, version.experts + 1)
    assert with_expert.names("experts") == version.names("experts") | {"cnn-added"}
    assert job.result is not None
    assert (job.result["expert"], job.result["zoo_version"]) == ("cnn-added", with_expert.content)
    expert = _row(settings, Expert, "cnn-added")
    assert (expert.status, expert.error) == (ZooItemStatus.ready, None)
    with session_scope(settings.resolved_database_url()) as session:
        column = session.scalars(
            select(MatrixEntry.error).where(MatrixEntry.expert_id == expert.id)
        ).all()
    assert len(column) == version.tasks
    assert all(0.0 <= e <= 1.0 for e in column)

    upload = _stored_upload(settings, npz_upload(1))
    data = uploads.validate(
        settings=settings, stored=upload, filename="t.npz", image_size=IMAGE_SIZE
    )
    with session_scope(settings.resolved_database_url()) as session:
        zoo_admin.register_task(
            session,
            settings=settings,
            task=NewZooTask("shoes-again", "clothing"),
            stored=upload,
            data=data,
            tenant="acme",
        )
    run_job(settings, sent[-1])
    job = job_row(settings, sent[-1])
    assert job.status == JobStatus.succeeded, job.error
    with_task = current_version(settings)
    assert with_task is not None
    assert (with_task.tasks, with_task.experts) == (version.tasks + 1, version.experts + 1)
    assert with_task.names("tasks") == version.names("tasks") | {"shoes-again"}
    task = _row(settings, ZooTask, "shoes-again")
    assert isinstance(task, ZooTask)
    assert (task.status, task.error) == (ZooItemStatus.ready, None)
    assert task.embedding_path is not None
    assert Path(task.embedding_path).is_file()
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalars(
            select(MatrixEntry.expert_id).where(MatrixEntry.zoo_task_id == task.id)
        ).all()
    assert len(row) == version.experts + 1  # every ready expert, the new one too
    assert _count(settings, MatrixEntry) == (version.tasks + 1) * (version.experts + 1)
