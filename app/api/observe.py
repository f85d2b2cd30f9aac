"""Every request gets an id and is timed: a pure ASGI middleware, outside all the others
(errors answered by Starlette's last-resort handler included).

The id is the client's ``X-Request-ID`` when it is sane (``context.request_id_from``), else a
new one; it is answered in ``X-Request-ID`` on every response, set in the context that the
log formatter reads and that new jobs are stamped from. The time goes to
``t2v_http_request_duration_seconds`` by the route's template, never the raw path."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import context
from app.observability.metrics import UNMATCHED, RequestMetrics

HEADER = b"x-request-id"


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = None
        for name, value in scope["headers"]:
            if name == HEADER:
                given = value
                break
        request_id = context.request_id_from(given)
        echoed = (HEADER, request_id.encode("ascii"))
        status = 500  # unless an answer starts: the server answers 500 to an exception

        async def answering(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        token = context.request_id.set(request_id)
        try:
            await self.app(scope, receive, answering)
        finally:
            route = scope.get("route")  # set by the router on the scope it shares
            template = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe(template, scope["method"], status, time.perf_counter() - started)
            context.request_id.reset(token)
