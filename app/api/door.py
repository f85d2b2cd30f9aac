"""The door: a request that carries a body (POST, PUT, PATCH) is authenticated before any
byte of the body is read, so an anonymous client, or one with a bogus, revoked or read-only
key, cannot make the service read and spool an upload. Every body-carrying route needs
``tasks:write`` or ``zoo:admin``; a key with neither is answered 403 at the door too. The
caller found goes on in the request's state (``auth.caller_of``)."""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.auth import KeyCheck
from app.api.problems import as_response, database_unavailable
from app.db.session import UNAVAILABLE
from app.services.problems import ProblemError
from app.settings import Settings

log = logging.getLogger(__name__)

#: The scopes that let a key send a body: some route accepts it with one of these.
WRITING_SCOPES = frozenset({"tasks:write", "zoo:admin"})


class Door:
    def __init__(self, app: ASGIApp, settings: Settings, check: KeyCheck) -> None:
        self.app, self.settings, self.check = app, settings, check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        authorization = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
        )
        address = scope["client"][0] if scope.get("client") else ""
        try:
            caller = await run_in_threadpool(
                self.check.caller, self.settings, authorization, address
            )
            if not caller.scopes & WRITING_SCOPES:
                raise ProblemError(
                    403,
                    "insufficient-scope",
                    "The API key lacks a scope",
                    "sending a body needs the scope 'tasks:write' (or 'zoo:admin'); the key has "
                    + ", ".join(sorted(caller.scopes)),
                )
        except ProblemError as error:
            await as_response(error)(scope, receive, send)
            return
        except UNAVAILABLE as exc:
            log.warning("database unavailable at the door: %s", exc)
            await database_unavailable(scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)
