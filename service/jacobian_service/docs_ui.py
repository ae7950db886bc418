"""``/docs`` (Swagger UI) and ``/redoc`` served from the installed packages, never a CDN.

FastAPI's own pages load Swagger UI and ReDoc from jsDelivr, so on a machine without
internet (an offline GPU cluster, a sandbox) they draw nothing. The scripts and styles
come from the ``fastapi-offline`` wheel instead (Swagger UI 5 and ReDoc 2, vendored and
kept current by that package); only its files are used, not its app factory.

Every URL in the pages starts with the request's ``root_path``, so the pages work behind
a proxy that strips a prefix (``uvicorn --root-path``) and when the app is mounted under
a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request, params
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "ASSET_FILES", "add_docs", "assets_dir"]

ASSETS_URL = "/docs-assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The folder with the Swagger UI and ReDoc files (raises if a file is missing)."""
    import fastapi_offline

    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline at {folder} lacks {', '.join(missing)}")
    return folder


def add_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc",
             assets_url: str = ASSETS_URL, dependencies: Sequence[params.Depends] = ()) -> None:
    """Add GET ``docs_url``, ``docs_url``/oauth2-redirect, ``redoc_url`` and the assets.

    Create ``app`` with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not
    added as well. ``dependencies`` (e.g. an API-key check) guard the two pages; the
    assets are the public Swagger UI and ReDoc files and stay open.
    """
    app.mount(assets_url, StaticFiles(directory=assets_dir()), name="docs-assets")
    oauth2_redirect_url = f"{docs_url}/oauth2-redirect"

    def prefix(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(docs_url, include_in_schema=False, dependencies=list(dependencies))
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            swagger_js_url=f"{root}{assets_url}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets_url}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets_url}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False, dependencies=list(dependencies))
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{assets_url}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{assets_url}/favicon.png",
            with_google_fonts=False,
        )
