"""The web console: one page at ``/`` and its files under ``/console``, served by the API.

Everything the page runs ships in ``app/console`` (no CDN, no build step, no request to
another host), so it works on a platform network with no way out. The page is public (it
holds no data); what it shows it reads from ``/v1`` with the key a person gives it, as any
client would, so a tenant sees only its own tasks and jobs.

A strict Content-Security-Policy goes with every console answer: scripts and styles only from
this origin and never inline, images from this origin or the blobs the page makes of
thumbnails it fetched with the key, no frames, no forms to elsewhere. The page renders every
name a user controls as text (``textContent``), and the policy stops a script even if a name
ever reached markup."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

#: Where the console's files are served.
ASSETS = "/console"

#: The policy of every console answer (see the module's docstring).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def folder() -> Path:
    """The console's files, inside the installed package."""
    return Path(str(files("app") / "console"))


class _ConsoleFiles(StaticFiles):
    """The console's files with the policy headers; revalidated on every load (``no-cache``
    with the ETag StaticFiles sets) so a new release is never mixed with an old script."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI) -> None:
    """``/`` and ``/console/...`` on ``app`` (left out of the OpenAPI)."""
    page = folder() / "index.html"

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(page, headers={**_HEADERS, "Cache-Control": "no-cache"})

    app.mount(ASSETS, _ConsoleFiles(directory=folder()), name="console")
