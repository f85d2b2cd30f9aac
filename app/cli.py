"""The ``task2vec`` command line: embed a dataset, compare embeddings.

Problems the user can fix (bad data, missing weights, contradictory options) end with one
``error: ...`` line on stderr and exit status 2, never a traceback; nothing is written then.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.progress import ProgressReporter, err
from app.settings import get_settings
from app.task2vec import distances
from app.task2vec.datasets import load_dataset
from app.task2vec.embedding import (
    BatchNormMode,
    Device,
    EmbedConfig,
    Embedding,
    Estimator,
    FisherLabels,
    HeadFit,
    Method,
    difficulty,
    embed,
)
from app.task2vec.errors import Task2VecError
from app.task2vec.probes import IMAGENET, PROBES, load_probe
from app.zoo.zoo import Zoo

app = typer.Typer(
    help="Task2Vec task embeddings: embed labelled image datasets and compare them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEFAULTS = EmbedConfig()


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.command("embed")
def embed_command(
    dataset: Annotated[
        Path, typer.Argument(help="zip/tar of <label>/<image> folders or with labels.csv; or .npz")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the embedding (.npz)")],
    probe: Annotated[
        str, typer.Option(help=f"probe network: {', '.join(PROBES)}")
    ] = _DEFAULTS.probe,
    probe_weights: Annotated[
        str,
        typer.Option(help="'imagenet' (cache or download), a state-dict FILE, or 'random[:SEED]'"),
    ] = IMAGENET,
    method: Annotated[Method, typer.Option(help="Fisher approximation")] = _DEFAULTS.method,
    fisher_estimator: Annotated[
        Estimator, typer.Option(help="Monte Carlo estimator: per-sample (default) or batch")
    ] = _DEFAULTS.fisher_estimator,
    fisher_labels: Annotated[
        FisherLabels,
        typer.Option(help="per-sample expectation over model labels: sampled, gaussian, exact"),
    ] = _DEFAULTS.fisher_labels,
    batchnorm: Annotated[
        BatchNormMode,
        typer.Option(help="BatchNorm statistics: eval (running) or train (batch; reference)"),
    ] = _DEFAULTS.batchnorm,
    head_fit: Annotated[
        HeadFit, typer.Option(help="head fitting: full-batch (deterministic) or sampled")
    ] = _DEFAULTS.head_fit,
    image_size: Annotated[int, typer.Option(help="probe input size (px)")] = _DEFAULTS.image_size,
    max_samples: Annotated[
        int, typer.Option(help="seeded class-stratified subset of at most this many images")
    ] = _DEFAULTS.max_samples,
    fisher_samples: Annotated[
        int, typer.Option(help="class-balanced draws for the Fisher")
    ] = _DEFAULTS.fisher_samples,
    batch_size: Annotated[int, typer.Option()] = _DEFAULTS.batch_size,
    skip_layers: Annotated[
        int, typer.Option(help="start the Fisher at probe layer N (6 = ResNet layer3)")
    ] = _DEFAULTS.skip_layers,
    seed: Annotated[int, typer.Option()] = _DEFAULTS.seed,
    device: Annotated[Device, typer.Option(help="cpu, cuda or auto")] = _DEFAULTS.device,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Embed DATASET with Task2Vec and write hessian, scale and metadata to --out."""
    config = EmbedConfig(
        probe=probe,
        probe_weights=probe_weights,
        method=method,
        fisher_estimator=fisher_estimator,
        fisher_labels=fisher_labels,
        batchnorm=batchnorm,
        head_fit=head_fit,
        image_size=image_size,
        max_samples=max_samples,
        fisher_samples=fisher_samples,
        batch_size=batch_size,
        skip_layers=skip_layers,
        seed=seed,
        device=device,
    )
    try:
        config.validate()
        # Weights first: a missing checkpoint is reported before a long dataset decode.
        probe_net = load_probe(probe, weights=probe_weights, image_size=image_size, seed=seed)
        data = load_dataset(dataset, image_size=image_size)
        with ProgressReporter(quiet) as progress:
            embedding = embed(data, config, probe=probe_net, progress=progress)
        embedding.meta["dataset"] = dataset.name
        embedding.save(out)
    except Task2VecError as exc:
        raise _fail(exc) from None
    meta = embedding.meta
    print(
        f"wrote {out}: {embedding.dim} dims, probe {meta['probe']} ({meta['probe_weights']}), "
        f"{meta['method']}/{meta['fisher_estimator'] or '-'}, {meta['samples']} images, "
        f"{meta['num_classes']} classes, difficulty {difficulty(embedding):.4g}, "
        f"{meta['wall_time_s']:.1f} s on {meta['device']}"
    )


@app.command("distance")
def distance_command(
    embeddings: Annotated[list[Path], typer.Argument(help="two or more embedding files (.npz)")],
    metric: Annotated[
        str, typer.Option(help=f"one of: {', '.join(distances.METRICS)}")
    ] = "symmetric",
    alpha: Annotated[
        float, typer.Option(help="weight of the trivial embedding in 'asymmetric'")
    ] = distances.DEFAULT_ALPHA,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Distance between embeddings: one number for two files, a matrix for more.

    Row i, column j is the distance from file i to file j ('asymmetric': i is the source).
    """
    if len(embeddings) < 2:
        raise _fail(ValueError("give at least two embedding files"))
    try:
        loaded = [Embedding.load(p) for p in embeddings]
        matrix = distances.distance_matrix(loaded, metric, alpha)
    except Task2VecError as exc:
        raise _fail(exc) from None
    names = [p.name for p in embeddings]
    norms = [difficulty(e) for e in loaded]
    if as_json:
        json.dump(
            {
                "metric": metric,
                "alpha": alpha,
                "files": names,
                "distance": matrix.tolist() if len(loaded) > 2 else float(matrix[0, 1]),
                "difficulty": norms,
            },
            sys.stdout,
        )
        print()
        return
    if len(loaded) == 2:
        print(f"{matrix[0, 1]:.6f}")
        return
    table = Table(title=f"{metric} distance (row → column)")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for name, row in zip(names, matrix, strict=True):
        table.add_row(name, *(f"{v:.4f}" for v in row))
    Console().print(table)


zoo_app = typer.Typer(help="Build and evaluate expert zoos.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def _zoo(preset_or_path: str, quiet: bool) -> Zoo:
    """A built zoo by preset name (built on first use) or by folder."""
    from app.zoo.build import ZooBuilder, zoo_folder
    from app.zoo.presets import PRESETS, recipe

    if preset_or_path not in PRESETS:
        return Zoo.load(preset_or_path)
    folder = zoo_folder(get_settings().data_dir, preset_or_path)
    if (folder / "zoo.json").exists():
        return Zoo.load(folder)
    err.print(f"building the {preset_or_path!r} zoo under {folder.parent} (first use)")
    with ProgressReporter(quiet) as progress:
        return ZooBuilder(recipe(preset_or_path), get_settings().data_dir, progress).build()


@zoo_app.command("build")
def zoo_build(
    preset: Annotated[
        str, typer.Option(help="demo, demo-chance (random-init ResNet-34 probe) or tiny")
    ] = "demo",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Build (or bring up to date) a zoo from its preset; cached artifacts are reused."""
    from app.zoo.build import ZooBuilder
    from app.zoo.presets import recipe

    try:
        with ProgressReporter(quiet) as progress:
            zoo = ZooBuilder(recipe(preset), get_settings().data_dir, progress).build()
    except (Task2VecError, ValueError) as exc:
        raise _fail(exc) from None
    print(f"zoo {preset!r}: {len(zoo.tasks)} tasks, {len(zoo.experts)} experts, probe {zoo.probe}")


@zoo_app.command("evaluate")
def zoo_evaluate(
    out: Annotated[Path, typer.Option("--out", help="folder for report.md, results.json, plots")],
    zoo: Annotated[str, typer.Option(help="preset name or zoo folder")] = "demo",
    methods: Annotated[
        str, typer.Option(help="comma-separated recommenders")
    ] = "global-best,task2vec-knn,task2vec-asym,learned,learned-shuffled,logme",
    k: Annotated[int, typer.Option(help="neighbour tasks for knn and learned")] = 5,
    protocols: Annotated[
        str, typer.Option(help="comma-separated: task (leave-one-task-out), domain")
    ] = "task,domain",
    zero_filters: Annotated[
        str, typer.Option(help="filters with zero Fisher in both embeddings: drop or half")
    ] = "drop",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Leave-one-task-out and leave-one-domain-out evaluation of the recommenders: a fold
    holds out its tasks and every expert trained on them."""
    from app.task2vec.distances import zero_filter_convention
    from app.zoo.evaluate import evaluate
    from app.zoo.report import write_report

    try:
        built = _zoo(zoo, quiet)
        with ProgressReporter(quiet) as progress, zero_filter_convention(zero_filters):
            results = evaluate(built, methods.split(","), k, progress, tuple(protocols.split(",")))
        results["zoo"]["zero_filters"] = zero_filters
        write_report(built, results, out)
    except (Task2VecError, ValueError) as exc:
        raise _fail(exc) from None
    print((out / "report.md").read_text())


@zoo_app.command("check")
def zoo_check(
    datasets: Annotated[
        list[Path], typer.Argument(help="labelled datasets the zoo never saw (zip, tar or .npz)")
    ],
    zoo: Annotated[str, typer.Option(help="preset name or zoo folder")] = "demo",
    methods: Annotated[
        str, typer.Option(help="comma-separated recommenders")
    ] = "global-best,task2vec-knn,task2vec-asym,learned,logme",
    k: Annotated[int, typer.Option(help="neighbour tasks for knn and learned")] = 5,
    out: Annotated[
        Path | None, typer.Option("--out", help="write results.json (every figure) here")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Score every recommender against brute force on datasets from outside the zoo: each
    expert is evaluated on each dataset with the zoo's protocol, then compared with the picks."""
    from app.zoo.check import check
    from app.zoo.report import summary_table, versus_table

    try:
        built = _zoo(zoo, quiet)
        size = built.embed_config.image_size
        # Named by file name unless two share one.
        names = [p.name for p in datasets]
        if len(set(names)) < len(names):
            names = [str(p) for p in datasets]
        loaded = {n: load_dataset(p, image_size=size) for n, p in zip(names, datasets, strict=True)}
        with ProgressReporter(quiet) as progress:
            results = check(built, loaded, tuple(methods.split(",")), k, progress)
    except (Task2VecError, ValueError) as exc:
        raise _fail(exc) from None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"{len(loaded)} datasets, zoo {zoo!r} ({len(built.tasks)} tasks, "
        f"{len(built.experts)} experts), truth: every expert evaluated on every dataset"
    )
    print("\n".join(summary_table(results["recommenders"])))
    print("\n".join(["", *versus_table(results["versus"])]))
    by_dataset = {
        m: {row["dataset"]: row for row in rows} for m, rows in results["per_dataset"].items()
    }
    for name, errors in results["errors"].items():
        best = min(errors, key=errors.__getitem__)
        picks = "; ".join(
            f"{m}: {rows[name]['pick']} (+{rows[name]['regret']:.1f} points)"
            for m, rows in by_dataset.items()
        )
        print(f"{name}: best {best} (error {errors[best]:.3f}); {picks}")


@app.command("recommend")
def recommend_command(
    dataset: Annotated[Path, typer.Argument(help="labelled dataset (zip, tar or .npz)")],
    method: Annotated[str, typer.Option(help="recommender")] = "learned",
    k: Annotated[int, typer.Option(help="how many experts to show")] = 5,
    zoo: Annotated[str, typer.Option(help="preset name or zoo folder")] = "demo",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Rank the zoo's experts for DATASET, locally."""
    from app.zoo.recommenders import LearnedScorer, Query, recommenders

    try:
        built = _zoo(zoo, quiet)
        config = built.embed_config
        data = load_dataset(dataset, image_size=config.image_size)
        with ProgressReporter(quiet) as progress:
            embedding = embed(data, config, progress=progress)
        built.check_compatible(embedding)
        available = recommenders(built)
        if method == "learned":
            ranking = LearnedScorer(built)(built, Query(embedding, data))
        elif method in available:
            ranking = available[method](built, Query(embedding, data))
        else:
            names = ", ".join(["learned", *available])
            raise ValueError(f"unknown method {method!r}; choose one of: {names}")
    except (Task2VecError, ValueError) as exc:
        raise _fail(exc) from None
    items = [{"expert": r.expert, "score": r.score, **r.evidence} for r in ranking[:k]]
    if as_json:
        json.dump({"method": method, "zoo": zoo, "ranking": items}, sys.stdout, default=str)
        print()
        return
    table = Table(title=f"{method} ranking for {dataset.name}")
    for column in ("rank", "expert", "score"):
        table.add_column(column)
    for i, item in enumerate(items, start=1):
        table.add_row(str(i), str(item["expert"]), f"{item['score']:.4f}")
    Console().print(table)


db_app = typer.Typer(help="The service's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply the migrations to T2V_DATABASE_URL (default: SQLite under the data directory)."""
    from app.db.migrate import upgrade

    url = get_settings().resolved_database_url()
    upgrade(url, revision)
    print(f"database at {url.split('@')[-1]} is at revision {revision}")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
) -> None:
    """Run the HTTP API (workers run separately: `task2vec worker`)."""
    import uvicorn

    _key_policy(host)
    uvicorn.run("app.api.main:app", host=host, port=port, log_level="info")


def _key_policy(host: str) -> None:
    """Decide whether the API needs keys, tell the user, and pass it on to the app (which
    reads its settings from the environment). Without keys only loopback is allowed."""
    import ipaddress
    import os

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    policy = get_settings().api_keys
    if policy == "auto":
        policy = "off" if loopback else "required"
    if policy == "off" and not loopback:
        raise _fail(
            ValueError(
                f"T2V_API_KEYS=off is only allowed on a loopback address, not {host}: create "
                "keys with `task2vec keys create` and leave T2V_API_KEYS unset"
            )
        )
    os.environ["T2V_API_KEYS"] = policy
    if policy == "off":
        err.print(
            f"API keys: off. Only this machine can reach {host}; every request acts as the "
            "tenant 'local'. Listening on another address requires keys."
        )
    else:
        err.print("API keys: required (Authorization: Bearer <key>; `task2vec keys create`)")


keys_app = typer.Typer(help="API keys: each bound to a tenant and scopes.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant whose data the key reaches")],
    scope: Annotated[
        list[str],
        typer.Option(help="tasks:read, tasks:write, zoo:admin (repeat for several)"),
    ],
    name: Annotated[str | None, typer.Option(help="a note: who or what uses it")] = None,
) -> None:
    """Create a key; the token is printed once and never stored."""
    from app.api.auth import create_key

    try:
        row, token = create_key(get_settings(), tenant, scope, name)
    except ValueError as exc:
        raise _fail(exc) from None
    err.print(f"key {row.id} for tenant {row.tenant!r}, scopes {', '.join(row.scopes)}")
    print(token)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: id, tenant, scopes, created, revoked."""
    from app.api.auth import list_keys

    for row in list_keys(get_settings()):
        revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        print(
            f"{row.id}  {row.tenant:20}  {','.join(row.scopes):32}  "
            f"{row.created_at:%Y-%m-%d %H:%M}  {revoked}  {row.name or ''}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> None:
    """Revoke a key: it stops working at once."""
    from app.api.auth import revoke_key

    if not revoke_key(get_settings(), key_id):
        raise _fail(ValueError(f"no active key {key_id!r}"))
    err.print(f"key {key_id} revoked")


@app.command("worker")
def worker_command(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "embed,evaluate",
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 1,
) -> None:
    """Run a Celery worker against T2V_BROKER_URL; start any number, on any machines."""
    from workers.celery_app import app as celery

    celery.worker_main(
        ["worker", "--loglevel=INFO", f"--queues={queues}", f"--concurrency={concurrency}"]
    )


@app.command("run")
def run_command(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
) -> None:
    """The whole service on this machine: migrate the database, build and publish the zoo on
    first use, start a Celery worker process and the API. Ctrl-C stops both."""
    import os
    import signal
    import subprocess

    import uvicorn

    from app import catalog
    from app.db.migrate import upgrade
    from app.ranking import zoo_folder

    settings = get_settings()
    try:
        upgrade(settings.resolved_database_url())
        version = catalog.current_version(settings)
        if version is None:  # first start: build the configured zoo, import and publish it
            _zoo(settings.zoo, quiet=False)
            version = catalog.ensure_published(settings, zoo_folder(settings))
    except (Task2VecError, ValueError) as exc:
        raise _fail(exc) from None
    err.print(
        f"zoo version {version.content[:12]}: {version.tasks} tasks, {version.experts} experts"
    )
    _key_policy(host)
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"])
    base = f"http://{host}:{port}"
    err.print(
        f"serving on {base} (OpenAPI: {base}/docs). Try:\n"
        f"  curl -F file=@shoes.zip '{base}/v1/recommendations?wait=120'"
    )
    try:
        uvicorn.run("app.api.main:app", host=host, port=port, log_level="info")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(worker.pid, signal.SIGKILL)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
