"""The chat page at ``/``: static files shipped inside the package (``server/web``), no build step.

It adds two routes and nothing else: ``GET /`` (the page) and the static path ``/ui`` (its script, style
and the vendored Markdown renderer). Both sit outside ``/v1``, so the API key does not guard them: the
page asks for the key itself and sends it with each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).parent / "web"
STATIC_PATH = "/ui"
# The page runs only its own scripts and talks only to this server: a model answer that got past the
# Markdown renderer's escaping still could not load a script or send data elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",  # a server upgrade serves the new page at once
    "X-Content-Type-Options": "nosniff",
}


def mount_web_ui(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its files under ``/ui``."""
    index = WEB_DIR / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"the web UI's page is missing from the package: {index}")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount(STATIC_PATH, StaticFiles(directory=WEB_DIR), name="ui")
