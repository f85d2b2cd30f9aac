"""Request size and pace at the door: before any byte of a body is read, a POST must say how
long it is (Content-Length, or chunked transfer), a declared length over the upload limit is
refused at once, and a body that streams past it is cut off (413); a body that pauses too long,
or arrives slower than the least rate, is cut off too (408), so a slow client cannot hold a
request open for ever. The key was checked before, at the door (``app.api.door``); a
request's headers have their own deadline in the server (``app.api.connections``)."""

from __future__ import annotations

import time

import anyio
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import problem_response
from app.settings import Settings

#: Room for the multipart framing and form fields around an upload of the largest size.
FORM_OVERHEAD = 1024 * 1024


class RequestLength:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
            response = None
            if length is None and not chunked:
                response = problem_response(
                    411,
                    "length-required",
                    "Length required",
                    "send Content-Length (or chunked transfer encoding) with the body",
                )
            elif length is not None:
                limit = self.settings.max_upload_bytes + FORM_OVERHEAD
                if not length.isdigit():
                    response = problem_response(
                        400, "bad-request", "Bad request", "Content-Length is not a number"
                    )
                elif int(length) > limit:
                    response = problem_response(
                        413,
                        "upload-too-large",
                        "The upload is too large",
                        f"the request declares {int(length)} bytes; uploads are limited to "
                        f"{self.settings.max_upload_bytes} bytes",
                    )
            if response is not None:
                await response(scope, receive, send)
                return
            receive = self._paced(self._counted(receive))
        await self.app(scope, receive, send)

    def _paced(self, receive: Receive) -> Receive:
        """``receive`` that answers 408 when the body pauses longer than
        ``request_body_idle_seconds`` or, after that long, has arrived slower than
        ``request_body_min_bytes_per_second`` on average; once the body is in, as it was."""
        idle = self.settings.request_body_idle_seconds
        rate = self.settings.request_body_min_bytes_per_second
        started, seen, done = time.monotonic(), 0, False

        async def paced() -> Message:
            nonlocal seen, done
            if done:
                return await receive()
            wait = idle
            if rate > 0:  # when the bytes seen fall below what the rate asks for
                wait = min(wait, started + idle + seen / rate - time.monotonic())
            if wait > 0:
                with anyio.move_on_after(wait):
                    message = await receive()
                    seen += len(message.get("body", b""))
                    done = message["type"] != "http.request" or not message.get("more_body")
                    return message
            raise BodyTimeout(idle, rate)

        return paced

    def _counted(self, receive: Receive) -> Receive:
        """``receive`` that stops a body (chunked ones included) past the upload limit."""
        limit = self.settings.max_upload_bytes + FORM_OVERHEAD
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(self.settings.max_upload_bytes)
            return message

        return counted


class BodyTimeout(HTTPException):
    """Raised while a body streams in too slowly: answered 408 ``request-timeout``, and the
    connection closed (the rest of the body is not read)."""

    def __init__(self, idle: float, rate: float) -> None:
        least = f", or arrived slower than {rate:g} bytes a second" if rate > 0 else ""
        super().__init__(
            408,
            f"the request's body paused longer than {idle:g} s{least}",
            headers={"Connection": "close"},
        )


class BodyTooLarge(HTTPException):
    """Raised while a body streams in: an HTTP exception, so the form parser passes it on and
    the API answers 413 ``upload-too-large``."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is larger than the limit of {limit} bytes")
