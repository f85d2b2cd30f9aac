"""How the service's long-running processes log and export metrics: the API under uvicorn
(its access and error logs through the project's formatter) and the Celery worker (Celery's
own logging left to the project's configuration, metrics of every pool process merged on
one port)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.cli.common import fail
from app.observability import logs, multiprocess
from app.settings import get_settings


def log_format(default: logs.LogFormat) -> logs.LogFormat:
    """``T2V_LOG_FORMAT``, or the command's own default. Also put in the environment, so
    that the processes the command starts log alike."""
    fmt = get_settings().log_format or default
    os.environ["T2V_LOG_FORMAT"] = fmt
    return fmt


def serve_api(
    host: str, port: int, workers: int = 1, default_format: logs.LogFormat = "json"
) -> None:
    """uvicorn on ``app.api.main:app``. With several processes, their request metrics go to a
    private multiprocess directory (``app.observability.metrics``), merged at each scrape."""
    import uvicorn

    config = logs.logging_config(log_format(default_format))
    directory = multiprocess.enable("api") if workers > 1 else None
    try:
        uvicorn.run(
            "app.api.main:app",
            host=host,
            port=port,
            workers=workers,
            log_level="info",
            log_config=config,
            server_header=False,  # no software banner in the answers
            http="app.api.connections:HeaderDeadlineProtocol",  # late request headers close
            proxy_headers=False,  # the app believes T2V_TRUSTED_PROXIES only (app.api.main)
        )
    finally:
        if directory is not None:
            multiprocess.disable(directory)


def _celery_logging(fmt: logs.LogFormat, loglevel: int | str | None = None, **_: Any) -> None:
    logs.configure(fmt, loglevel or "INFO")


@contextmanager
def worker_observability() -> Iterator[logs.LogFormat]:
    """For the life of ``task2vec worker``: Celery configures no logging of its own (its
    ``setup_logging`` signal has a receiver: the project's configuration, in the log format
    yielded), and with ``T2V_WORKER_METRICS_PORT`` the worker's metrics are served on that
    port."""
    from functools import partial

    from celery.signals import setup_logging

    settings = get_settings()
    fmt = log_format("json")
    logs.configure(fmt)  # from the start (Celery's checks warn before it sets up logging)
    setup_logging.connect(partial(_celery_logging, fmt), weak=False, dispatch_uid="t2v-logging")
    if settings.worker_metrics_port == 0:
        yield fmt
        return
    directory = multiprocess.enable("worker")
    try:
        port, host = settings.worker_metrics_port, settings.worker_metrics_host
        try:
            server = multiprocess.serve(port, host, directory)
        except OSError as exc:  # taken (another worker on this machine), or no such address
            reason = exc.strerror or type(exc).__name__
            raise fail(
                ValueError(
                    f"cannot serve the worker's metrics on {host}:{port} ({reason}): set "
                    "T2V_WORKER_METRICS_PORT to a free port for each worker on a machine, or "
                    "to 0 for none"
                )
            ) from None
        try:
            yield fmt
        finally:
            server.shutdown()
    finally:
        multiprocess.disable(directory)
