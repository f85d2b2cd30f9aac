"""Request size at the door: before any byte of a body is read, a POST must say how long it
is (Content-Length, or chunked transfer), a declared length over the upload limit is refused
at once, and a body that streams past it is cut off (413). The key was checked before, at the
door (``app.api.door``)."""

from __future__ import annotations

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
            receive = self._counted(receive)
        await self.app(scope, receive, send)

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


class BodyTooLarge(HTTPException):
    """Raised while a body streams in: an HTTP exception, so the form parser passes it on and
    the API answers 413 ``upload-too-large``."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is larger than the limit of {limit} bytes")
