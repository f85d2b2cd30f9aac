"""SQLAlchemy 2 models: the state of the service.

Files (uploads, embeddings, the FAISS index) live in the data directory, addressed by content;
rows hold their paths and what the API reports about them. A job row is committed before its
Celery task is sent, and workers write progress and results back here.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A stored moment with its zone: SQLite hands datetimes back without one; they are
    stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A moment, stored in UTC and read back with its zone on every database: PostgreSQL
    keeps the zone, SQLite stores the wall-clock text and hands back a naive datetime (which
    the API would show without an offset). A naive value written is taken to be UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value).astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value).astimezone(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


#: How constraints and indexes the models leave unnamed are named, the same on every dialect
#: (without it PostgreSQL and SQLite name them differently, or not at all). Explicit names stay
#: as they are. Migration 0006 renamed what 0001-0005 had created to these names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


#: The tenant of requests made without API keys (the embedded default on loopback).
LOCAL_TENANT = "local"


class ApiKey(Base):
    """An API key: the secret is shown once at creation and stored only as its sha256 (keys
    are 256 random bits, so a fast hash is enough). Bound to a tenant and scopes."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the key's public prefix
    secret_sha256: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Dataset(Base):
    """An uploaded labelled dataset, stored once per tenant and content (sha256): the file on
    disk is shared, the row (and what it reveals) is the tenant's own."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant", "sha256", name="uq_datasets_tenant_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(
        String(64), default=LOCAL_TENANT, server_default=LOCAL_TENANT, index=True
    )
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    num_images: Mapped[int | None] = mapped_column(Integer)
    classes: Mapped[list[Any] | None] = mapped_column(JSON)
    class_counts: Mapped[list[Any] | None] = mapped_column(JSON)
    #: Members left out (not images, undecodable): [{"member": ..., "reason": ...}].
    skipped: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Task(Base):
    """A dataset seen through one probe and embedding configuration."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("dataset_id", "config_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(
        String(64), default=LOCAL_TENANT, server_default=LOCAL_TENANT, index=True
    )
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    probe: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    dataset: Mapped[Dataset] = relationship()
    embedding: Mapped[EmbeddingRow | None] = relationship(back_populates="task", uselist=False)


class EmbeddingRow(Base):
    """A task's Task2Vec embedding: the file and what the API shows about it."""

    __tablename__ = "embeddings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    dim: Mapped[int] = mapped_column(Integer)
    difficulty: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    task: Mapped[Task] = relationship(back_populates="embedding")


class ZooItemStatus(StrEnum):
    """An expert or zoo task joins the published zoo once ``ready``: its matrix entries exist."""

    pending = "pending"
    ready = "ready"
    failed = "failed"


class Expert(Base):
    """A feature extractor of the zoo (the columns of the performance matrix)."""

    __tablename__ = "experts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    #: A weight file under the data directory, or a keyword of the probe loader
    #: ("imagenet", "random:N").
    weights: Mapped[str] = mapped_column(String(1024))
    input_size: Mapped[int] = mapped_column(Integer)
    mean: Mapped[list[Any]] = mapped_column(JSON)
    std: Mapped[list[Any]] = mapped_column(JSON)
    source_task: Mapped[str | None] = mapped_column(String(255))
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default=ZooItemStatus.pending)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ZooTask(Base):
    """A task of the zoo the service ranks against (the rows of the performance matrix)."""

    __tablename__ = "zoo_tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    domain: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[Any]] = mapped_column(JSON)
    #: The task's recipe (``app.zoo.tasks.TaskSpec`` as JSON).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    embedding_path: Mapped[str | None] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(16), default=ZooItemStatus.pending)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MatrixEntry(Base):
    """Held-out error of an expert's fixed features on a zoo task."""

    __tablename__ = "matrix_entries"
    __table_args__ = (UniqueConstraint("zoo_task_id", "expert_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    zoo_task_id: Mapped[int] = mapped_column(ForeignKey("zoo_tasks.id"))
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"))
    error: Mapped[float] = mapped_column(Float)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class Job(Base):
    """Work for a Celery worker. The row exists before the message; the message holds its id.

    The row is the ledger: a worker claims it for an attempt (``attempt``) under a lease
    (``lease_until``) that it renews while it works; a sweep re-sends jobs whose lease expired
    or whose message (sent at ``sent_at``, re-sent ``resends`` times) may have been lost."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(
        String(64), default=LOCAL_TENANT, server_default=LOCAL_TENANT, index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The request that created the job (``X-Request-ID``): its worker's log lines carry it.
    request_id: Mapped[str | None] = mapped_column(String(128))
    #: Where the job's view is POSTed when it ends (``app.services.deliveries``), if anywhere.
    callback_url: Mapped[str | None] = mapped_column(String(2000))
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    task_id: Mapped[str | None] = mapped_column(ForeignKey("tasks.id"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Recommendation(Base):
    """A ranking served for a task: method, zoo version and the ranked experts."""

    __tablename__ = "recommendations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(
        String(64), default=LOCAL_TENANT, server_default=LOCAL_TENANT, index=True
    )
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    method: Mapped[str] = mapped_column(String(32))
    #: The rank job that computed it (None: ranked by the API in-process); one row per job,
    #: however often the job runs.
    job_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    index_version_id: Mapped[int | None] = mapped_column(ForeignKey("index_versions.id"))
    ranking: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IndexVersionRow(Base):
    """A published version of the zoo: a folder with the tasks, embeddings, experts, matrix
    and FAISS index. The API and the workers serve the largest (zoos only grow, so it is also
    the newest); ``content`` hashes what it holds."""

    __tablename__ = "index_versions"
    __table_args__ = (UniqueConstraint("content", name="uq_index_versions_content"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    zoo: Mapped[str] = mapped_column(String(1024))
    probe: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    experts: Mapped[int] = mapped_column(Integer)
    #: The zoo's embedding configuration and evaluation protocol, which every later version
    #: keeps.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    content: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyRecord(Base):
    """The answer to a POST sent with an ``Idempotency-Key``: the same key and request again
    get it replayed; the same key with another request is refused."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("tenant", "key", name="uq_idempotency_tenant_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    location: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookSecret(Base):
    """A tenant's key for signing its webhook deliveries. Stored as it is (an HMAC needs the
    key itself, unlike an API key, which is only compared); created on first use."""

    __tablename__ = "webhook_secrets"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    #: Given up: a refused address, an answer that retrying cannot change, or a day of tries.
    failed = "failed"


class WebhookDelivery(Base):
    """The POST a job owes its ``callback_url`` once it ended: one per job, committed with the
    job's terminal status, then tried by a worker until delivered or given up.

    ``next_attempt_at`` is when the next try is due (the sweep re-sends a message that is long
    overdue: the broker lost it); ``sending_until`` is the lease of the try under way, so that
    of two messages for one delivery only one POSTs at a time."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2000))
    #: ``job.succeeded`` or ``job.failed`` (the ``X-T2V-Event`` header).
    event: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sending_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
