"""Webhook signatures: what the service signs is what a receiver's verify accepts, within its
tolerance, and nothing else."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from task2vec_client.webhooks import WebhookVerificationError, verify

from app.services import webhooks


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
