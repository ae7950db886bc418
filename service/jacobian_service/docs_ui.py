"""``/docs`` (Swagger UI) and ``/redoc`` served from the installed packages, never a CDN.

The usual pages load Swagger UI and ReDoc from jsDelivr, so on a machine without
internet (an offline GPU cluster, a sandbox) they draw nothing. The scripts and styles
come from the ``fastapi-offline`` wheel instead (Swagger UI 5 and ReDoc 2, vendored and
kept current by that package); only its files are used.

Every URL in the pages starts with the request's ``root_path``, so the pages work behind
a proxy that strips a prefix (``uvicorn --root-path``) and when the app is mounted under
a path. The pages follow ``DOCS_AUTH``; the asset files are public Swagger UI and ReDoc
code and stay open.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

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


def _root(request: Request) -> str:
    return html.escape(str(request.scope.get("root_path", "")).rstrip("/"), quote=True)


async def swagger_ui(request: Request) -> Response:
    root = _root(request)
    return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jacobian-service - Swagger UI</title>
<link rel="stylesheet" href="{root}{ASSETS_URL}/swagger-ui.css">
<link rel="icon" href="{root}{ASSETS_URL}/favicon.png"></head>
<body><div id="swagger-ui"></div>
<script src="{root}{ASSETS_URL}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: '{root}/openapi.json', dom_id: '#swagger-ui',
  presets: [SwaggerUIBundle.presets.apis], layout: 'BaseLayout', deepLinking: true}});</script>
</body></html>""")


async def redoc(request: Request) -> Response:
    root = _root(request)
    return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jacobian-service - ReDoc</title>
<link rel="icon" href="{root}{ASSETS_URL}/favicon.png"></head>
<body><redoc spec-url='{root}/openapi.json'></redoc>
<script src="{root}{ASSETS_URL}/redoc.standalone.js"></script>
</body></html>""")


async def asset(request: Request, file: str) -> Response:
    media_type = ASSET_FILES.get(file)
    if media_type is None:  # only the named files: no path ever reaches the file system
        raise NotFound(f"no docs asset {file!r}")
    return FileResponse(assets_dir() / file, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
