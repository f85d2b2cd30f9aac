"""What the routes take from the application: its settings and the zoo version it serves."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.problems import ProblemError
from app.ranking import ZooState
from app.settings import Settings
from app.task2vec.errors import Task2VecError


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def zoo_of(request: Request) -> ZooState:
    try:
        state: ZooState = request.app.state.zoos.current(settings_of(request))
    except Task2VecError as exc:
        raise ProblemError(503, "zoo-unavailable", "The zoo is not available", str(exc)) from None
    return state


SettingsDep = Annotated[Settings, Depends(settings_of)]
ZooDep = Annotated[ZooState, Depends(zoo_of)]
