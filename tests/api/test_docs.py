"""The API's documentation pages load nothing from another host: on an air-gapped network
they must render from the service alone."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings


class _Links(HTMLParser):
    """Every URL a page makes the browser fetch: scripts, styles, icons, images, frames."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href"} and value and tag in {"script", "link", "img", "iframe"}:
                self.urls.append(value)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_docs_page_loads_every_file_from_the_service(settings: Settings, page: str) -> None:
    with TestClient(create_app(settings)) as client:
        answer = client.get(page)
        assert answer.status_code == 200
        links = _Links()
        links.feed(answer.text)
        assert links.urls, "the page loads its files"
        for url in links.urls:
            assert url.startswith("/"), url
            assert not url.startswith("//"), url  # another host, scheme-relative
            fetched = client.get(url)
            assert fetched.status_code == 200, url
            assert len(fetched.content) > 1000, url
        assert "fonts.googleapis.com" not in answer.text
        assert "cdn.jsdelivr.net" not in answer.text


def test_the_docs_files_are_not_served_when_the_docs_are_private(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": "required"})
    with TestClient(create_app(keyed)) as client:
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 404
