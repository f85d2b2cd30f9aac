"""What ``task2vec remote recommend`` shows, without a service: the ranking table (predicted
accuracy, its interval, architecture, score), the out-of-distribution flag, and the job bars
that count stages while the upload's counts bytes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from task2vec_client import JobOut, Ranking, TaskAccepted
from task2vec_client.models import RankedExpert
from typer.testing import CliRunner

from app.cli import app, remote
from app.cli.remote import (
    EMBED_STAGES,
    MISSING,
    accuracy_cell,
    job_bar,
    job_description,
    novelty_line,
    progress_bars,
    ranking_table,
)

ROOT = Path(__file__).resolve().parents[2]

EVIDENCE = {
    "predicted_error": 0.12,
    "error_interval": [0.08, 0.2],
    "interval_level": 0.8,
    "architecture": "resnet18",
    "source_task": "cub",
}
IN_ZOO = {
    "out_of_distribution": False,
    "nearest_distance": 0.21,
    "threshold": 0.4,
    "threshold_quantile": 0.95,
    "zoo_quantile": 0.5,
}
OUT_OF_ZOO = {**IN_ZOO, "out_of_distribution": True, "nearest_distance": 0.73}


def _job(
    stage: str | None,
    fraction: float = 0.0,
    timings: dict[str, float] | None = None,
    *,
    kind: str = "embed",
    status: str = "running",
    params: dict[str, Any] | None = None,
) -> JobOut:
    return JobOut(
        id="j1",
        kind=kind,
        status=status,
        attempts=1,
        progress={"stage": stage, "fraction": fraction},
        task_id="t1",
        params={"prerank": ["hybrid"]} if params is None else params,
        timings=timings or {},
        created_at="2026-12-07T00:00:00Z",
        started_at=None,
        finished_at=None,
        error=None,
        result=None,
        links={},
    )


def _render(renderable: Any, width: int = 120) -> str:
    shown = StringIO()
    Console(file=shown, width=width, color_system=None).print(renderable)
    return shown.getvalue()


def _item(rank: int, expert: str, evidence: dict[str, Any], score: float = 0.5) -> RankedExpert:
    return RankedExpert(rank=rank, expert=expert, score=score, evidence=evidence)


def test_accuracy_is_one_minus_the_predicted_error_and_the_interval_flips() -> None:
    def cell(evidence: dict[str, Any], level: bool = False) -> str:
        return accuracy_cell(_item(1, "e", evidence), level=level)

    assert cell(EVIDENCE) == "88.0% (80–92)"
    assert cell(EVIDENCE, level=True) == "88.0% (80–92 at 80%)"
    assert cell({}) == MISSING
    assert cell({"predicted_error": 0.25}) == "75.0%"
    assert cell({"predicted_error": None, "error_interval": [0.1]}) == MISSING
    assert cell({"predicted_error": "n/a", "error_interval": [0.1, 0.3]}) == "– (70–90)"


def test_the_table_shows_accuracy_interval_architecture_and_score() -> None:
    table = _render(ranking_table("shoes", [_item(1, "resnet18-cub", EVIDENCE, 0.8123)]))
    header = next(line for line in table.splitlines() if "rank" in line)
    for column in ("expert", "predicted accuracy (80% interval)", "architecture", "score"):
        assert column in header
    row = next(line for line in table.splitlines() if "resnet18-cub" in line)
    assert re.search(r"1 .*resnet18-cub.*88\.0% \(80–92\).*resnet18.*0\.8123", row), table


def test_the_table_shows_a_dash_where_the_evidence_lacks_a_value() -> None:
    rows = [_item(1, "logme-only", {"logme": 1.5}), _item(2, "bare", {})]
    table = _render(ranking_table("t", rows))
    for expert in ("logme-only", "bare"):
        row = next(line for line in table.splitlines() if expert in line)
        assert row.count(MISSING) == 2, table  # accuracy with its interval, architecture


def test_levels_that_differ_are_shown_on_each_row() -> None:
    rows = [_item(1, "a", EVIDENCE), _item(2, "b", {**EVIDENCE, "interval_level": 0.9})]
    table = _render(ranking_table("t", rows))
    assert "88.0% (80–92 at 80%)" in table
    assert "88.0% (80–92 at 90%)" in table


def test_the_novelty_line_flags_a_dataset_outside_the_zoo() -> None:
    flag = novelty_line(OUT_OF_ZOO)
    assert "outside what the zoo covers" in flag
    assert "0.730" in flag
    assert "threshold 0.400" in flag
    assert "less sure" in flag
    assert "--method logme" in flag
    assert "within the zoo's distribution" in novelty_line(IN_ZOO)
    assert MISSING in novelty_line({"out_of_distribution": True})


def test_a_job_bar_names_its_stage_and_counts_stages() -> None:
    timings = {"loading dataset": 0.1, "features": 1.0, "head": 0.4}
    job = _job("fisher", 0.42, timings)
    assert job_description(job) == "embed job: fisher (stage 4 of 6) 42%"
    assert job_bar(job) == pytest.approx((3.42, 6.0))
    ranking = _job("ranking (hybrid)", 0.0, {**timings, "fisher": 2.0, "saving": 0.1})
    assert job_description(ranking) == "embed job: ranking (hybrid) (stage 6 of 6) 0%"
    rank = _job("loading dataset", kind="rank", params={"method": "logme"})
    assert job_description(rank) == "rank job: loading dataset (stage 1 of 2) 0%"
    assert job_description(_job(None, status="queued")) == "embed job: queued"
    done = _job("done", 1.0, timings, status="succeeded")
    assert job_description(done) == "embed job: succeeded (3 stages)"
    assert job_bar(done) == (1.0, 1.0)


def test_a_stage_the_plan_does_not_list_is_counted_from_the_timings() -> None:
    job = _job("matrix", 0.5, {"downloading weights": 3.0}, kind="expert", params={})
    assert job_description(job) == "expert job: matrix (stage 2) 50%"
    assert job_bar(job) == (1.5, 2.0)


def test_the_embedding_stages_are_the_ones_the_worker_and_embedding_report() -> None:
    sources = "".join(
        p.read_text() for p in [ROOT / "workers/tasks.py", *ROOT.glob("app/task2vec/*.py")]
    )
    for stage in EMBED_STAGES:
        assert f'"{stage}"' in sources, stage
    assert 'f"ranking ({method})"' in (ROOT / "workers/ranking.py").read_text()


def test_the_upload_bar_counts_bytes_and_a_job_bar_stages() -> None:
    progress = progress_bars(Console(file=StringIO()))
    progress.add_task("upload", total=2048, completed=1024, bytes=True)
    job = progress.add_task("job", total=1.0)
    remote_job = _job("fisher", 0.42, {"loading dataset": 0.1, "features": 1.0, "head": 0.4})
    completed, total = job_bar(remote_job)
    progress.update(job, description=job_description(remote_job), completed=completed, total=total)
    shown = _render(progress.make_tasks_table(progress.tasks))
    upload, job_line = shown.splitlines()
    assert "upload" in upload
    assert "/2.0 kB" in upload
    assert "embed job: fisher (stage 4 of 6) 42%" in job_line
    assert "bytes" not in job_line
    assert "/1" not in job_line


class FakeClient:
    """The service's answers to ``recommend``: an accepted upload, a job seen at two stages,
    and a stored ranking."""

    def __init__(self, ranking: Ranking) -> None:
        self.ranking = ranking
        self.seen: list[str] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def upload_task(self, dataset: Path, progress: Callable[[int, int], None]) -> TaskAccepted:
        progress(dataset.stat().st_size, dataset.stat().st_size)
        return TaskAccepted(task_id="t1", job_id="j1", status="queued", skipped=[], links={})

    def wait_for(self, job_id: str, on_poll: Callable[[JobOut], None]) -> JobOut:
        on_poll(_job("fisher", 0.5, {"loading dataset": 0.1, "features": 1.0, "head": 0.4}))
        done = _job("done", 1.0, {"fisher": 1.0}, status="succeeded")
        on_poll(done)
        return done

    def recommendations(self, task_id: str, k: int, method: str | None) -> Ranking:
        return self.ranking


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "shoes.npz"
    path.write_bytes(b"0" * 100)
    return path


def _recommend(
    monkeypatch: pytest.MonkeyPatch, dataset: Path, novelty: dict[str, Any] | None, *args: str
) -> str:
    ranking = Ranking(
        task_id="t1",
        method="hybrid",
        ranking=[_item(1, "resnet18-cub", EVIDENCE, 0.9), _item(2, "old-server", {})],
        novelty=novelty,
        seconds=0.1,
        zoo_version="v1",
    )
    monkeypatch.setattr(remote, "_client", lambda server, key: FakeClient(ranking))
    result = CliRunner().invoke(app, ["remote", "recommend", str(dataset), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "out", Console(width=120, color_system=None))


@pytest.mark.usefixtures("wide")
def test_recommend_flags_an_out_of_distribution_dataset_above_the_table(
    monkeypatch: pytest.MonkeyPatch, dataset: Path
) -> None:
    shown = _recommend(monkeypatch, dataset, OUT_OF_ZOO)
    flag, table = shown.index("outside what the zoo covers"), shown.index("resnet18-cub")
    assert flag < table
    assert "88.0% (80–92)" in shown
    row = next(line for line in shown.splitlines() if "old-server" in line)
    assert row.count(MISSING) == 2


@pytest.mark.usefixtures("wide")
def test_recommend_within_the_zoo_says_so_below_the_table(
    monkeypatch: pytest.MonkeyPatch, dataset: Path
) -> None:
    shown = _recommend(monkeypatch, dataset, IN_ZOO)
    assert "outside" not in shown
    assert shown.index("resnet18-cub") < shown.index("within the zoo's distribution")
    assert "within" not in _recommend(monkeypatch, dataset, None)


def test_recommend_json_stays_the_raw_answer(
    monkeypatch: pytest.MonkeyPatch, dataset: Path
) -> None:
    body = json.loads(_recommend(monkeypatch, dataset, OUT_OF_ZOO, "--json"))
    assert body["ranking"][0]["evidence"] == EVIDENCE
    assert body["novelty"] == OUT_OF_ZOO
    assert "predicted_accuracy" not in json.dumps(body)
