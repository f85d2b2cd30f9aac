"""Log records as one JSON object a line (for collectors) or as text (for a person), both
carrying the request and job they belong to; one configuration for the API (uvicorn's logs
included) and the workers (Celery's included)."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any, Literal

from app.observability import context

LogFormat = Literal["json", "text"]

#: Attributes every LogRecord has; any other attribute came as ``extra`` and is logged too.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
#: What uvicorn's access lines are made of.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
#: Extras that repeat the message (uvicorn's coloured copy of it).
_SKIPPED = frozenset({"color_message"})


def _ids() -> dict[str, str]:
    ids = {}
    if (request := context.request_id.get()) is not None:
        ids["request_id"] = request
    if (job := context.job_id.get()) is not None:
        ids["job_id"] = job
    return ids


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id"?, "job_id"?, "exc_info"?, ...}``:
    the time in ISO 8601 UTC, the ids when known, a traceback as one string, and any
    ``extra`` fields. uvicorn's access lines also get ``client``, ``method``, ``path`` and
    ``status``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            entry.update(zip(_ACCESS_FIELDS, args, strict=True))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _SKIPPED and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message [request_id=… job_id=…]``, for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = _ids()
        return f"{line} [{' '.join(f'{k}={v}' for k, v in ids.items())}]" if ids else line


def logging_config(fmt: LogFormat, level: str | int = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that sends every record (the root logger's, uvicorn's,
    Celery's) through one stderr handler with the formatter of ``fmt``. Also given to
    uvicorn as ``log_config``, which applies it in each of its processes."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"t2v": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "t2v": {
                "class": "logging.StreamHandler",
                "formatter": "t2v",
                "stream": "ext://sys.stderr",
            }
        },
        # uvicorn's and Celery's loggers keep no handlers of their own and propagate here;
        # Celery's process pool (billiard) logs as "multiprocessing", which never propagates.
        "loggers": {
            **{
                name: {"handlers": [], "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")
            },
            "multiprocessing": {"handlers": ["t2v"], "propagate": False, "level": "WARNING"},
        },
        "root": {
            "handlers": ["t2v"],
            "level": level if isinstance(level, str) else logging.getLevelName(level),
        },
    }


def configure(fmt: LogFormat, level: str | int = "INFO") -> None:
    """``logging_config`` for this process; warnings become log records too."""
    logging.config.dictConfig(logging_config(fmt, level))
    logging.captureWarnings(True)
