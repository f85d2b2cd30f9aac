"""The HTTP/1.1 connections ``task2vec serve`` accepts: uvicorn's h11 protocol with a deadline
for a request's headers, which uvicorn lacks (its keep-alive timeout starts only after a first
answer, and nothing bounds headers that arrive a byte at a time). A new connection must send
its request's headers within ``request_header_seconds`` of opening, and a kept-alive one within
as long of its next request's first byte; otherwise it is closed. Bodies have deadlines of
their own (``app.api.limits``)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.settings import get_settings


@functools.cache
def header_seconds() -> float:
    return get_settings().request_header_seconds


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are late."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of a kept-alive connection's next request
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self.header_deadline = self.loop.call_later(header_seconds(), self._late)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _late(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
