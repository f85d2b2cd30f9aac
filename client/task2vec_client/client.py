"""Sync and async clients of the service (httpx).

Every POST carries an ``Idempotency-Key`` made here, the same on each retry, so a retried
upload is one task and one job. 429 and 503 answers are retried after their ``Retry-After``
(at most ``MAX_WAIT`` seconds a time, ``retries`` times); so are network errors (a GET, or a
POST with its key). Any other error answer raises ``ProblemError``. The API key comes from the
argument or ``T2V_API_KEY``.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import httpx
from pydantic import BaseModel

from task2vec_client.errors import JobFailedError, ProblemError
from task2vec_client.models import (
    ExpertPage,
    JobAccepted,
    JobOut,
    Neighbours,
    Ranking,
    TaskAccepted,
    TaskOut,
    UploadRanking,
    ZooOut,
)

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_WAIT = 30.0
RETRIED = frozenset({429, 503})

Model = TypeVar("Model", bound=BaseModel)
Dataset = str | Path | bytes
#: ``progress(sent, total)`` while an upload streams.
UploadProgress = Callable[[int, int], None]


class _Counted(io.RawIOBase):
    """A file that reports how much of it has been read (the multipart body streams it)."""

    def __init__(self, raw: IO[bytes], progress: UploadProgress | None) -> None:
        self.raw, self.progress, self.sent = raw, progress, 0
        self.total = raw.seek(0, os.SEEK_END)
        raw.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.raw.seek(offset, whence)
        self.sent = position
        return position

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.sent += len(chunk)
        if self.progress is not None and chunk:
            self.progress(min(self.sent, self.total), self.total)
        return chunk


Files = dict[str, tuple[str, IO[bytes]]]
Upload = tuple[Dataset, str | None, UploadProgress | None]


@contextmanager
def _upload(
    dataset: Dataset, filename: str | None, progress: UploadProgress | None
) -> Iterator[Files]:
    with ExitStack() as stack:
        if isinstance(dataset, bytes):
            raw: IO[bytes] = io.BytesIO(dataset)
            name = filename or "dataset"
        else:
            raw = stack.enter_context(Path(dataset).open("rb"))
            name = filename or Path(dataset).name
        yield {"file": (name, cast(IO[bytes], _Counted(raw, progress)))}


def _retry_wait(response: httpx.Response | None, attempt: int) -> float:
    """Seconds before the next try: the answer's Retry-After, else a doubling backoff."""
    header = response.headers.get("retry-after") if response is not None else None
    try:
        wait = float(header) if header is not None else 0.5 * 2**attempt
    except ValueError:
        wait = 0.5 * 2**attempt
    return min(max(wait, 0.0), MAX_WAIT)


def _parsed(response: httpx.Response, *models: type[BaseModel]) -> Any:
    """The answer as the first model that fits its status (202 → JobAccepted), or the
    ProblemError it describes."""
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"title": response.reason_phrase, "detail": response.text[:500]}
        raise ProblemError(response.status_code, body if isinstance(body, dict) else {})
    data = response.json()
    if response.status_code == 202 and JobAccepted in models:
        return JobAccepted.model_validate(data)
    return models[0].model_validate(data)


def _headers(api_key: str | None, idempotency_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "task2vec-client/0.1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def _finished(job: JobOut, raise_on_failure: bool) -> JobOut:
    if job.status == "failed" and raise_on_failure:
        error = job.error or {}
        raise JobFailedError(int(error.get("status", 500)), error)
    return job


class Client:
    """The service over HTTP. ``http`` may be any ``httpx.Client`` (tests pass the app's)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        retries: int = 4,
        http: httpx.Client | None = None,
    ) -> None:
        self.api_key = api_key or os.environ.get("T2V_API_KEY")
        self.retries = retries
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        upload: Upload | None = None,
    ) -> httpx.Response:
        key = uuid.uuid4().hex if method == "POST" else None
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            with ExitStack() as stack:
                files = stack.enter_context(_upload(*upload)) if upload else None
                try:
                    response = self._http.request(
                        method,
                        path,
                        params=params,
                        files=files,
                        headers=_headers(self.api_key, key),
                    )
                except httpx.TransportError:
                    if last:
                        raise
                    time.sleep(_retry_wait(None, attempt))
                    continue
            if response.status_code not in RETRIED or last:
                return response
            time.sleep(_retry_wait(response, attempt))
        raise AssertionError("unreachable")

    def zoo(self) -> ZooOut:
        result: ZooOut = _parsed(self._send("GET", "/v1/zoo"), ZooOut)
        return result

    def upload_task(
        self,
        dataset: Dataset,
        *,
        filename: str | None = None,
        progress: UploadProgress | None = None,
    ) -> TaskAccepted:
        """Upload a labelled dataset (a path or bytes) to embed; 202 with the task and job."""
        response = self._send("POST", "/v1/tasks", upload=(dataset, filename, progress))
        result: TaskAccepted = _parsed(response, TaskAccepted)
        return result

    def recommend(
        self,
        dataset: Dataset,
        *,
        k: int = 5,
        method: str = "learned",
        wait: float = 120.0,
        filename: str | None = None,
        progress: UploadProgress | None = None,
    ) -> UploadRanking | JobAccepted:
        """Upload and rank in one call; a JobAccepted when not ranked within ``wait``."""
        params = {"k": k, "method": method, "wait": wait}
        response = self._send(
            "POST", "/v1/recommendations", params, upload=(dataset, filename, progress)
        )
        result: UploadRanking | JobAccepted = _parsed(response, UploadRanking, JobAccepted)
        return result

    def job(self, job_id: str) -> JobOut:
        result: JobOut = _parsed(self._send("GET", f"/v1/jobs/{job_id}"), JobOut)
        return result

    def experts(self, *, limit: int = 100, offset: int = 0) -> ExpertPage:
        response = self._send("GET", "/v1/experts", {"limit": limit, "offset": offset})
        result: ExpertPage = _parsed(response, ExpertPage)
        return result

    def wait_for(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_poll: Callable[[JobOut], None] | None = None,
        raise_on_failure: bool = True,
    ) -> JobOut:
        """Poll the job (0.25 s, growing to 5 s) until it ends; ``JobFailedError`` when it
        failed (unless ``raise_on_failure`` is off), ``TimeoutError`` past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.25
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.finished:
                return _finished(job, raise_on_failure)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(pause)
            pause = min(pause * 1.5, 5.0)

    def task(self, task_id: str) -> TaskOut:
        result: TaskOut = _parsed(self._send("GET", f"/v1/tasks/{task_id}"), TaskOut)
        return result

    def neighbors(self, task_id: str, k: int = 10) -> Neighbours:
        response = self._send("GET", f"/v1/tasks/{task_id}/neighbors", {"k": k})
        result: Neighbours = _parsed(response, Neighbours)
        return result

    def recommendations(
        self, task_id: str, *, k: int = 5, method: str = "learned"
    ) -> Ranking | JobAccepted:
        """The task's ranking; a JobAccepted for the methods a worker computes."""
        params = {"k": k, "method": method}
        response = self._send("GET", f"/v1/tasks/{task_id}/recommendations", params)
        result: Ranking | JobAccepted = _parsed(response, Ranking, JobAccepted)
        return result


class AsyncClient:
    """``Client`` for asyncio: the same methods, awaited."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        retries: int = 4,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_key = api_key or os.environ.get("T2V_API_KEY")
        self.retries = retries
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        upload: Upload | None = None,
    ) -> httpx.Response:
        key = uuid.uuid4().hex if method == "POST" else None
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            with ExitStack() as stack:
                files = stack.enter_context(_upload(*upload)) if upload else None
                try:
                    response = await self._http.request(
                        method,
                        path,
                        params=params,
                        files=files,
                        headers=_headers(self.api_key, key),
                    )
                except httpx.TransportError:
                    if last:
                        raise
                    await asyncio.sleep(_retry_wait(None, attempt))
                    continue
            if response.status_code not in RETRIED or last:
                return response
            await asyncio.sleep(_retry_wait(response, attempt))
        raise AssertionError("unreachable")

    async def zoo(self) -> ZooOut:
        result: ZooOut = _parsed(await self._send("GET", "/v1/zoo"), ZooOut)
        return result

    async def upload_task(
        self,
        dataset: Dataset,
        *,
        filename: str | None = None,
        progress: UploadProgress | None = None,
    ) -> TaskAccepted:
        response = await self._send("POST", "/v1/tasks", upload=(dataset, filename, progress))
        result: TaskAccepted = _parsed(response, TaskAccepted)
        return result

    async def recommend(
        self,
        dataset: Dataset,
        *,
        k: int = 5,
        method: str = "learned",
        wait: float = 120.0,
        filename: str | None = None,
        progress: UploadProgress | None = None,
    ) -> UploadRanking | JobAccepted:
        params = {"k": k, "method": method, "wait": wait}
        response = await self._send(
            "POST", "/v1/recommendations", params, upload=(dataset, filename, progress)
        )
        result: UploadRanking | JobAccepted = _parsed(response, UploadRanking, JobAccepted)
        return result

    async def job(self, job_id: str) -> JobOut:
        result: JobOut = _parsed(await self._send("GET", f"/v1/jobs/{job_id}"), JobOut)
        return result

    async def experts(self, *, limit: int = 100, offset: int = 0) -> ExpertPage:
        response = await self._send("GET", "/v1/experts", {"limit": limit, "offset": offset})
        result: ExpertPage = _parsed(response, ExpertPage)
        return result

    async def wait_for(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_poll: Callable[[JobOut], None] | None = None,
        raise_on_failure: bool = True,
    ) -> JobOut:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.25
        while True:
            job = await self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.finished:
                return _finished(job, raise_on_failure)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 5.0)

    async def task(self, task_id: str) -> TaskOut:
        result: TaskOut = _parsed(await self._send("GET", f"/v1/tasks/{task_id}"), TaskOut)
        return result

    async def neighbors(self, task_id: str, k: int = 10) -> Neighbours:
        response = await self._send("GET", f"/v1/tasks/{task_id}/neighbors", {"k": k})
        result: Neighbours = _parsed(response, Neighbours)
        return result

    async def recommendations(
        self, task_id: str, *, k: int = 5, method: str = "learned"
    ) -> Ranking | JobAccepted:
        params = {"k": k, "method": method}
        response = await self._send("GET", f"/v1/tasks/{task_id}/recommendations", params)
        result: Ranking | JobAccepted = _parsed(response, Ranking, JobAccepted)
        return result
