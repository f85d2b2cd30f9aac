"""Commands of the service: database migrations, the API, workers, the whole service on one
machine, API keys."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from sqlalchemy.orm import Session

from app.cli.common import app, fail, load_zoo
from app.cli.processes import log_format, serve_api, worker_observability
from app.db.session import session_scope
from app.progress import err
from app.services import api_keys, deliveries
from app.settings import Settings, get_settings
from app.task2vec.errors import Task2VecError

if TYPE_CHECKING:
    from app.services.versions import Version


def _session() -> AbstractContextManager[Session]:
    """One unit of work on the configured database."""
    return session_scope(get_settings().resolved_database_url())


db_app = typer.Typer(help="The service's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply the migrations to T2V_DATABASE_URL (default: SQLite under the data directory)."""
    from app.db.migrate import upgrade

    url = get_settings().resolved_database_url()
    upgrade(url, revision)
    print(f"database at {url.split('@')[-1]} is at revision {revision}")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="API processes (each holds the served zoo in memory)")
    ] = 1,
) -> None:
    """Run the HTTP API (workers run separately: `task2vec worker`). Logs JSON lines unless
    T2V_LOG_FORMAT=text."""
    _key_policy(host)
    require_migrated()
    serve_api(host, port, workers)


def require_migrated() -> None:
    """Refuse to start on a database the migrations have not brought up to date (it would
    answer every request with an error), saying what to run."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.db.migrate import revisions

    url = get_settings().resolved_database_url()
    try:
        current, head = revisions(url)
    except SQLAlchemyError as exc:
        raise fail(ValueError(f"the database cannot be reached ({type(exc).__name__})")) from None
    if current != head:
        state = "was never migrated" if current is None else f"is at revision {current}"
        raise fail(
            ValueError(
                f"the database {state}, the code needs {head}: run `task2vec db upgrade` first"
            )
        )


def _key_policy(host: str) -> None:
    """Decide whether the API needs keys, tell the user, and pass it on to the app (which
    reads its settings from the environment). Without keys only loopback is allowed."""
    import ipaddress
    import os

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    policy = get_settings().api_keys
    if policy == "auto":
        policy = "off" if loopback else "required"
    if policy == "off" and not loopback:
        raise fail(
            ValueError(
                f"T2V_API_KEYS=off is only allowed on a loopback address, not {host}: create "
                "keys with `task2vec keys create` and leave T2V_API_KEYS unset"
            )
        )
    os.environ["T2V_API_KEYS"] = policy
    if policy == "off":
        err.print(
            f"API keys: off. Only this machine can reach {host}; every request acts as the "
            "tenant 'local'. Listening on another address requires keys."
        )
    else:
        err.print("API keys: required (Authorization: Bearer <key>; `task2vec keys create`)")


keys_app = typer.Typer(help="API keys: each bound to a tenant and scopes.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant whose data the key reaches")],
    scope: Annotated[
        list[str],
        typer.Option(help="tasks:read, tasks:write, zoo:admin (repeat for several)"),
    ],
    name: Annotated[str | None, typer.Option(help="a note: who or what uses it")] = None,
) -> None:
    """Create a key; the token is printed once and never stored."""
    try:
        with _session() as session:
            row, token = api_keys.create(session, tenant=tenant, scopes=scope, name=name)
    except ValueError as exc:
        raise fail(exc) from None
    err.print(f"key {row.id} for tenant {row.tenant!r}, scopes {', '.join(row.scopes)}")
    print(token)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: id, tenant, scopes, created, revoked."""
    with _session() as session:
        rows = api_keys.listing(session)
    for row in rows:
        revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        print(
            f"{row.id}  {row.tenant:20}  {','.join(row.scopes):32}  "
            f"{row.created_at:%Y-%m-%d %H:%M}  {revoked}  {row.name or ''}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> None:
    """Revoke a key: it stops working at once."""
    with _session() as session:
        revoked = api_keys.revoke(session, key_id=key_id)
    if not revoked:
        raise fail(ValueError(f"no active key {key_id!r}"))
    err.print(f"key {key_id} revoked")


@keys_app.command("webhook-secret")
def keys_webhook_secret(
    tenant: Annotated[str, typer.Option(help="the tenant ('local' when keys are off)")],
) -> None:
    """Print the tenant's webhook signing secret, creating it if it has none. Receivers check
    X-T2V-Signature with it (task2vec_client.webhooks.verify)."""
    try:
        print(deliveries.secret_for(get_settings(), tenant))
    except ValueError as exc:
        raise fail(exc) from None


@app.command("worker")
def worker_command(
    queues: Annotated[
        str, typer.Option(help="comma-separated queues (webhooks: callback deliveries)")
    ] = "embed,evaluate,webhooks",
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="worker processes for jobs (default 1); threads for webhook deliveries "
            "(default T2V_WEBHOOK_CONCURRENCY)"
        ),
    ] = None,
    beside: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run a Celery worker against T2V_BROKER_URL; start any number, on any machines. Jobs run
    in worker processes; webhook deliveries in threads of a worker of their own (started
    beside this one when its queues include webhooks and jobs' queues), so that stalled
    receivers never hold up a job. Logs JSON lines unless T2V_LOG_FORMAT=text; serves metrics
    on T2V_WORKER_METRICS_PORT."""
    from app.services.queue import WEBHOOK_QUEUE

    if beside is not None:
        _die_with(beside)
    served = [name for name in queues.split(",") if name]
    with worker_observability() as fmt:  # first: it decides how metrics are kept
        if WEBHOOK_QUEUE in served and len(served) > 1:
            with deliveries_worker():
                jobs = [name for name in served if name != WEBHOOK_QUEUE]
                _celery_worker(fmt, jobs, concurrency or 1)
        elif served == [WEBHOOK_QUEUE]:
            threads = concurrency or get_settings().webhook_concurrency
            _celery_worker(fmt, served, threads, "threads")
        else:
            _celery_worker(fmt, served, concurrency or 1)


def _celery_worker(fmt: str, queues: list[str], concurrency: int, pool: str = "prefork") -> None:
    from app.services.jobs import EMBED_QUEUE, EVALUATE_QUEUE
    from app.services.queue import WARM_UP_SETTING, celery_for

    quiet = ["--quiet"] if fmt == "json" else []  # no banner: JSON lines only
    options = [
        "--loglevel=INFO",
        f"--queues={','.join(queues)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
    ]
    celery = celery_for(get_settings().resolved_broker_url())
    celery.conf.worker_concurrency = concurrency  # the pool processes share the cores
    celery.conf[WARM_UP_SETTING] = bool({EMBED_QUEUE, EVALUATE_QUEUE} & set(queues))
    celery.worker_main([*quiet, "worker", *options])


@contextmanager
def deliveries_worker() -> Iterator[None]:
    """A worker of the webhooks queue beside this one, for the block: its own process, so
    that deliveries have slots of their own. It writes its metrics where this one's are
    served, dies with this process however it ends, and is stopped as `run` stops its
    worker."""
    import os

    from app.services.queue import WEBHOOK_QUEUE

    env = {**os.environ, "T2V_WORKER_METRICS_PORT": "0"}
    command = [sys.executable, "-m", "app.cli", "worker", f"--queues={WEBHOOK_QUEUE}"]
    deliveries = subprocess.Popen([*command, f"--beside={os.getpid()}"], env=env)
    try:
        yield
    finally:
        stop_worker(deliveries)


def _die_with(parent: int) -> None:
    """SIGTERM to this process when ``parent`` is gone (at once if it already is)."""
    import os

    from billiard.util import set_pdeathsig  # type: ignore[import-untyped]

    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        raise typer.Exit(code=0)


@app.command("run")
def run_command(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
) -> None:
    """The whole service on this machine: migrate the database, import (the starter zoo ships
    as a bundle) or build the zoo and publish it on first use, start a Celery worker process
    and the API. Ctrl-C stops both. Logs text for a person at the terminal unless
    T2V_LOG_FORMAT=json."""
    from app.db.migrate import upgrade

    settings = get_settings()
    try:
        upgrade(settings.resolved_database_url())
        version = first_version(settings)
    except (Task2VecError, ValueError) as exc:
        raise fail(exc) from None
    err.print(
        f"zoo version {version.content[:12]}: {version.tasks} tasks, {version.experts} experts"
    )
    _key_policy(host)
    log_format("text")  # the worker started here logs alike
    # uvicorn raises the signal that stopped it again once it is done; SIGTERM then ends
    # this process at once unless a handler turns it into an exit that runs `finally`.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"])
    base = f"http://{host}:{port}"
    err.print(
        f"serving on {base} (OpenAPI: {base}/docs). Try:\n"
        f"  curl -F file=@shoes.zip '{base}/v1/recommendations?wait=120'"
    )
    try:
        serve_api(host, port, default_format="text")
    finally:
        stop_worker(worker)


def first_version(settings: Settings) -> Version:
    """The zoo version to serve; on a first start, the configured zoo published: imported
    from the bundle it ships as (the starter zoo, in seconds), else built (minutes).

    Several processes may run this at once (replicas starting together): one import wins the
    zoo's names and the others' are refused; a process that finds the zoo's rows but no
    version yet (the winner still publishing, or killed before it did) publishes them itself,
    and identical versions are one row. So every caller gets the same version, and a second
    run changes nothing."""
    from app.services.bundles import import_shipped, shipped, staged
    from app.services.layout import DataLayout
    from app.services.publishing import current_version, ensure_published, publish

    version = current_version(settings) or import_shipped(settings)
    bundle = shipped(settings)
    if version is None and bundle is not None and _holds_zoo_items(settings):
        with staged(settings, bundle) as verified:  # the version's configuration
            version = publish(settings, base=(verified.zoo.embed_config, verified.zoo.protocol))
    if version is None:  # no bundle (or refused): build the configured zoo and publish it
        load_zoo(settings.zoo, quiet=False)
        version = ensure_published(settings, DataLayout.of(settings).zoo(settings.zoo))
    return version


def _holds_zoo_items(settings: Settings) -> bool:
    from sqlalchemy import select

    from app.db.models import ZooTask

    with session_scope(settings.resolved_database_url()) as session:
        return session.scalar(select(ZooTask.id).limit(1)) is not None


#: How `run` stops its worker: SIGTERM (a warm stop: the job under way finishes), then after
#: this many seconds SIGQUIT (a cold stop: the job is cut off, and its lease brings it back
#: on the next start), then SIGKILL (the pool processes die with their main process).
WARM_STOP_SECONDS = 10.0
COLD_STOP_SECONDS = 5.0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Stop the worker `run` started within seconds, whatever it is doing. Its processes
    got the signal that stopped `run` too when it came to the whole group; a repeated one
    would cut this short, so they are ignored meanwhile."""
    for repeated in (signal.SIGTERM, signal.SIGINT):
        signal.signal(repeated, signal.SIG_IGN)
    for sig, patience in (
        (signal.SIGTERM, WARM_STOP_SECONDS),
        (signal.SIGQUIT, COLD_STOP_SECONDS),
        (signal.SIGKILL, COLD_STOP_SECONDS),
    ):
        if worker.poll() is not None:
            return
        if sig != signal.SIGTERM:
            err.print(f"the worker is still running: {signal.Signals(sig).name}")
        worker.send_signal(sig)
        try:
            worker.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            continue
