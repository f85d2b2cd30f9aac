"""Who is calling: the API key on each request (``app.services.api_keys``), its scopes, and
rate limits: per key for the requests it makes, per client address for failed
authentication. The client address is the peer's, or the one a proxy of
``T2V_TRUSTED_PROXIES`` names in X-Forwarded-For (``app.api.main``); no other peer, not even
one on this machine, can choose the address its failures count against.

With ``T2V_API_KEYS=off`` (allowed only when the API listens on loopback: ``task2vec serve``
and ``run`` refuse otherwise) every request is the tenant ``local`` with every scope.

A request with a body is authenticated by the door middleware (``app.api.door``) before any
byte of it is read; the caller it found travels in the request's state, so the route's
dependency does not look the key up again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from app.db.models import LOCAL_TENANT
from app.db.session import session_scope
from app.services import api_keys
from app.services.api_keys import SCOPES, Caller
from app.services.cache import LRUCache
from app.services.problems import ProblemError
from app.settings import Settings


def _loopback(host: str) -> bool:
    """Whether a peer address is this machine (test clients, which name no address, count)."""
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


def rate_limited(wait: float, detail: str) -> ProblemError:
    seconds = max(1, math.ceil(wait))
    error = ProblemError(
        429, "rate-limited", "Too many requests", f"{detail}; retry in {seconds} s"
    )
    error.headers["Retry-After"] = str(seconds)
    return error


class RateLimiter:
    """A token bucket per key (an API key's id, or a client address): ``per_minute`` a
    minute, bursts up to that many. Kept in the API process, so with several replicas each
    allows its own share.

    A bucket left alone for a minute has refilled, which is the same as having none: it is
    forgotten then. At most ``max_keys`` are kept, the least recently spent dropped first,
    so that requests from ever new addresses cannot grow the process."""

    #: Seconds after which an untouched bucket is full (``per_minute`` refill in a minute).
    IDLE = 60.0

    def __init__(
        self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._max_keys, self._clock = max_keys, clock
        # key → (tokens, last refill), the least recently spent first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, key: str, per_minute: int, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(per_minute), now))
        return min(float(per_minute), tokens + (now - last) * per_minute / 60.0)

    def _keep(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while self._buckets:
            _, last = next(iter(self._buckets.values()))
            if len(self._buckets) <= self._max_keys and now - last < self.IDLE:
                break
            self._buckets.popitem(last=False)

    def wait_needed(self, key: str, per_minute: int) -> float:
        """0 when the request may go now (and spend a token), else seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens = self._refilled(key, per_minute, now)
            spent = tokens >= 1.0
            self._keep(key, tokens - 1.0 if spent else tokens, now)
        return 0.0 if spent else (1.0 - tokens) * 60.0 / per_minute

    def peek(self, key: str, per_minute: int) -> float:
        """Seconds until ``key`` has a token again (0: it has one), spending none."""
        with self._lock:
            tokens = self._refilled(key, per_minute, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * 60.0 / per_minute


class KeyCheck:
    """Authentication with a memory of failures: each client address may fail
    ``auth_failures_per_minute`` times a minute (a missing, malformed, unknown or revoked
    key), after which its further failures are answered 429 until the budget refills. A
    good key is served all the same: the limit slows guessing, and must not let a guesser
    (or a neighbour behind the same address) lock the key's owner out. A key found unknown
    or revoked is remembered as such for ``UNKNOWN_FOR`` seconds, so repeating it costs no
    database lookup. Known keys are never remembered: revoking one takes effect at once."""

    UNKNOWN_FOR = 300.0

    def __init__(self) -> None:
        self.failures = RateLimiter()
        self.unknown: LRUCache[str, float] = LRUCache(10_000)

    def caller(self, settings: Settings, authorization: str | None, address: str) -> Caller:
        """The caller of a request, or the ProblemError to answer (401 or 429)."""
        if settings.api_keys == "off":
            if not _loopback(address):
                raise unauthorized(
                    "this service runs without keys and answers only its own machine"
                )
            return Caller(LOCAL_TENANT, frozenset(SCOPES))
        found = self._lookup(settings, authorization)
        if isinstance(found, Caller):
            return found
        budget = settings.auth_failures_per_minute
        if budget:
            wait = self.failures.wait_needed(address, budget)
            if wait > 0:
                raise rate_limited(wait, f"more than {budget} failed authentications a minute")
        raise unauthorized(found)

    def _lookup(self, settings: Settings, authorization: str | None) -> Caller | str:
        """The caller the Authorization header names, or why there is none."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return KEY_HINT
        digest = hashlib.sha256(token.encode()).hexdigest()
        until = self.unknown.get(digest)
        if until is not None and until > time.monotonic():
            return "the API key is unknown or revoked"
        with session_scope(settings.resolved_database_url()) as session:
            caller = api_keys.authenticate(session, token=token)
        if caller is None:
            self.unknown.put(digest, time.monotonic() + self.UNKNOWN_FOR)
            return "the API key is unknown or revoked"
        return caller


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def caller_of(request: Request) -> Caller:
    """The caller the door found for a request with a body; for others, looked up now."""
    found: Caller | None = getattr(request.state, "caller", None)
    if found is not None:
        return found
    check: KeyCheck = request.app.state.key_check
    return check.caller(
        request.app.state.settings, request.headers.get("authorization"), _address(request)
    )


def limited_caller(request: Request, caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
    """The caller, unless its key has spent its requests for now (429 with Retry-After)."""
    settings: Settings = request.app.state.settings
    if caller.key_id is None or settings.rate_limit_per_minute == 0:
        return caller
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.wait_needed(caller.key_id, settings.rate_limit_per_minute)
    if wait > 0:
        raise rate_limited(
            wait, f"this key may make {settings.rate_limit_per_minute} requests a minute"
        )
    return caller


CallerDep = Annotated[Caller, Depends(limited_caller)]


def lacking(scope: str, caller: Caller) -> ProblemError:
    return ProblemError(
        403,
        "insufficient-scope",
        "The API key lacks a scope",
        f"this needs the scope {scope!r}; the key has {', '.join(sorted(caller.scopes))}",
    )


#: Each scope check ``require`` made, with its scope: the door reads a route's from here.
SCOPE_CHECKS: dict[Callable[..., Caller], str] = {}


def require(scope: str) -> Any:
    """A dependency: the caller, who must hold ``scope``."""

    def check(caller: CallerDep) -> Caller:
        if scope not in caller.scopes:
            raise lacking(scope, caller)
        return caller

    SCOPE_CHECKS[check] = scope
    return Depends(check)


Reader = Annotated[Caller, require("tasks:read")]
Writer = Annotated[Caller, require("tasks:write")]
Admin = Annotated[Caller, require("zoo:admin")]
