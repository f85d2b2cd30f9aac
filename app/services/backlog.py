"""Which queued jobs' messages still wait in the broker, not yet delivered to any worker.

The sweep re-sends a job queued for long, since a broker may have lost its message (a Redis
restarted without persistence, a worker killed between receiving a message and claiming its
job). Under load most such jobs are not lost: they wait behind a backlog, and a re-send only
doubles the backlog. So before re-sending, the sweep looks into the broker: a job whose
message is in its queue is *waiting*, left alone; one whose message is not is *lost*, re-sent.

Redis queues are lists and the embedded broker's a table: both can be read without taking a
message. Another broker cannot be looked into (``None``), and the sweep goes by time alone.
A queue longer than ``MAX_READ`` messages is not read through: a backlog that long holds every
job of its kind that is queued (the sweep looks again once it has shrunk).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from app.services.queue import EMBEDDED, celery_for

#: Messages read from one queue at most, per sweep.
MAX_READ = 10_000


@dataclass(frozen=True)
class Backlog:
    """Jobs whose message waits in the queues read, and the queues too long to read."""

    jobs: frozenset[str]
    unread: frozenset[str] = frozenset()

    def holds(self, job_id: str, queue: str) -> bool:
        return queue in self.unread or job_id in self.jobs


def job_of(message: str | bytes) -> str | None:
    """The job id a Celery message carries (its first argument), or None."""
    try:
        envelope = json.loads(message)
        body: Any = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        args = decoded.get("args") if isinstance(decoded, dict) else decoded[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def read(broker_url: str, queues: Iterable[str]) -> Backlog | None:
    """The messages waiting in ``queues``; None for a broker that cannot be looked into.
    The broker's errors are raised."""
    read_queue: Callable[[Any, str], Sequence[str | bytes] | None]
    if broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        read_queue = _redis_queue
    elif broker_url.startswith(("sqla+", EMBEDDED)):
        read_queue = _table_queue
    else:
        return None
    jobs: set[str] = set()
    unread: set[str] = set()
    with celery_for(broker_url).connection_for_read() as connection:
        channel = connection.default_channel
        for queue in sorted(set(queues)):
            messages = read_queue(channel, queue)
            if messages is None:
                unread.add(queue)
            else:
                jobs.update(j for j in map(job_of, messages) if j is not None)
    return Backlog(frozenset(jobs), frozenset(unread))


def _redis_queue(channel: Any, queue: str) -> list[bytes] | None:
    """A Redis queue is a list of messages (a message a worker took is no longer in it)."""
    client = channel.client
    if client.llen(queue) > MAX_READ:
        return None
    messages: list[bytes] = client.lrange(queue, 0, MAX_READ - 1)
    return messages


def _table_queue(channel: Any, queue: str) -> list[str] | None:
    """kombu's SQLAlchemy transport keeps a message a worker took, made invisible."""
    session = channel.session
    try:
        found = session.query(channel.queue_cls).filter_by(name=queue).first()
        if found is None:
            return []
        message = channel.message_cls
        waiting = session.query(message.payload).filter(
            message.queue_id == found.id, message.visible.is_(True)
        )
        if waiting.count() > MAX_READ:
            return None
        return [payload for (payload,) in waiting.limit(MAX_READ)]
    finally:
        session.rollback()  # no read transaction left open on the broker's database
