"""Checking a webhook from the service before trusting it.

The service POSTs a job's view to a job's ``callback_url`` when the job ends, with three
headers: ``X-T2V-Event`` (``job.succeeded`` or ``job.failed``), ``X-T2V-Delivery`` (the same
id on every retry of one delivery: skip ids already handled) and ``X-T2V-Signature``
(``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``, keyed with the tenant's secret from
``task2vec keys webhook-secret --tenant NAME``).

    from task2vec_client.webhooks import WebhookVerificationError, verify

    try:
        verify(raw_body, request.headers["X-T2V-Signature"], secret)
    except WebhookVerificationError:
        return 400

Verify the raw bytes received, before parsing them: the signature covers the body as sent.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-T2V-Signature"
DELIVERY_HEADER = "X-T2V-Delivery"
EVENT_HEADER = "X-T2V-Event"


class WebhookVerificationError(ValueError):
    """The delivery is not to be trusted: a malformed or missing signature, one that does not
    match the body and secret, or a timestamp outside the tolerance (a replay)."""


def _parts(header: str) -> tuple[int, list[str]]:
    """The timestamp and the ``v1`` signatures of a signature header."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            # At most 12 ASCII digits: ``int`` would also read other scripts' digits, and
            # refuses thousands of them with a ValueError of its own.
            if not (value.isascii() and value.isdigit() and len(value) <= 12):
                raise WebhookVerificationError(f"the timestamp {value[:20]!r} is not a number")
            timestamp = int(value)
        elif name == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise WebhookVerificationError("the signature header has no t=... or no v1=...")
    return timestamp, signatures


def verify(
    body: bytes, header: str, secret: str, tolerance: int = 300, now: float | None = None
) -> None:
    """Return if ``header`` signs ``body`` with ``secret`` at a time within ``tolerance``
    seconds of ``now`` (default: the clock); else raise ``WebhookVerificationError``.

    The signature is compared in constant time. The tolerance bounds how long a captured
    delivery could be replayed; a receiver that also remembers the ``X-T2V-Delivery`` ids
    it handled is safe from replays within it too."""
    timestamp, signatures = _parts(header)
    signed = str(timestamp).encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
    # Compared as bytes: a header may hold any character, and ``compare_digest`` refuses
    # strings with non-ASCII ones.
    if not any(hmac.compare_digest(expected, s.encode()) for s in signatures):
        raise WebhookVerificationError("the signature does not match the body and secret")
    moment = time.time() if now is None else now
    if abs(moment - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"the signature's timestamp is {moment - timestamp:.0f} s away from now, beyond "
            f"the tolerance of {tolerance} s: a replayed delivery?"
        )
