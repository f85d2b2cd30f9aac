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
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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


def _ranking_table(title: str, ranking: list[RankedExpert]) -> Table:
    """Rank, expert, score, and the expert's predicted error with its interval when given
    (one column, so that the table fits 80 characters without cutting a name)."""
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("expert", no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("predicted error (80%)", justify="right")
    for item in ranking:
        error, interval = item.predicted_error, item.error_interval
        predicted = "" if error is None else f"{100 * error:.1f}%"
        if interval is not None:
            predicted += f" ({100 * interval[0]:.0f}–{100 * interval[1]:.0f})"
        table.add_row(str(item.rank), item.expert, f"{item.score:.4f}", predicted)
    return table


def _novelty_line(novelty: dict[str, Any]) -> str:
    """One sentence on whether the zoo knows tasks like this one."""
    distance, threshold = novelty["nearest_distance"], novelty["threshold"]
    if novelty["out_of_distribution"]:
        return (
            f"[yellow]out of the zoo's distribution[/]: nearest zoo task at {distance:.3f}, "
            f"beyond {threshold:.3f}; predictions are unsure, try --method logme"
        )
    return f"within the zoo's distribution: nearest zoo task at {distance:.3f} (≤ {threshold:.3f})"


def _follow(t2v: Client, job_id: str, progress: Progress) -> JobOut:
    """Wait for the job with a bar for its stage and fraction."""
    bar = progress.add_task("queued", total=1.0)

    def show(job: JobOut) -> None:
        stage = job.progress.stage or job.status
        progress.update(bar, description=stage, completed=job.progress.fraction)

    job = t2v.wait_for(job_id, on_poll=show)
    progress.update(bar, description=job.status, completed=1.0)
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
            Progress(
                TextColumn("{task.description:24}"),
                BarColumn(),
                DownloadColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=True,
                disable=as_json,
            ) as progress,
        ):
            bar = progress.add_task("upload", total=dataset.stat().st_size)
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
                rows = [RankedExpert.model_validate(item) for item in items]
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
    out.print(_ranking_table(f"{dataset.name}: {method}, task {accepted.task_id}", rows))
    if body.get("novelty"):
        out.print(_novelty_line(body["novelty"]))


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
        "stage": f"{job.progress.stage} ({job.progress.fraction:.0%})",
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
        out.print(_ranking_table(ranked.method, ranked.ranking))
        if ranked.novelty is not None:
            out.print(_novelty_line(ranked.novelty.model_dump()))


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
