"""Sync and async clients of the service (httpx).

Every POST carries an ``Idempotency-Key`` made here, the same on each retry, so a retried
upload is one task and one job. 429 and 503 answers are retried after their ``Retry-After``
(at most ``MAX_WAIT`` seconds a time, ``retries`` times); so are network errors (a GET, or a
POST with its key). Any other error answer raises ``ProblemError``. The API key comes from the
argument or ``T2V_API_KEY``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from task2vec_client.errors import JobFailedError, ProblemError
from task2vec_client.models import (
    ExpertOut,
    ExpertPage,
    ItemAccepted,
    JobAccepted,
    JobOut,
    Neighbours,
    Ranking,
    RankingMethod,
    TaskAccepted,
    TaskOut,
    UploadRanking,
    ZooOut,
)
from task2vec_client.uploads import Dataset, Upload, UploadProgress, upload_files

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_WAIT = 30.0
RETRIED = frozenset({429, 503})

Model = TypeVar("Model", bound=BaseModel)
Triple = tuple[float, float, float]


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


def _with_callback(params: dict[str, Any], callback_url: str | None) -> dict[str, Any]:
    """The query parameters, without those left to the service's default (None)."""
    params = {name: value for name, value in params.items() if value is not None}
    return params if callback_url is None else {**params, "callback_url": callback_url}


def _expert_form(
    name: str,
    architecture: str,
    input_size: int,
    weights_uri: str | None,
    mean: Triple | None,
    std: Triple | None,
    normalisation: str | None,
    source_task: str | None,
    tags: Sequence[str],
) -> dict[str, str]:
    """The registration's form fields; those not given are left to the service's defaults."""
    optional = {
        "weights_uri": weights_uri,
        "mean": None if mean is None else ",".join(map(str, mean)),
        "std": None if std is None else ",".join(map(str, std)),
        "normalisation": normalisation,
        "source_task": source_task,
        "tags": ",".join(tags) or None,
    }
    form = {"name": name, "architecture": architecture, "input_size": str(input_size)}
    return {**form, **{k: v for k, v in optional.items() if v is not None}}


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
        data: dict[str, str] | None = None,
    ) -> httpx.Response:
        key = uuid.uuid4().hex if method == "POST" else None
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            with ExitStack() as stack:
                files = stack.enter_context(upload_files(*upload)) if upload else None
                try:
                    response = self._http.request(
                        method,
                        path,
                        params=params,
                        files=files,
                        data=data,
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
        callback_url: str | None = None,
    ) -> TaskAccepted:
        """Upload a labelled dataset (a path or bytes) to embed; 202 with the task and job.
        ``callback_url`` is POSTed the job's view, signed, when the job ends."""
        params = _with_callback({}, callback_url)
        upload = (dataset, filename, progress, "file")
        response = self._send("POST", "/v1/tasks", params, upload=upload)
        result: TaskAccepted = _parsed(response, TaskAccepted)
        return result

    def recommend(
        self,
        dataset: Dataset,
        *,
        k: int = 5,
        method: RankingMethod | None = None,
        wait: float = 120.0,
        filename: str | None = None,
        progress: UploadProgress | None = None,
        callback_url: str | None = None,
    ) -> UploadRanking | JobAccepted:
        """Upload and rank in one call; a JobAccepted when not ranked within ``wait``."""
        params = _with_callback({"k": k, "method": method, "wait": wait}, callback_url)
        upload = (dataset, filename, progress, "file")
        response = self._send("POST", "/v1/recommendations", params, upload=upload)
        result: UploadRanking | JobAccepted = _parsed(response, UploadRanking, JobAccepted)
        return result

    def job(self, job_id: str) -> JobOut:
        result: JobOut = _parsed(self._send("GET", f"/v1/jobs/{job_id}"), JobOut)
        return result

    def experts(self, *, limit: int = 100, offset: int = 0) -> ExpertPage:
        response = self._send("GET", "/v1/experts", {"limit": limit, "offset": offset})
        result: ExpertPage = _parsed(response, ExpertPage)
        return result

    def expert(self, name: str) -> ExpertOut:
        result: ExpertOut = _parsed(self._send("GET", f"/v1/experts/{name}"), ExpertOut)
        return result

    def register_expert(
        self,
        name: str,
        architecture: str,
        input_size: int,
        weights: Dataset | None = None,
        *,
        weights_uri: str | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        normalisation: str | None = None,
        source_task: str | None = None,
        tags: Sequence[str] = (),
        callback_url: str | None = None,
        progress: UploadProgress | None = None,
    ) -> ItemAccepted:
        """Add an expert to the zoo (admin): its weights uploaded (a path or bytes: a state
        dict, a TorchScript archive, an ONNX model) or named by ``weights_uri``; 202 with the
        job that evaluates it on every zoo task."""
        form = _expert_form(
            name, architecture, input_size, weights_uri, mean, std, normalisation, source_task, tags
        )
        upload = None if weights is None else (weights, None, progress, "weights")
        params = _with_callback({}, callback_url)
        response = self._send("POST", "/v1/experts", params, upload=upload, data=form)
        result: ItemAccepted = _parsed(response, ItemAccepted)
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
        self,
        task_id: str,
        *,
        k: int = 5,
        method: RankingMethod | None = None,
        callback_url: str | None = None,
    ) -> Ranking | JobAccepted:
        """The task's ranking; a JobAccepted for the methods a worker computes."""
        params = _with_callback({"k": k, "method": method}, callback_url)
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
        data: dict[str, str] | None = None,
    ) -> httpx.Response:
        key = uuid.uuid4().hex if method == "POST" else None
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            with ExitStack() as stack:
                files = stack.enter_context(upload_files(*upload)) if upload else None
                try:
                    response = await self._http.request(
                        method,
                        path,
                        params=params,
                        files=files,
                        data=data,
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
        callback_url: str | None = None,
    ) -> TaskAccepted:
        params = _with_callback({}, callback_url)
        upload = (dataset, filename, progress, "file")
        response = await self._send("POST", "/v1/tasks", params, upload=upload)
        result: TaskAccepted = _parsed(response, TaskAccepted)
        return result

    async def recommend(
        self,
        dataset: Dataset,
        *,
        k: int = 5,
        method: RankingMethod | None = None,
        wait: float = 120.0,
        filename: str | None = None,
        progress: UploadProgress | None = None,
        callback_url: str | None = None,
    ) -> UploadRanking | JobAccepted:
        params = _with_callback({"k": k, "method": method, "wait": wait}, callback_url)
        upload = (dataset, filename, progress, "file")
        response = await self._send("POST", "/v1/recommendations", params, upload=upload)
        result: UploadRanking | JobAccepted = _parsed(response, UploadRanking, JobAccepted)
        return result

    async def job(self, job_id: str) -> JobOut:
        result: JobOut = _parsed(await self._send("GET", f"/v1/jobs/{job_id}"), JobOut)
        return result

    async def experts(self, *, limit: int = 100, offset: int = 0) -> ExpertPage:
        response = await self._send("GET", "/v1/experts", {"limit": limit, "offset": offset})
        result: ExpertPage = _parsed(response, ExpertPage)
        return result

    async def expert(self, name: str) -> ExpertOut:
        result: ExpertOut = _parsed(await self._send("GET", f"/v1/experts/{name}"), ExpertOut)
        return result

    async def register_expert(
        self,
        name: str,
        architecture: str,
        input_size: int,
        weights: Dataset | None = None,
        *,
        weights_uri: str | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        normalisation: str | None = None,
        source_task: str | None = None,
        tags: Sequence[str] = (),
        callback_url: str | None = None,
        progress: UploadProgress | None = None,
    ) -> ItemAccepted:
        form = _expert_form(
            name, architecture, input_size, weights_uri, mean, std, normalisation, source_task, tags
        )
        upload = None if weights is None else (weights, None, progress, "weights")
        params = _with_callback({}, callback_url)
        response = await self._send("POST", "/v1/experts", params, upload=upload, data=form)
        result: ItemAccepted = _parsed(response, ItemAccepted)
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
        self,
        task_id: str,
        *,
        k: int = 5,
        method: RankingMethod | None = None,
        callback_url: str | None = None,
    ) -> Ranking | JobAccepted:
        params = _with_callback({"k": k, "method": method}, callback_url)
        response = await self._send("GET", f"/v1/tasks/{task_id}/recommendations", params)
        result: Ranking | JobAccepted = _parsed(response, Ranking, JobAccepted)
        return result
