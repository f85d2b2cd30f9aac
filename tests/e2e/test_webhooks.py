"""Signed webhooks: a job's view POSTed to its ``callback_url`` when it ends, by a real worker
process, to a real HTTP receiver on loopback; the signature, retries, giving up, the sweep's
re-send of a lost message, and the guard on callback URLs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from task2vec_client.webhooks import WebhookVerificationError, verify
from typer.testing import CliRunner

from app.api.main import create_app
from app.cli import app as cli
from app.db.models import (
    DeliveryStatus,
    WebhookDelivery,
    WebhookSecret,
)
from app.db.session import session_scope
from app.services import webhooks
from app.settings import Settings
from tests.helpers import (
    eventually,
    fresh_database,
    npz_upload,
    service_settings,
    stop,
    worker_env,
)
from tests.receiver import Receiver, receiving

pytestmark = pytest.mark.slow

BASE = 0.3  # the first retry's delay in these tests, seconds


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as running:
        yield running


@pytest.fixture(scope="module")
def live(
    tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[tuple[Settings, TestClient]]:
    """The API in-process and a real worker process, on SQLite, callbacks to loopback allowed
    (the receiver's waits end at once if the worker exits)."""
    tmp = tmp_path_factory.mktemp("webhooks")
    with fresh_database("sqlite", tmp) as url:
        settings = service_settings(tiny_zoo, url, tmp).model_copy(
            update={"allow_private_urls": True, "webhook_retry_base_seconds": BASE}
        )
        env = worker_env(
            settings, T2V_ALLOW_PRIVATE_URLS="true", T2V_WEBHOOK_RETRY_BASE_SECONDS=str(BASE)
        )
        log = tmp / "worker.log"
        with log.open("ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        receiver.senders = [worker]
        try:
            with TestClient(create_app(settings)) as client:
                yield settings, client
        finally:
            receiver.senders = []
            stop(worker)


def _delivery(settings: Settings, job_id: str) -> WebhookDelivery | None:
    with session_scope(settings.resolved_database_url()) as session:
        row: WebhookDelivery | None = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        )
        return row


def _settled(settings: Settings, job_id: str) -> WebhookDelivery:
    """The job's delivery once the worker has recorded its outcome (delivered or failed)."""

    def settled() -> WebhookDelivery | None:
        row = _delivery(settings, job_id)
        return row if row is not None and row.status != DeliveryStatus.pending else None

    return eventually(settled, f"the delivery of {job_id} to settle")


def test_a_job_that_succeeded_delivers_its_view_signed(
    live: tuple[Settings, TestClient], receiver: Receiver
) -> None:
    settings, client = live
    hook = receiver.plan("/done")
    answer = client.post(
        "/v1/tasks", params={"callback_url": hook}, files={"file": ("a.npz", npz_upload(1))}
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    (got,) = receiver.wait("/done", 1)
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "succeeded"
    assert json.loads(got.body) == view  # the same document as GET /v1/jobs/{id}
    assert got.headers["X-T2V-Event"] == "job.succeeded"
    row = _settled(settings, job_id)
    assert got.headers["X-T2V-Delivery"] == row.id
    assert (row.status, row.attempts, row.last_status) == ("delivered", 1, 200)
    assert row.delivered_at is not None
    assert row.last_error is None

    env = {
        "T2V_DATA_DIR": str(settings.data_dir),
        "T2V_DATABASE_URL": settings.resolved_database_url(),
    }
    printed = CliRunner().invoke(cli, ["keys", "webhook-secret", "--tenant", "local"], env=env)
    assert printed.exit_code == 0, printed.output
    secret = printed.stdout.strip()
    with session_scope(settings.resolved_database_url()) as session:
        stored = session.get(WebhookSecret, "local")
        assert stored is not None
        assert stored.secret == secret  # printed, not made anew
    signature = got.headers["X-T2V-Signature"]
    verify(got.body, signature, secret, now=got.at_unix)  # as a receiver checks it on arrival
    sent_at = int(signature.split(",")[0].removeprefix("t="))
    with pytest.raises(WebhookVerificationError, match="tolerance"):  # replayed 5 min later
        verify(got.body, signature, secret, now=sent_at + 301)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(got.body.replace(b'"succeeded"', b'"failed"'), signature, secret)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(got.body, signature, webhooks.new_secret())


def test_a_receiver_that_fails_twice_gets_the_third_try(
    live: tuple[Settings, TestClient], receiver: Receiver
) -> None:
    settings, client = live
    hook = receiver.plan("/flaky", 500, 503)
    answer = client.post(
        "/v1/tasks", params={"callback_url": hook}, files={"file": ("b.npz", npz_upload(2))}
    )
    job_id = answer.json()["job_id"]
    tries = receiver.wait("/flaky", 3)
    assert [t.answered for t in tries] == [500, 503, 200]
    assert len({t.headers["X-T2V-Delivery"] for t in tries}) == 1  # one delivery, three tries
    assert len({t.body for t in tries}) == 1
    row = _settled(settings, job_id)
    assert (row.status, row.attempts, row.last_status) == ("delivered", 3, 200)
    assert receiver.count("/flaky") == 3  # delivered once: no try after the 200


def test_a_job_that_failed_delivers_too(
    live: tuple[Settings, TestClient], receiver: Receiver
) -> None:
    """An expert whose weights do not load: its job fails, and calls back."""
    settings, client = live
    hook = receiver.plan("/failed")
    form = {
        "name": "junk",
        "architecture": "cnn-4x1",
        "input_size": "28",
        "weights_uri": f"{receiver.base}/junk.pt",
    }
    answer = client.post("/v1/experts", params={"callback_url": hook}, data=form)
    assert answer.status_code == 202, answer.text
    (got,) = receiver.wait("/failed", 1)
    assert got.headers["X-T2V-Event"] == "job.failed"
    view = json.loads(got.body)
    assert view["id"] == answer.json()["job_id"]
    assert view["status"] == "failed"
    assert view["error"]["status"] == 422
    assert _settled(settings, view["id"]).status == "delivered"
