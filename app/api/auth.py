"""Who is calling: the API key on each request (``app.services.api_keys``), its scopes, and a
rate limit per key.

With ``T2V_API_KEYS=off`` (allowed only when the API listens on loopback: ``task2vec serve``
and ``run`` refuse otherwise) every request is the tenant ``local`` with every scope.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, Request

from app.db.models import LOCAL_TENANT
from app.db.session import session_scope
from app.services import api_keys
from app.services.api_keys import SCOPES, Caller
from app.services.problems import ProblemError
from app.settings import Settings


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
    # Its own short transaction: the request's session stays unopened while the body is
    # stored and checked.
    with session_scope(settings.resolved_database_url()) as session:
        caller = api_keys.authenticate(session, token=token)
    if caller is None:
        raise unauthorized("the API key is unknown or revoked")
    return caller


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
