"""The interactive API documentation, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with no network.

FastAPI's own pages load their scripts from a CDN, so on a machine without internet (the usual case for a
self-hosted model server) they are blank. These are the same pages (FastAPI's ``get_swagger_ui_html`` /
``get_redoc_html``) pointed at the Swagger UI 5 and ReDoc 2 bundles that the ``fastapi-offline`` package
ships, served from ``/docs-assets``. Like ``/openapi.json``, they sit outside ``/v1``: the API key does not
guard them.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/docs-assets"
ASSETS_PACKAGE = "fastapi_offline"  # its static/ folder: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js
# The pages load nothing from elsewhere: ReDoc's sidebar shows a logo from its CDN and Swagger UI a validator
# badge from swagger.io; the browser does not even ask for them. (FastAPI's pages start the bundles with
# inline scripts and styles; ReDoc's search runs in a worker made from a blob.)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def assets_dir() -> str:
    """The packaged folder of the documentation pages' scripts and styles."""
    return str(files(ASSETS_PACKAGE) / "static")


def _contained(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


def mount_api_docs(app: FastAPI) -> None:
    """Serve ``/docs``, its OAuth2 redirect page, ``/redoc`` and their assets; the app must have been made
    with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_dir()), name="docs-assets")
    title = f"{app.title} API"

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")  # behind a path prefix, as FastAPI's own pages

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return _contained(
            get_swagger_ui_html(
                openapi_url=f"{base}{app.openapi_url}",
                title=title,
                swagger_js_url=f"{base}{ASSETS_PATH}/swagger-ui-bundle.js",
                swagger_css_url=f"{base}{ASSETS_PATH}/swagger-ui.css",
                swagger_favicon_url=f"{base}{ASSETS_PATH}/favicon.png",
                oauth2_redirect_url=f"{base}{app.swagger_ui_oauth2_redirect_url}",
                swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
            )
        )

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return _contained(
            get_redoc_html(
                openapi_url=f"{base}{app.openapi_url}",
                title=title,
                redoc_js_url=f"{base}{ASSETS_PATH}/redoc.standalone.js",
                redoc_favicon_url=f"{base}{ASSETS_PATH}/favicon.png",
                with_google_fonts=False,  # fonts from Google's CDN: the system's fonts instead
            )
        )
