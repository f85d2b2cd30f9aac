"""Webhook deliveries: a job's view POSTed to its ``callback_url`` once it ended.

``jobs.end`` stages a delivery row with the job's terminal status and sends its message; a
worker then makes one try per message (``attempt``) and, for an answer worth retrying, has
Celery send the next message after the delay this returns. The row records every try: how
many, the last status and error, when it was delivered. A try:

- claims the row under a short lease, so that two messages for one delivery (a re-send, a
  broker's redelivery) never POST at once, and a message that comes before the delivery is
  due, or after it ended, is dropped;
- signs the body with the tenant's secret (``webhooks.sign``) and POSTs it through the
  outbound guard, checked again now (``outbound.post``: the connection goes to the address
  checked, no redirect is followed, short timeouts);
- records the outcome: 2xx delivered; 408, 429, 5xx, a timeout or a connection error
  retried after ``webhook_retry_base_seconds`` doubling each time (at most ``MAX_DELAY``)
  until ``webhook_give_up_seconds`` after the job ended; anything else (another 4xx, a 3xx,
  a refused address, a URL that is not valid) given up at once, since trying again would get
  the same answer.

A receiver dedupes by the ``X-T2V-Delivery`` id: a try whose answer was lost (the worker died
between the POST and the record) is made again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from app.db.models import (
    DeliveryStatus,
    Job,
    WebhookDelivery,
    WebhookSecret,
    as_utc,
    utcnow,
)
from app.db.session import session_scope, updated
from app.services import jobs, outbound, queue, webhooks
from app.services.outbound import NotAllowedError, OutboundError, Policy
from app.settings import Settings

log = logging.getLogger(__name__)

#: The longest wait between two tries, in seconds.
MAX_DELAY = 3600.0
#: Answers worth another try, besides 5xx: request timeout, too many requests.
RETRIED = frozenset({408, 429})
#: Deliveries the sweep sends again at most per round (the rest wait for the next round).
RESEND_BATCH = 100
#: A message may come this early (seconds; clocks of machines differ) and still be its try.
EARLY = 1.0


def tenant_of(settings: Settings, delivery_id: str) -> str | None:
    """The tenant a delivery is for (None: no such delivery)."""
    with session_scope(settings.resolved_database_url()) as session:
        row = session.get(WebhookDelivery, delivery_id)
        return None if row is None else row.tenant


def policy(settings: Settings) -> Policy:
    """How callback URLs are reached: the outbound guard, with the webhook timeout."""
    return Policy(
        max_bytes=0,
        deadline_seconds=settings.webhook_timeout_seconds,
        allowed=outbound.allowed_by(settings),
    )


def check_url(settings: Settings, url: str) -> None:
    """Raise ``OutboundError`` unless ``url`` may be called back (when a job is asked for)."""
    outbound.check(url, policy(settings))


def secret_for(settings: Settings, tenant: str) -> str:
    """The tenant's signing secret, created on first use (by its first delivery, or by
    ``task2vec keys webhook-secret``); of two processes creating it at once, one wins and
    both return its secret."""
    if not tenant or len(tenant) > 64 or not tenant.replace("-", "").replace("_", "").isalnum():
        raise ValueError("a tenant is 1-64 letters, digits, '-' or '_'")
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        row = session.get(WebhookSecret, tenant)
        if row is not None:
            return row.secret
    try:
        with session_scope(url) as session:
            row = WebhookSecret(tenant=tenant, secret=webhooks.new_secret())
            session.add(row)
        return row.secret
    except IntegrityError:
        with session_scope(url) as session:
            won = session.get(WebhookSecret, tenant)
            assert won is not None
            return won.secret


@dataclass(frozen=True)
class _Try:
    """A claimed try: its number, where to, what to send."""

    number: int
    url: str
    event: str
    tenant: str
    body: bytes
    created_at: datetime


def _claim(settings: Settings, delivery_id: str, now: datetime) -> _Try | None:
    """Claim the delivery for one try, if it is pending, due and no other try is under way.

    A retry is due at ``next_attempt_at``, set by the worker that sent its message with that
    countdown: an earlier message for it is a duplicate (Redis hands a message held past its
    visibility timeout, as a long countdown is, to a second worker) and is dropped. The first
    try is due at once, whichever machine's clock staged it."""
    lease = now + timedelta(seconds=3 * settings.webhook_timeout_seconds + 30)
    free = or_(WebhookDelivery.sending_until.is_(None), WebhookDelivery.sending_until < now)
    due = or_(
        WebhookDelivery.attempts == 0,
        WebhookDelivery.next_attempt_at <= now + timedelta(seconds=EARLY),
    )
    with session_scope(settings.resolved_database_url()) as session:
        done = updated(
            session,
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.pending,
                due,
                free,
            )
            .values(sending_until=lease, attempts=WebhookDelivery.attempts + 1),
        )
        if done == 0:
            return None
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        job = session.get(Job, row.job_id)
        assert job is not None
        body = json.dumps(jobs.view(job), separators=(",", ":")).encode()
        return _Try(row.attempts, row.url, row.event, row.tenant, body, as_utc(row.created_at))


#: Outcomes of a try, as the workers' metrics count them.
DELIVERED, RETRYING, FAILED, DROPPED = "delivered", "retried", "failed", "dropped"


@dataclass(frozen=True)
class Outcome:
    """What a try came to (``DELIVERED``, ...) and the seconds until the next, if any."""

    name: str
    delay: float | None


def attempt(settings: Settings, delivery_id: str, now: datetime | None = None) -> float | None:
    """One try at a delivery; the seconds until the next one, or None when there is none to
    make (delivered, given up, or the message was not this try's: a duplicate, too early).
    Whether it is due is judged at ``now``, the clock's time unless given."""
    return try_once(settings, delivery_id, now).delay


def try_once(settings: Settings, delivery_id: str, now: datetime | None = None) -> Outcome:
    """``attempt``, telling what the try came to."""
    claimed = _claim(settings, delivery_id, now or utcnow())
    if claimed is None:
        log.info("webhook delivery %s: not pending and due; message dropped", delivery_id)
        return Outcome(DROPPED, None)
    headers = {
        webhooks.SIGNATURE_HEADER: webhooks.sign(
            claimed.body, secret_for(settings, claimed.tenant)
        ),
        webhooks.DELIVERY_HEADER: delivery_id,
        webhooks.EVENT_HEADER: claimed.event,
    }
    status: int | None = None
    error: str | None = None
    retry = False
    try:
        status = outbound.post(claimed.url, claimed.body, headers, policy(settings))
        retry = status in RETRIED or status >= 500
        error = None if 200 <= status < 300 else f"answered {status}"
    except NotAllowedError as exc:
        error = str(exc)
    except OutboundError as exc:  # timed out, refused, reset, does not resolve
        error, retry = str(exc), True
    return _record(settings, delivery_id, claimed, status, error, retry)


def _record(
    settings: Settings,
    delivery_id: str,
    claimed: _Try,
    status: int | None,
    error: str | None,
    retry: bool,
) -> Outcome:
    """Write the try's outcome (unless a later try took the row over), and log it: a try
    that failed is a warning."""
    now = utcnow()
    values: dict[str, object] = {
        "last_status": status,
        "last_error": None if error is None else error[:1000],
        "sending_until": None,
    }
    delay: float | None = None
    if error is None:
        values.update(status=DeliveryStatus.delivered, delivered_at=now)
    elif retry:
        delay = min(settings.webhook_retry_base_seconds * 2 ** (claimed.number - 1), MAX_DELAY)
        deadline = claimed.created_at + timedelta(seconds=settings.webhook_give_up_seconds)
        if now + timedelta(seconds=delay) > deadline:
            delay = None
            values["status"] = DeliveryStatus.failed
        else:
            values["next_attempt_at"] = now + timedelta(seconds=delay)
    else:
        values["status"] = DeliveryStatus.failed
    with session_scope(settings.resolved_database_url()) as session:
        updated(
            session,
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.pending,
                WebhookDelivery.attempts == claimed.number,
            )
            .values(**values),
        )
    outcome = values.get("status", f"retried in {delay} s")
    log.log(
        logging.INFO if error is None else logging.WARNING,
        "webhook delivery %s: try %d: %s (%s)",
        delivery_id,
        claimed.number,
        outcome,
        error or status,
    )
    name = DELIVERED if error is None else RETRYING if delay is not None else FAILED
    return Outcome(name, delay)


def resend_lost(settings: Settings, now: datetime) -> list[str]:
    """Send again the messages of pending deliveries overdue by ``webhook_resend_seconds``
    with no try under way (the broker lost the message, or the worker died mid-try); at most
    ``RESEND_BATCH`` a round. Each is marked due now first (a conditional UPDATE: of several
    sweeps only one sends), so it is not sent again before another period has passed.

    One still pending past ``webhook_give_up_seconds`` is given up instead: its tries kept
    failing before they could record why (so no try ended it), and re-sending it for ever
    would only repeat that."""
    overdue = now - timedelta(seconds=settings.webhook_resend_seconds)
    free = or_(WebhookDelivery.sending_until.is_(None), WebhookDelivery.sending_until < now)
    stale = now - timedelta(seconds=settings.webhook_give_up_seconds)
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        updated(
            session,
            update(WebhookDelivery)
            .where(
                WebhookDelivery.status == DeliveryStatus.pending,
                WebhookDelivery.created_at < stale,
                free,
            )
            .values(
                status=DeliveryStatus.failed,
                last_error="given up: not delivered in time, and its last try left no outcome",
            ),
        )
    lost = (
        WebhookDelivery.status == DeliveryStatus.pending,
        WebhookDelivery.next_attempt_at < overdue,
        free,
    )
    with session_scope(url) as session:
        ids = session.scalars(
            select(WebhookDelivery.id)
            .where(*lost)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(RESEND_BATCH)
        ).all()
    resent = []
    for delivery_id in ids:
        with session_scope(url) as session:
            won = updated(
                session,
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, *lost)
                .values(next_attempt_at=now),
            )
        if won:
            queue.send_delivery(delivery_id, settings.resolved_broker_url())
            resent.append(delivery_id)
    return resent
