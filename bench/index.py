"""The task index at 10k to 1M tasks: build time, memory, nearest-task latency and recall.

    python -m bench.index [--json] [--sizes 10000,100000,1000000] [--queries 200]
                          [--truth 50] [--full-scan-to 100000] [--dim 17024]
                          [--scratch /tmp/t2v-scale] [--first-stage ivf] [--keep]

Zoos are synthetic (``app.zoo.synthetic``: mixtures of the starter zoo's real embeddings,
``--dim`` of their filters), generated once into ``--scratch`` (the time is printed apart
from the build's). Queries are held-out synthetic tasks (another seed), never rows of the
index. Per size: the index kind, build time, the process's memory growth while the saved
index is loaded (anonymous and file-backed RSS) and its size on disk, search latency
(p50/p99 of ``TaskIndex.search(k=10)`` over ``--queries``), and recall@10 against the exact
symmetric distance. The truth is a chunked full scan of the store up to ``--full-scan-to``
tasks; beyond that, a full scan costs minutes per query on two cores, so the truth is the
exact top 10 of a 5,000-task shortlist (the nearest in the reduced space, every list probed),
and the smaller sizes print how often that shortlist's top 10 equals the full scan's.
Recall is printed with a 95% interval over the queries (mean ± 1.96·sd/√n).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from app.task2vec.embedding import Embedding
from app.zoo import index_zoo
from app.zoo.bundle import read_bundle
from app.zoo.evaluate import evaluate, paired_difference
from app.zoo.index import TaskIndex
from app.zoo.index_compressed import StageSettings
from app.zoo.index_reduce import scan_nearest, symmetric_block
from app.zoo.index_zoo import COMPRESSED_FROM, zoo_index
from app.zoo.synthetic import HESSIANS, MANIFEST, SyntheticZoo, load_synthetic, write_synthetic
from app.zoo.zoo import Zoo
from bench.console import cpu_model

STARTER = Path(__file__).parents[1] / "app" / "data" / "bundles" / "starter.t2vzoo"
SHORTLIST = 5_000


def _rss() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    return fields


def _synthetic(scratch: Path, n: int, dim: int, seed: int) -> tuple[SyntheticZoo, float | None]:
    """The cached synthetic zoo, or a new one; and the seconds its generation took."""
    out = scratch / f"syn-{n}-d{dim}-s{seed}"
    if (out / MANIFEST).is_file():
        return load_synthetic(out), None
    staging = Path(tempfile.mkdtemp(prefix="starter-"))
    try:
        real = read_bundle(STARTER, staging).zoo
        started = time.perf_counter()
        write_synthetic(real, n, out, seed=seed, dim=dim)
        return load_synthetic(out), time.perf_counter() - started
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _interval(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    half = 1.96 * a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
    return {"mean": round(float(a.mean()), 4), "ci95": round(float(half), 4), "n": len(a)}


def _shortlist_truth(index: TaskIndex, query: np.ndarray, k: int) -> list[int]:
    """Exact top ``k`` among the ``SHORTLIST`` nearest in the reduced space (all lists)."""
    stage = index.stage
    assert stage is not None
    ivf: Any = stage.index
    lists = getattr(ivf, "nlist", 0)
    if lists:
        ivf.nprobe = lists
    try:
        found = stage.candidates(query, min(SHORTLIST, len(index)))
    finally:
        stage._tune()
    rows = np.sort(found)
    exact = symmetric_block(query * stage.factor, np.asarray(stage.rows[rows]))
    best: list[int] = rows[np.lexsort((rows, exact))[:k]].tolist()
    return best


def _truth(
    index: TaskIndex, queries: np.ndarray, k: int, full: bool
) -> tuple[list[list[int]], str, float | None]:
    """Per query the exact ``k`` nearest ids, how they were found, and (full scans with the
    compressed kind) the share of queries whose shortlist truth is the same."""
    if not full:
        return [_shortlist_truth(index, q, k) for q in queries], "shortlist", None
    rows, _ = scan_nearest(queries, index.hessians, k, index.stage.factor if index.stage else 1)
    truth = [r.tolist() for r in rows]
    if index.stage is None:
        return truth, "full scan", None
    same = [_shortlist_truth(index, q, k) == t for q, t in zip(queries, truth, strict=True)]
    return truth, "full scan", float(np.mean(same))


def _search(index: TaskIndex, queries: np.ndarray, k: int) -> tuple[list[list[int]], list[float]]:
    scale = np.ones(queries.shape[1], dtype=np.float32)
    found, latencies = [], []
    for q in queries:
        embedding = Embedding(np.asarray(q, dtype=np.float32), scale, {})
        started = time.perf_counter()
        neighbours = index.search(embedding, k)
        latencies.append(time.perf_counter() - started)
        found.append([n.id for n in neighbours])
    return found, latencies


def _build(zoo: SyntheticZoo, kind: str, settings: StageSettings) -> TaskIndex:
    ids = np.arange(len(zoo), dtype=np.int64)
    if kind == "flat":
        return TaskIndex("synthetic", ids, np.asarray(zoo.hessians, dtype=np.float32))
    return TaskIndex.build_compressed("synthetic", ids, zoo.folder / HESSIANS, settings=settings)


def run_size(n: int, args: argparse.Namespace, queries: np.ndarray) -> dict[str, Any]:
    zoo, generated = _synthetic(args.scratch, n, args.dim, 0)
    kind = args.kind if args.kind != "auto" else ("flat" if n < COMPRESSED_FROM else "compressed")
    settings = StageSettings(first_stage=args.first_stage, rerank=args.rerank, nprobe=args.nprobe)
    load = os.getloadavg()[0]
    saved = args.scratch / f"index-{n}-{kind}.npz"
    build_s = None
    if not (args.reuse and saved.is_file()):
        started = time.perf_counter()
        built = _build(zoo, kind, settings)
        build_s = round(time.perf_counter() - started, 1)
        built.save(saved)
        del built
        gc.collect()
    before = _rss()
    index = TaskIndex.load(saved)
    assert index is not None
    after = _rss()
    if index.stage is not None:
        index.stage.retune(args.rerank, args.nprobe)
    found, latencies = _search(index, queries[: args.queries], 10)
    full = n <= args.full_scan_to
    truth, how, agree = _truth(index, queries[: args.truth], 10, full)
    recall = [len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=False)]
    on_disk = saved.stat().st_size + (
        0 if kind == "flat" else (zoo.folder / HESSIANS).stat().st_size
    )
    return {
        "tasks": n,
        "dim": zoo.dim,
        "kind": kind,
        "first_stage": args.first_stage if kind == "compressed" else "flat L2",
        "rerank": index.stage.settings.rerank if index.stage is not None else 0,
        "nprobe": args.nprobe,
        "generate_s": None if generated is None else round(generated, 1),
        "build_s": build_s,
        "rss_anon_mb": round((after["RssAnon"] - before["RssAnon"]) / 2**20, 1),
        "rss_file_mb": round((after["RssFile"] - before["RssFile"]) / 2**20, 1),
        "index_file_mb": round(saved.stat().st_size / 2**20, 1),
        "on_disk_mb": round(on_disk / 2**20, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "queries": len(latencies),
        "recall_at_10": _interval(recall),
        "truth": how,
        "shortlist_agrees": agree,
        "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def starter_check(stressed_rerank: int = 12) -> dict[str, Any]:
    """The compressed kind forced on the real starter zoo, against the flat kind: the
    leave-one-out 10 nearest tasks of every task (default settings, and with only
    ``stressed_rerank`` candidates re-ranked, so that the PCA + IVF stage decides), and the
    paired regret of task2vec-knn and 1-nn under the zoo's evaluation."""
    staging = Path(tempfile.mkdtemp(prefix="starter-"))
    try:
        zoo = read_bundle(STARTER, staging).zoo
        k = min(10, len(zoo.tasks) - 1)
        flat = zoo_index(zoo.probe, zoo.embeddings, None)
        packed = zoo_index(zoo.probe, zoo.embeddings, None, compressed_from=1)
        stressed = zoo_index(zoo.probe, zoo.embeddings, None, compressed_from=1)
        assert stressed.stage is not None
        stressed.stage.settings = replace(stressed.stage.settings, rerank=stressed_rerank)
        out: dict[str, Any] = {"tasks": len(zoo.tasks), "kinds": [flat.kind, packed.kind]}
        variants = (("default", packed, 4), (f"rerank {stressed_rerank}", stressed, 1))
        for name, index, oversample in variants:
            same, overlap, exact = 0, [], []
            for t, e in enumerate(zoo.embeddings):
                want = [n.id for n in flat.search(e, k, exclude=[t])]
                truth = [n.id for n in flat.exact_search(e, k, exclude=[t])]
                got = [n.id for n in index.search(e, k, oversample, exclude=[t])]
                same += want == got
                overlap.append(len(set(want) & set(got)) / k)
                exact.append(len(set(truth) & set(got)) / k)
            out[name] = {
                "same_order_as_flat": same,
                "recall_at_10_vs_flat": _interval(overlap),
                "recall_at_10_vs_exact": _interval(exact),
            }
        out["flat_recall_at_10_vs_exact"] = _interval(
            [
                len(
                    {n.id for n in flat.search(e, k, exclude=[t])}
                    & {n.id for n in flat.exact_search(e, k, exclude=[t])}
                )
                / k
                for t, e in enumerate(zoo.embeddings)
            ]
        )
        out["paired_regret"] = _paired_regret(zoo)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _paired_regret(zoo: Zoo) -> dict[str, Any]:
    methods = ["task2vec-knn", "1-nn"]
    flat = evaluate(zoo, methods)["protocols"]
    saved = index_zoo.COMPRESSED_FROM
    index_zoo.COMPRESSED_FROM = 1  # every fold's zoo gets the compressed kind
    try:
        packed = evaluate(replace(zoo, folder=None), methods)["protocols"]
    finally:
        index_zoo.COMPRESSED_FROM = saved
    return {
        f"{protocol}/{m}": paired_difference(
            packed[protocol]["per_task"][m], flat[protocol]["per_task"][m]
        )
        for protocol in flat
        for m in methods
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per size")
    parser.add_argument("--truth", type=int, default=50, help="queries with exact truth")
    parser.add_argument("--full-scan-to", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=17_024, help="ResNet-34's filter count")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/t2v-scale"))
    parser.add_argument("--kind", default="auto", choices=["auto", "flat", "compressed"])
    parser.add_argument("--first-stage", default="ivf", choices=["ivf", "ivfpq", "hnsw"])
    parser.add_argument(
        "--rerank", type=int, default=StageSettings.rerank, help="0: by the zoo's size"
    )
    parser.add_argument("--nprobe", type=int, default=StageSettings.nprobe)
    parser.add_argument("--keep", action="store_true", help="keep the generated zoos")
    parser.add_argument("--reuse", action="store_true", help="search a saved index again")
    parser.add_argument("--starter", action="store_true", help="only the starter-zoo check")
    args = parser.parse_args()
    if args.starter:
        print(json.dumps({"cpu": cpu_model(), **starter_check()}, indent=1))
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    held_out, _ = _synthetic(args.scratch, max(args.queries, args.truth), args.dim, 1)
    queries = np.asarray(held_out.hessians, dtype=np.float32)
    rows = []
    for n in sizes:
        rows.append(run_size(n, args, queries))
        if not args.json:
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(args.scratch / f"syn-{n}-d{args.dim}-s0", ignore_errors=True)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "sizes": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    _table(result)


def _table(result: dict[str, Any]) -> None:
    print(f"task index on {result['cpu']} ({result['cores']} cores)")
    head = ("tasks", "kind", "gen s", "build s", "anon MB", "file MB", "disk MB", "p50 ms")
    print("  " + " ".join(f"{h:>9}" for h in (*head, "p99 ms", "recall@10", "truth", "load")))
    for r in result["sizes"]:
        rec = r["recall_at_10"]
        cells = [r["tasks"], r["kind"], r["generate_s"], r["build_s"], r["rss_anon_mb"]]
        cells += [r["rss_file_mb"], r["on_disk_mb"], r["p50_ms"], r["p99_ms"]]
        recall = f"{rec['mean']}±{rec['ci95']} (n={rec['n']})"
        print(
            "  " + " ".join(f"{c!s:>9}" for c in cells),
            f"{recall:>22} {r['truth']:>10} {r['load_1min']}",
        )
        if r["shortlist_agrees"] is not None:
            print(
                f"    shortlist truth = full-scan truth on {r['shortlist_agrees']:.0%} of queries"
            )


if __name__ == "__main__":
    main()
