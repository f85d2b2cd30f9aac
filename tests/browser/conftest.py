"""The console in Debian's Chromium against real processes: ``task2vec serve`` and a
``task2vec worker`` on the tiny zoo (SQLite, the SQLite-backed broker), keys off for most
tests and required for the key flow. Each test saves a screenshot under ``T2V_SCREENSHOTS``
(default: the session's temporary folder); a page that asks another host for anything, throws,
breaks the Content-Security-Policy or opens a dialog fails its test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from playwright.sync_api import Browser, Page

from app.settings import Settings
from bench.browser import Watch, chromium, watched_page
from tests.helpers import (
    PATIENCE,
    eventually,
    free_port,
    fresh_database,
    service_settings,
    start_api,
    start_worker,
    stop,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Console:
    """A running service: its settings, base URL and processes."""

    settings: Settings
    base: str
    processes: tuple[subprocess.Popen[bytes], ...]
    log: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=PATIENCE)

    def until(self, check: Callable[[], T], what: str) -> T:
        return eventually(check, what, processes=list(self.processes), log=self.log)


@contextmanager
def _service(tiny_zoo: Path, folder: Path, **env: str) -> Iterator[Console]:
    with fresh_database("sqlite", folder) as url:
        settings = service_settings(tiny_zoo, url, folder)
        log = folder / "processes.log"
        worker = start_worker(settings, log)
        try:
            port = free_port()
            api = start_api(settings, port, log, **env)
            try:
                yield Console(settings, f"http://127.0.0.1:{port}", (api, worker), log)
            finally:
                stop(api)
        finally:
            stop(worker)


@pytest.fixture(scope="package")
def service(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """Keys off, as on loopback: every request is the tenant ``local``."""
    with _service(tiny_zoo, tmp_path_factory.mktemp("console")) as console:
        yield console


@pytest.fixture(scope="package")
def keyed_service(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """Keys required, as on a platform network."""
    folder = tmp_path_factory.mktemp("console-keys")
    with _service(tiny_zoo, folder, T2V_API_KEYS="required") as console:
        yield console


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """For this package's tests only: Playwright's sync API runs an event loop on the main
    thread while it is open, and later tests that start one of their own (asyncio.run) must
    not find it running."""
    with chromium() as running:
        yield running


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("T2V_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Tab:
    """A watched browser tab; ``shot`` saves a screenshot of the whole page."""

    page: Page
    watch: Watch
    folder: Path

    def shot(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def open_tab(browser: Browser, screenshots: Path) -> Iterator[Callable[[str], Tab]]:
    """Opens watched tabs (each its own context: its own session storage); every one must
    stay clean."""
    tabs: list[Tab] = []

    def opening(base: str) -> Tab:
        page, watch = watched_page(browser, base)
        page.set_default_timeout(PATIENCE * 1000)
        tabs.append(Tab(page, watch, screenshots))
        return tabs[-1]

    yield opening
    for tab in tabs:
        tab.page.context.close()
    for tab in tabs:
        assert tab.watch.clean(), tab.watch.report()
