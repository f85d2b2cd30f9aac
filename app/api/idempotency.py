"""``Idempotency-Key`` on POSTs: a client that retries after a timeout gets the first answer
again instead of a second job; the same key with a different request is an error (422).

A request is identified by its fingerprint: the route, the query parameters that change the
answer, the form fields and the sha256 of each uploaded file (never the raw multipart bytes,
whose boundaries differ on every send). Records are per tenant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.api.problems import ProblemError
from app.db.models import IdempotencyRecord
from app.db.session import session_scope
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


def fingerprint(request: Request, ignore: tuple[str, ...] = (), **parts: Any) -> str:
    query = sorted((k, v) for k, v in request.query_params.multi_items() if k not in ignore)
    blob = json.dumps([request.method, request.url.path, query, parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def replay(settings: Settings, tenant: str, key: str, print_: str) -> JSONResponse | None:
    """The recorded answer for this key, or None if the key is new; 422 if it was used for
    another request."""
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalar(
            select(IdempotencyRecord).where(
                IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key
            )
        )
        if row is None:
            return None
        if row.fingerprint != print_:
            raise ProblemError(
                422,
                "idempotency-key-reused",
                "Idempotency-Key already used",
                f"the Idempotency-Key {key!r} was sent with a different request",
            )
        headers = {"Idempotent-Replayed": "true"}
        if row.location:
            headers["Location"] = row.location
        return JSONResponse(row.body, status_code=row.status, headers=headers)


def remember(
    settings: Settings, tenant: str, key: str, print_: str, response: JSONResponse
) -> JSONResponse:
    """Record the answer; if a concurrent request with the key won, answer as it did."""
    body = json.loads(bytes(response.body))
    try:
        with session_scope(settings.resolved_database_url()) as session:
            session.add(
                IdempotencyRecord(
                    tenant=tenant,
                    key=key,
                    fingerprint=print_,
                    status=response.status_code,
                    body=body,
                    location=response.headers.get("location"),
                )
            )
    except IntegrityError:
        return replay(settings, tenant, key, print_) or response
    return response


async def idempotent(
    request: Request,
    settings: Settings,
    tenant: str,
    key: str | None,
    parts: dict[str, Any],
    answer: Callable[[], Awaitable[JSONResponse]],
    refused: Callable[[], None] | None = None,
    ignore: tuple[str, ...] = (),
) -> JSONResponse:
    """``answer()``, or the recorded answer when ``key`` was seen with the same request (the
    route, its query but ``ignore``, and ``parts``: form fields, uploaded files' sha256). The
    same key with another request is refused with 422, after ``refused()`` drops what the
    request stored."""
    if key is None:
        return await answer()
    print_ = fingerprint(request, ignore, **parts)
    try:
        replayed = await run_in_threadpool(replay, settings, tenant, key, print_)
    except ProblemError:
        if refused is not None:
            await run_in_threadpool(refused)
        raise
    if replayed is not None:
        return replayed
    response = await answer()
    return await run_in_threadpool(remember, settings, tenant, key, print_, response)
