"""The HTTP endpoints, kept thin: read, parse (off the loop when large), schedule, encode."""

from __future__ import annotations

import asyncio
import hmac
import math
import platform
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio.to_thread
import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from jacobian_client import wire

from .engine import Call, Engine, Result, host_dtype
from .errors import (
    ClientGone,
    Forbidden,
    InvalidInput,
    MalformedBody,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from .parsing import Kind, Options, media_type_of, parse_call
from .responses import acceptable, choose, encode, is_single_array, problem_response
from .scheduler import Batchable, JobInfo
from .state import ServiceState

__all__ = ["DERIVATIVE_KINDS", "handle", "router"]

# Bodies and results above this are parsed / encoded on a thread, not on the event loop.
_OFFLOAD_BYTES = 256 << 10
_RESULT_KEY = {"jacobian": "jacobian", "hessian": "hessian", "evaluate": "output", "vjp": "vjp", "jvp": "jvp",
               "hvp": "hvp"}  # hvp: issue 12
DERIVATIVE_KINDS = frozenset(_RESULT_KEY)


def _state(request: Request) -> ServiceState:
    return request.app.state.service


async def require_key(request: Request) -> None:  # async: no threadpool hop per request
    """Bearer API keys, compared in constant time; no keys configured turns auth off."""
    keys = _state(request).api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header or scheme.lower() != "bearer" or not token:
        raise Unauthorized("send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    supplied = token.strip().encode()
    if not any(hmac.compare_digest(supplied, key.encode()) for key in keys):  # no early exit on a match
        raise Forbidden("the API key is not valid")


async def _require_metrics_key(request: Request) -> None:
    if _state(request).settings.metrics_auth:
        await require_key(request)


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


# ------------------------------------------------------------------ operations


@router.get("/healthz", tags=["operations"], summary="Liveness: 200 while the process serves")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], summary="Readiness: 200 once warmed up, 503 while draining")
async def readyz(request: Request) -> Response:
    state = _state(request)
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready"})
    why = "draining" if state.draining else "warming up"
    return problem_response(Unavailable(f"not ready: {why}", headers={"Retry-After": "1"}), request.state.request_id)


@router.get("/metrics", tags=["operations"], dependencies=[Depends(_require_metrics_key)])
async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.queue_depth.set(state.scheduler.depth())
    for device in state.devices:
        if device.type == "cuda":
            state.metrics.device_memory.labels(str(device)).set(torch.cuda.memory_allocated(device))
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@v1.get("/info", tags=["operations"])
async def info(request: Request) -> dict[str, Any]:
    from . import __version__

    s = _state(request).settings
    return {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "devices": [str(d) for d in _state(request).devices],
        "torch_threads": torch.get_num_threads(),
        "functions": len(_state(request).registry),
        "limits": {
            "max_request_bytes": s.max_request_bytes,
            "max_result_bytes": s.max_result_bytes,
            "max_array_elements": s.max_array_elements,
            "max_array_rank": s.max_array_rank,
            "max_npz_members": s.max_npz_members,
            "max_json_depth": s.max_json_depth,
            "max_queue": s.max_queue,
            "max_batch_size": s.max_batch_size,
            "max_batch_wait_ms": s.max_batch_wait_ms,
            "request_timeout_s": s.request_timeout_s,
            "memory_budget_bytes": [e.memory_budget for e in _state(request).scheduler.engines],
            "stream_threshold_bytes": s.stream_threshold_bytes,
        },
        "auth": bool(_state(request).api_keys),
    }


@v1.get("/functions", tags=["functions"], summary="Every registered function")
async def list_functions(request: Request) -> list[dict[str, Any]]:
    return [spec.describe() for spec in _state(request).registry]


@v1.get("/functions/{name}", tags=["functions"], summary="One function's description")
async def describe_function(name: str, request: Request) -> dict[str, Any]:
    return _state(request).registry.get(name).describe()


# ------------------------------------------------------------------ derivatives


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise MalformedBody("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit}")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _deadline(state: ServiceState, request: Request) -> float:
    """The server's timeout, shortened by the client's ``X-Request-Timeout`` (seconds)."""
    timeout = state.settings.request_timeout_s
    header = request.headers.get("x-request-timeout")
    if header:
        try:
            asked = float(header)
        except ValueError:
            raise InvalidInput("X-Request-Timeout must be a number of seconds") from None
        if not math.isfinite(asked) or asked <= 0:
            raise InvalidInput("X-Request-Timeout must be a positive number of seconds")
        timeout = min(timeout, asked)
    return time.monotonic() + timeout


async def _offload(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    if size > _OFFLOAD_BYTES:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


def _meta(info: JobInfo, result: Result, compute_s: float | None = None) -> dict[str, Any]:
    return {
        "device": str(info.engine.device) if info.engine else None,
        "chunk_size": result.chunk_size,
        "batch_size": info.batch_size,
        "mode": result.mode,
        "queue_ms": round(info.queue_s * 1e3, 3),
        "compute_ms": round((info.compute_s if compute_s is None else compute_s) * 1e3, 3),
    }


def _could_be_single(call: Call, kind: Kind) -> bool:
    """Whether the result may be one bare array, judged before compute."""
    if call.spec.has_aux or call.return_output:
        return False
    return kind in ("evaluate", "jvp") or not call.as_tuple


def _batchable(call: Call, kind: Kind) -> Batchable | None:
    """Requests that may share one vmap: same function, options and per-example shapes."""
    if kind not in ("jacobian", "evaluate", "hessian") or call.batched or call.rows is not None:
        return None
    key = (kind, call.signature(), call.chunk_size, call.mode, call.return_output)
    return Batchable(key, kind, call)


async def _derivative(request: Request, name: str, kind: Kind) -> Response:
    state = _state(request)
    started = time.monotonic()
    spec = state.registry.get(name)
    media = acceptable(request.headers.get("accept"))
    body = await _read_body(request, state.settings.max_request_bytes)
    content_type = media_type_of(request.headers.get("content-type"))
    call: Call = await _offload(
        len(body), parse_call, spec, kind, content_type, body, dict(request.query_params), state.settings.wire_limits
    )
    call.deadline = _deadline(state, request)
    call.max_result_bytes = state.settings.max_result_bytes
    stop = threading.Event()  # set when the client goes away or the deadline passes
    call.cancelled = stop.is_set
    if not _could_be_single(call, kind):  # known before compute: answer 406 now, not after
        media = [m for m in media if m != wire.NPY]
        choose(media, single_array=False)
    if kind == "jacobian" and media[0] == wire.NPY and not call.batched and call.mode != "fwd":
        # Stream unless earlier calls showed this Jacobian is small (then it may batch).
        rows = state.output_rows.get(call.signature())
        if rows is None or call.rows is not None or rows * call.row_nbytes() > state.settings.stream_threshold_bytes:
            return await _cancellable(request, stop, _jacobian_npy(state, call, media))

    result, info = await _cancellable(
        request,
        stop,
        state.scheduler.run(lambda eng: getattr(eng, kind)(call), deadline=call.deadline, batch=_batchable(call, kind)),
    )
    chosen = choose(media, is_single_array(result))
    encode_start = time.monotonic()
    response = await _offload(result.nbytes(), encode, chosen, spec.name, _RESULT_KEY[kind], result, _meta(info, result))
    for phase, seconds in (
        ("queue", info.queue_s),
        ("compute", info.compute_s),
        ("encode", time.monotonic() - encode_start),
        ("total", time.monotonic() - started),
    ):
        state.metrics.latency.labels(kind, phase).observe(seconds)
    return response


async def _cancellable(request: Request, stop: threading.Event, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client disconnects first. A disconnect, a failure or a
    timeout sets ``stop``, which the engine checks between chunks."""
    current = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()  # type: ignore[union-attr]

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except BaseException:  # cancelled, failed or timed out: the engine stops at the next chunk
        stop.set()
        if gone:
            raise ClientGone("the client closed the connection; its work was cancelled") from None
        raise
    finally:
        watcher.cancel()


async def _jacobian_npy(state: ServiceState, call: Call, media: list[str]) -> Response:
    """A Jacobian as ``.npy``: streamed row chunk by row chunk when large.

    The forward pass (vjp) runs first; it fixes the output shape, hence the header and
    Content-Length, before any row is computed. A failure after the header has gone out
    aborts the connection, so a short body is never taken for a whole one.
    """
    stream, info = await state.scheduler.run(lambda eng: eng.row_stream(call), deadline=call.deadline)
    engine: Engine = info.engine  # type: ignore[assignment]
    worker = state.scheduler.engines.index(engine)
    if len(state.output_rows) > 4096:  # bounded: a client cycling through shapes cannot grow it
        state.output_rows.clear()
    state.output_rows[call.signature()] = stream.total_rows
    start, stop = call.rows or (0, stream.total_rows)
    nbytes = (stop - start) * call.row_nbytes()
    forward = engine.wants_forward(call, stream)
    if len(stream.leaves) != 1 or forward or nbytes <= state.settings.stream_threshold_bytes:
        result, info2 = await state.scheduler.run(lambda eng: eng.jacobian(call, stream), deadline=call.deadline, worker=worker)
        chosen = choose(media, is_single_array(result))
        meta = _meta(info, result, compute_s=info.compute_s + info2.compute_s)
        return await _offload(result.nbytes(), encode, chosen, call.spec.name, "jacobian", result, meta)

    primal = stream.primals[0]
    shape = (stop - start, *primal.shape) if call.rows else (*stream.leaves[0].shape, *primal.shape)
    header = wire.npy_header(shape, host_dtype(primal.dtype))
    chunk = call.chunk_size or stream.auto_chunk()
    chunks = stream.chunks(start, stop, chunk)  # a generator: it runs on the worker, at next()

    def next_chunk(eng: Engine) -> np.ndarray | None:
        step = next(chunks, None)
        return None if step is None else np.ascontiguousarray(eng.host(step[2][0]))

    async def body() -> AsyncIterator[bytes | memoryview]:
        yield header
        while True:
            # A stream that keeps making progress is not timed out: each chunk gets the
            # request timeout afresh once the first bytes are out.
            call.deadline = time.monotonic() + state.settings.request_timeout_s
            arr, _ = await state.scheduler.run(next_chunk, deadline=call.deadline, admitted=True, worker=worker)
            if arr is None:
                return
            state.metrics.streamed_bytes.inc(arr.nbytes)
            yield memoryview(arr.reshape(-1)).cast("B")

    headers = {
        "Content-Length": str(len(header) + nbytes),
        "X-Chunk-Size": str(chunk),
        "X-Device": str(engine.device),
        "X-Queue-Ms": f"{info.queue_s * 1e3:.3f}",
    }
    return StreamingResponse(body(), media_type=wire.NPY, headers=headers)


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            wire.JSON: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "inputs": {
                            "description": "arrays, positional (list) or by parameter name (object); an array is a "
                            "number, a nested list, or {dtype, shape, data|base64}",
                            "anyOf": [{"type": "array"}, {"type": "object"}],
                        },
                        "cotangents": {"description": "vjp only: one array, or a list/dict matching the outputs"},
                        "tangents": {"description": "jvp and hvp only: one array, or a list matching argnums"},
                        **Options.model_json_schema()["properties"],
                    },
                }
            },
            wire.NPY: {"schema": {"type": "string", "format": "binary"}},
            wire.NPZ: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "the result as JSON, .npy or .npz (by Accept)",
            "content": {
                wire.JSON: {"schema": {"type": "object"}},
                wire.NPY: {"schema": {"type": "string", "format": "binary"}},
                wire.NPZ: {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **{
            str(status): {"description": code, "content": {wire.PROBLEM: {"schema": {"type": "object"}}}}
            for status, code in [
                (400, "malformed_body"),
                (404, "function_not_found"),
                (406, "not_acceptable"),
                (413, "payload_too_large / result_too_large"),
                (415, "unsupported_media_type"),
                (422, "invalid_input"),
                (429, "overloaded"),
                (500, "function_error"),
                (504, "timeout"),
                (507, "out_of_memory"),
            ]
        },
    },
}


async def handle(request: Request, name: str, kind: Kind) -> Response:
    """One derivative request, start to finish; errors become problem+json here.

    Shared by the FastAPI routes (which give the OpenAPI document) and the app's
    fast path, which calls it straight from ASGI for the hot endpoints.
    """
    state = _state(request)
    label = name if name in state.registry else "_unknown"  # bounded metric labels
    try:
        await require_key(request)
        response = await _derivative(request, name, kind)
    except ServiceError as exc:
        state.metrics.requests.labels(label, kind, str(exc.status), exc.code).inc()
        return problem_response(exc, request.state.request_id)
    except ClientDisconnect:
        state.metrics.requests.labels(label, kind, "499", "client_closed").inc()
        return Response(status_code=499)  # nobody is listening
    state.metrics.requests.labels(label, kind, str(response.status_code), "").inc()
    return response


def _endpoint(kind: Kind) -> Callable[[str, Request], Awaitable[Response]]:
    async def endpoint(name: str, request: Request) -> Response:
        return await handle(request, name, kind)

    endpoint.__name__ = f"{kind}_endpoint"
    return endpoint


_SUMMARIES = {
    "jacobian": "The Jacobian, as torch.func.jacrev computes it",
    "hessian": "Second derivatives, as torch.func.hessian computes them",
    "evaluate": "The function's output (and aux)",
    "vjp": "Vector-Jacobian products, one or many cotangents",
    "jvp": "Jacobian-vector products, one or many tangents",
    "hvp": "Hessian-vector products (forward-over-reverse) of a scalar function, one or many tangents",
}
derivatives = APIRouter(prefix="/v1")  # authenticates inside handle()
for _kind, _summary in _SUMMARIES.items():
    derivatives.add_api_route(
        f"/functions/{{name}}/{_kind}",
        _endpoint(_kind),  # type: ignore[arg-type]
        methods=["POST"],
        tags=["derivatives"],
        summary=_summary,
        openapi_extra=_BODY_DOC,
        response_class=Response,
    )

router.include_router(v1)
router.include_router(derivatives)
