"""One exception for every answer the service refuses: its RFC 9457 problem document."""

from __future__ import annotations

from typing import Any


class ProblemError(Exception):
    """An error answer: ``type`` (a URI; ``kind`` is its last part), ``status``, ``title``,
    ``detail``, and the whole document in ``body`` (e.g. ``errors`` of a 422)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.type = str(body.get("type", "about:blank"))
        self.title = str(body.get("title", ""))
        self.detail = str(body.get("detail", ""))
        super().__init__(f"{status} {self.kind}: {self.detail or self.title}")

    @property
    def kind(self) -> str:
        return self.type.rsplit("/", 1)[-1]


class JobFailedError(ProblemError):
    """A job the client waited for ended ``failed``; its problem document is the error."""
