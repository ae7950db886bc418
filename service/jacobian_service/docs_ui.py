"""``/docs`` (Swagger UI) and ``/redoc`` served from the installed packages, never a CDN.

The usual pages load Swagger UI and ReDoc from jsDelivr, so on a machine without
internet (an offline GPU cluster, a sandbox) they draw nothing. The scripts and styles
come from the ``fastapi-offline`` wheel instead (Swagger UI 5 and ReDoc 2, vendored and
kept current by that package); only its files are used.

Every URL in the pages starts with the request's ``root_path``, so the pages work behind
a proxy that strips a prefix (``uvicorn --root-path``) and when the app is mounted under
a path. The pages follow ``DOCS_AUTH``; the asset files are public Swagger UI and ReDoc
code and stay open.

The pages name each asset with its content's digest (``?v=``): such a URL never changes
what it holds, so it is cached for a year (``immutable``), and an upgrade of the files
changes the URL. Any other URL of an asset is revalidated each time (``no-cache``); the
digest is also the ETag, answered with 304.
"""

from __future__ import annotations

import functools
import hashlib
import html
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from .errors import NotFound

__all__ = ["ASSETS_URL", "ASSET_FILES", "asset", "assets_dir", "redoc", "swagger_ui"]

ASSETS_URL = "/docs-assets"
ASSET_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


@functools.cache
def assets_dir() -> Path:
    """The folder with the Swagger UI and ReDoc files (raises if a file is missing)."""
    import fastapi_offline

    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline at {folder} lacks {', '.join(missing)}")
    return folder


@functools.cache
def _asset_file(name: str) -> tuple[bytes, str]:
    """An asset's bytes and the digest of them, read once (a few MB in all)."""
    body = (assets_dir() / name).read_bytes()
    return body, hashlib.sha256(body).hexdigest()[:16]


def _root(request: Request) -> str:
    return html.escape(str(request.scope.get("root_path", "")).rstrip("/"), quote=True)


def _url(root: str, name: str) -> str:
    """An asset's versioned URL (see the module's docstring)."""
    return f"{root}{ASSETS_URL}/{name}?v={_asset_file(name)[1]}"


async def swagger_ui(request: Request) -> Response:
    root = _root(request)
    return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jacobian-service - Swagger UI</title>
<link rel="stylesheet" href="{_url(root, "swagger-ui.css")}">
<link rel="icon" href="{_url(root, "favicon.png")}"></head>
<body><div id="swagger-ui"></div>
<script src="{_url(root, "swagger-ui-bundle.js")}"></script>
<script>SwaggerUIBundle({{url: '{root}/openapi.json', dom_id: '#swagger-ui',
  presets: [SwaggerUIBundle.presets.apis], layout: 'BaseLayout', deepLinking: true}});</script>
</body></html>""")


async def redoc(request: Request) -> Response:
    root = _root(request)
    return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jacobian-service - ReDoc</title>
<link rel="icon" href="{_url(root, "favicon.png")}"></head>
<body><redoc spec-url='{root}/openapi.json'></redoc>
<script src="{_url(root, "redoc.standalone.js")}"></script>
</body></html>""")


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison against each listed tag, or ``*``."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


async def asset(request: Request, file: str) -> Response:
    media_type = ASSET_FILES.get(file)
    if media_type is None:  # only the named files: no path ever reaches the file system
        raise NotFound(f"no docs asset {file!r}")
    body, digest = _asset_file(file)
    etag = f'"{digest}"'
    versioned = request.query_params.get("v") == digest
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable" if versioned else "no-cache"}
    if _etag_matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)
