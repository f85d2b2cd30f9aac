"""Commands on datasets and embeddings: embed, distance, recommend (locally, no service)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli.common import app, fail, load_zoo
from app.progress import ProgressReporter
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
from app.task2vec.probes import IMAGENET, PROBES

_DEFAULTS = EmbedConfig()


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
        probe_net = config.load_probe()
        data = load_dataset(dataset, image_size=image_size)
        with ProgressReporter(quiet) as progress:
            embedding = embed(data, config, probe=probe_net, progress=progress)
        embedding.meta["dataset"] = dataset.name
        embedding.save(out)
    except Task2VecError as exc:
        raise fail(exc) from None
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
        raise fail(ValueError("give at least two embedding files"))
    try:
        loaded = [Embedding.load(p) for p in embeddings]
        matrix = distances.distance_matrix(loaded, metric, alpha)
    except Task2VecError as exc:
        raise fail(exc) from None
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
    from app.zoo import recommenders
    from app.zoo.recommenders import Query

    try:
        built = load_zoo(zoo, quiet)
        config = built.embed_config
        data = load_dataset(dataset, image_size=config.image_size)
        with ProgressReporter(quiet) as progress:
            embedding = embed(data, config, progress=progress)
        built.check_compatible(embedding)
        recommenders.method(method, among=recommenders.served())
        ranking = recommenders.build(method, built)(built, Query(embedding, data))
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
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
