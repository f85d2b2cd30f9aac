"""One registry of ranking methods: every name the API, the workers, the CLI, the evaluation,
the OpenAPI schema and the client accept is read from here.

A method is one module that decorates the function fitting it on a zoo::

    @register("task2vec-knn", needs="embedding", runs="api", summary="...")
    def knn(zoo: Zoo, k: int) -> Recommender: ...

``needs`` says what of the query it reads, and so its cost class: ``nothing`` (the zoo
alone), ``label`` (a domain or source label that only the evaluation knows: a baseline, never
served), ``embedding`` (the one probe pass every upload gets) or ``images`` (a forward pass of
experts over the uploaded images). ``runs`` says where the service computes it: ``api``
answers in the request, ``worker`` queues a job beside the embedding, ``evaluation`` only
in the meta-evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.task2vec.errors import ConfigError
from app.zoo.recommenders.base import Recommender
from app.zoo.zoo import Zoo

Needs = Literal["nothing", "label", "embedding", "images"]
Runs = Literal["api", "worker", "evaluation"]
Builder = Callable[[Zoo, int], Recommender]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs: Needs
    runs: Runs
    build: Builder
    #: The evaluation's truth (every expert trained and tested), not a contender in it.
    oracle: bool = False

    @property
    def served(self) -> bool:
        return self.runs != "evaluation"


REGISTRY: dict[str, Method] = {}


def register(
    name: str, *, summary: str, needs: Needs, runs: Runs, oracle: bool = False
) -> Callable[[Builder], Builder]:
    """Add the decorated builder to the registry under ``name``."""

    def decorate(build: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"ranking method {name!r} is registered twice")
        REGISTRY[name] = Method(name, summary, needs, runs, build, oracle)
        return build

    return decorate


def names(*, runs: tuple[Runs, ...] = ("api", "worker", "evaluation")) -> tuple[str, ...]:
    """The registered methods that run in one of ``runs``, in registration order."""
    return tuple(m.name for m in REGISTRY.values() if m.runs in runs)


def served() -> tuple[str, ...]:
    """What the API, the client and the CLI accept."""
    return names(runs=("api", "worker"))


def evaluated() -> tuple[str, ...]:
    """What the meta-evaluation compares: every method but the oracle it scores against."""
    return tuple(m.name for m in REGISTRY.values() if not m.oracle)


def method(name: str, among: tuple[str, ...] | None = None) -> Method:
    """The method called ``name``; an error that lists the choices when there is none (or it
    is not among ``among``)."""
    choices = tuple(REGISTRY) if among is None else among
    if name not in choices:
        raise ConfigError(f"unknown ranking method {name!r}; choose one of: {', '.join(choices)}")
    return REGISTRY[name]


def build(name: str, zoo: Zoo, k: int = 5) -> Recommender:
    """Method ``name`` fitted on ``zoo`` (``k``: its neighbour count, where it has one)."""
    return method(name).build(zoo, k)
