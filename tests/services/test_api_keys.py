"""API keys below HTTP (``app.services.api_keys``): a key is created, authenticates as its
tenant and scopes, and stops working once revoked; the database keeps only the sha256 of its
secret (a leaked table reveals no usable token); a wrong secret, a malformed token, an unknown
or revoked key all authenticate as nobody; the listing holds every key, oldest first.

These are the promises every authenticated route rests on, so they are checked on both
databases, with the service functions called directly on a session."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect

from app.db.models import ApiKey
from app.db.session import session_scope
from app.services import api_keys
from app.services.api_keys import PREFIX, Caller
from app.settings import Settings


def _create(settings: Settings, tenant: str, scopes: list[str], **kw: str) -> tuple[str, str]:
    with session_scope(settings.resolved_database_url()) as session:
        row, token = api_keys.create(session, tenant=tenant, scopes=scopes, **kw)
        return row.id, token


def _authenticate(settings: Settings, token: str) -> Caller | None:
    with session_scope(settings.resolved_database_url()) as session:
        return api_keys.authenticate(session, token=token)


def _revoke(settings: Settings, key_id: str) -> bool:
    with session_scope(settings.resolved_database_url()) as session:
        return api_keys.revoke(session, key_id=key_id)


def test_a_key_authenticates_as_its_tenant_until_revoked(settings: Settings) -> None:
    key_id, token = _create(
        settings, "acme", ["tasks:write", "tasks:read", "tasks:read"], name="ci"
    )
    assert token.startswith(f"{PREFIX}{key_id}_")
    assert len(token) > len(f"{PREFIX}{key_id}_") + 32  # 256 random bits of secret

    caller = _authenticate(settings, token)
    assert caller == Caller("acme", frozenset({"tasks:read", "tasks:write"}), key_id)
    assert _authenticate(settings, f"  {token}\n") == caller  # a header's whitespace

    assert _revoke(settings, key_id)
    assert _authenticate(settings, token) is None  # at once
    assert not _revoke(settings, key_id)  # not active any more
    assert not _revoke(settings, "0123456789ab")  # no such key
    with session_scope(settings.resolved_database_url()) as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
        assert row.revoked_at is not None
        assert (row.tenant, row.scopes, row.name) == ("acme", ["tasks:read", "tasks:write"], "ci")


def test_the_stored_row_keeps_only_a_digest_of_the_secret(settings: Settings) -> None:
    key_id, token = _create(settings, "acme", ["zoo:admin"])
    secret = token.removeprefix(f"{PREFIX}{key_id}_")
    with session_scope(settings.resolved_database_url()) as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
        stored = [str(getattr(row, c.key)) for c in inspect(ApiKey).columns]
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in value for value in stored)
    assert not any(token in value for value in stored)


def test_a_wrong_secret_a_malformed_token_or_an_unknown_key_authenticate_nobody(
    settings: Settings,
) -> None:
    key_id, token = _create(settings, "acme", ["tasks:read"])
    secret = token.removeprefix(f"{PREFIX}{key_id}_")
    other_id, other_token = _create(settings, "globex", ["tasks:read"])
    other_secret = other_token.removeprefix(f"{PREFIX}{other_id}_")
    refused = [
        f"{PREFIX}{key_id}_{other_secret}",  # another key's secret
        f"{PREFIX}{key_id}_{secret[:-1]}",  # one character short
        f"{PREFIX}{key_id}_{secret}x",  # one too many
        f"{PREFIX}{key_id}_",  # no secret
        f"{PREFIX}{key_id}",
        f"{PREFIX}_{secret}",  # no id
        f"{PREFIX}ffffffffffff_{secret}",  # an unknown id
        PREFIX,
        "",
        "   ",
        "Bearer " + token,
        token.upper(),
    ]
    for bad in refused:
        assert _authenticate(settings, bad) is None, bad
    assert _authenticate(settings, token) is not None  # the key itself still works


def test_a_secret_with_underscores_is_read_whole(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token splits at the first ``_`` after the prefix (ids are hex): a url-safe secret
    may hold ``_`` itself."""
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: "se_cr_et_" + "x" * 34)
    key_id, token = _create(settings, "acme", ["tasks:read"])
    assert token == f"{PREFIX}{key_id}_se_cr_et_{'x' * 34}"
    assert _authenticate(settings, token) == Caller("acme", frozenset({"tasks:read"}), key_id)
    assert _authenticate(settings, f"{PREFIX}{key_id}_se") is None


def test_unknown_scopes_and_bad_tenants_are_refused(settings: Settings) -> None:
    refused = [
        ("acme", [], "scopes must be"),
        ("acme", ["tasks:read", "tasks:delete"], "scopes must be"),
        ("acme", ["admin"], "scopes must be"),
        ("", ["tasks:read"], "a tenant is"),
        ("ac me", ["tasks:read"], "a tenant is"),
        ("acme/../x", ["tasks:read"], "a tenant is"),
        ("a" * 65, ["tasks:read"], "a tenant is"),
    ]
    with session_scope(settings.resolved_database_url()) as session:
        for tenant, scopes, why in refused:
            with pytest.raises(ValueError, match=why):
                api_keys.create(session, tenant=tenant, scopes=scopes)
        assert api_keys.listing(session) == []


def test_the_listing_holds_every_key_oldest_first(settings: Settings) -> None:
    first, _ = _create(settings, "a" * 64, ["tasks:read"])  # 64 characters: the longest
    second, _ = _create(settings, "globex_eu-1", ["zoo:admin"])
    third, _ = _create(settings, "acme", ["tasks:write"])
    assert _revoke(settings, second)
    moment = datetime(2030, 1, 1, tzinfo=UTC)
    with session_scope(settings.resolved_database_url()) as session:  # out of creation order
        for key_id, days in ((first, 2), (second, 0), (third, 1)):
            row = session.get(ApiKey, key_id)
            assert row is not None
            row.created_at = moment + timedelta(days=days)
    with session_scope(settings.resolved_database_url()) as session:
        listed = api_keys.listing(session)
        assert [k.id for k in listed] == [second, third, first]
        assert [k.revoked_at is not None for k in listed] == [True, False, False]


def test_a_token_with_a_nul_byte_authenticates_nobody(settings: Settings) -> None:
    """A malformed token is nobody, whatever bytes it holds: a NUL in the id part never
    reaches the query (PostgreSQL would refuse the text with an error, not find no row)."""
    key_id, token = _create(settings, "acme", ["tasks:read"])
    assert _authenticate(settings, token + "\x00") is None  # in the secret: only hashed
    assert _authenticate(settings, f"{PREFIX}{key_id}\x00_x") is None
