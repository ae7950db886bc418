"""The HTTP floor: a bare Starlette app answering precomputed Jacobian bytes.

``python -m bench._floor --port P --dir D`` serves ``POST /v1/functions/{name}/jacobian``
with ``D/{name}.npy`` when the request accepts ``application/x-npy``, else
``D/{name}.json``. It reads the request body (as the service must) but parses nothing,
computes nothing. It runs under the same ``uvicorn.run`` call as ``jacobian-service
serve`` (see ``jacobian_service/cli.py``), so the difference to the service is the
service's own work: parsing, checking, scheduling, computing, encoding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def build_app(directory: Path) -> Starlette:
    answers: dict[tuple[str, str], bytes] = {}
    for path in directory.iterdir():
        media = "application/x-npy" if path.suffix == ".npy" else "application/json"
        answers[(path.stem, media)] = path.read_bytes()

    async def jacobian(request: Request) -> Response:
        await request.body()
        media = "application/x-npy" if "application/x-npy" in request.headers.get("accept", "") else "application/json"
        body = answers.get((request.path_params["name"], media))
        if body is None:
            return JSONResponse({"code": "function_not_found"}, status_code=404)
        return Response(body, media_type=media)

    async def ready(request: Request) -> Response:
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[
        Route("/v1/functions/{name}/jacobian", jacobian, methods=["POST"]),
        Route("/readyz", ready),
        Route("/healthz", ready),
    ])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", type=Path, required=True)
    args = p.parse_args()
    # The same call as jacobian_service.cli._serve (default drain grace 30 s, log level info).
    uvicorn.run(build_app(args.dir), host=args.host, port=args.port, timeout_graceful_shutdown=30, log_level="info")


if __name__ == "__main__":
    main()
