"""``task2vec remote``: a running service, through the Python client (``task2vec_client``).

The server comes from ``--server`` or ``T2V_SERVER``, the key from ``--api-key`` or
``T2V_API_KEY``. Refusals end as one ``error:`` line naming the problem (exit status 2);
``--json`` prints the answer as the API gave it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from app.cli.common import app, fail
from app.progress import err

if TYPE_CHECKING:
    from task2vec_client import Client, JobOut
    from task2vec_client.models import RankedExpert, RankingMethod

remote_app = typer.Typer(help="A running service, through its Python client.", no_args_is_help=True)
app.add_typer(remote_app, name="remote")
out = Console()

Server = Annotated[str, typer.Option(envvar="T2V_SERVER", help="the service's base URL")]
Key = Annotated[str | None, typer.Option(envvar="T2V_API_KEY", help="an API key")]
AsJson = Annotated[bool, typer.Option("--json", help="print the answer as JSON")]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _client(server: str, api_key: str | None) -> Client:
    """The client (a package of its own: ``pip install ./client``, done by make install)."""
    try:
        from task2vec_client import Client
    except ImportError:
        raise fail(ImportError("task2vec_client is not installed: pip install ./client")) from None
    return Client(server, api_key=api_key or os.environ.get("T2V_API_KEY"))


def _print_json(answer: BaseModel) -> None:
    print(json.dumps(answer.model_dump(mode="json"), indent=1))


#: Shown where the answer leaves a value out (an older service, or a method whose evidence
#: has no predicted error): a table cell, never a crash.
MISSING = "–"


def _fraction(value: Any) -> float | None:
    """A number from the evidence, or None when it is absent or not a number."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def accuracy_cell(item: RankedExpert, level: bool = False) -> str:
    """The predicted accuracy (1 − predicted_error) and, in brackets, its interval: an error
    interval [low, high] holds the accuracy in [1 − high, 1 − low] (``level``: followed by
    the interval's level, ``88.0% (80–92 at 80%)``). ``MISSING`` for what the evidence lacks."""
    error, bounds, at = item.predicted_error, item.error_interval, item.interval_level
    accuracy = MISSING if error is None else f"{100 * (1 - error):.1f}%"
    if bounds is None:
        return accuracy
    low, high = bounds
    interval = f"{100 * (1 - high):.0f}–{100 * (1 - low):.0f}"
    if level and at is not None:
        interval += f" at {at:.0%}"
    return f"{accuracy} ({interval})"


def ranking_table(title: str, ranking: list[RankedExpert]) -> Table:
    """Rank, expert, the accuracy to expect from it on the dataset with the interval that
    holds the true accuracy at the evidence's level (in the header when every row shares it),
    its architecture, and the method's score (what ordered the rows; its units are the
    method's own, so it comes last). Accuracy and interval share a column and the table has
    no inner lines, so that it fits 80 characters without cutting a name."""
    levels = {item.interval_level for item in ranking} - {None}
    shared = levels.pop() if len(levels) == 1 else None
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    table.add_column("rank", justify="right")
    table.add_column("expert", no_wrap=True)
    interval = "interval" if shared is None else f"{shared:.0%} interval"
    table.add_column(f"predicted accuracy ({interval})", justify="right")
    table.add_column("architecture", no_wrap=True)
    table.add_column("score", justify="right")
    for item in ranking:
        accuracy = accuracy_cell(item, level=shared is None)
        architecture = (item.evidence or {}).get("architecture") or MISSING
        table.add_row(str(item.rank), item.expert, accuracy, str(architecture), f"{item.score:.4f}")
    return table


def novelty_line(novelty: dict[str, Any]) -> str:
    """Whether the zoo knows tasks like this one. Out of its distribution, the line is a flag:
    the neighbours' experts say little, so the predicted accuracies are less sure."""
    distance = _fraction(novelty.get("nearest_distance"))
    threshold = _fraction(novelty.get("threshold"))
    near = MISSING if distance is None else f"{distance:.3f}"
    limit = MISSING if threshold is None else f"{threshold:.3f}"
    if novelty.get("out_of_distribution"):
        return (
            f"[bold yellow]⚠ out of distribution:[/] this dataset lies outside what the zoo "
            f"covers (nearest zoo task at distance {near}, threshold {limit}); the predicted "
            f"accuracies are less sure: try --method logme, which reads the images"
        )
    return f"within the zoo's distribution: nearest zoo task at {near} (threshold {limit})"


def _print_ranking(title: str, rows: list[RankedExpert], novelty: dict[str, Any] | None) -> None:
    """The table, with the novelty line: before it when the dataset is out of the zoo's
    distribution (a flag to read first), after it otherwise."""
    flagged = bool(novelty and novelty.get("out_of_distribution"))
    if novelty and flagged:
        out.print(novelty_line(novelty))
    out.print(ranking_table(title, rows))
    if novelty and not flagged:
        out.print(novelty_line(novelty))


#: The stages of an embedding job, in the order its worker runs them (``workers/tasks.py``
#: ``run_embed``, with the embedding's own "features", "head" and "fisher" from
#: ``app/task2vec``); then one "ranking (method)" per method its upload asked it to rank.
EMBED_STAGES = ("loading dataset", "features", "head", "fisher", "saving")


def job_stages(kind: str, params: dict[str, Any]) -> list[str]:
    """The stages a job of ``kind`` with ``params`` goes through; empty for a kind whose
    stages are not known here (then they are counted from the job's timings)."""
    if kind == "embed":
        return [*EMBED_STAGES, *(f"ranking ({m})" for m in params.get("prerank") or [])]
    if kind == "rank" and params.get("method"):  # workers/tasks.py run_rank
        return ["loading dataset", f"ranking ({params['method']})"]
    return []


def job_position(job: JobOut) -> tuple[int, int | None]:
    """Which stage the job is in (1 for the first) and of how many (None when not known).
    A stage the plan lists is numbered by its place there (a retried job may skip the
    stages an earlier attempt finished); any other is the one after those its timings
    (seconds per finished stage) count."""
    planned = job_stages(job.kind, job.params)
    stage, finished = job.progress.stage, list(job.timings)
    if stage in planned:
        number = planned.index(stage) + 1
    else:
        number = len(finished) + (0 if stage in finished else 1)
    return number, (max(len(planned), number) if planned else None)


def job_description(job: JobOut) -> str:
    """A job's bar text: ``embed job: fisher (stage 4 of 5) 42%`` (the percentage is the
    stage's own), its status while queued, and how many stages it ran once it ended."""
    name = f"{job.kind} job"
    if job.finished:
        return f"{name}: {job.status} ({len(job.timings)} stages)"
    if job.progress.stage is None:
        return f"{name}: {job.status}"
    number, total = job_position(job)
    of = f"stage {number}" if total is None else f"stage {number} of {total}"
    return f"{name}: {job.progress.stage} ({of}) {job.progress.fraction:.0%}"


def job_bar(job: JobOut) -> tuple[float, float]:
    """A job's bar as (completed, total), in stages: finished ones and the fraction of the
    one under way."""
    if job.finished:
        return 1.0, 1.0
    if job.progress.stage is None:
        return 0.0, 1.0
    number, total = job_position(job)
    return number - 1 + job.progress.fraction, float(total or number)


class AmountColumn(ProgressColumn):
    """Bytes sent for a bar that counts bytes (the upload's, added with ``bytes=True``);
    nothing for a job's, whose description counts its stages."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task: Task) -> Text:
        return self._bytes.render(task) if task.fields.get("bytes") else Text("")


def progress_bars(console: Console, disable: bool = False) -> Progress:
    """The bars of ``recommend``: the upload's in bytes, each job's in stages."""
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        AmountColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=disable,
    )


def _follow(t2v: Client, job_id: str, progress: Progress) -> JobOut:
    """Wait for the job with a bar for its stages: which one it is in, of how many."""
    bar = progress.add_task("job: queued", total=1.0)

    def show(job: JobOut) -> None:
        completed, total = job_bar(job)
        progress.update(bar, description=job_description(job), completed=completed, total=total)

    job = t2v.wait_for(job_id, on_poll=show)
    show(job)
    return job


def _method(name: str | None) -> RankingMethod | None:
    """The method as the client types it: the service checks the name and names the choices."""
    return cast("RankingMethod | None", name)


@remote_app.command("recommend")
def recommend(
    dataset: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="zip, tar or .npz")],
    server: Server = DEFAULT_SERVER,
    api_key: Key = None,
    method: Annotated[
        str | None,
        typer.Option(help="ranking method (GET /v1/methods lists them); the service's default"),
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="experts to show")] = 5,
    as_json: AsJson = False,
) -> None:
    """Upload a labelled dataset and print the zoo's experts ranked for it."""
    from task2vec_client import JobAccepted, ProblemError
    from task2vec_client.models import RankedExpert

    try:
        with (
            _client(server, api_key) as t2v,
            progress_bars(err, disable=as_json) as progress,
        ):
            bar = progress.add_task("upload", total=dataset.stat().st_size, bytes=True)
            accepted = t2v.upload_task(
                dataset, progress=lambda sent, _: progress.update(bar, completed=sent)
            )
            progress.remove_task(bar)
            _follow(t2v, accepted.job_id, progress)
            ranked = t2v.recommendations(accepted.task_id, k=k, method=_method(method))
            if isinstance(ranked, JobAccepted):  # a worker ranks it
                job = _follow(t2v, ranked.job_id, progress)
                result = job.result or {}
                items = result.get("ranking", [])[:k]
                rows = [RankedExpert.model_validate({"evidence": {}, **item}) for item in items]
                method = result.get("method", method)
                body = {
                    "task_id": accepted.task_id,
                    "method": method,
                    "ranking": items,
                    "novelty": result.get("novelty"),
                }
            else:
                rows, body, method = ranked.ranking, ranked.model_dump(mode="json"), ranked.method
    except ProblemError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(body, indent=1))
        return
    _print_ranking(f"{dataset.name}: {method}, task {accepted.task_id}", rows, body.get("novelty"))


@remote_app.command("jobs")
def jobs(
    job_id: Annotated[str, typer.Argument(help="a job's id")],
    server: Server = DEFAULT_SERVER,
    api_key: Key = None,
    as_json: AsJson = False,
) -> None:
    """A job: its status, stage, timings and error."""
    from task2vec_client import ProblemError

    try:
        with _client(server, api_key) as t2v:
            job = t2v.job(job_id)
    except ProblemError as exc:
        raise fail(exc) from None
    if as_json:
        _print_json(job)
        return
    table = Table(title=f"job {job.id}", show_header=False)
    rows = {
        "kind": job.kind,
        "status": job.status,
        "stage": job_description(job),
        "task": job.task_id or "",
        "timings": ", ".join(f"{k} {v:.2f} s" for k, v in job.timings.items()),
        "error": (job.error or {}).get("detail", ""),
    }
    for name, value in rows.items():
        table.add_row(name, str(value))
    out.print(table)


@remote_app.command("tasks")
def tasks(
    task_id: Annotated[str, typer.Argument(help="a task's id")],
    server: Server = DEFAULT_SERVER,
    api_key: Key = None,
    method: Annotated[
        str | None, typer.Option(help="ranking method; the service's default")
    ] = None,
    k: Annotated[int, typer.Option(min=1)] = 5,
    as_json: AsJson = False,
) -> None:
    """A task: its dataset and the experts ranked for it."""
    from task2vec_client import JobAccepted, ProblemError

    try:
        with _client(server, api_key) as t2v:
            task = t2v.task(task_id)
            ranked = t2v.recommendations(task_id, k=k, method=_method(method))
    except ProblemError as exc:
        raise fail(exc) from None
    if as_json:
        _print_json(task)
        return
    data = task.dataset
    out.print(f"task {task.id}: {data.filename}, {data.num_images} images, {data.classes}")
    if isinstance(ranked, JobAccepted):
        out.print(f"{method} is ranked by a worker: task2vec remote jobs {ranked.job_id}")
    else:
        novelty = None if ranked.novelty is None else ranked.novelty.model_dump()
        _print_ranking(ranked.method, ranked.ranking, novelty)


@remote_app.command("experts")
def experts(server: Server = DEFAULT_SERVER, api_key: Key = None, as_json: AsJson = False) -> None:
    """The zoo's experts."""
    from task2vec_client import ProblemError

    try:
        with _client(server, api_key) as t2v:
            page = t2v.experts()
    except ProblemError as exc:
        raise fail(exc) from None
    if as_json:
        _print_json(page)
        return
    table = Table(title=f"{page.total} experts")
    for column in ("expert", "architecture", "input", "status", "mean error"):
        table.add_column(column)
    for e in page.items:
        error = "" if e.mean_error is None else f"{e.mean_error:.3f}"
        table.add_row(e.id, e.architecture, str(e.input_size), e.status, error)
    out.print(table)
