"""The FastAPI application: ``uvicorn app.api.main:app`` or ``task2vec serve``."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import text
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.api import bundles, console, jobs, problems, tasks, zoo
from app.api import docs as api_docs
from app.api.auth import KeyCheck, RateLimiter
from app.api.door import Door
from app.api.headers import SecurityHeaders
from app.api.limits import RequestLength
from app.api.observe import RequestObserver
from app.api.schemas import Health, Ready
from app.api.shares import FairPool
from app.api.waits import Waits
from app.db.session import engine_for
from app.observability.metrics import ApiMetrics, ZooSize
from app.services import environment, objects, queue
from app.services import tasks as tasks_service
from app.services.jobs import JobKind
from app.services.serving import FAST_METHODS, ZooStates, limit_numeric_threads
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _check_database(settings: Settings) -> None:
    with engine_for(settings.resolved_database_url()).connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_broker(settings: Settings) -> None:
    queue.check(settings.resolved_broker_url())


def _check_objects(settings: Settings) -> None:
    store = objects.store_of(settings)
    if store is not None:
        store.check()


@asynccontextmanager
async def _following_the_zoo(app: FastAPI) -> AsyncIterator[None]:
    """A thread that keeps the served zoo version current while the app runs; the pool that
    validates uploads (``app.api.uploads.validate``) is sized."""
    tasks_service.EMBEDDINGS.size = app.state.settings.embedding_cache_size
    settings = app.state.settings
    app.state.validation = FairPool(
        settings.validation_threads, settings.validation_threads_per_tenant
    )
    stop = threading.Event()
    follower = threading.Thread(
        target=app.state.zoos.follow, args=(app.state.settings, stop), daemon=True
    )
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join(timeout=10)


class _ObservedApp(FastAPI):
    """Requests are identified and timed outside every other middleware, so that answers
    of the last-resort error handler (500) are too."""

    def build_middleware_stack(self) -> ASGIApp:
        stack = SecurityHeaders(super().build_middleware_stack())
        return RequestObserver(stack, self.state.metrics.requests)


def _served_zoo(zoos: ZooStates) -> ZooSize | None:
    state = zoos.served
    if state is None:
        return None
    version = state.version
    return ZooSize(content=version.content, tasks=version.tasks, experts=version.experts)


#: The process's own endpoints, beside the API's version 1.
_health = APIRouter()


@_health.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@_health.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics (documented in docs/operations.md, not in the OpenAPI: no key needed)."""
    body, media_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=media_type)


@_health.get(
    "/readyz",
    response_model=Ready,
    responses=problems.documented(503),
    summary="Database, broker, zoo index, object store and the data directory's disk are usable",
)
async def readyz(request: Request) -> Any:
    current: Settings = request.app.state.settings
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: _check_database(current)),
        ("broker", lambda: _check_broker(current)),
        ("index", lambda: request.app.state.zoos.current(current)),
        ("objects", lambda: _check_objects(current)),
    ):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as exc:  # logged, not answered: driver text names hosts
            log.warning("not ready: %s unavailable: %s", name, exc)
            checks[name] = "unavailable"
    disk = await run_in_threadpool(environment.space, current.data_dir)
    checks["storage"] = "ok" if disk.usable(current.min_free_bytes) else "unavailable"
    if checks["storage"] != "ok":
        log.warning(
            "not ready: the data directory's disk has %s bytes free (%d wanted)%s",
            disk.free_bytes,
            current.min_free_bytes,
            " and is read-only" if disk.read_only else "",
        )
    if all(v == "ok" for v in checks.values()):
        return Ready(status="ready", checks=checks, data_free_bytes=disk.free_bytes)
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    return problems.problem_response(
        503,
        "not-ready",
        "Not ready",
        f"unavailable: {failing}",
        headers={"Retry-After": str(problems.RETRY_AFTER_SECONDS)},
        checks=checks,
        data_free_bytes=disk.free_bytes,
    )


def _hold_state(app: FastAPI, settings: Settings) -> None:
    """What the app's requests share for its life: the zoo versions it serves, the rate
    limits, metrics, the key check's cache and the waits."""
    app.state.settings = settings
    app.state.zoos = ZooStates(fitted=FAST_METHODS)  # workers run the others
    app.state.rate_limiter = RateLimiter()
    app.state.metrics = ApiMetrics(
        settings.resolved_database_url(),
        queues={kind.value: kind.queue for kind in JobKind},
        served=lambda: _served_zoo(app.state.zoos),
        free_bytes=lambda: environment.space(settings.data_dir).free_bytes,
    )
    app.state.key_check = KeyCheck()
    app.state.waits = Waits(app.state.metrics.waiting)


#: The API's routers, in the order they are matched.
_ROUTERS = (tasks.router, jobs.router, zoo.router, bundles.router, _health)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """The length check and the door (authentication before any byte of a body is read);
    CORS only when origins are named; the client named in X-Forwarded-For only when the peer
    is one of ``trusted_proxies``."""
    app.add_middleware(RequestLength, settings=settings)
    routes = [route for router in _ROUTERS for route in router.routes]
    app.add_middleware(Door, settings=settings, check=app.state.key_check, routes=routes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Idempotency-Key", "Content-Type"],
        )
    if settings.trusted_proxies:  # outermost: the door counts failures of the client behind
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    docs = settings.public_docs if settings.public_docs is not None else settings.api_keys == "off"
    app = _ObservedApp(
        title="Task2Vec model recommendation",
        version="1.0.0",
        description="Upload a labelled image dataset; get the zoo's experts ranked for it.",
        lifespan=_following_the_zoo,
        docs_url=None,  # app.api.docs: the pages with files served here, not from a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    if docs:
        api_docs.install(app, "/openapi.json")
    _hold_state(app, settings)
    _add_middleware(app, settings)
    problems.install(app)
    for router in _ROUTERS:
        app.include_router(router)
    console.install(app)
    return app


def __getattr__(name: str) -> Any:
    """``app.api.main:app`` for uvicorn, built on first access with the environment's
    settings (tests build their own with ``create_app``). The process serves: its numeric
    libraries are limited to ``api_numeric_threads``."""
    if name == "app":
        settings = get_settings()
        limit_numeric_threads(settings.api_numeric_threads)
        return create_app(settings)
    raise AttributeError(name)
