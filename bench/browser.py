"""The console in a real browser: Debian's Chromium (``/usr/bin/chromium``, installed by
``make browser``) driven through Playwright, with the package's own browser downloads never
used. The browser tests (``tests/browser``) and ``bench.console`` share it.

Every page is watched: a request to any host but the service's is refused and recorded (the
console must work with no way out), and page errors and Content-Security-Policy violations
are recorded, so a test can fail on any of them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Route,
    ViewportSize,
    sync_playwright,
)

#: A screen a person reads a ranking on.
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}


def chromium_path() -> str:
    """The system Chromium, or a clear error naming the command that installs it."""
    found = os.environ.get("T2V_CHROMIUM") or shutil.which("chromium")
    if not found or not Path(found).is_file():
        raise RuntimeError("Chromium is not installed: run `make browser` (Debian's chromium)")
    return found


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium for the life of the block. Chromium's sandbox needs user
    namespaces a root process in a container rarely has, so root runs it without."""
    arguments = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=arguments)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watch:
    """What a page did that it must not: requests to another host, page errors (uncaught
    exceptions), CSP violations, and dialogs (``alert`` from an injected script)."""

    origin: str
    off_host: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        return not (self.off_host or self.errors or self.violations or self.dialogs)

    def report(self) -> str:
        return (
            f"off-host requests: {self.off_host}; page errors: {self.errors}; "
            f"CSP violations: {self.violations}; dialogs: {self.dialogs}"
        )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def watched_page(browser: Browser, base: str) -> tuple[Page, Watch]:
    """A new tab (its own context: its own session storage) on ``base``, watched."""
    watch = Watch(_origin(base))
    context = browser.new_context(viewport=VIEWPORT, service_workers="block")

    def only_the_service(route: Route) -> None:
        url = route.request.url
        if _origin(url) == watch.origin:
            route.continue_()
        else:
            watch.off_host.append(url)
            route.abort()

    def console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            watch.violations.append(message.text)

    def dialog(opened: object) -> None:
        watch.dialogs.append(str(getattr(opened, "message", "")))
        opened.dismiss()  # type: ignore[attr-defined]

    context.route("**/*", only_the_service)
    page = context.new_page()
    page.on("pageerror", lambda error: watch.errors.append(str(error)))
    page.on("console", console)
    page.on("dialog", dialog)
    return page, watch


def first_paint_ms(page: Page) -> float | None:
    """The page's first contentful paint, as the browser measured it."""
    value = page.evaluate(
        "() => { const e = performance.getEntriesByName('first-contentful-paint')[0];"
        " return e ? e.startTime : null; }"
    )
    return None if value is None else float(value)


def transferred_bytes(page: Page, prefix: str = "/console/") -> dict[str, int]:
    """Bytes of each console file the page loaded (decoded body sizes), by path; the page
    itself under ``/``."""
    entries = page.evaluate(
        "() => [{name: location.href, size: performance.getEntriesByType('navigation')[0]"
        ".decodedBodySize}].concat(performance.getEntriesByType('resource')"
        ".map(e => ({name: e.name, size: e.decodedBodySize})))"
    )
    sizes: dict[str, int] = {}
    for entry in entries:
        path = urlsplit(entry["name"]).path
        if path == "/" or path.startswith(prefix):
            sizes[path] = int(entry["size"])
    return sizes
