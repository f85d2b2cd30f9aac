"""Idempotency-Key records expire: a key older than its time is free again, and the sweep
deletes such records."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.db.models import IdempotencyRecord, utcnow
from app.db.session import session_scope
from app.settings import Settings
from tests.helpers import npz_upload


def _age(settings: Settings, hours: float) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        session.execute(
            update(IdempotencyRecord).values(created_at=utcnow() - timedelta(hours=hours))
        )


def _records(settings: Settings) -> int:
    with session_scope(settings.resolved_database_url()) as session:
        return int(session.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0)


def test_an_idempotency_key_is_free_again_after_a_day(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    key = {"Idempotency-Key": "nightly-1"}
    first = client.post("/v1/tasks", headers=key, files={"file": ("a.npz", npz_upload(1))})
    assert first.status_code == 202
    other = client.post("/v1/tasks", headers=key, files={"file": ("b.npz", npz_upload(2))})
    assert other.status_code == 422  # the key holds the first request
    _age(settings, 25)
    again = client.post("/v1/tasks", headers=key, files={"file": ("b.npz", npz_upload(2))})
    assert again.status_code == 202, again.text
    assert "idempotent-replayed" not in again.headers
    assert _records(settings) == 1  # the expired record gave way to the new one
