"""Typed answers of the service. Each model has the name of the schema it mirrors in the
service's ``/openapi.json``; a test of the service compares them field by field, so the two
cannot drift. Unknown fields are kept (a newer service may add some)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

#: The ranking methods the service accepts (its registry's served methods; a test of the
#: service compares the two). Leave the method out to get the service's default.
RankingMethod = Literal[
    "global-best", "task2vec-knn", "task2vec-asym", "learned", "logme", "brute-force", "hybrid"
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Progress(_Model):
    stage: str | None
    fraction: float


class JobOut(_Model):
    id: str
    kind: str
    status: str
    attempts: int
    progress: Progress
    task_id: str | None
    params: dict[str, Any]
    timings: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    links: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed")


class TaskAccepted(_Model):
    task_id: str
    job_id: str
    status: str
    skipped: list[dict[str, str]]
    #: What to check in an accepted dataset (class names that look alike).
    warnings: list[str] = []
    links: dict[str, str]


class JobAccepted(_Model):
    job_id: str
    status: str | None = None
    task_id: str | None = None


class DatasetOut(_Model):
    sha256: str
    filename: str
    bytes: int
    num_images: int | None
    classes: list[Any] | None
    class_counts: list[Any] | None
    skipped: list[dict[str, str]]


class EmbeddingOut(_Model):
    dim: int
    difficulty: float
    seconds: float


class TaskOut(_Model):
    id: str
    probe: str
    dataset: DatasetOut
    embedding: EmbeddingOut | None
    links: dict[str, str]


class Neighbour(_Model):
    task: str
    domain: str
    distance: float
    best_expert: str


class Neighbours(_Model):
    task_id: str
    neighbors: list[Neighbour]


class RankedExpert(_Model):
    rank: int
    expert: str
    score: float
    evidence: dict[str, Any]

    @property
    def predicted_error(self) -> float | None:
        """The expert's expected error on the dataset (a fraction), when the service gave one
        (None for a value that is absent or not a number: an older service, another method)."""
        return _number(self.evidence.get("predicted_error"))

    @property
    def error_interval(self) -> tuple[float, float] | None:
        """The interval holding the true error at ``interval_level``, when the service gave
        both of its ends as numbers."""
        value = self.evidence.get("error_interval")
        if not isinstance(value, list | tuple) or len(value) != 2:
            return None
        low, high = _number(value[0]), _number(value[1])
        return None if low is None or high is None else (low, high)

    @property
    def interval_level(self) -> float | None:
        """The share of true errors ``error_interval`` holds (0.8: four in five)."""
        return _number(self.evidence.get("interval_level"))


def _number(value: Any) -> float | None:
    """A float from an answer's free-form evidence, or None when it is absent or not one."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class Novelty(_Model):
    out_of_distribution: bool
    nearest_distance: float
    threshold: float
    threshold_quantile: float
    zoo_quantile: float


class Ranking(_Model):
    task_id: str
    method: str
    ranking: list[RankedExpert]
    novelty: Novelty | None = None
    seconds: float
    cached: bool = False
    zoo_version: str


class Timings(_Model):
    upload_s: float
    queue_wait_s: float | None
    job_s: float | None
    job_stages: dict[str, Any]
    total_s: float


class UploadRanking(_Model):
    task_id: str
    job_id: str
    method: str
    ranking: list[RankedExpert]
    novelty: Novelty | None = None
    seconds: float | None = None
    zoo_version: str | None = None
    timings: Timings
    warnings: list[str] = []


class ZooOut(_Model):
    version: str
    tasks: int
    experts: int
    probe: str
    embedding: dict[str, Any]
    protocol: dict[str, Any]
    pending: dict[str, int]


class ExpertOut(_Model):
    id: str
    architecture: str
    input_size: int
    parameters: int | None = None  # the features' parameters; none for file-defined families
    mean: list[float]
    std: list[float]
    source_task: str | None
    tags: list[str]
    status: str
    in_served_zoo: bool
    mean_error: float | None
    error: dict[str, Any] | None
    links: dict[str, str]


class ItemAccepted(_Model):
    name: str
    job_id: str
    status: str
    links: dict[str, str]


class ExpertPage(_Model):
    total: int
    items: list[ExpertOut]


#: Every model, by the name of the service schema it mirrors.
MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (
        Progress,
        JobOut,
        TaskAccepted,
        JobAccepted,
        DatasetOut,
        EmbeddingOut,
        TaskOut,
        Neighbour,
        Neighbours,
        RankedExpert,
        Ranking,
        Timings,
        UploadRanking,
        ZooOut,
        ExpertOut,
        ExpertPage,
        ItemAccepted,
    )
}
