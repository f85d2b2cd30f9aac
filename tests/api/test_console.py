"""The console's page and files as the API serves them: from the service only, under a strict
Content-Security-Policy, with nothing inline for the policy to refuse, within the size budget,
and public (the page holds no data) when keys are required. The browser tests (tests/browser)
drive it."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api import console
from app.api.main import create_app
from app.settings import Settings

#: The whole console's files, uncompressed: the issue's budget.
BUDGET = 500_000


class _Page(HTMLParser):
    """The URLs the page fetches, and anything a strict policy would refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href"):
            value = found.get(name)
            if value and tag in {"script", "link", "img", "iframe"}:
                self.urls.append(value)
        self.inline += [f"{tag} {name}" for name in found if name.startswith("on")]
        if "style" in found:
            self.inline.append(f"{tag} style")
        if tag == "style":
            self.inline.append("style element")
        if tag == "script" and not found.get("src"):
            self.inline.append("inline script")


def _files() -> list[Path]:
    return sorted(p for p in console.folder().iterdir() if p.is_file())


@pytest.mark.parametrize("keys", ["off", "required"])
def test_the_page_loads_its_files_from_the_service_under_the_policy(
    settings: Settings, keys: str
) -> None:
    with TestClient(create_app(settings.model_copy(update={"api_keys": keys}))) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == console.CONTENT_SECURITY_POLICY
        parsed = _Page()
        parsed.feed(page.text)
        assert parsed.inline == []
        assert parsed.urls, "the page loads its files"
        for url in parsed.urls:
            assert re.match(r"^/[^/]", url), url  # this service, never another host
            answer = client.get(url)
            assert answer.status_code == 200, url
            assert answer.headers["content-security-policy"] == console.CONTENT_SECURITY_POLICY
            assert answer.headers["x-content-type-options"] == "nosniff"
        module = client.get("/console/main.js")
        assert module.headers["content-type"].startswith("text/javascript")
        # The page is public; what it shows needs a key when keys are required.
        assert client.get("/v1/zoo").status_code == (401 if keys == "required" else 200)


def test_the_policy_allows_nothing_from_elsewhere_and_nothing_inline() -> None:
    policy = dict(part.strip().split(" ", 1) for part in console.CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'", directive
    assert policy["img-src"] == "'self' blob:"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in console.CONTENT_SECURITY_POLICY


def test_the_scripts_write_names_as_text_and_import_only_their_own_files() -> None:
    for path in _files():
        if path.suffix != ".js":
            continue
        source = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source.replace("no innerHTML", ""), f"{path.name}: {sink}"
        for imported in re.findall(r'from "([^"]+)"', source):
            assert imported.startswith("./"), imported
            assert (path.parent / imported).is_file(), imported


def test_the_console_fits_its_budget() -> None:
    total = sum(p.stat().st_size for p in _files())
    assert total < BUDGET, f"{total} bytes"
