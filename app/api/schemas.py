"""The bodies of the API's success answers, so ``/openapi.json`` describes every one of them
and a generated client gets typed results (errors are ``problems.Problem``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Links = dict[str, str]


class Progress(BaseModel):
    stage: str | None
    fraction: float = Field(description="0 to 1, within the stage")


class JobOut(BaseModel):
    id: str
    kind: str = Field(description="embed, rank, expert or zoo-task")
    status: str = Field(description="queued, running, succeeded or failed")
    attempts: int = Field(
        description="attempts a worker has started; more than one when a worker was killed "
        "or cut off mid-job and another took the job over"
    )
    progress: Progress
    task_id: str | None
    params: dict[str, Any]
    timings: dict[str, Any] = Field(description="seconds per finished stage")
    created_at: str = Field(description="ISO 8601")
    started_at: str | None
    finished_at: str | None
    error: dict[str, Any] | None = Field(description="a problem document, when it failed")
    result: dict[str, Any] | None
    links: Links


class DatasetOut(BaseModel):
    sha256: str
    filename: str
    bytes: int
    num_images: int | None
    classes: list[Any] | None
    class_counts: list[Any] | None
    skipped: list[dict[str, str]] = Field(description="members left out, and why")


class EmbeddingOut(BaseModel):
    dim: int
    difficulty: float
    seconds: float


class TaskOut(BaseModel):
    id: str
    probe: str
    dataset: DatasetOut
    embedding: EmbeddingOut | None
    links: Links


class TaskAccepted(BaseModel):
    task_id: str
    job_id: str
    status: str
    skipped: list[dict[str, str]]
    warnings: list[str] = Field(
        default_factory=list, description="what to check in an accepted dataset"
    )
    links: Links


class Neighbour(BaseModel):
    task: str
    domain: str
    distance: float
    best_expert: str


class Neighbours(BaseModel):
    task_id: str
    neighbors: list[Neighbour]


class RankedExpert(BaseModel):
    rank: int
    expert: str
    score: float = Field(description="the method's score: higher ranks first")
    evidence: dict[str, Any] = Field(
        description="why the expert is here: predicted_error (a fraction of the images, in "
        "the zoo protocol's units) with error_interval (its low and high end) at "
        "interval_level (0.8: four in five true errors fall inside), and what the method "
        "read (docs/api.md, Reading the answer, documents every field)"
    )


class NoveltyOut(BaseModel):
    """Whether the task lies outside what the zoo covers."""

    out_of_distribution: bool = Field(
        description="the task is farther from its nearest zoo task than threshold_quantile of "
        "the zoo's own tasks are from theirs: the neighbours' experts say little, so trust "
        "predicted errors less (their intervals are wider) and prefer a method that reads the "
        "images (logme)"
    )
    nearest_distance: float = Field(description="symmetric Task2Vec distance to the nearest task")
    threshold: float = Field(description="the distance above which a task is flagged")
    threshold_quantile: float
    zoo_quantile: float = Field(
        description="the share of zoo tasks whose nearest neighbour is at least as near"
    )


class MethodOut(BaseModel):
    name: str
    summary: str
    needs: str = Field(
        description="what of the dataset it reads: nothing, its embedding (the one probe pass "
        "every upload gets) or its images (a forward pass of each expert it ranks)"
    )
    runs: str = Field(description="api: answered in the request; worker: a job beside it")
    default: bool = Field(description="the method a ranking uses when none is named")


class Ranking(BaseModel):
    task_id: str
    method: str
    ranking: list[RankedExpert]
    novelty: NoveltyOut | None = None
    seconds: float = Field(description="time to rank")
    cached: bool = Field(
        default=False,
        description="answered from the rankings this API process computed for the zoo version",
    )
    zoo_version: str


class JobAccepted(BaseModel):
    """A ranking left to a worker (or not finished within ``wait``): follow the job."""

    job_id: str
    status: str | None = None
    task_id: str | None = None


class Timings(BaseModel):
    upload_s: float
    queue_wait_s: float | None
    job_s: float | None
    job_stages: dict[str, Any]
    total_s: float


class UploadRanking(BaseModel):
    task_id: str
    job_id: str = Field(description="the embedding job")
    method: str
    ranking: list[RankedExpert]
    novelty: NoveltyOut | None = None
    seconds: float | None = None
    zoo_version: str | None = None
    timings: Timings
    warnings: list[str] = Field(
        default_factory=list, description="what to check in the uploaded dataset"
    )


class ZooOut(BaseModel):
    version: str
    tasks: int
    experts: int
    probe: str
    embedding: dict[str, Any] = Field(description="dim and the embedding configuration")
    protocol: dict[str, Any]
    pending: dict[str, int] = Field(description="experts and tasks still being added")


class ExpertOut(BaseModel):
    id: str
    architecture: str
    input_size: int
    parameters: int | None = Field(
        default=None,
        description="the parameters of the features it computes (a probe's trunk, a small "
        "network whole); none for TorchScript, ONNX, torchvision and timm experts",
    )
    mean: list[float]
    std: list[float]
    source_task: str | None
    tags: list[str]
    status: str
    in_served_zoo: bool
    mean_error: float | None
    error: dict[str, Any] | None = Field(
        description="why it failed: type, title and status (the detail is on its job)"
    )
    links: Links


class ZooTaskOut(BaseModel):
    name: str
    domain: str
    size: int
    classes: list[str]
    status: str
    in_served_zoo: bool
    best_expert: str | None
    error: dict[str, Any] | None = Field(
        description="why it failed: type, title and status (the detail is on its job)"
    )
    links: Links


class ExpertPage(BaseModel):
    total: int
    items: list[ExpertOut]


class ZooTaskPage(BaseModel):
    total: int
    items: list[ZooTaskOut]


class ItemAccepted(BaseModel):
    name: str
    job_id: str
    status: str
    links: Links


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    checks: dict[str, str]
    #: Free bytes on the data directory's disk: not ready below ``T2V_MIN_FREE_BYTES``.
    data_free_bytes: int | None = None


class TaskSummary(BaseModel):
    """A task as a list shows it: the dataset at a glance and where its embedding stands."""

    id: str
    created_at: str = Field(description="ISO 8601")
    filename: str
    num_images: int | None
    num_classes: int | None
    status: str | None = Field(
        description="the embedding job's: queued, running, succeeded or failed"
    )
    job_id: str | None = Field(description="the task's newest embedding job")
    links: Links


class TaskPage(BaseModel):
    total: int
    items: list[TaskSummary]


class JobPage(BaseModel):
    total: int
    items: list[JobOut]


class MapTask(BaseModel):
    name: str
    domain: str
    x: float
    y: float
    best_expert: str


class PlacedTask(BaseModel):
    task_id: str
    x: float
    y: float


class ZooMap(BaseModel):
    """The zoo's tasks in two dimensions, for a map coloured by domain."""

    zoo_version: str
    method: str = Field(description="how the layout is computed")
    domains: list[str]
    tasks: list[MapTask]
    placed: PlacedTask | None = Field(
        description="the task asked for (?task=), placed on the same map without moving the "
        "zoo's tasks (the landmark-MDS out-of-sample formula)"
    )


class MatrixTask(BaseModel):
    name: str
    domain: str


class MatrixExpert(BaseModel):
    name: str
    architecture: str
    source_task: str | None


class ZooMatrix(BaseModel):
    """Each zoo task's held-out error with each expert's features, for a heat map."""

    zoo_version: str
    tasks: list[MatrixTask]
    experts: list[MatrixExpert]
    errors: list[list[float | None]] = Field(
        description="a row per task, a column per expert: a fraction of the images, 4 decimals"
    )


class ZooDistances(BaseModel):
    """The symmetric Task2Vec distance between every two zoo tasks, for a heat map."""

    zoo_version: str
    tasks: list[MatrixTask]
    distances: list[list[float]] = Field(
        description="a row and a column per task, in the tasks' order: symmetric, zero on the "
        "diagonal, 4 decimals"
    )
