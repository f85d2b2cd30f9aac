"""``Idempotency-Key`` on POSTs: a client that retries after a timeout gets the first answer
again instead of a second job; the same key with a different request is an error (422).

A request is identified by its fingerprint: the route, the query parameters that change the
answer, the form fields and the sha256 of each uploaded file (never the raw multipart bytes,
whose boundaries differ on every send). Records are per tenant, and hold their key for
``IDEMPOTENCY_TTL_SECONDS`` (a day); the workers' sweep deletes older ones
(``app.services.orphans``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from app.db.models import IdempotencyRecord, as_utc, utcnow
from app.db.session import session_scope
from app.services.problems import ProblemError
from app.settings import Settings

HEADER = "Idempotency-Key"


def key_of(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ProblemError(
            422,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "an Idempotency-Key is 1-255 printable characters",
        )
    return key


#: The request's Idempotency-Key, checked before its upload is stored (a route lists it
#: before its upload: dependencies are solved in that order).
IdempotencyKey = Annotated[str | None, Depends(key_of)]


def fingerprint(request: Request, ignore: tuple[str, ...] = (), **parts: Any) -> str:
    query = sorted((k, v) for k, v in request.query_params.multi_items() if k not in ignore)
    blob = json.dumps([request.method, request.url.path, query, parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


#: ``status`` of a record whose request is still being answered.
IN_PROGRESS = 0


def _recorded(row: IdempotencyRecord, key: str, print_: str) -> JSONResponse:
    """What a request that finds ``row`` under its key gets: 422 for another request, 409
    while the first one is still being answered, else the first answer again."""
    if row.fingerprint != print_:
        raise ProblemError(
            422,
            "idempotency-key-reused",
            "Idempotency-Key already used",
            f"the Idempotency-Key {key!r} was sent with a different request",
        )
    if row.status == IN_PROGRESS:
        error = ProblemError(
            409,
            "idempotency-key-in-progress",
            "The first request with this key is still running",
            f"a request with the Idempotency-Key {key!r} is being answered; retry shortly",
        )
        error.headers["Retry-After"] = "1"
        raise error
    headers = {"Idempotent-Replayed": "true"}
    if row.location:
        headers["Location"] = row.location
    return JSONResponse(row.body, status_code=row.status, headers=headers)


def _select(tenant: str, key: str) -> Any:
    return select(IdempotencyRecord).where(
        IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key
    )


def claim(settings: Settings, tenant: str, key: str, print_: str) -> JSONResponse | None:
    """Take the key for this request (None), or answer from what holds it already. Claiming
    before the work makes two concurrent requests with one key do the work once."""
    url = settings.resolved_database_url()
    try:
        with session_scope(url) as session:
            session.add(
                IdempotencyRecord(
                    tenant=tenant, key=key, fingerprint=print_, status=IN_PROGRESS, body={}
                )
            )
        return None
    except IntegrityError:
        with session_scope(url) as session:
            row = session.scalar(_select(tenant, key))
            if row is not None and _expired(row, settings):
                session.execute(
                    delete(IdempotencyRecord).where(
                        IdempotencyRecord.id == row.id,
                        IdempotencyRecord.created_at == row.created_at,
                    )
                )
                row = None
        if row is None:  # released or expired meanwhile: the next try claims it
            return claim(settings, tenant, key, print_)
        return _recorded(row, key, print_)


def _expired(row: IdempotencyRecord, settings: Settings) -> bool:
    """A record older than ``idempotency_ttl_seconds`` no longer holds its key."""
    age = utcnow() - as_utc(row.created_at)
    return age > timedelta(seconds=settings.idempotency_ttl_seconds)


def complete(settings: Settings, tenant: str, key: str, response: JSONResponse) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalar(_select(tenant, key))
        if row is not None:
            row.status = response.status_code
            row.body = json.loads(bytes(response.body))
            row.location = response.headers.get("location")


def release(settings: Settings, tenant: str, key: str) -> None:
    """The request failed: free the key, so that a retry does the work."""
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalar(_select(tenant, key))
        if row is not None and row.status == IN_PROGRESS:
            session.delete(row)


async def idempotent(
    request: Request,
    settings: Settings,
    tenant: str,
    key: str | None,
    parts: dict[str, Any],
    answer: Callable[[], Awaitable[JSONResponse]],
    ignore: tuple[str, ...] = (),
) -> JSONResponse:
    """``answer()``, or the recorded answer when ``key`` was seen with the same request (the
    route, its query but ``ignore``, and ``parts``: form fields, uploaded files' sha256). The
    same key with another request is refused with 422; while the first request runs, 409
    with Retry-After."""
    if key is None:
        return await answer()
    print_ = fingerprint(request, ignore, **parts)
    replayed = await run_in_threadpool(claim, settings, tenant, key, print_)
    if replayed is not None:
        return replayed
    try:
        response = await answer()
    except BaseException:
        await run_in_threadpool(release, settings, tenant, key)
        raise
    await run_in_threadpool(complete, settings, tenant, key, response)
    return response
