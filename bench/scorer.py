"""The learned ranking at zoo sizes a real zoo does not reach: its fit, and its reads.

    python -m bench.scorer [--json] [--sizes 1000,10000,100000] [--queries 200] [--dim D]
                           [--fit-tasks 2000] [--folder DIR] [--threads 1]

For each size, a synthetic zoo of that many tasks (``app.zoo.synthetic``: mixtures of the
shipped starter zoo's tasks within a domain, with noise, rows in a float16 memory-mapped file)
and its index (built, and timed, before the scorer). Then:

fit: the seconds of ``LearnedScorer(zoo)``: a sample of at most ``--fit-tasks`` tasks, one
neighbour search in the index for each, the principal axes and the ridge.

read: ``--queries`` rankings of the fitted ``learned`` method, one at a time, each for a task
that is not in the zoo (a second synthetic zoo, drawn with another seed from the same real
tasks, over the same filters); p50 and p99 of their seconds, and of the same queries' neighbour
searches alone (the index's share, measured after the rankings). A few queries before them
are not counted (first reads of the files). The target: p99 within 100 ms at 100,000 tasks
on 2 cores.

Numeric libraries run ``--threads`` threads each (default 1: the API's
``api_numeric_threads``, which is where the ranking is served and fitted).

``--dim`` keeps that many of the real zoo's filters (default: all of them); ``--folder`` keeps
the synthetic zoos there and reuses those already written (default: a temporary folder,
removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.services.bundles import STARTER_BUNDLE
from app.services.serving import limit_numeric_threads
from app.zoo.bundle import read_bundle
from app.zoo.recommenders import LearnedScorer, Query
from app.zoo.recommenders.base import need_embedding
from app.zoo.recommenders.learned import FIT_TASKS
from app.zoo.synthetic import MANIFEST, SyntheticZoo, load_synthetic, write_synthetic
from app.zoo.zoo import Zoo
from bench.console import cpu_model

TARGET_P99_MS = 100.0
TARGET_TASKS = 100_000
#: Queries read before the counted ones: the first reads of the row files.
WARM_UP = 10


def _real_zoo() -> Zoo:
    staging = Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    try:
        return read_bundle(STARTER_BUNDLE, staging).zoo
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _synthetic(real: Zoo, n: int, folder: Path, seed: int, dim: int) -> tuple[SyntheticZoo, float]:
    """The synthetic zoo of ``n`` tasks in ``folder`` (written unless it is there already, of
    this size, seed and dimension), and the seconds writing it took (0 when reused)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if (manifest["n_tasks"], manifest["seed"], manifest["dim"]) == (n, seed, dim):
            return load_synthetic(folder), 0.0
    except (OSError, ValueError, KeyError):
        pass
    started = time.perf_counter()
    write_synthetic(real, n, folder, seed=seed, dim=dim)
    return load_synthetic(folder), time.perf_counter() - started


def _percentile_ms(seconds: list[float], q: float) -> float:
    return round(1000.0 * float(np.percentile(seconds, q)), 2)


def _seconds(queries: list[Query], read: Callable[[Query], object]) -> list[float]:
    """The seconds of ``read`` on each query after the first ``WARM_UP``."""
    seconds = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        read(query)
        if i >= WARM_UP:
            seconds.append(time.perf_counter() - started)
    return seconds


def measure(
    real: Zoo, n: int, queries: list[Query], folder: Path, dim: int, fit_tasks: int
) -> dict[str, Any]:
    """One size: writing the zoo, its index, the scorer's fit, and the rankings' seconds."""
    synthetic, written = _synthetic(real, n, folder / f"zoo-{n}", seed=0, dim=dim)
    zoo = synthetic.zoo()
    started = time.perf_counter()
    zoo.index()
    indexed = time.perf_counter() - started
    started = time.perf_counter()
    scorer = LearnedScorer(zoo, fit_tasks=fit_tasks)
    fitted = time.perf_counter() - started
    seconds = _seconds(queries, lambda q: scorer(zoo, q))
    # The index's share of a ranking: the same searches alone, after the rankings.
    searches = _seconds(
        queries, lambda q: scorer.knn.weighted_errors(need_embedding(q, "learned"), [])
    )
    return {
        "tasks": n,
        "dim": dim,
        "fitted_on": len(scorer.sample),
        "write_s": round(written, 1),
        "index_s": round(indexed, 2),
        "fit_s": round(fitted, 2),
        "queries": len(seconds),
        "read_p50_ms": _percentile_ms(seconds, 50),
        "read_p99_ms": _percentile_ms(seconds, 99),
        "read_max_ms": _percentile_ms(seconds, 100),
        "search_p50_ms": _percentile_ms(searches, 50),
        "search_p99_ms": _percentile_ms(searches, 99),
    }


def run(
    sizes: list[int], count: int, dim: int | None, fit_tasks: int, folder: Path
) -> dict[str, Any]:
    load_before = os.getloadavg()
    real = _real_zoo()
    dim = real.embeddings[0].dim if dim is None else dim
    held_out, _ = _synthetic(real, count + WARM_UP, folder / "queries", seed=1, dim=dim)
    queries = [Query(e) for e in held_out.zoo().embeddings]
    rows = [measure(real, n, queries, folder, dim, fit_tasks) for n in sizes]
    return {
        "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        # 1, 5 and 15 minutes, before and after: other work on the cores slows every figure.
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "real_zoo": f"starter ({len(real.tasks)} tasks, {len(real.experts)} experts)",
        "fit_tasks": fit_tasks,
        "target": f"read p99 <= {TARGET_P99_MS:g} ms at {TARGET_TASKS:,} tasks",
        "sizes": rows,
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"learned ranking on {result['cpu']} ({result['machine']}, "
        f"{result['numeric_threads']} numeric thread(s); load average "
        f"{' '.join(map(str, result['load_average'][:3]))} before, "
        f"{' '.join(map(str, result['load_average'][3:]))} after)\n"
        f"synthetic zoos from the {result['real_zoo']}; target: {result['target']}"
    )
    print(
        f"  {'tasks':>8} {'dim':>6} {'fitted on':>9} {'index s':>8} {'fit s':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'queries':>7} "
        f"{'search p50':>10} {'search p99':>10}"
    )
    for row in result["sizes"]:
        print(
            f"  {row['tasks']:>8,} {row['dim']:>6} {row['fitted_on']:>9} {row['index_s']:>8.2f} "
            f"{row['fit_s']:>7.2f} {row['read_p50_ms']:>8.2f} {row['read_p99_ms']:>8.2f} "
            f"{row['read_max_ms']:>8.2f} {row['queries']:>7} {row['search_p50_ms']:>10.2f} "
            f"{row['search_p99_ms']:>10.2f}"
        )


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes takes task counts like 1000,10000: {text!r}"
        ) from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"--sizes needs task counts of at least 2: {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sizes", type=_sizes, default=[1000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200, help="counted rankings per size")
    parser.add_argument("--dim", type=int, default=None, help="filters kept (default: all)")
    parser.add_argument("--fit-tasks", type=int, default=FIT_TASKS)
    parser.add_argument("--folder", type=Path, default=None, help="keep the zoos here")
    parser.add_argument("--threads", type=int, default=1, help="numeric threads (the API's)")
    args = parser.parse_args()
    if args.queries < 1 or args.threads < 1:
        parser.error("--queries and --threads must be at least 1")
    limit_numeric_threads(args.threads)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    try:
        result = run(args.sizes, args.queries, args.dim, args.fit_tasks, folder)
        result["numeric_threads"] = args.threads
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print(result)


if __name__ == "__main__":
    main()
