"""A TCP relay in front of a server that can be cut and mended: the fault drills' way of
taking the database away from a process and giving it back, without stopping the server."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.helpers import free_port


class Relay:
    """A TCP relay in front of PostgreSQL that can be cut (every connection dropped, new ones
    refused) and mended: the database becomes unreachable for the API and comes back."""

    def __init__(self, target: int = 5432) -> None:
        self.target = target
        self.port = free_port()
        self._open: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.mend()

    def mend(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        assert self._server is not None
        with contextlib.suppress(OSError):  # wakes the accepting thread (Linux)
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
