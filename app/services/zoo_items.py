"""The zoo's experts and tasks as the service keeps them: rows, their specs, and reads.

Once the service has started, the database is the zoo's source of truth: every expert and zoo
task has a row with its status (pending until its matrix entries exist, then ready; failed,
with why). A published version is a snapshot of the ready ones (``publishing``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from typing import Any, TypeVar, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Expert, ZooItemStatus, ZooTask
from app.services.jobs import JobKind
from app.services.problems import ProblemError, not_found
from app.zoo.experts import ExpertSpec
from app.zoo.tasks import TaskSpec
from app.zoo.zoo import expert_from_json, task_from_json

Item = Expert | ZooTask
#: One kind of item, for reads that hand back rows of the model they were given.
Row = TypeVar("Row", Expert, ZooTask)
ItemModel = type[Expert] | type[ZooTask]
#: The job that adds each kind of zoo item; its name is also the item's in problem types,
#: job parameters and messages.
KIND: dict[ItemModel, JobKind] = {Expert: JobKind.expert, ZooTask: JobKind.zoo_task}
#: The fields an expert row shares with ``ExpertSpec``.
EXPERT_FIELDS = tuple(f.name for f in fields(ExpertSpec))
#: An item's name: it is part of URLs, file names and messages.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def what(model: ItemModel) -> str:
    """``expert`` or ``zoo task``, for messages."""
    return KIND[model].replace("-", " ")


def check_name(what: str, name: str) -> None:
    """422 for a name an item cannot have (``what``: ``expert`` or ``zoo task``)."""
    if not NAME.fullmatch(name):
        raise ProblemError(
            422,
            "invalid-name",
            f"Invalid {what} name",
            f"{what} name {name!r}: 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
        )


def expert_spec(row: Expert) -> ExpertSpec:
    return expert_from_json({name: getattr(row, name) for name in EXPERT_FIELDS})


def task_spec(row: ZooTask) -> TaskSpec:
    return task_from_json(row.spec)


def expert_row(spec: ExpertSpec, status: str = ZooItemStatus.pending) -> Expert:
    values: dict[str, Any] = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in ((n, getattr(spec, n)) for n in EXPERT_FIELDS)
    }
    return Expert(**values, status=status)


def zoo_task_row(spec: TaskSpec, status: str = ZooItemStatus.pending) -> ZooTask:
    return ZooTask(
        name=spec.name,
        domain=spec.domain,
        size=spec.size,
        classes=list(spec.group_names),
        spec=asdict(spec),
        status=status,
    )


def by_name(session: Session, model: ItemModel, name: str) -> Item | None:
    return cast("Item | None", session.scalar(select(model).where(model.name == name)))


def one(session: Session, model: type[Row], name: str) -> Row:
    row = session.scalar(select(model).where(model.name == name))
    if row is None:
        raise not_found(what(model), name)
    return row


def page(session: Session, model: type[Row], *, limit: int, offset: int) -> tuple[int, list[Row]]:
    """One page of items, oldest first, and how many there are."""
    total = session.scalar(select(func.count()).select_from(model)) or 0
    rows = session.scalars(select(model).order_by(model.id).offset(offset).limit(limit))
    return total, list(rows)


def pending(session: Session) -> dict[str, int]:
    """How many experts and tasks are still being added."""
    return {
        kind: session.scalar(
            select(func.count()).select_from(model).where(model.status == ZooItemStatus.pending)
        )
        or 0
        for kind, model in (("experts", Expert), ("tasks", ZooTask))
    }


def ready_ids(session: Session, model: ItemModel) -> list[int]:
    return list(session.scalars(select(model.id).where(model.status == ZooItemStatus.ready)))


def refuse_taken(model: ItemModel, name: str, status: str | None) -> None:
    """409 for a name in use by an item that has not failed (a failed one may be replaced)."""
    if status is not None and status != ZooItemStatus.failed:
        kind = KIND[model]
        raise ProblemError(
            409,
            f"{kind}-exists",
            f"The {what(model)} exists",
            f"{what(model)} {name!r} is already {status}",
        )


def check_free(session: Session, *, model: ItemModel, name: str) -> None:
    """409 before anything is stored when the name is taken (the unique constraint still
    decides a race)."""
    refuse_taken(model, name, session.scalar(select(model.status).where(model.name == name)))
