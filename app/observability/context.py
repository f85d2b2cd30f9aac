"""The request and the job a line of work belongs to, as context variables: set by the API
for each request and by a worker for each job, read by the log formatter and stored on the
jobs a request creates."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("t2v_request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("t2v_job_id", default=None)

#: A request id a client may choose: short, and safe in a header, a log line and a label.
_SANE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id_from(header: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is sane, else a new one."""
    if header is not None and _SANE.fullmatch(header):
        return header.decode("ascii")
    return uuid.uuid4().hex


@contextmanager
def bound(*, job: str | None = None, request: str | None = None) -> Iterator[None]:
    """Within the block, log lines carry ``job`` and ``request`` (those given)."""
    job_token = job_id.set(job) if job is not None else None
    request_token = request_id.set(request) if request is not None else None
    try:
        yield
    finally:
        if request_token is not None:
            request_id.reset(request_token)
        if job_token is not None:
            job_id.reset(job_token)
