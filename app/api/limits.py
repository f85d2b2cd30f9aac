"""Request size at the door: before any byte of a body is read, a POST must say how long it
is (Content-Length, or chunked transfer, whose size the upload counts while streaming), and a
declared length over the upload limit is refused at once instead of after the transfer."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

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
        await self.app(scope, receive, send)
