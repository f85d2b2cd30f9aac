"""Outside check: every recommender against brute force on datasets no zoo task or expert saw.

    python -m bench.outside [--json] [--zoo demo] [--write DIR]

Ten labelled datasets are cut, seeded, from Fashion-MNIST's test split (t10k), which the zoo's
image provenance keeps out of every zoo task and every expert's training set: class subsets,
semantic groupings, a few-shot task, three with the zoo's own alterations (inverted, noisy,
low-contrast) and two with alterations no zoo task has (edge maps, 4x4 pixelation). For each,
``app.zoo.check`` evaluates every expert of the zoo on it with the zoo's protocol (the truth)
and scores each recommender's ranking: relative error increase, regret in error points,
weighted τ, top-1, seconds per recommendation. ``--write DIR`` also saves the datasets as .npz
files, to upload them to a running service or to pass them to ``task2vec zoo check``.

The zoo is the one built under ``./data/zoos`` (``task2vec zoo build --preset NAME`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from app.data.offline import FASHION_MNIST_CLASSES, fashion_mnist
from app.task2vec.datasets import LabelledImages, from_arrays
from app.zoo.build import zoo_folder
from app.zoo.check import CHECK_METHODS, check
from app.zoo.evaluate import versus
from app.zoo.report import interval_lines, summary_table, versus_table
from app.zoo.tasks import TRANSFORMS
from app.zoo.zoo import Zoo

ALL = tuple((c,) for c in range(10))
FOOTWEAR = ((5,), (7,), (9,))
TOPS = ((0,), (2,), (3,), (4,), (6,))


def _edges(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import sobel

    x = images.astype(np.float32)
    magnitude = np.hypot(sobel(x, axis=1), sobel(x, axis=2))
    scaled = 255.0 * magnitude / max(float(magnitude.max()), 1e-6)
    out: np.ndarray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def _pixelated(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w = images.shape
    blocks = images.reshape(n, h // 4, 4, w // 4, 4).mean(axis=(2, 4))
    out: np.ndarray = np.rint(blocks).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    return out


ALTERATIONS = {**TRANSFORMS, "edges": _edges, "pixelated": _pixelated}

#: name → (label groups of t10k classes, images per label, alteration or None)
DATASETS: dict[str, tuple[tuple[tuple[int, ...], ...], int, str | None]] = {
    "t10k-all-10": (ALL, 100, None),
    "t10k-footwear": (FOOTWEAR, 100, None),
    "t10k-tops": (TOPS, 100, None),
    "t10k-few-shot-10": (ALL, 8, None),
    "t10k-bag-vs-shoes": (((8,), (5, 7, 9)), 150, None),
    "t10k-inverted-10": (ALL, 50, "inverted"),
    "t10k-noisy-tops": (TOPS, 80, "noisy"),
    "t10k-low-contrast-footwear": (FOOTWEAR, 100, "low-contrast"),
    "t10k-edges-10": (ALL, 50, "edges"),
    "t10k-pixelated-10": (ALL, 50, "pixelated"),
}


def datasets(seed: int = 0) -> dict[str, LabelledImages]:
    """The outside datasets, the same for the same seed."""
    x, y, _ = fashion_mnist("test")
    out = {}
    for i, (name, (groups, per_label, alteration)) in enumerate(DATASETS.items()):
        rng = np.random.default_rng([seed, i])
        index, labels = [], []
        for group in groups:
            chosen = rng.choice(np.flatnonzero(np.isin(y, group)), per_label, replace=False)
            index.append(chosen)
            label = "/".join(FASHION_MNIST_CLASSES[c] for c in group)
            labels += [label] * per_label
        images = x[np.concatenate(index)]
        if alteration is not None:
            images = ALTERATIONS[alteration](images, rng)
        out[name] = from_arrays(images, np.array(labels))
    return out


def _write(data: dict[str, LabelledImages], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, d in data.items():
        names = np.array(d.classes)[d.labels]
        np.savez_compressed(folder / f"{name}.npz", x=d.images[..., 0], y=names)


def _print(results: dict[str, Any]) -> None:
    print(
        f"Outside check on Fashion-MNIST t10k: {len(results['errors'])} datasets, "
        f"zoo {results['zoo_name']!r} ({results['zoo']['tasks']} tasks, "
        f"{results['zoo']['experts']} experts, probe {results['zoo']['probe']}), "
        f"{results['machine']}"
    )
    print("\n".join(summary_table(results["recommenders"])))
    print("\n".join(["", *versus_table(results["versus"])]))
    if "logme" in results["per_dataset"]:
        against = versus(results["per_dataset"], key="dataset", cluster=None, baseline="logme")
        print("\n".join(["", *versus_table(against, baseline="logme")]))
    print("\n".join(["", *interval_lines(results.get("intervals"))]))
    rows = {m: {r["dataset"]: r for r in rs} for m, rs in results["per_dataset"].items()}
    print(
        "\n| dataset | images | out of distribution | best expert (error) | "
        + " | ".join(rows)
        + " |"
    )
    print("|---|---:|---|---|" + "---|" * len(rows))
    for name, errors in results["errors"].items():
        best = min(errors, key=errors.__getitem__)
        first = next(iter(rows.values()))[name]
        flag = "yes" if first["out_of_distribution"] else "no"
        cells = [f"{r[name]['pick']} (+{r[name]['regret']:.1f})" for r in rows.values()]
        print(
            f"| {name} | {first['images']} | {flag} ({first['nearest_distance']:.3f}) "
            f"| {best} ({errors[best]:.3f}) | " + " | ".join(cells) + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--zoo", default="demo", help="preset built under ./data/zoos")
    parser.add_argument("--data-dir", default="data", help="the data directory of the zoo")
    parser.add_argument("--k", type=int, default=5, help="neighbour tasks for knn and learned")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset draws")
    parser.add_argument("--write", type=Path, help="also save the datasets as .npz files here")
    args = parser.parse_args()
    zoo = Zoo.load(zoo_folder(Path(args.data_dir), args.zoo))
    data = datasets(args.seed)
    if args.write is not None:
        _write(data, args.write)
    results = check(zoo, data, CHECK_METHODS, args.k)
    results["zoo_name"] = args.zoo
    results["machine"] = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        _print(results)


if __name__ == "__main__":
    main()
