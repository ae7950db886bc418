"""The interactive docs pages (Swagger UI, ReDoc) for /docs and /redoc."""

from __future__ import annotations

from typing import Any

__all__ = ["asset_routes", "redoc_html", "swagger_html"]

_SWAGGER = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
_REDOC = "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"


def swagger_html(root_path: str) -> str:
    return f"""<!doctype html><html><head><title>jacobian-service</title>
<link rel="stylesheet" href="{_SWAGGER}/swagger-ui.css"></head><body><div id="swagger-ui"></div>
<script src="{_SWAGGER}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{root_path}/openapi.json", dom_id: "#swagger-ui"}});</script></body></html>"""


def redoc_html(root_path: str) -> str:
    return f"""<!doctype html><html><head><title>jacobian-service</title></head><body>
<redoc spec-url="{root_path}/openapi.json"></redoc><script src="{_REDOC}"></script></body></html>"""


def asset_routes() -> list[Any]:
    return []
