"""What the service tells its operators: the API's /metrics (parsed as Prometheus parses it),
X-Request-ID on every answer and on the jobs a request creates, JSON log lines carrying the
request and the job, and the workers' job and sweep metrics (tests/e2e/test_stack.py
scrapes a real worker's endpoint in multiprocess mode)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.api.main import create_app
from app.db.models import Job, JobStatus
from app.db.session import session_scope
from app.observability import context, multiprocess
from app.observability.logs import JsonFormatter, TextFormatter
from app.services.leases import SweepReport
from app.settings import Settings
from tests.helpers import npz_upload, run_job
from workers import tasks

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ROUTE = "/v1/tasks/{task_id}/recommendations"


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def latency_count(samples: Samples, route: str, method: str, status: int) -> float:
    key = labels(route=route, method=method, status=str(status))
    return samples.get(("t2v_http_request_duration_seconds_count", key), 0.0)


#: Job rows of every kind: (kind, status, attempt, resends).
JOBS = [
    ("embed", "queued", 0, 2),
    ("embed", "queued", 0, 0),
    ("embed", "succeeded", 3, 0),
    ("rank", "queued", 1, 1),
    ("rank", "running", 2, 0),
    ("expert", "failed", 3, 0),
    ("zoo-task", "queued", 0, 0),
]


def test_metrics_by_route_template_jobs_and_zoo(client: TestClient, settings: Settings) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        for kind, status, attempt, resends in JOBS:
            session.add(
                Job(kind=kind, status=status, attempt=attempt, resends=resends, tenant="local")
            )
    zoo = client.get("/v1/zoo").json()  # the zoo is loaded
    for _ in range(2):
        assert client.get("/v1/tasks/0a1b2c3d/recommendations").status_code == 404
    assert client.get("/v1/no/such/path/0a1b2c3d").status_code == 404
    assert client.get("/healthz").status_code == 200

    samples = scrape(client)
    assert latency_count(samples, ROUTE, "GET", 404) == 2
    assert latency_count(samples, "unmatched", "GET", 404) == 1
    assert latency_count(samples, "/healthz", "GET", 200) == 1
    assert latency_count(samples, "/v1/zoo", "GET", 200) == 1
    raw = [key for key in samples if any("0a1b2c3d" in value for _, value in key[1])]
    assert raw == []  # never a raw path in a label

    assert samples[("t2v_database_up", labels())] == 1
    jobs = {key: n for (name, key), n in samples.items() if name == "t2v_jobs"}
    assert jobs[labels(kind="embed", status="queued")] == 2
    assert jobs[labels(kind="rank", status="running")] == 1
    assert jobs[labels(kind="expert", status="failed")] == 1
    assert jobs[labels(kind="expert", status="queued")] == 0  # every kind × status is there
    assert sum(jobs.values()) == len(JOBS)
    # embed and zoo-task jobs go to the embed queue; rank and expert jobs to evaluate.
    assert samples[("t2v_queue_depth", labels(queue="embed"))] == 3
    assert samples[("t2v_queue_depth", labels(queue="evaluate"))] == 1
    assert samples[("t2v_job_repeat_attempts", labels(kind="embed"))] == 2
    assert samples[("t2v_job_repeat_attempts", labels(kind="rank"))] == 1
    assert samples[("t2v_job_repeat_attempts", labels(kind="expert"))] == 2
    assert samples[("t2v_job_resends", labels(kind="embed"))] == 2
    assert samples[("t2v_job_resends", labels(kind="rank"))] == 1

    assert samples[("t2v_zoo_tasks", labels())] == zoo["tasks"]
    assert samples[("t2v_zoo_experts", labels())] == zoo["experts"]
    assert samples[("t2v_zoo_version_info", labels(content=zoo["version"]))] == 1
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_metrics_answer_while_the_database_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://t2v@127.0.0.1:1/none")
    client = TestClient(create_app(settings))  # no lifespan: no zoo loaded either
    assert client.get("/healthz").status_code == 200
    samples = scrape(client)
    assert samples[("t2v_database_up", labels())] == 0
    assert latency_count(samples, "/healthz", "GET", 200) == 1
    names = {name for name, _ in samples}
    assert not names & {"t2v_jobs", "t2v_queue_depth", "t2v_zoo_tasks", "t2v_zoo_experts"}


@pytest.fixture
def keyed(tmp_path: Path) -> TestClient:
    """The API with keys required and a route that fails; no lifespan, no database used."""
    app = create_app(Settings(data_dir=tmp_path, api_keys="required", max_upload_bytes=1))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    return TestClient(app, raise_server_exceptions=False)


ANSWERS = [
    ("GET", "/healthz", 200),
    ("GET", "/nowhere", 404),  # no route
    ("GET", "/v1/jobs/0a1b", 401),  # problem+json from a dependency
    ("POST", "/v1/tasks", 401),  # problem+json from a middleware (the door: no key)
    ("GET", "/boom", 500),  # problem+json from the last-resort handler
]


def body(method: str) -> bytes | None:
    """Over the upload limit (1 byte, and the room for a form) for a POST: refused at the door
    all the same, for want of a key."""
    return b"x" * 2**21 if method == "POST" else None


@pytest.mark.parametrize(("method", "path", "status"), ANSWERS)
def test_a_sane_request_id_is_echoed(
    keyed: TestClient, method: str, path: str, status: int
) -> None:
    given = "edge-42:retry.1_a-B"
    response = keyed.request(method, path, headers={"X-Request-ID": given}, content=body(method))
    assert response.status_code == status
    assert response.headers["x-request-id"] == given


@pytest.mark.parametrize(("method", "path", "status"), ANSWERS)
@pytest.mark.parametrize("given", [None, "", "x" * 129, "a b", "a/b", "<script>"])
def test_a_request_id_is_made_when_none_sane_is_given(
    keyed: TestClient, method: str, path: str, status: int, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    response = keyed.request(method, path, headers=headers, content=body(method))
    assert response.status_code == status
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    other = keyed.request(method, path, headers=headers, content=body(method))
    assert other.headers["x-request-id"] != response.headers["x-request-id"]


@contextmanager
def json_lines(name: str, level: int = logging.INFO) -> Iterator[list[dict[str, object]]]:
    """The records of logger ``name`` while the block runs, formatted as the service
    formats them (at the moment they are logged, in the context they are logged in)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    lines: list[dict[str, object]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        lines += [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_an_api_log_line_is_json_with_the_request_id(keyed: TestClient) -> None:
    with json_lines("app.api") as lines:
        response = keyed.get("/boom", headers={"X-Request-ID": "trace-7"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    [line] = lines
    assert line["request_id"] == "trace-7"
    assert (line["level"], line["logger"]) == ("ERROR", "app.api.problems")
    assert line["message"] == "internal error on GET /boom"
    assert 'raise RuntimeError("boom")' in str(line["exc_info"])
    assert datetime.fromisoformat(str(line["time"])).utcoffset() == timedelta(0)


def test_log_lines_carry_the_job_and_its_request() -> None:
    record = logging.LogRecord("workers.tasks", logging.INFO, __file__, 1, "job %s", ("j1",), None)
    with context.bound(job="j1", request="r1"):
        line = json.loads(JsonFormatter().format(record))
        text = TextFormatter().format(record)
    assert {k: line[k] for k in ("level", "logger", "message", "job_id", "request_id")} == {
        "level": "INFO",
        "logger": "workers.tasks",
        "message": "job j1",
        "job_id": "j1",
        "request_id": "r1",
    }
    assert text.endswith("INFO    workers.tasks: job j1 [request_id=r1 job_id=j1]")
    outside = json.loads(JsonFormatter().format(record))
    assert "job_id" not in outside
    assert "request_id" not in outside


def test_access_lines_have_their_fields() -> None:
    args = ("127.0.0.1:5000", "GET", "/v1/zoo", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == '127.0.0.1:5000 - "GET /v1/zoo HTTP/1.1" 200'
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/zoo", 200)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_carries_the_request_id_to_its_worker(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    """The id is stored on the job row (a re-sent job keeps it); the worker's lines of that
    job carry both ids, and the attempt is counted by kind and outcome."""
    response = client.post(
        "/v1/tasks", files={"file": ("a.npz", npz_upload())}, headers={"X-Request-ID": "up-1"}
    )
    assert response.status_code == 202
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, response.json()["job_id"])
        assert job is not None
        assert job.request_id == "up-1"
        # A rank job whose task is gone fails at once, without loading the zoo.
        doomed = Job(kind="rank", status=JobStatus.queued, tenant="local", request_id="up-2")
        session.add(doomed)
        session.flush()
        doomed_id = doomed.id

    def failed() -> float:
        key = {"kind": "rank", "outcome": "failed"}
        return REGISTRY.get_sample_value("t2v_worker_job_duration_seconds_count", key) or 0.0

    before = failed()
    with json_lines("workers") as lines:
        run_job(settings, doomed_id)
    assert failed() == before + 1
    assert lines, "the worker logged nothing"
    assert all((line["job_id"], line["request_id"]) == (doomed_id, "up-2") for line in lines)
    ended = rf"job {doomed_id}: attempt 1 failed in [0-9.]+ s"
    assert any(re.fullmatch(ended, str(line["message"])) for line in lines), lines


def test_sweeps_are_counted() -> None:
    def value(action: str) -> float:
        return REGISTRY.get_sample_value("t2v_worker_sweep_jobs_total", {"action": action}) or 0.0

    before = {action: value(action) for action in ("expired", "resent", "failed")}
    tasks._count_sweep(SweepReport(expired=["a"], resent=["b", "c"], failed=[], waiting=["d"]))
    assert {action: value(action) - before[action] for action in before} == {
        "expired": 1,
        "resent": 2,
        "failed": 0,
    }
    # Jobs behind a backlog are not lost messages: a gauge of their own, not a re-send.
    assert REGISTRY.get_sample_value("t2v_worker_sweep_jobs_waiting") == 1


@pytest.mark.slow
def test_a_worker_metrics_directory_is_fresh_and_stale_ones_go(tmp_path: Path) -> None:
    """``enable`` puts a process in multiprocess mode on a new private directory, and removes
    the directories of workers that were killed (their process is gone)."""
    stale = tmp_path / "t2v-worker-metrics-999999999-abc"
    live = tmp_path / f"t2v-worker-metrics-{os.getpid()}-abc"
    stale.mkdir()
    live.mkdir()
    code = (
        "from app.observability import multiprocess\n"
        "print(multiprocess.enable('worker'))\n"
        "from prometheus_client import values\n"
        "print(values.ValueClass.__name__)\n"
    )
    made, value_class = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert value_class == "MmapedValue"
    assert Path(made).parent == tmp_path
    assert Path(made).name.startswith("t2v-worker-metrics-")
    assert (Path(made).stat().st_mode & 0o777) == 0o700
    assert not stale.exists()
    assert live.exists()
    with pytest.raises(RuntimeError, match="imported before"):  # this process already did
        multiprocess.enable("worker")
