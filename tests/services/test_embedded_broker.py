"""The embedded broker (kombu's SQLAlchemy transport on a SQLite file) gives back the space
of the messages it delivered: a real broker file, filled and drained through the transport,
shrinks once a worker's periodic compaction has run."""

from __future__ import annotations

from pathlib import Path
from queue import Empty

from app.services import queue

PAYLOAD = "x" * 8192
MESSAGES = 600


def _fill_and_drain(broker: str) -> None:
    celery = queue.celery_for(broker)
    for i in range(MESSAGES):
        celery.send_task(queue.DELIVERY_TASK, args=[f"{i}", PAYLOAD], queue=queue.WEBHOOK_QUEUE)
    drained = 0
    with celery.connection_for_read() as connection:
        waiting = connection.SimpleQueue(queue.WEBHOOK_QUEUE)
        try:
            while True:
                try:
                    message = waiting.get_nowait()
                except Empty:
                    break
                message.ack()
                drained += 1
        finally:
            waiting.close()
    assert drained == MESSAGES


def test_the_embedded_broker_file_shrinks_once_its_messages_are_consumed(
    tmp_path: Path,
) -> None:
    database = tmp_path / "broker.db"
    broker = queue.EMBEDDED + str(database)
    _fill_and_drain(broker)
    full = database.stat().st_size
    assert full > MESSAGES * len(PAYLOAD)  # every delivered message is still a row
    queue.compact_embedded(database)
    assert database.stat().st_size < full / 4

    _fill_and_drain(broker)  # the space is used again, and given back again
    queue.compact_embedded(database)
    assert database.stat().st_size < full / 4


def test_a_worker_on_the_embedded_broker_compacts_it_periodically(tmp_path: Path) -> None:
    steps = queue.celery_for(queue.EMBEDDED + str(tmp_path / "broker.db")).steps["consumer"]
    assert queue.CompactEmbeddedBroker in steps
    assert (
        queue.CompactEmbeddedBroker
        not in queue.celery_for("redis://127.0.0.1:1/0").steps["consumer"]
    )
