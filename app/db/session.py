"""Engines and sessions from the settings' database URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Update, create_engine, event, func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, Task

#: Errors that mean the database is down or out of connections, not a bug: the API answers
#: them 503 with Retry-After, a worker retries its job.
UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeoutError)

_urls: set[str] = set()


@cache
def engine_for(url: str) -> Engine:
    _urls.add(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # type: ignore[no-untyped-def]
            # WAL: the API reads while a worker process writes; foreign keys on, as in PostgreSQL.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def dispose_engines() -> None:
    """In a forked child: drop the connections inherited from the parent without closing
    them (they are the parent's), so the child opens its own."""
    for url in _urls:
        engine_for(url).dispose(close=False)


def updated(session: Session, statement: Update) -> int:
    """Run an UPDATE in ``session``; how many rows it matched (a conditional UPDATE is how
    two processes decide which of them acts)."""
    result = cast("CursorResult[Any]", session.execute(statement))
    return result.rowcount


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = sessionmaker(engine_for(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


Owned = TypeVar("Owned", Job, Task)


def newest_page(
    session: Session, model: type[Owned], *, tenant: str, limit: int, offset: int
) -> tuple[int, list[Owned]]:
    """One page of a tenant's rows, newest first (ties by id, so pages never overlap), and
    how many the tenant has."""
    total = session.scalar(select(func.count()).select_from(model).where(model.tenant == tenant))
    rows = session.scalars(
        select(model)
        .where(model.tenant == tenant)
        .order_by(model.created_at.desc(), model.id.desc())
        .offset(offset)
        .limit(limit)
    )
    return total or 0, list(rows)
