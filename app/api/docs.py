"""The API's documentation pages, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, with every
script, style and icon served by the API itself.

FastAPI's own pages load their files from a public CDN, so on an air-gapped platform network
they render blank. The files come from the installed ``fastapi-offline`` package (MIT; Swagger
UI and ReDoc under their own licences, as that package ships them), under ``/docs-assets``;
ReDoc's web fonts are left out (the page falls back to the browser's)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the pages' files are served.
ASSETS = "/docs-assets"


def assets_folder() -> Path:
    """The folder of the installed package's Swagger UI and ReDoc files."""
    return Path(str(files("fastapi_offline") / "static"))


def install(app: FastAPI, openapi_url: str) -> None:
    """``/docs``, ``/redoc`` and their files on ``app`` (left out of the OpenAPI)."""
    title = app.title

    app.mount(ASSETS, StaticFiles(directory=assets_folder()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title}: API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title}: API reference",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
