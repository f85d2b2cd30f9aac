"""The zoo's rows and reads (``app.services.zoo_items``), on both databases, rows written
directly (no zoo is published: nothing here needs one).

A row is what the service keeps of an expert or zoo task once it has started, so a spec written
as a row and read back in another transaction must be the same spec (mean, std and tags come
back as tuples, an uploaded task keeps its dataset and domain); a name that would break a URL,
a file name or a message is refused with 422 before anything is stored; ``one`` is a 404 for a
missing name; ``page`` is oldest first with the total; ``pending`` and ``ready_ids`` count and
list by status; a name is taken (409) by a pending or ready item of the same kind, never by a
failed one, which may be replaced."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from app.db.models import Expert, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.services import zoo_items
from app.services.problems import ProblemError
from app.services.zoo_items import ItemModel
from app.settings import Settings
from app.zoo.experts import ExpertSpec
from app.zoo.presets import tiny
from app.zoo.tasks import TaskSpec

SPEC = ExpertSpec(
    name="cnn-4x1-rt",
    architecture="cnn-4x1",
    weights="/data/experts/ab/abcdef.pt",
    input_size=28,
    mean=(0.1, 0.2, 0.3),
    std=(0.4, 0.5, 0.625),
    source_task="digits-parity",
    tags=("random", "tiny"),
)

UPLOADED = TaskSpec(
    name="shoes",
    source="upload",
    groups=((0,), (1,), (2,)),
    group_names=("boot", "sandal", "sneaker"),
    size=90,
    dataset="/data/uploads/12/1234.upload",
    domain_name="clothing",
)

ALTERED = TaskSpec(
    name="fm-inverted",
    source="fashion_mnist",
    groups=((1,), (7,)),
    group_names=("trouser", "sneaker"),
    size=80,
    seed=4,
    transform="inverted",
)


def _problem(call: Callable[[], object]) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        call()
    return raised.value


def _expert(name: str, status: str = ZooItemStatus.pending) -> Expert:
    return zoo_items.expert_row(
        ExpertSpec(name=name, architecture="cnn-4x1", weights="w.pt", input_size=28), status
    )


def _task(name: str, status: str = ZooItemStatus.pending) -> ZooTask:
    return zoo_items.zoo_task_row(
        TaskSpec(name, "mnist", ((3,), (8,)), ("3", "8"), 80, seed=2), status
    )


def _add(settings: Settings, *rows: Expert | ZooTask) -> list[int]:
    """Commit ``rows``; their ids."""
    with session_scope(settings.resolved_database_url()) as session:
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def test_an_expert_spec_survives_its_row(settings: Settings) -> None:
    row = zoo_items.expert_row(SPEC)
    assert (row.status, row.mean, row.std, row.tags) == (
        ZooItemStatus.pending,
        [0.1, 0.2, 0.3],
        [0.4, 0.5, 0.625],
        ["random", "tiny"],
    )  # JSON columns hold lists
    assert zoo_items.expert_row(SPEC, ZooItemStatus.ready).status == ZooItemStatus.ready
    _add(settings, row)
    with session_scope(settings.resolved_database_url()) as session:
        stored = zoo_items.one(session, Expert, SPEC.name)
        assert zoo_items.expert_spec(stored) == SPEC
    bare = ExpertSpec(name="bare", architecture="onnx", weights="m.onnx", input_size=32)
    _add(settings, zoo_items.expert_row(bare))
    with session_scope(settings.resolved_database_url()) as session:
        read = zoo_items.expert_spec(zoo_items.one(session, Expert, "bare"))
    assert read == bare
    assert (read.source_task, read.tags) == (None, ())


@pytest.mark.parametrize("spec", [tiny()[7], tiny()[1], UPLOADED, ALTERED], ids=lambda s: s.name)
def test_a_task_spec_survives_its_row(settings: Settings, spec: TaskSpec) -> None:
    row = zoo_items.zoo_task_row(spec)
    assert (row.name, row.domain, row.size, row.classes) == (
        spec.name,
        spec.domain,
        spec.size,
        list(spec.group_names),
    )
    _add(settings, row)
    with session_scope(settings.resolved_database_url()) as session:
        stored = zoo_items.one(session, ZooTask, spec.name)
        assert zoo_items.task_spec(stored) == spec
        assert zoo_items.task_spec(stored).key() == spec.key()  # its cached files still match
        assert (stored.status, stored.embedding_path) == (ZooItemStatus.pending, None)


def test_an_uploaded_task_keeps_its_domain_or_is_called_uploaded() -> None:
    assert zoo_items.zoo_task_row(UPLOADED).domain == "clothing"
    unnamed = TaskSpec("x", "upload", ((0,), (1,)), ("a", "b"), 10, dataset="d.upload")
    assert zoo_items.zoo_task_row(unnamed).domain == "uploaded"
    assert zoo_items.zoo_task_row(tiny()[0]).domain != "uploaded"


@pytest.mark.parametrize(
    "name",
    ["a", "7", "cnn-4x1.v2_final", "A" * 100, "x.-_"],
)
def test_good_names_pass(name: str) -> None:
    zoo_items.check_name("expert", name)
    zoo_items.check_name("zoo task", name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-leading-dash",
        ".hidden",
        "_under",
        "a/b",
        "../up",
        "a b",
        "tab\there",
        "naïve",
        "a?b=c",
        "A" * 101,
        "trailing-newline\n",
    ],
)
def test_names_that_would_break_a_url_or_a_file_are_refused(name: str) -> None:
    for what in ("expert", "zoo task"):
        refused = _problem(partial(zoo_items.check_name, what, name))
        assert (refused.status, refused.kind) == (422, "invalid-name")
        assert refused.title == f"Invalid {what} name"
        assert repr(name) in refused.detail  # the name, quoted, so the client sees which


def test_one_finds_a_row_by_its_exact_name_or_is_a_404(settings: Settings) -> None:
    _add(settings, _expert("cnn-a"), _task("task-a"))
    with session_scope(settings.resolved_database_url()) as session:
        assert zoo_items.one(session, Expert, "cnn-a").name == "cnn-a"
        assert zoo_items.one(session, ZooTask, "task-a").name == "task-a"
        for call, what, name in (
            (partial(zoo_items.one, session, Expert, "task-a"), "expert", "task-a"),  # a task's
            (partial(zoo_items.one, session, ZooTask, "cnn-a"), "zoo task", "cnn-a"),
            (partial(zoo_items.one, session, Expert, "cnn"), "expert", "cnn"),  # no prefix match
            (partial(zoo_items.one, session, Expert, "CNN-A"), "expert", "CNN-A"),  # nor case
        ):
            missing = _problem(call)
            assert (missing.status, missing.kind) == (404, "not-found")
            assert missing.title == f"No such {what}"
            assert missing.detail == f"{what} {name!r} does not exist"


def test_a_page_is_oldest_first_with_the_total(settings: Settings) -> None:
    names = ["e-c", "e-a", "e-d", "e-b", "e-e"]  # not in alphabetical order: ids decide
    for name in names:
        _add(settings, _expert(name))
    with session_scope(settings.resolved_database_url()) as session:
        total, rows = zoo_items.page(session, Expert, limit=2, offset=1)
        assert (total, [r.name for r in rows]) == (5, ["e-a", "e-d"])
        total, rows = zoo_items.page(session, Expert, limit=10, offset=0)
        assert (total, [r.name for r in rows]) == (5, names)
        assert zoo_items.page(session, Expert, limit=3, offset=5) == (5, [])
        assert zoo_items.page(session, ZooTask, limit=3, offset=0) == (0, [])


def test_pending_and_ready_ids_count_by_status(settings: Settings) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        assert zoo_items.pending(session) == {"experts": 0, "tasks": 0}
        assert zoo_items.ready_ids(session, Expert) == []
    experts = _add(
        settings,
        _expert("p1"),
        _expert("r1", ZooItemStatus.ready),
        _expert("p2"),
        _expert("f1", ZooItemStatus.failed),
        _expert("r2", ZooItemStatus.ready),
    )
    tasks = _add(
        settings,
        _task("t-r", ZooItemStatus.ready),
        _task("t-p"),
        _task("t-f", ZooItemStatus.failed),
    )
    with session_scope(settings.resolved_database_url()) as session:
        assert zoo_items.pending(session) == {"experts": 2, "tasks": 1}
        assert sorted(zoo_items.ready_ids(session, Expert)) == [experts[1], experts[4]]
        assert zoo_items.ready_ids(session, ZooTask) == [tasks[0]]


@pytest.mark.parametrize(
    ("model", "kind", "what"),
    [(Expert, "expert", "expert"), (ZooTask, "zoo-task", "zoo task")],
)
def test_a_pending_or_ready_name_is_taken_a_failed_one_is_not(
    model: ItemModel, kind: str, what: str
) -> None:
    zoo_items.refuse_taken(model, "x", None)  # no such item
    zoo_items.refuse_taken(model, "x", ZooItemStatus.failed)  # may be replaced
    for status in (ZooItemStatus.pending, ZooItemStatus.ready):
        taken = _problem(partial(zoo_items.refuse_taken, model, "x", status))
        assert (taken.status, taken.kind, taken.title) == (
            409,
            f"{kind}-exists",
            f"The {what} exists",
        )
        assert taken.detail == f"{what} 'x' is already {status}"


def test_check_free_reads_the_status_of_the_name_in_its_own_kind(settings: Settings) -> None:
    _add(
        settings,
        _expert("pending-one"),
        _expert("ready-one", ZooItemStatus.ready),
        _expert("failed-one", ZooItemStatus.failed),
        _task("task-one", ZooItemStatus.ready),
    )
    with session_scope(settings.resolved_database_url()) as session:
        for name, status in (("pending-one", "pending"), ("ready-one", "ready")):
            taken = _problem(partial(zoo_items.check_free, session, model=Expert, name=name))
            assert (taken.status, taken.kind) == (409, "expert-exists")
            assert taken.detail == f"expert {name!r} is already {status}"
        zoo_items.check_free(session, model=Expert, name="failed-one")
        zoo_items.check_free(session, model=Expert, name="nobody")
        zoo_items.check_free(session, model=Expert, name="task-one")  # a task's name: free
        zoo_items.check_free(session, model=ZooTask, name="ready-one")  # an expert's: free
        taken = _problem(lambda: zoo_items.check_free(session, model=ZooTask, name="task-one"))
        assert (taken.status, taken.kind) == (409, "zoo-task-exists")
