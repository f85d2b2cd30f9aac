"""Reading the broker's queues without taking a message: real messages sent through Celery to
the embedded broker (a SQLite file of the test's own) and to the shared Redis (a queue name of
the test's own, removed after). The drill with workers and a kill is
``tests/drills/test_backlog.py``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.services import backlog
from app.services.jobs import EMBED_QUEUE
from app.services.queue import celery_for

#: The shared Redis, in a database no other test uses.
REDIS_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture(params=["embedded", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A broker URL and a queue of this test's own on it."""
    if request.param == "embedded":
        yield f"sqla+sqlite:///{tmp_path / 'broker.db'}", EMBED_QUEUE
        return
    queue = f"t2v-test-{uuid.uuid4().hex[:12]}"
    try:
        yield REDIS_URL, queue
    finally:
        with celery_for(REDIS_URL).connection_for_write() as connection:
            connection.default_channel.client.delete(queue)


def _send(broker_url: str, queue: str, job_id: str) -> None:
    celery_for(broker_url).send_task("t2v.embed", args=[job_id], queue=queue)


def test_a_waiting_message_names_its_job_and_a_taken_one_does_not(
    broker: tuple[str, str],
) -> None:
    url, queue = broker
    _send(url, queue, "job-a")
    _send(url, queue, "job-b")
    found = backlog.read(url, [queue])
    assert found is not None
    assert found.jobs == {"job-a", "job-b"}
    assert found.holds("job-a", queue)
    assert not found.holds("job-c", queue)

    with celery_for(url).connection_for_write() as connection:  # a worker holds the first
        assert connection.default_channel.basic_get(queue, no_ack=False) is not None
        held = backlog.read(url, [queue])
    assert held is not None
    assert held.jobs == {"job-b"}
    # A connection closed without an acknowledgement gives its message back: waiting again.
    again = backlog.read(url, [queue])
    assert again is not None
    assert again.jobs == {"job-a", "job-b"}


def test_a_queue_too_long_to_read_holds_every_job(
    broker: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, queue = broker
    monkeypatch.setattr(backlog, "MAX_READ", 2)
    for n in range(3):
        _send(url, queue, f"job-{n}")
    found = backlog.read(url, [queue])
    assert found is not None
    assert found.unread == {queue}
    assert found.holds("any job at all", queue)


def test_a_broker_that_cannot_be_looked_into_gives_no_backlog() -> None:
    assert backlog.read("amqp://guest:guest@127.0.0.1:1//", [EMBED_QUEUE]) is None


@pytest.mark.parametrize("message", [b"", b"not json", b'{"body": 3}', b'{"body": "[[], {}]"}'])
def test_a_message_that_names_no_job_is_none(message: bytes) -> None:
    assert backlog.job_of(message) is None
