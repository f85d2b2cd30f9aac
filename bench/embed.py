"""Embedding speed, seed-to-seed noise and peak memory.

    python -m bench.embed [--json] [--sections speed,memory,paper] [--no-exact] [--device D]
                          [--reference FOLDER] [--threads 2] [--plan default|measured]

speed: one embedding of a 1,000-image Fashion-MNIST task (10 classes, a seeded stratified
subset of the training set) at 64 px with ResNet-34, Monte Carlo, 2,048 Fisher samples,
batch 64, for each estimator; the wall time of ``embed`` (feature caching, head, Fisher).
Noise is the symmetric distance between the embeddings of seeds 0 and 1 of the same task; the
distance to a different task (1,000 MNIST digits) is printed beside it for scale. When the
public reference code is on this machine (``bench.reference``) it embeds the same images with
the same probe weights (eval BatchNorm, the same threads) in the same run, and every row gets
its ratio: the reference's seconds over the row's. Only those ratios compare the two, and
only on the CPU named beside them. ``--plan measured`` first times the execution plans
(``app.task2vec.calibration``) on a short embedding of the task and runs every row with the
fastest; ``default`` runs the plan tuned on the 2-core AMD EPYC.

memory: peak resident memory of a fresh process that embeds 10,000 Fashion-MNIST images at
224 px with ``--skip-layers 6`` (ResNet-34, per-sample estimator).

paper (for a GPU): the paper's setting, 10,000 Fashion-MNIST images at 224 px, ResNet-34,
10,000 Fisher samples, per-sample estimator, all layers; wall time and peak GPU memory.

ImageNet ResNet-34 weights are used when torchvision's cache has them, otherwise a fixed
random initialisation (``random:0``, the same for every seed); the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.data.offline import fashion_mnist, mnist_5k
from app.task2vec import EmbedConfig, embed, from_arrays, plans
from app.task2vec.calibration import calibrate, cpu_model, trial_config
from app.task2vec.datasets import LabelledImages
from app.task2vec.distances import symmetric
from app.task2vec.errors import ProbeWeightsError
from app.task2vec.probes import load_probe
from app.task2vec.sampling import stratified_subset
from bench import reference

if TYPE_CHECKING:  # annotations only: rich is imported where the tables are printed
    from rich.console import Console

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("batch, train BN (reference)", {"fisher_estimator": "batch", "batchnorm": "train"}),
    ("batch, eval BN", {"fisher_estimator": "batch"}),
    ("per-sample, sampled labels", {"fisher_estimator": "per-sample"}),
    ("per-sample, gaussian labels", {"fisher_labels": "gaussian"}),
    ("per-sample, exact labels", {"fisher_labels": "exact"}),
]


class _StageClock:
    """Seconds per stage of one embedding (features, head, fisher), from its progress
    callback: a stage ends with its last report, where the next one begins."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ends: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.ends[stage] = time.perf_counter()

    def split(self) -> dict[str, float]:
        split, begun = {}, self.started
        for stage, ended in self.ends.items():
            split[stage] = round(ended - begun, 2)
            begun = ended
        return split


def _subset(images: np.ndarray, labels: np.ndarray, n: int, seed: int) -> LabelledImages:
    data = from_arrays(images, labels)
    return data.subset(stratified_subset(data.labels, n, torch.Generator().manual_seed(seed)))


def _weights() -> str:
    try:
        load_probe("resnet34", allow_download=False)
        return "imagenet"
    except ProbeWeightsError:
        return "random:0"


def _machine(device: str) -> str:
    where = f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores"
    if device != "cpu" and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}, {where}"
    return f"{where}, torch {torch.__version__}"


def _fashion_10k() -> LabelledImages:
    x, y, _ = fashion_mnist("train")
    return _subset(x, y, 10_000, seed=7)


def _reference_row(
    folder: str | None, task: LabelledImages, other: LabelledImages, config: EmbedConfig
) -> dict[str, Any]:
    """The reference on the same images and probe weights: seconds, noise, other task; or
    why it did not run."""
    where = reference.locate(folder)
    why = "no reference folder here" if where is None else reference.missing_requirement()
    if where is None or why is not None:
        return {"available": False, "why": why}
    state = load_probe("resnet34", weights=config.probe_weights, image_size=64).source_state_dict()

    def embedded(data: LabelledImages, seed: int) -> reference.ReferenceRun:
        return reference.run(
            where,
            data,
            state,
            seed=seed,
            image_size=config.image_size,
            fisher_samples=config.fisher_samples,
            threads=torch.get_num_threads(),
        )

    first, second, different = embedded(task, 0), embedded(task, 1), embedded(other, 0)
    print(f"  reference: {first.seconds:.1f} s", file=sys.stderr)
    return {
        "available": True,
        "variant": "public reference code (eval BN)",
        "seconds": round(first.seconds, 2),
        "noise": round(symmetric(first.embedding, second.embedding), 4),
        "other_task": round(symmetric(first.embedding, different.embedding), 4),
    }


def _plan(
    choice: str, task: LabelledImages, config: EmbedConfig, probe: Any
) -> tuple[plans.ExecutionPlan, dict[str, float] | None]:
    """The plan the rows run with, and the calibration's seconds per plan when measured."""
    if choice == "default":
        return plans.DEFAULT, None
    small = trial_config(config)
    found = calibrate(lambda plan: embed(task, small, probe=probe, plan=plan))
    print(f"  plans: {found.seconds}; chosen {found.plan.name}", file=sys.stderr)
    return found.plan, found.seconds


def speed(
    include_exact: bool, device: str, folder: str | None = None, plan_choice: str = "default"
) -> dict[str, Any]:
    x, y, _ = fashion_mnist("train")
    task = _subset(x, y, 1000, seed=123)
    xd, yd, _ = mnist_5k()
    other = _subset(xd, yd, 1000, seed=123)
    base = EmbedConfig(
        probe="resnet34",
        probe_weights=_weights(),
        image_size=64,
        max_samples=1000,
        fisher_samples=2048,
        batch_size=64,
        device=device,  # type: ignore[arg-type]
    )
    probe = load_probe("resnet34", weights=base.probe_weights, image_size=64)
    plan, calibration = _plan(plan_choice, task, base, probe)
    rows = []
    for name, changes in VARIANTS:
        if not include_exact and changes.get("fisher_labels") == "exact":
            continue
        config = replace(base, **changes)
        clock = _StageClock()
        first = embed(task, config, probe=probe, progress=clock, plan=plan)
        seconds = time.perf_counter() - clock.started
        second = embed(task, replace(config, seed=1), probe=probe, plan=plan)
        different = embed(other, config, probe=probe, plan=plan)
        rows.append(
            {
                "variant": name,
                "seconds": round(seconds, 2),
                "stages": clock.split(),
                "noise": round(symmetric(first, second), 4),
                "other_task": round(symmetric(first, different), 4),
            }
        )
        print(f"  {name}: {seconds:.1f} s, noise {rows[-1]['noise']}", file=sys.stderr)
    ref = _reference_row(folder, task, other, base)
    cpu = cpu_model()
    for row in rows:
        row["cpu"] = cpu
        row["ratio"] = round(ref["seconds"] / row["seconds"], 2) if ref["available"] else None
        row["noise_ratio"] = round(row["noise"] / ref["noise"], 2) if ref["available"] else None
    return {
        "probe_weights": base.probe_weights,
        "machine": _machine(device),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "plan": plan.name,
        "plan_seconds": calibration,
        "rows": rows,
        "reference": ref,
    }


def _config_10k(device: str, **changes: Any) -> EmbedConfig:
    """ResNet-34 on 10,000 images at 224 px, the paper's input size."""
    base = EmbedConfig(
        probe="resnet34",
        probe_weights=_weights(),
        image_size=224,
        max_samples=10_000,
        device=device,  # type: ignore[arg-type]
    )
    return replace(base, **changes)


def paper(device: str) -> dict[str, Any]:
    config = _config_10k(device, fisher_samples=10_000)
    task = _fashion_10k()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    e = embed(task, config)
    result: dict[str, Any] = {
        "seconds": round(time.perf_counter() - started, 1),
        "dim": e.dim,
        "probe_weights": config.probe_weights,
        "machine": _machine(device),
    }
    if e.meta["device"] == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    return result


def _memory_child(device: str) -> None:
    task = _fashion_10k()
    config = _config_10k(device, skip_layers=6)
    started = time.perf_counter()
    e = embed(task, config)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(
        {
            "peak_rss_gb": round(peak_kb / 1024**2, 3),
            "seconds": round(time.perf_counter() - started, 1),
            "dim": e.dim,
            "cached_layer_input": e.meta["cached_layer_input"],
            "fisher_samples": config.fisher_samples,
            "probe_weights": config.probe_weights,
        },
        sys.stdout,
    )


def memory(device: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "bench.embed", "--memory-child", "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(run.stdout)
    result["machine"] = _machine(device)
    return result


def _print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    if "speed" in results:
        _print_speed(console, results["speed"])
    if "memory" in results:
        m = results["memory"]
        console.print(
            f"10,000 images at 224 px, --skip-layers 6: peak RSS {m['peak_rss_gb']:.2f} GB in "
            f"{m['seconds']:.0f} s ({m['dim']} dims, layer input cached: "
            f"{m['cached_layer_input']}) — {m['machine']}"
        )
    if "paper" in results:
        p = results["paper"]
        gpu = f", peak GPU memory {p['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in p else ""
        console.print(
            f"paper setting (10,000 images, 224 px, 10,000 Fisher samples, per-sample): "
            f"{p['seconds']:.0f} s{gpu} ({p['dim']} dims) — {p['machine']}"
        )


def _print_speed(console: Console, s: dict[str, Any]) -> None:
    """One row per estimator, the reference's last (dimmed) when it ran: the ratios are to
    its time and its seed noise."""
    from rich.table import Table

    table = Table(
        title=f"1,000 Fashion-MNIST images, 64 px, ResNet-34 ({s['probe_weights']}), "
        f"2,048 Fisher samples, batch 64, plan: {s['plan']} — {s['machine']}"
    )
    columns = (
        "estimator",
        "seconds",
        "features / head / Fisher",
        "x reference",
        "seed noise",
        "/ reference's",
        "other",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for row in s["rows"]:
        table.add_row(
            row["variant"],
            f"{row['seconds']:.1f}",
            " / ".join(f"{v:.1f}" for v in row["stages"].values()),
            "" if row["ratio"] is None else f"{row['ratio']:.2f}x on {row['cpu']}",
            f"{row['noise']:.4f}",
            "" if row["noise_ratio"] is None else f"{row['noise_ratio']:.2f}",
            f"{row['other_task']:.4f}",
        )
    ref = s["reference"]
    if ref["available"]:
        table.add_row(
            ref["variant"],
            f"{ref['seconds']:.1f}",
            "",
            f"1.00x on {s['cpu']}",
            f"{ref['noise']:.4f}",
            "1.00",
            f"{ref['other_task']:.4f}",
            style="dim",
        )
    console.print(table)
    if not ref["available"]:
        console.print(f"reference not run: {ref['why']}; no ratios")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--sections", default="speed,memory", help="speed,memory,paper")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-labels row")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--reference", help="the reference folder (runner and code)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument(
        "--plan", default="default", choices=["default", "measured"], help="execution plan"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.device)
        return
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    results: dict[str, Any] = {}
    if "speed" in sections:
        results["speed"] = speed(not args.no_exact, args.device, args.reference, args.plan)
    if "memory" in sections:
        results["memory"] = memory(args.device)
    if "paper" in sections:
        results["paper"] = paper(args.device)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        _print_tables(results)


if __name__ == "__main__":
    main()
