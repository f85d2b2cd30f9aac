"""Errors a client can act on, as RFC 9457 problem details (rendered over HTTP by ``app.api``).

They live below the web layer because the services raise them and the workers store them on
job rows in the same shape the API answers with.
"""

from __future__ import annotations

import re
from typing import Any

PROBLEM_BASE = "https://task2vec.dev/problems/"


#: ``scheme://user:password@`` in a URL: what ``redact`` removes.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the userinfo (user names, passwords, tokens) of every URL in it removed:
    error texts are stored and shown, credentials never."""
    return _USERINFO.sub(r"\1", text)


def public(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """What every tenant may see of a zoo item's stored error: its type, title and status.
    The detail can name internal hosts and paths; it stays in the logs and on the job, which
    only the tenant that made it can read."""
    if error is None:
        return None
    return {k: error[k] for k in ("type", "title", "status") if k in error}


def problem(status: int, kind: str, title: str, detail: str) -> dict[str, Any]:
    """A problem document, as stored on a failed job or zoo item."""
    return {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}


class ProblemError(Exception):
    """An error the client can act on; ``kind`` names its type URI, ``extra`` adds members."""

    def __init__(self, status: int, kind: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.extra = extra
        self.headers: dict[str, str] = {}

    def as_problem(self) -> dict[str, Any]:
        return problem(self.status, self.kind, self.title, self.detail)

    @classmethod
    def of(cls, document: dict[str, Any], **extra: Any) -> ProblemError:
        """The error a stored problem document (a failed job's) describes."""
        return cls(
            int(document.get("status", 500)),
            str(document.get("type", "")).rsplit("/", 1)[-1] or "job-failed",
            str(document.get("title", "The job failed")),
            str(document.get("detail", "")),
            **extra,
        )


def not_found(what: str, name: str) -> ProblemError:
    """404 for a missing item (or another tenant's: the same answer, so ids leak nothing)."""
    return ProblemError(404, "not-found", f"No such {what}", f"{what} {name!r} does not exist")
