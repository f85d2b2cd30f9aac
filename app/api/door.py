"""The door: a request that carries a body (POST, PUT, PATCH) is authenticated before any
byte of the body is read, so an anonymous client, or one with a bogus, revoked or read-only
key, cannot make the service read and spool an upload. The scope the route needs (its
``auth.require``) is checked there too, so a key with the other writing scope is answered 403
before its body is read; a request that matches no route needs ``tasks:write`` or
``zoo:admin``. The caller found goes on in the request's state (``auth.caller_of``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi.dependencies.models import Dependant
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.auth import SCOPE_CHECKS, KeyCheck, lacking
from app.api.problems import as_response, database_unavailable
from app.db.session import UNAVAILABLE
from app.services.api_keys import Caller
from app.services.problems import ProblemError
from app.settings import Settings

log = logging.getLogger(__name__)

#: The scopes that let a key send a body: some route accepts it with one of these.
WRITING_SCOPES = frozenset({"tasks:write", "zoo:admin"})


def _scopes_required(dependant: Dependant) -> Iterator[str]:
    for dependency in dependant.dependencies:
        if dependency.call in SCOPE_CHECKS:
            yield SCOPE_CHECKS[dependency.call]
        yield from _scopes_required(dependency)


class Door:
    def __init__(
        self, app: ASGIApp, settings: Settings, check: KeyCheck, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app, self.settings, self.check = app, settings, check
        self.routes = routes  # the app's, to tell which one a request goes to
        self._needs: dict[int, frozenset[str]] = {}  # by route

    def needed(self, scope: Scope) -> frozenset[str] | None:
        """The scopes of the route the request goes to, or None when it matches none."""
        for route in self.routes:
            if route.matches(scope)[0] is Match.FULL:
                if id(route) not in self._needs:
                    dependant: Any = getattr(route, "dependant", None)
                    found = _scopes_required(dependant) if dependant is not None else ()
                    self._needs[id(route)] = frozenset(found)
                return self._needs[id(route)]
        return None

    def authorize(self, caller: Caller, scope: Scope) -> None:
        """The caller may send this request's body, or the 403 to answer."""
        needed = self.needed(scope)
        if not needed:
            if not caller.scopes & WRITING_SCOPES:
                raise ProblemError(
                    403,
                    "insufficient-scope",
                    "The API key lacks a scope",
                    "sending a body needs the scope 'tasks:write' (or 'zoo:admin'); the key "
                    "has " + ", ".join(sorted(caller.scopes)),
                )
            return
        missing = sorted(needed - caller.scopes)
        if missing:
            raise lacking(missing[0], caller)

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
            self.authorize(caller, scope)
        except ProblemError as error:
            await as_response(error)(scope, receive, send)
            return
        except UNAVAILABLE as exc:
            log.warning("database unavailable at the door: %s", exc)
            await database_unavailable(scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)
