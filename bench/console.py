"""The web console in a real browser: first paint, the ranking after its job, the assets' weight,
and whether any request leaves the machine.

    python -m bench.console [--json] [--zoo starter] [--images 300] [--loads 5] [--uploads 3]
                            [--pictures DIR]

Starts the real processes on the embedded default (``bench.processes``: ``task2vec serve`` and
one ``task2vec worker`` on a fresh data directory, the starter zoo imported from its bundle)
and drives Debian's Chromium headless through Playwright (``bench.browser``), over loopback:

first paint: ``--loads`` loads of ``/`` in fresh browser contexts (no cache), the browser's
own first-contentful-paint; and the same for the zoo view until its map is drawn.

ranking after the job: ``--uploads`` Fashion-MNIST uploads (``--images`` images of the test
set, a different seeded subset each, so none is a zoo task or a repeat) dropped on the page.
Two figures: from the moment the page saw the job end (its poll) to the ranking drawn, and
from the job's ``finished_at`` (the worker's clock: the same machine) to the ranking drawn,
which adds the page's polling delay.

assets: the bytes of ``/`` and every ``/console/`` file the page loaded (uncompressed).

off-host requests: every request to a host other than the service's is refused and counted
(the target is none). ``--pictures DIR`` saves the ranking and zoo views as PNG files (the
README's picture is ``console-ranking.png`` made this way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from playwright.sync_api import Browser

from bench.browser import Watch, chromium, first_paint_ms, transferred_bytes, watched_page
from bench.processes import fashion_upload, running

#: What the issue sets: first paint, ranking after the job, assets, off-host requests.
TARGETS = {"first_paint_ms": 1000, "ranking_after_job_ms": 500, "assets_bytes": 500_000}


def cpu_model() -> str:
    """The CPU's model name (every figure is named with it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(float(np.median(values)), 1),
        "max": round(float(np.max(values)), 1),
        "runs": len(values),
    }


@dataclass
class _Seen:
    """What the runs measured, and what the pages did that they must not."""

    paints: list[float] = field(default_factory=list)
    maps: list[float] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)
    after_job: list[float] = field(default_factory=list)
    assets: dict[str, int] = field(default_factory=dict)
    off_host: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def watched(self, watch: Watch) -> None:
        self.off_host += watch.off_host
        self.problems += watch.errors + watch.violations + watch.dialogs


def _loads(browser: Browser, base: str, loads: int, out: _Seen) -> None:
    """Cold loads of ``/`` (first paint) and of the zoo view (until its map is drawn)."""
    for _ in range(loads):
        page, watch = watched_page(browser, base)
        page.goto(base + "/")
        page.wait_for_selector("#zoo-version:has-text('experts')")
        paint = first_paint_ms(page)
        if paint is not None:
            out.paints.append(paint)
        out.assets = out.assets or transferred_bytes(page)
        started = time.perf_counter()
        page.goto(base + "/#/zoo")
        page.wait_for_selector("#map svg circle")
        out.maps.append(1000 * (time.perf_counter() - started))
        out.watched(watch)
        page.context.close()


def _upload(browser: Browser, base: str, path: Path, out: _Seen, pictures: Path | None) -> None:
    """One dataset dropped on the page, its ranking drawn; the pictures when asked for."""
    page, watch = watched_page(browser, base)
    page.goto(base + "/")
    page.wait_for_selector("#zoo-version:has-text('experts')")
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#ranking-rows tr", timeout=600_000)
    marks = page.evaluate(
        "() => ({seen: performance.getEntriesByName('t2v:job-seen-ended')[0].startTime,"
        " shown: performance.getEntriesByName('t2v:ranking-shown')[0].startTime,"
        " origin: performance.timeOrigin,"
        " job: document.getElementById('job-id').textContent})"
    )
    out.seen.append(marks["shown"] - marks["seen"])
    job = service_job(base, marks["job"])
    finished = datetime.fromisoformat(job["finished_at"]).timestamp() * 1000
    out.after_job.append(marks["origin"] + marks["shown"] - finished)
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#nearest-cards img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )
        page.screenshot(path=str(pictures / "console-ranking.png"))
        page.click("#task-on-map")
        page.wait_for_selector("#map svg path.placed")
        page.screenshot(path=str(pictures / "console-zoo.png"), full_page=True)
    out.watched(watch)
    page.context.close()


def run(zoo: str, images: int, loads: int, uploads: int, pictures: Path | None) -> dict[str, Any]:
    out = _Seen()
    with running(zoo) as service, chromium() as browser, tempfile.TemporaryDirectory() as tmp:
        _loads(browser, service.base, loads, out)
        for i in range(uploads):
            path = Path(tmp) / f"fashion-{i}.npz"
            path.write_bytes(fashion_upload(images, seed=100 + i))
            last = i == uploads - 1
            _upload(browser, service.base, path, out, pictures if last else None)
    return {
        "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "zoo": zoo,
        "images": images,
        "first_paint_ms": _summary(out.paints),
        "zoo_map_drawn_ms": _summary(out.maps),
        "ranking_after_job_seen_ms": _summary(out.seen),
        "ranking_after_job_finished_ms": _summary(out.after_job),
        "assets_bytes": sum(out.assets.values()),
        "assets": out.assets,
        "off_host_requests": len(out.off_host),
        "page_problems": out.problems,
        "targets": TARGETS,
    }


def service_job(base: str, job_id: str) -> dict[str, Any]:
    """The job's view, for its ``finished_at``."""
    answer = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=60)
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--zoo", default="starter", help="zoo under ./data/zoos (or the bundle)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--uploads", type=int, default=3)
    parser.add_argument("--pictures", type=Path, default=None, help="save screenshots here")
    args = parser.parse_args()
    result = run(args.zoo, args.images, args.loads, args.uploads, args.pictures)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"console on {result['cpu']} ({result['machine']}), zoo {result['zoo']}, loopback")
    print(f"  {'measure':34} {'median':>9} {'max':>9} {'runs':>5} {'target':>9}")
    for key, target in (
        ("first_paint_ms", TARGETS["first_paint_ms"]),
        ("zoo_map_drawn_ms", None),
        ("ranking_after_job_seen_ms", TARGETS["ranking_after_job_ms"]),
        ("ranking_after_job_finished_ms", TARGETS["ranking_after_job_ms"]),
    ):
        row = result[key]
        shown = f"{target} ms" if target else ""
        print(f"  {key:34} {row['median']:7.1f}ms {row['max']:7.1f}ms {row['runs']:5} {shown:>9}")
    print(
        f"  {'assets_bytes':34} {result['assets_bytes']:>9} {'':9} {'':5} "
        f"{TARGETS['assets_bytes']:>9}"
    )
    print(f"  {'off_host_requests':34} {result['off_host_requests']:>9} {'':9} {'':5} {0:>9}")
    if result["page_problems"]:
        print(f"  page problems: {result['page_problems']}")


if __name__ == "__main__":
    main()
