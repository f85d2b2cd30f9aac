"""A checkpoint download (the probes' ``imagenet`` weights) gives up on a server that never
answers, that answers too slowly, or that sends more than a checkpoint can be, with a reason
that says so, and leaves nothing in the cache. The servers are real sockets on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.task2vec.probes import checkpoint_cache_dir, fetch_checkpoint

#: How long any one attempt may take before the test calls it stuck (the settings below ask
#: for a few seconds at most).
PATIENCE = 60.0
NAME = "resnet18-f37072fd.pth"


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


@contextmanager
def _server(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A loopback server that hands each connection to ``answer`` until the test ends."""
    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(conn, done), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/{NAME}"
    finally:
        done.set()
        thread.join(5)
        listener.close()


def _silent(conn: socket.socket, done: threading.Event) -> None:
    """Accepts, reads the request, never answers."""
    with conn:
        done.wait(2 * PATIENCE)


def _dripping(conn: socket.socket, done: threading.Event) -> None:
    """Answers at once, then one byte every 0.2 s: each read is quick, the whole never ends."""
    with conn:
        conn.recv(65536)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n")
            for _ in range(int(PATIENCE / 0.2)):
                if done.is_set():
                    return
                conn.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            return  # the client gave up


def _oversized(conn: socket.socket, done: threading.Event) -> None:
    with conn:
        conn.recv(65536)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
        except OSError:
            return


def _attempt(call: Callable[[], object]) -> BaseException:
    """The error ``call`` ends with, waited for at most ``PATIENCE`` seconds."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive(), f"the download still waits after {PATIENCE:g} s"
    assert outcome, "the download succeeded"
    return outcome[0]


def _cache_is_empty() -> bool:
    folder = checkpoint_cache_dir()
    return not folder.exists() or not any(folder.iterdir())


def test_a_server_that_never_answers_times_out(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASK2VEC_DOWNLOAD_TIMEOUT", "1")
    with _server(_silent) as url:
        error = _attempt(lambda: fetch_checkpoint(url, allow_download=True))
    assert "no answer within 1 s" in str(error), error
    assert _cache_is_empty()


def test_a_download_that_drips_stops_at_its_deadline(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASK2VEC_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setenv("TASK2VEC_DOWNLOAD_DEADLINE", "2")
    with _server(_dripping) as url:
        error = _attempt(lambda: fetch_checkpoint(url, allow_download=True))
    assert "not finished within 2 s" in str(error), error
    assert _cache_is_empty()


def test_a_download_larger_than_a_checkpoint_can_be_is_refused(torch_home: Path) -> None:
    with _server(_oversized) as url:
        error = _attempt(lambda: fetch_checkpoint(url, allow_download=True, max_bytes=1000))
    assert "more than 1000 bytes" in str(error), error
    assert _cache_is_empty()
