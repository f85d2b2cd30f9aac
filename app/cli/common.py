"""What every command shares: the Typer application, the one-line error exit, and zoos by
preset name or folder."""

from __future__ import annotations

import typer

from app.progress import ProgressReporter, err
from app.settings import get_settings
from app.zoo.zoo import Zoo

app = typer.Typer(
    help="Task2Vec task embeddings: embed labelled image datasets and compare them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(exc: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def load_zoo(preset_or_path: str, quiet: bool) -> Zoo:
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
