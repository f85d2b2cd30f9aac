"""``task2vec zoo``: build a zoo from its preset, evaluate its recommenders, check them on
datasets from outside it, move zoos as bundles, and publish the first version of a
deployment's zoo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import app, fail, load_zoo
from app.progress import ProgressReporter
from app.settings import get_settings
from app.task2vec.datasets import load_dataset
from app.task2vec.errors import Task2VecError

zoo_app = typer.Typer(help="Build and evaluate expert zoos.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


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
        raise fail(exc) from None
    print(f"zoo {preset!r}: {len(zoo.tasks)} tasks, {len(zoo.experts)} experts, probe {zoo.probe}")


@zoo_app.command("evaluate")
def zoo_evaluate(
    out: Annotated[Path, typer.Option("--out", help="folder for report.md, results.json, plots")],
    zoo: Annotated[str, typer.Option(help="preset name or zoo folder")] = "demo",
    methods: Annotated[
        str | None, typer.Option(help="comma-separated recommenders; by default all of them")
    ] = None,
    k: Annotated[int, typer.Option(help="neighbour tasks for knn and learned")] = 5,
    protocols: Annotated[
        str,
        typer.Option(help="comma-separated: task (leave-one-task-out), domain, source"),
    ] = "task,domain,source",
    zero_filters: Annotated[
        str, typer.Option(help="filters with zero Fisher in both embeddings: drop or half")
    ] = "drop",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Leave-one-task-out, leave-one-domain-out and leave-one-source-out evaluation of the
    recommenders: a fold holds out its tasks, every task that shares an image with them and
    every expert trained on one of those."""
    from app.task2vec.distances import zero_filter_convention
    from app.zoo.evaluate import METHODS, evaluate
    from app.zoo.report import write_report

    try:
        built = load_zoo(zoo, quiet)
        with ProgressReporter(quiet) as progress, zero_filter_convention(zero_filters):
            chosen = list(METHODS) if methods is None else methods.split(",")
            results = evaluate(built, chosen, k, progress, tuple(protocols.split(",")))
        results["zoo"]["zero_filters"] = zero_filters
        write_report(built, results, out)
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
    print((out / "report.md").read_text())


@zoo_app.command("check")
def zoo_check(
    datasets: Annotated[
        list[Path], typer.Argument(help="labelled datasets the zoo never saw (zip, tar or .npz)")
    ],
    zoo: Annotated[str, typer.Option(help="preset name or zoo folder")] = "demo",
    methods: Annotated[
        str | None, typer.Option(help="comma-separated recommenders; by default all of them")
    ] = None,
    k: Annotated[int, typer.Option(help="neighbour tasks for knn and learned")] = 5,
    out: Annotated[
        Path | None, typer.Option("--out", help="write results.json (every figure) here")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Score every recommender against brute force on datasets from outside the zoo: each
    expert is evaluated on each dataset with the zoo's protocol, then compared with the picks."""
    from app.zoo.check import CHECK_METHODS, check
    from app.zoo.report import interval_lines, summary_table, versus_table

    try:
        built = load_zoo(zoo, quiet)
        size = built.embed_config.image_size
        # Named by file name unless two share one.
        names = [p.name for p in datasets]
        if len(set(names)) < len(names):
            names = [str(p) for p in datasets]
        loaded = {n: load_dataset(p, image_size=size) for n, p in zip(names, datasets, strict=True)}
        with ProgressReporter(quiet) as progress:
            chosen = CHECK_METHODS if methods is None else tuple(methods.split(","))
            results = check(built, loaded, chosen, k, progress)
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"{len(loaded)} datasets, zoo {zoo!r} ({len(built.tasks)} tasks, "
        f"{len(built.experts)} experts), truth: every expert evaluated on every dataset"
    )
    print("\n".join(summary_table(results["recommenders"])))
    print("\n".join(["", *versus_table(results["versus"])]))
    print("\n".join(["", *interval_lines(results["intervals"])]))
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


@zoo_app.command("export")
def zoo_export(
    out: Annotated[Path, typer.Option("--out", help="the bundle to write (.t2vzoo)")],
    zoo: Annotated[
        str | None,
        typer.Option(help="a preset name or zoo folder; default: the version being served"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Write a zoo as one bundle: manifest, task recipes and embeddings, expert specs and
    weights, the performance matrix (and the datasets of uploaded zoo tasks)."""
    from app.services import bundles

    try:
        built = None if zoo is None else load_zoo(zoo, quiet)
        sha, written = bundles.export(get_settings(), out, built)
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
    size = out.stat().st_size
    print(
        f"{out}: {len(written.tasks)} tasks, {len(written.experts)} experts, probe "
        f"{written.probe}, {size / 1e6:.1f} MB, sha256 {sha}"
    )


@zoo_app.command("import")
def zoo_import(
    bundle: Annotated[Path, typer.Argument(help="a bundle written by `task2vec zoo export`")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Verify a bundle (every hash, its configuration against this service's zoo, names
    already taken) and import it into the database and data directory; then publish a new
    version, which running APIs and workers pick up."""
    import time

    from app.cli.service import require_migrated
    from app.services import bundles

    require_migrated()
    started = time.perf_counter()
    try:
        with ProgressReporter(quiet) as progress:
            version = bundles.import_bundle(get_settings(), bundle, progress)
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
    print(
        f"imported in {time.perf_counter() - started:.1f} s: zoo version "
        f"{version.content[:12]}, {version.tasks} tasks, {version.experts} experts"
    )


@zoo_app.command("init")
def zoo_init() -> None:
    """Publish the configured zoo if nothing is published yet, as `task2vec run` does on its
    first start: the starter zoo is imported from the bundle it ships as (a zoo that ships
    none is built). Once a version is published it changes nothing, and replicas may run it
    at once; run it after `task2vec db upgrade`, before the API and the workers."""
    from app.cli.service import first_version, require_migrated

    require_migrated()
    try:
        version = first_version(get_settings())
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
    print(f"zoo version {version.content[:12]}: {version.tasks} tasks, {version.experts} experts")
