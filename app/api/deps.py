"""What the routes take from the application: its settings, a database session for the
request's unit of work, and the zoo version it serves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.db.session import session_scope
from app.services.problems import ProblemError
from app.services.serving import ZooState
from app.settings import Settings
from app.task2vec.errors import Task2VecError


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def session_of(settings: Annotated[Settings, Depends(settings_of)]) -> Iterator[Session]:
    """The request's session: committed when the route returns, rolled back when it raises,
    before the answer is sent (``scope="function"``), so a client never sees a success that
    was not stored. Services that must commit earlier (a job before its message) say so."""
    with session_scope(settings.resolved_database_url()) as session:
        yield session


def zoo_of(request: Request) -> ZooState:
    try:
        state: ZooState = request.app.state.zoos.current(settings_of(request))
    except Task2VecError as exc:
        raise ProblemError(503, "zoo-unavailable", "The zoo is not available", str(exc)) from None
    return state


SettingsDep = Annotated[Settings, Depends(settings_of)]
SessionDep = Annotated[Session, Depends(session_of, scope="function")]
ZooDep = Annotated[ZooState, Depends(zoo_of)]
