"""A new expert's column of the performance matrix: what registering an expert costs a worker.

    python -m bench.features [--json] [--zoo starter] [--architecture torchvision/resnet18]
                             [--size 64] [--together 3] [--threads 2]

For every task of the zoo's recipe (decoded from the offline data, as a worker materialises
it): the expert's features of the task's images and the held-out error of the matrix's
classifier on them — exactly ``publishing.add_entries`` for one expert, without the database.
The expert is ``--architecture`` with random weights (written to a state-dict file and loaded
through the registration path), at ``--size`` px.

column: seconds decoding the tasks, extracting features, fitting the classifiers, and in all.

together: ``--together`` experts of the architecture (different seeds) on the same tasks,
features extracted in one pass (``extract_many``: each batch resized once per input size)
against one pass per expert (decoding counted once in both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from app.task2vec.datasets import LabelledImages
from app.zoo.experts import ExpertSpec, default_normalisation
from app.zoo.features import extract_features, extract_many, load_checked
from app.zoo.matrix import holdout_error
from app.zoo.presets import recipe
from app.zoo.tasks import materialize


def _experts(architecture: str, size: int, count: int, folder: Path) -> list[ExpertSpec]:
    """``count`` experts of ``architecture`` with seeded random weights in safetensors files."""
    from torchvision import models

    from app.zoo import architectures

    specs = []
    mean, std = default_normalisation(architecture)
    for seed in range(count):
        torch.manual_seed(seed)
        if architecture.startswith(architectures.TORCHVISION):
            net = models.get_model(architecture.removeprefix(architectures.TORCHVISION))
        else:
            import timm

            net = timm.create_model(architecture.removeprefix(architectures.TIMM))
        path = folder / f"{seed}.safetensors"
        save_file(net.state_dict(), str(path))
        specs.append(ExpertSpec(f"bench-{seed}", architecture, str(path), size, mean, std))
    return specs


def _tasks(zoo: str) -> tuple[list[LabelledImages], float]:
    zoo_recipe = recipe(zoo)
    started = time.perf_counter()
    data = [
        materialize(
            spec,
            image_size=zoo_recipe.embed_config.image_size,
            split=zoo_recipe.protocol.split,
        )
        for spec in zoo_recipe.tasks
    ]
    return data, time.perf_counter() - started


def run(zoo: str, architecture: str, size: int, together: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    protocol = recipe(zoo).protocol
    with tempfile.TemporaryDirectory() as tmp:
        specs = _experts(architecture, size, max(1, together), Path(tmp))
        started = time.perf_counter()
        models = [(spec, load_checked(spec)) for spec in specs]
        load_seconds = (time.perf_counter() - started) / len(models)
        tasks, decode = _tasks(zoo)
        spec, model = models[0]
        extract = fit = 0.0
        for data in tasks:
            started = time.perf_counter()
            features = extract_features(spec, model, data)
            extract += time.perf_counter() - started
            started = time.perf_counter()
            holdout_error(features, data.labels, protocol)
            fit += time.perf_counter() - started
        one_by_one = many = 0.0
        if together > 1:
            started = time.perf_counter()
            for data in tasks:
                for spec, model in models:
                    extract_features(spec, model, data)
            one_by_one = time.perf_counter() - started
            started = time.perf_counter()
            for data in tasks:
                extract_many(models, data)
            many = time.perf_counter() - started
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": threads,
        "zoo": zoo,
        "architecture": architecture,
        "size": size,
        "tasks": len(tasks),
        "images": sum(len(t) for t in tasks),
        "features_dim": int(features.shape[1]),
        "column_seconds": {
            "load_and_check": round(load_seconds, 2),
            "decode": round(decode, 2),
            "features": round(extract, 2),
            "classifier": round(fit, 2),
            "total": round(load_seconds + decode + extract + fit, 2),
        },
        "together": {
            "experts": together,
            "one_pass_per_expert_seconds": round(one_by_one, 2),
            "one_pass_seconds": round(many, 2),
        }
        if together > 1
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--zoo", default="starter", help="a zoo recipe: starter, demo, tiny")
    parser.add_argument("--architecture", default="torchvision/resnet18")
    parser.add_argument("--size", type=int, default=64, help="the expert's input size")
    parser.add_argument("--together", type=int, default=3, help="experts for the one-pass row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a worker's)")
    args = parser.parse_args()
    result = run(args.zoo, args.architecture, args.size, args.together, args.threads)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"new expert column on {result['machine']}, {result['threads']} threads: "
        f"{result['architecture']} at {result['size']} px ({result['features_dim']} features), "
        f"zoo {result['zoo']}: {result['tasks']} tasks, {result['images']} images"
    )
    for stage, seconds in result["column_seconds"].items():
        print(f"  {stage:>15} {seconds:>8.2f} s")
    if (both := result["together"]) is not None:
        print(
            f"  {both['experts']} experts: one pass per expert "
            f"{both['one_pass_per_expert_seconds']:.2f} s, "
            f"one pass {both['one_pass_seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
