"""The service end to end: POST-to-ranking wall time, and ranking latency in the API.

    python -m bench.service [--json] [--zoo starter] [--images 1000] [--requests 200]
                            [--method NAME]

Starts the real processes on the embedded default (SQLite, the SQLite-backed Celery broker):
``task2vec serve`` on a free port and one ``task2vec worker``, both on a fresh data directory
that links the zoo built under ``./data/zoos`` (``task2vec zoo build --preset NAME`` first).
Then:

post-to-ranking: ``POST /v1/recommendations?wait=…`` with a 28x28 Fashion-MNIST .npz of
``--images`` images (10 classes; a seeded stratified subset of the test set, so it is no zoo
task), over HTTP; the wall time and its split as the API reports it (upload, queue wait, the
worker's stages, ranking).

ranking: ``GET /v1/tasks/{id}/recommendations`` with the same ``--method`` (the service's
default when left out) for the embedded task, ``--requests`` times over one keep-alive
connection; p50 and p95 of the client-side latency.

zoo management: ``POST /v1/experts`` with an uploaded cnn-16x3 (seeded random weights), then
``POST /v1/zoo/tasks`` with another ``--images``-image Fashion-MNIST subset; for each, the
worker job (matrix entries, publishing the version) and the time from the POST until the API
serves the new version.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from typing import Any

import httpx
import numpy as np
import torch

from app.zoo.experts import SmallCNN
from bench.processes import fashion_upload, running


def _expert_weights() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(SmallCNN(16, 3).state_dict(), buffer)
    return buffer.getvalue()


def _until_served(client: httpx.Client, job_id: str, size: tuple[int, int]) -> dict[str, Any]:
    """Wait for the job, then for the API to serve a version with (tasks, experts) = size."""
    deadline = time.monotonic() + 900
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} did not finish: {job}")
        time.sleep(0.1)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} failed: {job['error']}")
    while (zoo := client.get("/v1/zoo").json())["tasks"] + zoo["experts"] < sum(size):
        time.sleep(0.05)
    return {"job_s": _seconds(job), "job_stages": job["timings"]}


def _seconds(job: dict[str, Any]) -> float:
    from datetime import datetime

    started = datetime.fromisoformat(job["started_at"])
    return round((datetime.fromisoformat(job["finished_at"]) - started).total_seconds(), 3)


def _zoo_management(client: httpx.Client, images: int) -> dict[str, Any]:
    zoo = client.get("/v1/zoo").json()
    size = (zoo["tasks"], zoo["experts"])
    out: dict[str, Any] = {}
    started = time.perf_counter()
    response = client.post(
        "/v1/experts",
        data={"name": "bench-cnn-16x3", "architecture": "cnn-16x3", "input_size": "28"},
        files={"weights": ("cnn.pt", _expert_weights())},
    )
    response.raise_for_status()
    size = (size[0], size[1] + 1)
    out["expert"] = _until_served(client, response.json()["job_id"], size)
    out["expert"]["post_to_served_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    response = client.post(
        "/v1/zoo/tasks",
        data={"name": "bench-clothing", "domain": "clothing"},
        files={"file": ("clothing.npz", fashion_upload(images, seed=8))},
    )
    response.raise_for_status()
    size = (size[0] + 1, size[1])
    out["zoo_task"] = _until_served(client, response.json()["job_id"], size)
    out["zoo_task"]["post_to_served_s"] = round(time.perf_counter() - started, 3)
    out["zoo_after"] = size
    return out


def run(zoo: str, images: int, requests: int, method: str | None = None) -> dict[str, Any]:
    """``method``: the ranking asked for (the service's default when None). The repeated
    reads ask for the same method: answered in-process, or read from the stored ranking for
    a method a worker ran."""
    payload = fashion_upload(images)
    chosen = {"method": method} if method else {}
    with running(zoo) as service, httpx.Client(base_url=service.base, timeout=600) as client:
        started = time.perf_counter()
        response = client.post(
            "/v1/recommendations",
            params={"wait": 300, "k": 5, **chosen},
            files={"file": ("fashion.npz", payload)},
        )
        wall = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        latencies = []
        url = f"/v1/tasks/{body['task_id']}/recommendations"
        for _ in range(requests):
            t0 = time.perf_counter()
            client.get(url, params={"k": 5, **chosen}).raise_for_status()
            latencies.append(time.perf_counter() - t0)
        management = _zoo_management(client, images)
    timings = body["timings"]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "zoo": zoo,
        "method": body["method"],
        "images": images,
        "upload_bytes": len(payload),
        "post_to_ranking_s": round(wall, 3),
        "split": {
            "upload_s": timings["upload_s"],
            "queue_wait_s": timings["queue_wait_s"],
            "job_s": timings["job_s"],
            "job_stages": timings["job_stages"],
            "ranking_s": body.get("seconds"),
        },
        "top_expert": body["ranking"][0]["expert"],
        "ranking_latency_ms": {
            "p50": round(1000 * float(np.percentile(latencies, 50)), 2) if latencies else None,
            "p95": round(1000 * float(np.percentile(latencies, 95)), 2) if latencies else None,
            "requests": requests,
        },
        "zoo_management": management,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--zoo", default="starter", help="zoo under ./data/zoos")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--method", default=None, help="ranking method (the default when left out)")
    args = parser.parse_args()
    result = run(args.zoo, args.images, args.requests, args.method)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    split = result["split"]
    print(
        f"service on {result['machine']}, zoo {result['zoo']}, {result['images']} images, "
        f"method {result['method']}"
    )
    print(f"  POST to ranking        {result['post_to_ranking_s']:8.2f} s")
    print(f"    upload               {split['upload_s']:8.3f} s")
    print(f"    queue wait           {split['queue_wait_s']:8.3f} s")
    print(f"    worker job           {split['job_s']:8.3f} s  {split['job_stages']}")
    if split["ranking_s"] is not None:
        print(f"    ranking              {split['ranking_s']:8.4f} s")
    lat = result["ranking_latency_ms"]
    print(
        f"  ranking latency (API)  p50 {lat['p50']} ms, p95 {lat['p95']} ms over {lat['requests']}"
    )
    admin = result["zoo_management"]
    for what, label in (("expert", "new expert (cnn-16x3)"), ("zoo_task", "new zoo task")):
        item = admin[what]
        print(
            f"  {label:22} {item['post_to_served_s']:8.2f} s POST to served "
            f"(worker job {item['job_s']:.2f} s: {item['job_stages']})"
        )


if __name__ == "__main__":
    main()
