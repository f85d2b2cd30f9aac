"""API keys: who is calling, for which tenant, with which scopes.

A key reads ``t2v_<id>_<secret>``; the service keeps the id and the secret's sha256, never the
secret (keys are 256 random bits, so a fast hash is enough). Each key belongs to one tenant and
carries scopes: ``tasks:write`` (upload datasets, ask for rankings), ``tasks:read`` (read one's
own tasks, jobs and rankings), ``zoo:admin`` (add experts and zoo tasks). The zoo and its
experts are readable with any key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ApiKey

SCOPES = ("tasks:read", "tasks:write", "zoo:admin")
PREFIX = "t2v_"
#: A key id: 6 random bytes in hex. Anything else is nobody, without asking the database
#: (PostgreSQL refuses text with a NUL in it rather than finding no row).
KEY_ID = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(
    session: Session, *, tenant: str, scopes: list[str], name: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for ``tenant``; returns its row and the token, which is shown only now."""
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(scopes)}")
    if not tenant or len(tenant) > 64 or not tenant.replace("-", "").replace("_", "").isalnum():
        raise ValueError("a tenant is 1-64 letters, digits, '-' or '_'")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id,
        secret_sha256=_digest(secret),
        tenant=tenant,
        scopes=sorted(set(scopes)),
        name=name,
    )
    session.add(row)
    session.flush()
    return row, f"{PREFIX}{key_id}_{secret}"


def revoke(session: Session, *, key_id: str) -> bool:
    """Revoke a key (it stops working at once); False if there is no active key by that id."""
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(UTC)
    return True


def listing(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def authenticate(session: Session, *, token: str) -> Caller | None:
    """The caller a bearer token stands for; None for an unknown, malformed or revoked key."""
    key_id, _, secret = token.strip().removeprefix(PREFIX).partition("_")
    row = session.get(ApiKey, key_id) if KEY_ID.fullmatch(key_id) and secret else None
    if (
        row is None
        or row.revoked_at is not None
        or not hmac.compare_digest(row.secret_sha256, _digest(secret))
    ):
        return None
    return Caller(row.tenant, frozenset(row.scopes), row.id)
