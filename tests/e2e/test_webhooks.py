"""Signed webhooks: a job's view POSTed to its ``callback_url`` when it ends, by a real worker
process, to a real HTTP receiver on loopback; the signature, retries, giving up, the sweep's
re-send of a lost message, and the guard on callback URLs."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from task2vec_client.webhooks import WebhookVerificationError, verify
from typer.testing import CliRunner

from app.api.main import create_app
from app.cli import app as cli
from app.db.models import DeliveryStatus, Job, JobStatus, WebhookDelivery, WebhookSecret
from app.db.session import session_scope
from app.services import deliveries, jobs, leases, queue, webhooks
from app.services.jobs import JobKind
from app.settings import Settings
from tests.helpers import fresh_database, npz_upload, service_settings, stop, worker_env
from tests.receiver import Receiver, receiving

BASE = 0.3  # the first retry's delay in these tests, seconds


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as running:
        yield running


@pytest.fixture(scope="module")
def live(
    tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, TestClient]]:
    """The API in-process and a real worker process, on SQLite, callbacks to loopback allowed."""
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
        try:
            with TestClient(create_app(settings)) as client:
                yield settings, client
        finally:
            stop(worker)


def _delivery(settings: Settings, job_id: str) -> WebhookDelivery | None:
    with session_scope(settings.resolved_database_url()) as session:
        row: WebhookDelivery | None = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        )
        return row


def _settled(settings: Settings, job_id: str, timeout: float = 30) -> WebhookDelivery:
    """The job's delivery once it is no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        row = _delivery(settings, job_id)
        if row is not None and row.status != DeliveryStatus.pending:
            return row
        assert time.monotonic() < deadline, f"delivery of {job_id}: {row and row.status}"
        time.sleep(0.1)


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
    verify(got.body, signature, secret)
    sent_at = int(signature.split(",")[0].removeprefix("t="))
    assert abs(sent_at - time.time()) < 120
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
    assert tries[1].at - tries[0].at >= BASE * 0.9  # backing off: base, then twice as long
    assert tries[2].at - tries[1].at >= 2 * BASE * 0.9
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


def test_a_callback_to_an_internal_address_is_refused(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    assert not settings.allow_private_urls
    hook = {"callback_url": "http://127.0.0.1:9/hook"}
    refused = client.post("/v1/tasks", params=hook, files={"file": ("a.npz", npz_upload(1))})
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["type"].endswith("/invalid-callback-url")
    assert problem["detail"].startswith("callback_url: ")
    assert "address is not allowed" in problem["detail"]
    assert problem["errors"][0]["location"] == ["query", "callback_url"]
    expert = {"name": "e", "architecture": "cnn-4x1", "input_size": "28", "weights_uri": "x"}
    for url in ("http://127.0.0.1:9/hook", "ftp://example.org/hook", "http:///no-host"):
        answer = client.post("/v1/experts", params={"callback_url": url}, data=expert)
        assert answer.status_code == 422
        assert answer.json()["type"].endswith("/invalid-callback-url")
    with session_scope(settings.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert sent == []


def test_sign_and_verify() -> None:
    body, secret, moment = b'{"id":"j1","status":"succeeded"}', "whsec_test", 1_700_000_000
    header = webhooks.sign(body, secret, moment)
    expected = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    verify(body, header, secret, now=moment + 299)
    verify(body, header, secret, now=moment - 299)
    verify(body, f"t={moment},v1={'0' * 64},v1={expected}", secret, now=moment)  # rotation
    for now in (moment + 301, moment - 301):
        with pytest.raises(WebhookVerificationError, match="tolerance"):
            verify(body, header, secret, now=now)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(body, header, secret, tolerance=10, now=moment + 11)
    later = webhooks.sign(body, secret, moment + 1000)  # a new timestamp is a new signature
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(body, f"t={moment},{later.split(',')[1]}", secret, now=moment)
    for bad in ("", f"v1={expected}", f"t={moment}", f"t=soon,v1={expected}"):
        with pytest.raises(WebhookVerificationError):
            verify(body, bad, secret, now=moment)
    assert webhooks.new_secret() != webhooks.new_secret()


def _ended_job(settings: Settings, url: str, status: JobStatus = JobStatus.succeeded) -> str:
    """A job with ``url`` to call back, ended with no message sent (as if the broker lost it)."""
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.create(
            session, kind=JobKind.expert, task_id=None, tenant="acme", callback_url=url, expert="x"
        )
        assert jobs.end(session, job.id, status=status, broker_url=None, result={"ok": 1})
        assert not jobs.end(session, job.id, status=status, broker_url=None)  # ends once
        return job.id


def test_the_sweep_resends_lost_messages_and_tries_are_recorded(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = settings.model_copy(
        update={
            "allow_private_urls": True,
            "webhook_resend_seconds": 0.5,
            "webhook_retry_base_seconds": 60.0,
        }
    )
    messages: list[str] = []
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: messages.append(d))
    job_id = _ended_job(quick, receiver.plan("/gone", 404))
    lost = _delivery(quick, job_id)
    assert lost is not None
    assert (lost.event, lost.attempts, lost.tenant) == ("job.succeeded", 0, "acme")
    assert leases.sweep(quick).deliveries == []  # not overdue yet
    time.sleep(0.6)
    assert leases.sweep(quick).deliveries == [lost.id]
    assert leases.sweep(quick).deliveries == []  # marked due now: not again at once
    assert messages == [lost.id]

    assert deliveries.attempt(quick, lost.id) is None  # 404: given up, recorded
    gone = _delivery(quick, job_id)
    assert gone is not None
    assert (gone.status, gone.attempts, gone.last_status) == ("failed", 1, 404)
    assert gone.last_error == "answered 404"
    tried = receiver.count("/gone")
    assert deliveries.attempt(quick, lost.id) is None  # no second try
    assert receiver.count("/gone") == tried

    busy = _ended_job(quick, receiver.plan("/busy", 429), JobStatus.failed)
    row = _delivery(quick, busy)
    assert row is not None
    assert deliveries.attempt(quick, row.id) == 60.0  # retried after the base delay
    assert deliveries.attempt(quick, row.id) is None  # a duplicate message, before it is due
    retried = _delivery(quick, busy)
    assert retried is not None
    assert (retried.status, retried.attempts, retried.last_status) == ("pending", 1, 429)
    impatient = quick.model_copy(update={"webhook_give_up_seconds": 30.0})
    down = _ended_job(impatient, receiver.plan("/down", 502))
    row = _delivery(impatient, down)
    assert row is not None
    assert deliveries.attempt(impatient, row.id) is None  # the next try would come too late
    given_up = _settled(impatient, down)
    assert (given_up.status, given_up.attempts, given_up.last_status) == ("failed", 1, 502)

    stale = _ended_job(quick, receiver.plan("/never"))  # its message lost, for over a day
    time.sleep(0.6)
    brief = quick.model_copy(update={"webhook_give_up_seconds": 0.5})
    assert leases.sweep(brief).deliveries == []  # too late to send: given up instead
    dropped = _settled(brief, stale, timeout=0)
    assert (dropped.status, dropped.attempts) == ("failed", 0)
    assert (dropped.last_error or "").startswith("given up")
    assert messages == [lost.id]


def test_a_lost_job_and_an_unsent_one_owe_their_delivery(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep giving up on a job, and the API failing a job the broker refused, end the
    job through the same door: its delivery is staged with it."""
    messages: list[str] = []
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: messages.append(d))
    quick = settings.model_copy(update={"job_lease_seconds": 0.2, "job_max_attempts": 1})
    with session_scope(quick.resolved_database_url()) as session:
        job = jobs.create(
            session, kind=JobKind.rank, task_id=None, tenant="local", callback_url="http://h/"
        )
        job_id = job.id
    assert leases.claim(quick, job_id) == 1
    time.sleep(0.3)  # its worker died
    assert leases.sweep(quick).failed == [job_id]
    row = _delivery(quick, job_id)
    assert row is not None
    assert row.event == "job.failed"
    assert messages == [row.id]

    def refuse(job_id: str, kind: JobKind, broker: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "dispatch", refuse)
    open_ = settings.model_copy(update={"allow_private_urls": True})
    with TestClient(create_app(open_)) as api:
        answer = api.post(
            "/v1/tasks",
            params={"callback_url": "http://127.0.0.1:9/hook"},
            files={"file": ("a.npz", npz_upload(1))},
        )
    assert answer.status_code == 503
    with session_scope(quick.resolved_database_url()) as session:
        unsent: Any = session.execute(
            select(Job.status, WebhookDelivery.event)
            .join(WebhookDelivery, WebhookDelivery.job_id == Job.id)
            .where(Job.kind == JobKind.embed)
        ).one()
    assert tuple(unsent) == ("failed", "job.failed")
    assert messages == [row.id]  # the refusing broker is not asked again: the sweep sends it
