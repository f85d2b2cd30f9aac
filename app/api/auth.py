"""API keys: who is calling, for which tenant, with which scopes.

A key reads ``t2v_<id>_<secret>``; the service keeps the id and the secret's sha256, never the
secret. Each key belongs to one tenant and carries scopes: ``tasks:write`` (upload datasets,
ask for rankings), ``tasks:read`` (read one's own tasks, jobs and rankings), ``zoo:admin``
(add experts and zoo tasks). The zoo and its experts are readable with any key.

With ``T2V_API_KEYS=off`` (allowed only when the API listens on loopback: ``task2vec serve``
and ``run`` refuse otherwise) every request is the tenant ``local`` with every scope.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import select

from app.api.problems import ProblemError
from app.db.models import LOCAL_TENANT, ApiKey
from app.db.session import session_scope
from app.settings import Settings

SCOPES = ("tasks:read", "tasks:write", "zoo:admin")
PREFIX = "t2v_"


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    settings: Settings, tenant: str, scopes: list[str], name: str | None = None
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
    with session_scope(settings.resolved_database_url()) as session:
        session.add(row)
    return row, f"{PREFIX}{key_id}_{secret}"


def revoke_key(settings: Settings, key_id: str) -> bool:
    with session_scope(settings.resolved_database_url()) as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = datetime.now(UTC)
        return True


def list_keys(settings: Settings) -> list[ApiKey]:
    with session_scope(settings.resolved_database_url()) as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def _from_loopback(request: Request) -> bool:
    """Whether the peer is this machine (test clients, which name no address, count as it)."""
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("", "testclient", "localhost")


#: What to do about a missing key.
KEY_HINT = "send 'Authorization: Bearer <key>' (task2vec keys create)"


def unauthorized(detail: str) -> ProblemError:
    error = ProblemError(401, "unauthorized", "An API key is needed", detail)
    error.headers["WWW-Authenticate"] = 'Bearer realm="task2vec"'
    return error


def caller_of(request: Request) -> Caller:
    settings: Settings = request.app.state.settings
    if settings.api_keys == "off":
        if not _from_loopback(request):
            raise unauthorized("this service runs without keys and answers only its own machine")
        return Caller(LOCAL_TENANT, frozenset(SCOPES))
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(KEY_HINT)
    key_id, _, secret = token.strip().removeprefix(PREFIX).partition("_")
    with session_scope(settings.resolved_database_url()) as session:
        row = session.get(ApiKey, key_id) if key_id and secret else None
        valid = (
            row is not None
            and row.revoked_at is None
            and hmac.compare_digest(row.secret_sha256, _digest(secret))
        )
        if not valid or row is None:
            raise unauthorized("the API key is unknown or revoked")
        return Caller(row.tenant, frozenset(row.scopes), row.id)


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests a minute, bursts up to that many. Kept
    in the API process, so with several replicas each allows its own share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, last refill)

    def wait_needed(self, key: str, per_minute: int) -> float:
        """0 when the request may go now (and spend a token), else seconds to wait."""
        now = time.monotonic()
        rate = per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate


def limited_caller(request: Request, caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
    """The caller, unless its key has spent its requests for now (429 with Retry-After)."""
    settings: Settings = request.app.state.settings
    if caller.key_id is None or settings.rate_limit_per_minute == 0:
        return caller
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.wait_needed(caller.key_id, settings.rate_limit_per_minute)
    if wait > 0:
        error = ProblemError(
            429,
            "rate-limited",
            "Too many requests",
            f"this key may make {settings.rate_limit_per_minute} requests a minute; "
            f"retry in {math.ceil(wait)} s",
        )
        error.headers["Retry-After"] = str(math.ceil(wait))
        raise error
    return caller


CallerDep = Annotated[Caller, Depends(limited_caller)]


def require(scope: str) -> Any:
    """A dependency: the caller, who must hold ``scope``."""

    def check(caller: CallerDep) -> Caller:
        if scope not in caller.scopes:
            raise ProblemError(
                403,
                "insufficient-scope",
                "The API key lacks a scope",
                f"this needs the scope {scope!r}; the key has {', '.join(sorted(caller.scopes))}",
            )
        return caller

    return Depends(check)


Reader = Annotated[Caller, require("tasks:read")]
Writer = Annotated[Caller, require("tasks:write")]
Admin = Annotated[Caller, require("zoo:admin")]
