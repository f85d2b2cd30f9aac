"""Slow and half-sent requests against a real ``task2vec serve`` (uvicorn), over raw sockets:
a connection that never finishes its request's headers is closed, a body that stalls or
drips slower than the least rate is cut off with 408, and a key without the scope of the route
it calls is answered 403 while its body has not been sent at all.

The API runs with deadlines of a second; a test waits up to ``PATIENCE`` for what should
come within them, so only a deadline that never comes fails it."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from tests.helpers import (
    PATIENCE,
    create_key,
    free_port,
    fresh_database,
    service_settings,
    start_api,
    stop,
)

pytestmark = pytest.mark.slow

DEADLINES = {
    "T2V_REQUEST_HEADER_SECONDS": "1",
    "T2V_REQUEST_BODY_IDLE_SECONDS": "1",
    "T2V_REQUEST_BODY_MIN_BYTES_PER_SECOND": "1000",
}


class Api:
    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port

    def key(self, *scopes: str) -> str:
        return create_key(self.settings, "acme", list(scopes))[1]

    def connect(self) -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE)
        connection.settimeout(PATIENCE)
        return connection


@pytest.fixture(scope="module")
def api(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``task2vec serve`` with keys required and deadlines of a second."""
    tmp_path = tmp_path_factory.mktemp("slow-clients")
    with fresh_database("sqlite", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        port, log = free_port(), tmp_path / "api.log"
        process = start_api(settings, port, log, T2V_API_KEYS="required", **DEADLINES)
        try:
            yield Api(settings, port)
        finally:
            stop(process)


def _until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {PATIENCE:.0f} s; received {received!r}") from None
    return received


def _one_answer(connection: socket.socket) -> bytes:
    """One whole answer: its headers and its Content-Length of body."""
    received = b""
    while True:
        head, end, body = received.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if end and length and len(body) >= int(length[1]):
            return received
        chunk = connection.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk


def _head(token: str, path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


#: The start of an upload's part: what follows is the file's bytes.
FILE_PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def test_a_connection_that_never_finishes_its_headers_is_closed(api: Api) -> None:
    silent, halfway = api.connect(), api.connect()
    with silent, halfway:
        halfway.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        assert _until_closed(halfway) == b""
        assert _until_closed(silent) == b""


def test_a_body_that_stalls_is_cut_off_with_408(api: Api) -> None:
    with api.connect() as connection:
        connection.sendall(_head(api.key("tasks:write"), "/v1/tasks", 100_000) + b"--b\r\n")
        answer = _until_closed(connection)
    assert _status(answer) == 408
    assert b"request-timeout" in answer


def test_a_body_that_drips_is_cut_off_with_408(api: Api) -> None:
    with api.connect() as connection:
        connection.sendall(_head(api.key("tasks:write"), "/v1/tasks", 100_000) + FILE_PART)
        started = time.monotonic()
        try:
            while time.monotonic() - started < PATIENCE:  # 20 bytes a second
                connection.sendall(b"PK\x03\x04\x00")
                time.sleep(0.25)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off: what it was answered is read below
        answer = _until_closed(connection)
    assert _status(answer) == 408
    assert b"request-timeout" in answer


@pytest.mark.parametrize(
    ("scope", "path"), [("tasks:write", "/v1/experts"), ("zoo:admin", "/v1/tasks")]
)
def test_a_key_without_the_routes_scope_is_refused_before_its_body(
    api: Api, scope: str, path: str
) -> None:
    with api.connect() as connection:
        connection.sendall(_head(api.key("tasks:read", scope), path, 5_000_000))
        answer = _one_answer(connection)  # not one byte of the body was sent
    assert _status(answer) == 403, answer
    assert b"insufficient-scope" in answer
