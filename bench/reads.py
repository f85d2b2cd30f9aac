"""Ranking reads under concurrent readers: throughput and latency of the API's hot path.

    python -m bench.reads [--json] [--zoo starter] [--api-workers 2] [--readers 1,2,4,8]
                          [--seconds 10] [--tasks 3] [--method learned]

Starts the real processes on the embedded default (``bench.processes``): ``task2vec serve
--workers N`` and one worker. Uploads ``--tasks`` Fashion-MNIST subsets (300 images each,
different seeds, so none is a zoo task) and waits for their embeddings; then stops the worker,
so the readers measure the API alone.

first read: the latency of the first ``GET /v1/tasks/{id}/recommendations`` of each task on
each API process, which computes the ranking (the API caches it per task, method and zoo
version).

readers: for each count in ``--readers``, that many threads, each with its own keep-alive
connection (httpx), read the rankings of the tasks in turn for ``--seconds``; the answers per
second over all of them, and the client-side latency's p50 and p99. Everything runs on one
machine over loopback: the readers' own CPU time is taken from the API's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from typing import Any

import httpx
import numpy as np

from bench.processes import fashion_upload, running


def _upload(client: httpx.Client, seed: int) -> str:
    response = client.post(
        "/v1/tasks",
        files={"file": (f"fashion-{seed}.npz", fashion_upload(300, seed=seed))},
    )
    response.raise_for_status()
    body = response.json()
    deadline = time.monotonic() + 600
    while (job := client.get(f"/v1/jobs/{body['job_id']}").json())["status"] != "succeeded":
        if job["status"] == "failed" or time.monotonic() > deadline:
            raise SystemExit(f"job {body['job_id']} did not succeed: {job}")
        time.sleep(0.2)
    return str(body["task_id"])


def _read(base: str, urls: list[str], params: dict[str, Any], until: float) -> list[float]:
    latencies = []
    with httpx.Client(base_url=base, timeout=30) as client:
        i = 0
        while (started := time.perf_counter()) < until:
            response = client.get(urls[i % len(urls)], params=params)
            if response.status_code != 200:
                raise SystemExit(f"{response.status_code}: {response.text[:300]}")
            latencies.append(time.perf_counter() - started)
            i += 1
    return latencies


def _readers(
    base: str, urls: list[str], params: dict[str, Any], readers: int, seconds: float
) -> dict[str, Any]:
    results: list[list[float]] = [[] for _ in range(readers)]
    until = time.perf_counter() + seconds

    def reader(i: int) -> None:
        results[i] = _read(base, urls, params, until)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = np.concatenate([np.array(r) for r in results])
    return {
        "readers": readers,
        "requests": int(latencies.size),
        "per_second": round(latencies.size / elapsed, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
    }


def run(
    zoo: str, api_workers: int, readers: list[int], seconds: float, tasks: int, method: str
) -> dict[str, Any]:
    with running(zoo, api_workers) as service:
        with httpx.Client(base_url=service.base, timeout=600) as client:
            task_ids = [_upload(client, seed=100 + i) for i in range(tasks)]
        service.stop_worker()
        urls = [f"/v1/tasks/{t}/recommendations" for t in task_ids]
        params: dict[str, Any] = {"method": method, "k": 5}
        first = []
        for url in urls:  # a fresh connection each: the kernel picks the API process
            for _ in range(api_workers):
                with httpx.Client(base_url=service.base, timeout=60) as client:
                    started = time.perf_counter()
                    client.get(url, params=params).raise_for_status()
                    first.append(time.perf_counter() - started)
        _readers(service.base, urls, params, 2, 2.0)  # warm every connection path
        rows = [_readers(service.base, urls, params, n, seconds) for n in readers]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "zoo": zoo,
        "api_workers": api_workers,
        "method": method,
        "tasks": tasks,
        "seconds_per_row": seconds,
        "first_read_ms": {
            "max": round(1000 * max(first), 1),
            "median": round(1000 * float(np.median(first)), 1),
        },
        "readers": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--zoo", default="starter", help="zoo under ./data/zoos")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--readers", default="1,2,4,8", help="comma-separated reader counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="per reader count")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--method", default="learned")
    args = parser.parse_args()
    counts = [int(n) for n in args.readers.split(",")]
    result = run(args.zoo, args.api_workers, counts, args.seconds, args.tasks, args.method)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"ranking reads on {result['machine']}, zoo {result['zoo']}, method {result['method']}, "
        f"{result['api_workers']} API processes, {result['tasks']} tasks"
    )
    first = result["first_read_ms"]
    print(f"  first read per task and process: median {first['median']} ms, max {first['max']}")
    print(f"  {'readers':>8} {'reads/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for row in result["readers"]:
        print(f"  {row['readers']:>8} {row['per_second']:>9} {row['p50_ms']:>8} {row['p99_ms']:>8}")


if __name__ == "__main__":
    main()
