"""A real HTTP server on loopback that receives webhooks: it records every POST and answers
each path with the statuses planned for it, then 200."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from tests.helpers import eventually


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int
    #: When it arrived, in Unix seconds (whole: as a signature's timestamp is).
    at_unix: int


class _Receiver(BaseHTTPRequestHandler):
    """Records every POST; answers each path with the statuses planned for it, then 200."""

    plans: ClassVar[dict[str, list[int]]]
    got: ClassVar[list[Received]]
    arrived: ClassVar[threading.Condition]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.arrived:
            plan = self.plans.get(self.path, [])
            status = plan.pop(0) if plan else 200
            arrived = Received(self.path, dict(self.headers), body, status, int(time.time()))
            self.got.append(arrived)
            self.arrived.notify_all()
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # expert weights that do not load
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"junk")

    def log_message(self, *args: object) -> None:
        pass


class Receiver:
    def __init__(self, handler: type[_Receiver], base: str) -> None:
        self.handler, self.base = handler, base
        #: The processes that send here (a worker, an API): a wait fails at once when one
        #: of them has exited, instead of waiting for POSTs that can no longer come.
        self.senders: list[subprocess.Popen[bytes]] = []

    def plan(self, path: str, *statuses: int) -> str:
        self.handler.plans[path] = list(statuses)
        return self.base + path

    def wait(self, path: str, count: int) -> list[Received]:
        """The first ``count`` POSTs to ``path``, once they came."""
        what = f"{count} POSTs to {path}"
        eventually(lambda: self.count(path) >= count, what, processes=self.senders)
        with self.handler.arrived:
            return [r for r in self.handler.got if r.path == path][:count]

    def count(self, path: str) -> int:
        with self.handler.arrived:
            return len([r for r in self.handler.got if r.path == path])


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A receiver on a free loopback port, served from a thread until the block ends."""
    handler = type(
        "Handler", (_Receiver,), {"plans": {}, "got": [], "arrived": threading.Condition()}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Receiver(handler, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
