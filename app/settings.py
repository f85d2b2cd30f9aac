"""One settings class for the command line, the API and the workers (prefix ``T2V_``).

The defaults are the embedded single-machine setup: SQLite for state and a SQLite-backed
Celery broker (kombu's SQLAlchemy transport), both under the data directory. Production points
``T2V_DATABASE_URL`` at PostgreSQL and ``T2V_BROKER_URL`` at Redis, and either gives every
process on every machine the same data directory (a shared volume) or sets
``T2V_STORAGE_URL`` to an object store that they share instead (``app.services.objects``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.task2vec.limits import ArchiveLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2V_", env_file=".env", extra="ignore")

    #: Built zoos, caches, uploads and embeddings. Without ``storage_url``, every process
    #: must see the same one; with it, each process's is only its private cache.
    data_dir: Path = Path("data")
    #: ``s3://bucket/prefix``: the object store every process shares uploads, embeddings,
    #: expert weights and published zoo versions through (credentials and region from
    #: boto3's chain: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    #: ``AWS_DEFAULT_REGION``). Empty: the data directory itself is shared.
    storage_url: str = ""
    #: The S3 endpoint of a store other than AWS (SeaweedFS, MinIO); empty: AWS.
    s3_endpoint_url: str = ""
    #: ``/readyz`` answers not ready while the data directory's disk has fewer free bytes
    #: than this (0: only a read-only or unreadable disk is not ready).
    min_free_bytes: int = Field(default=1024**3, ge=0)
    #: SQLAlchemy URL of the state database; empty: SQLite under ``data_dir``.
    database_url: str = ""
    #: Celery broker URL; empty: kombu's SQLAlchemy transport on SQLite under ``data_dir``.
    broker_url: str = ""
    #: The zoo the service ranks against: a preset name (built on first use) or a zoo folder.
    zoo: str = "starter"
    #: Largest accepted upload, in bytes.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    #: Slow clients (``task2vec serve``): a connection's request headers must all arrive
    #: within ``request_header_seconds`` of its first byte (of its opening, for a new
    #: connection), or it is closed; a request's body must not pause longer than
    #: ``request_body_idle_seconds``, and after that long it must keep arriving at
    #: ``request_body_min_bytes_per_second`` on average, or it is answered 408.
    request_header_seconds: float = Field(default=20.0, gt=0)
    request_body_idle_seconds: float = Field(default=30.0, gt=0)
    request_body_min_bytes_per_second: float = Field(default=16 * 1024, ge=0)
    #: A zoo bundle's bytes once decompressed (``task2vec zoo import``, ``POST
    #: /v1/zoo/import``): extraction stops at the first chunk past it and removes what it
    #: wrote. Unset: twice ``max_upload_bytes`` (weights, arrays and datasets barely
    #: compress: the starter bundle's 18 MB hold 31 MB).
    max_bundle_bytes: int | None = Field(default=None, gt=0)
    #: Upload limits (``app.task2vec.limits.ArchiveLimits``): archive members, bytes per
    #: member and in all once uncompressed, compression ratio per member, pixels per image and
    #: in all, decoded-to-compressed ratio per image, classes, the fewest images per class,
    #: and the largest fraction of undecodable images that is skipped (reported) rather than
    #: refused.
    max_archive_members: int = Field(default=200_000, gt=0)
    max_member_bytes: int = Field(default=64 * 1024**2, gt=0)
    max_uncompressed_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    max_image_pixels: int = Field(default=16 * 1024**2, gt=0)
    max_total_pixels: int = Field(default=1024**3, gt=0)
    max_image_ratio: float = Field(default=250.0, gt=1)
    #: Uploads validated (decoded) at once by an API process, outside its request threads;
    #: of them, at most ``validation_threads_per_tenant`` of one tenant's (its other uploads
    #: wait, and a freed thread goes to the waiting tenant holding the fewest).
    validation_threads: int = Field(default=2, ge=1)
    validation_threads_per_tenant: int = Field(default=1, ge=1)
    #: Seconds one upload's images may take to decode (checked image by image; one image is
    #: bounded by ``max_image_pixels``): past it the upload is refused.
    max_decode_seconds: float = Field(default=60.0, gt=0)
    max_classes: int = Field(default=1_000, ge=2)
    min_images_per_class: int = Field(default=2, ge=1)
    max_skipped_fraction: float = Field(default=0.1, ge=0, le=1)
    #: Longest ``wait`` a client may ask for on POST /v1/recommendations, in seconds.
    max_wait_seconds: float = Field(default=600.0, ge=0)
    #: Requests of one key that may wait at once; past it a request answers 202 at once.
    max_waits_per_key: int = Field(default=8, ge=0)
    #: How often (seconds) the API and the workers look for a newly published zoo version.
    zoo_poll_seconds: float = Field(default=2.0, ge=0)
    #: Published zoo versions whose folders are kept on disk (older ones are deleted).
    zoo_versions_kept: int = Field(default=3, ge=2)
    #: A folder whose weight files an expert may name by path (``weights_uri``); unset, the
    #: weights are uploaded or named by URL.
    weights_import_dir: Path | None = None
    #: Let downloads (``weights_uri``) and webhooks (``callback_url``) reach loopback,
    #: private, link-local and reserved addresses: for tests and closed networks only
    #: (``app.services.outbound``).
    allow_private_urls: bool = False
    #: A download ends when it takes longer than this, or when it reads slower than
    #: ``download_min_bytes_per_second`` after its first 10 s.
    download_deadline_seconds: float = Field(default=600.0, gt=0)
    download_min_bytes_per_second: float = Field(default=16 * 1024, ge=0)
    #: Webhooks (``callback_url``): each try's connect and read timeout, in seconds; the
    #: first retry's delay, doubling after each try (up to an hour); how long after the job
    #: ended a delivery is given up; and how overdue a try must be before the sweep re-sends
    #: its message (the broker may have lost it).
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_retry_base_seconds: float = Field(default=30.0, gt=0)
    webhook_give_up_seconds: float = Field(default=86400.0, gt=0)
    webhook_resend_seconds: float = Field(default=300.0, gt=0)
    #: Deliveries a worker of the ``webhooks`` queue makes at once (threads: a try mostly
    #: waits on the network), and how many of them one tenant's may hold: a tenant's
    #: deliveries past that wait a moment and are sent again, so that its stalled receivers
    #: cannot hold up another tenant's.
    webhook_concurrency: int = Field(default=8, ge=1)
    webhook_tenant_concurrency: int = Field(default=2, ge=1)
    #: API keys: "required", "off" (every request is the tenant "local"; only allowed on a
    #: loopback address), or "auto" (off on loopback, required elsewhere; decided by
    #: ``task2vec serve``/``run``, and required when the app is started any other way).
    api_keys: Literal["auto", "required", "off"] = "auto"
    #: Serve /docs, /redoc and /openapi.json; unset: only when API keys are off (with keys
    #: required, the API's description is not handed to whoever asks).
    public_docs: bool | None = None
    #: Requests per minute and key (a token bucket of that size per API process); 0: no limit.
    rate_limit_per_minute: int = Field(default=600, ge=0)
    #: Failed authentications (no key, a malformed, unknown or revoked one) a client address
    #: may make a minute; past them its further failures are answered 429 until the budget
    #: refills (a good key from it is still served). 0: no limit.
    auth_failures_per_minute: int = Field(default=30, ge=0)
    #: Reverse proxies (addresses or networks, as JSON: ``["10.0.0.0/8"]``) whose
    #: X-Forwarded-For and X-Forwarded-Proto the API believes: a request from one is taken to
    #: come from the client it names. Empty (the default): no proxy is believed, not even one
    #: on this machine, and a request's client is its peer.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Origins allowed to call the API from a browser; empty (the default): CORS stays off.
    cors_origins: list[str] = Field(default_factory=list)
    #: A job's lease, in seconds: a worker renews it every third of this while it works; a
    #: job whose lease expired (its worker was killed or cut off) is re-sent by the sweep.
    job_lease_seconds: float = Field(default=20.0, gt=0)
    #: Attempts a job gets before it fails as lost.
    job_max_attempts: int = Field(default=3, ge=1)
    #: A queued job whose message is older than this (seconds) is re-sent, doubling after
    #: each re-send: a broker may have lost it.
    job_resend_seconds: float = Field(default=120.0, gt=0)
    #: How often (seconds) every worker sweeps for expired leases and stale queued jobs.
    sweep_seconds: float = Field(default=5.0, gt=0)
    #: A stored upload or weight file that no row holds (its request was cut off before
    #: committing) is removed by the sweep once this old: far longer than any request takes.
    orphan_files_seconds: float = Field(default=3600.0, gt=0)
    #: How long an Idempotency-Key holds its request's answer (then the key is free again).
    idempotency_ttl_seconds: float = Field(default=86400.0, gt=0)
    #: Rankings each API process keeps per zoo version (a ranking is a pure function of the
    #: task's embedding, the method and the version); 0: compute every read.
    ranking_cache_size: int = Field(default=4096, ge=0)
    #: Task embeddings each process keeps in memory (with their tenant); 0: read every time.
    embedding_cache_size: int = Field(default=1024, ge=0)
    #: Threads for numeric libraries (BLAS, OpenMP, torch) inside an API process: requests
    #: already run in parallel on the threadpool, and small parallel kernels on top of that
    #: only contend for the cores.
    api_numeric_threads: int = Field(default=1, ge=1)
    #: Torch threads in each worker process; 0: the machine's cores shared out among the
    #: worker's processes (``task2vec worker --concurrency``), at least one each. The engine
    #: runs that many batches side by side (``app.task2vec.lanes``).
    worker_torch_threads: int = Field(default=0, ge=0)
    #: Device for the workers' embeddings: auto (CUDA when present), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: How a worker's embeddings run on its CPU (lanes, memory layout, bfloat16):
    #: "measured" times the candidate plans once per CPU model at the worker's first start
    #: (a minute or more of both cores, beside its first jobs) and caches the fastest under
    #: the data directory (``workers.execution``); "default" runs the plan tuned on an AMD
    #: EPYC without measuring. Production workers measure; ``task2vec run`` on a laptop need
    #: not spend its first minute on it.
    execution_plan: Literal["default", "measured"] = "default"
    #: Log records as JSON objects, one a line, or as text for a person; unset, the command
    #: decides: json for ``task2vec serve`` and ``task2vec worker``, text for ``task2vec run``.
    log_format: Literal["json", "text"] | None = None
    #: ``task2vec worker`` serves its Prometheus metrics on this port (0: not at all), on
    #: ``worker_metrics_host``.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"

    def bundle_bytes(self) -> int:
        """The most bytes a zoo bundle may expand to (``max_bundle_bytes``)."""
        return self.max_bundle_bytes or 2 * self.max_upload_bytes

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        """Empty, or ``s3://bucket`` with an optional key prefix."""
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if value.strip() and (parts.scheme != "s3" or not parts.netloc or parts.query):
            raise ValueError(f"{value!r} is not of the form s3://bucket/prefix")
        return value.strip()

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses_or_networks(cls, value: list[str]) -> list[str]:
        """Each written as uvicorn compares it (a network by its own address: 10.0.0.0/8)."""
        import ipaddress

        return [
            str(ipaddress.ip_network(v, strict=False) if "/" in v else ipaddress.ip_address(v))
            for v in (item.strip() for item in value)
        ]

    def dataset_limits(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_members=self.max_archive_members,
            max_total_bytes=self.max_uncompressed_bytes,
            max_member_bytes=self.max_member_bytes,
            max_compression_ratio=self.max_compression_ratio,
            max_image_pixels=self.max_image_pixels,
            max_total_pixels=self.max_total_pixels,
            max_image_ratio=self.max_image_ratio,
            max_decode_seconds=self.max_decode_seconds,
            max_classes=self.max_classes,
            min_images_per_class=self.min_images_per_class,
            max_skipped_fraction=self.max_skipped_fraction,
        )

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'task2vec.db').resolve()}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"


def get_settings() -> Settings:
    return Settings()
