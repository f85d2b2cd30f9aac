"""Headers every answer carries: ``X-Content-Type-Options: nosniff`` (a browser must not
guess a type: an uploaded file name or a problem detail is never run as HTML), and
``Cache-Control: no-store`` on the API's own routes, whose answers are a tenant's data (no
shared cache may keep them). A pure ASGI middleware: it adds two headers and reads nothing."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")
NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tenant_data = scope["path"].startswith("/v1/")

        async def answering(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append(NOSNIFF)
                if tenant_data and not any(k.lower() == NO_STORE[0] for k, _ in headers):
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, answering)
