"""Webhook signatures: what a receiver checks to know a delivery came from this service and
was not replayed.

A delivery carries ``X-T2V-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``
keyed with its tenant's secret. The timestamp is inside the signed text, so a receiver that
refuses old timestamps also refuses a captured delivery sent again later; the body is signed
as sent, byte for byte, so the receiver verifies the raw body before parsing it. Receivers use
``task2vec_client.webhooks.verify``, which mirrors ``sign``.

Pure functions of their arguments: no database, no network, no clock unless asked.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SIGNATURE_HEADER = "X-T2V-Signature"
DELIVERY_HEADER = "X-T2V-Delivery"
EVENT_HEADER = "X-T2V-Event"
#: Secrets start so, to be told apart from API keys (``t2v_``) in configuration files.
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret: 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(body: bytes, secret: str, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"`` keyed with ``secret``."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``X-T2V-Signature`` value for ``body``, at ``timestamp`` (default: now)."""
    moment = int(time.time()) if timestamp is None else timestamp
    return f"t={moment},v1={digest(body, secret, moment)}"
