"""Errors as RFC 9457 problem details (``application/problem+json``), for every route: the
HTTP rendering of ``app.services.problems``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db.session import UNAVAILABLE
from app.services import environment
from app.services.problems import PROBLEM_BASE, ProblemError

MEDIA_TYPE = "application/problem+json"
#: What a client is told to wait (Retry-After) when a dependency is down.
RETRY_AFTER_SECONDS = 5
log = logging.getLogger(__name__)


class Problem(BaseModel):
    """RFC 9457 problem details, as every error of this API is answered."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers (problem+json), for a route's ``responses``."""
    content = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {
        status: {"model": Problem, "content": content, "description": _REASONS[status]}
        for status in statuses
    }


_REASONS = {
    400: "Bad request",
    401: "No valid API key",
    403: "The key lacks a scope",
    404: "Not found (or another tenant's)",
    409: "Conflict with the current state",
    411: "Length required",
    413: "Upload too large",
    422: "Invalid request or data",
    429: "Rate limited",
    500: "Internal error",
    503: "A dependency is unavailable",
}


def problem_response(
    status: int,
    kind: str,
    title: str,
    detail: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def as_response(exc: ProblemError, instance: str | None = None) -> JSONResponse:
    """The problem+json answer for ``exc`` (also for middleware, which runs outside the
    exception handlers)."""
    return problem_response(
        exc.status,
        exc.kind,
        exc.title,
        exc.detail,
        instance=instance,
        headers=exc.headers or None,
        **exc.extra,
    )


def database_unavailable(instance: str) -> JSONResponse:
    """A state that passes: 503 with Retry-After, and no driver text (it names hosts and
    ports) in the answer."""
    return problem_response(
        503,
        "database-unavailable",
        "The database is unavailable",
        "the service cannot reach its database; retry shortly",
        instance=instance,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def storage_unavailable(instance: str, error: OSError) -> JSONResponse:
    """The data directory's disk is full or failing (``app.services.environment``): a state
    that passes, like a database outage; the answer names no path."""
    return problem_response(
        503,
        "storage-unavailable",
        "Storage is unavailable",
        environment.describe(error),
        instance=instance,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _disk_failed(request: Request, disk: OSError) -> JSONResponse:
    log.warning(
        "storage unavailable on %s %s: %s",
        request.method,
        request.url.path,
        environment.errno_name(disk),
    )
    return storage_unavailable(request.url.path, disk)


async def _storage(request: Request, exc: Exception) -> JSONResponse:
    """A full or failing disk answers 503; any other OS error is the internal one."""
    disk = environment.storage_error(exc)
    if disk is None:
        raise exc
    return _disk_failed(request, disk)


def install(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        """Anything unforeseen still answers problem+json (and is logged with its trace)."""
        if (disk := environment.storage_error(exc)) is not None:  # wrapped in another error
            return _disk_failed(request, disk)
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(
            500,
            "internal",
            "Internal error",
            "the service failed on this request; the error is logged",
            instance=request.url.path,
        )

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return database_unavailable(request.url.path)

    for unavailable in UNAVAILABLE:
        app.add_exception_handler(unavailable, _database)
    app.add_exception_handler(OSError, _storage)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        if (disk := environment.storage_error(exc)) is not None:  # e.g. a staging copy
            return _disk_failed(request, disk)
        return as_response(exc, instance=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"location": list(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['location']))}: {e['message']}" for e in errors)
        return problem_response(
            422,
            "invalid-request",
            "The request is not valid",
            detail,
            instance=request.url.path,
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {
            404: "not-found",
            405: "method-not-allowed",
            408: "request-timeout",
            413: "upload-too-large",
        }.get(exc.status_code, "http-error")
        return problem_response(
            exc.status_code,
            kind,
            str(exc.detail) if exc.status_code != 404 else "Not found",
            str(exc.detail),
            instance=request.url.path,
            headers=getattr(exc, "headers", None),
        )
