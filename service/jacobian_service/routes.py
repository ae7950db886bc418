"""The HTTP endpoints and the one routing table that serves them and documents them.

Each :class:`Route` names its method, path, handler, who may call it and how the
OpenAPI document describes it; :class:`Router` dispatches from the same list, and
:mod:`jacobian_service.openapi` writes the document from it, so the two cannot drift.
Handlers are thin: read, parse (off the loop when large), hand to the engines, encode.
No torch here: the engines are reached through :mod:`jacobian_service.engine_client`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import platform
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio.to_thread
import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from jacobian_client import wire

from . import preconditions
from .clients import client_of
from .connections import Charge, first_header, read_body
from .errors import (
    ClientGone,
    Forbidden,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    OutOfMemory,
    ResultTooLarge,
    ServiceError,
    Unavailable,
    UnsupportedMediaType,
)
from .parsing import KINDS, check_head, check_json_charset, media_type_of, parse_call, parse_sparsity_query
from .responses import (ClosingStreamingResponse, JsonRows, StreamHold, acceptable, attachment, choose, echo, encode, is_single_array, meta_headers, not_one_array,
                        problem_response, sparse_json_body, stream_hold)
from .scheduler import StreamHead
from .settings import NULL_ORIGIN_HINT
from .state import ServiceState
from .types import HELD_ANSWER_BYTES, HOST_CHUNK_BYTES, SPARSE_CHUNK_BYTES, Call, JobInfo, Result, tree_leaves

__all__ = ["DERIVATIVE_KINDS", "ROUTES", "Route", "Router", "route_path"]

log = logging.getLogger("jacobian_service")

# Bodies and results above this are parsed / encoded on a thread, not on the event loop.
_OFFLOAD_BYTES = 256 << 10
# ... and JSON bodies of more items or containers than these, whatever their size: a
# JSON body's parse costs by what it holds, not by its bytes. A number is cheap (read in
# C), but each list or object is a Python object made, walked (wire.check_depth) and
# judged, and a bare NaN is rewritten by a Python call: 80,000 `{}` or 25,000 ragged
# `[1],[1,2]` in 250 KB, parsed on the loop, held every other client's request (and
# /healthz) for 0.4-0.7 s per body on a loaded host.
_INLINE_JSON_ITEMS = 4096
_INLINE_JSON_CONTAINERS = 256
# Rows of a streamed JSON Jacobian encoded at once (their text is ~3x this).
_JSON_BLOCK_BYTES = 1 << 20
DERIVATIVE_KINDS = frozenset(wire.RESULT_KEY)
assert DERIVATIVE_KINDS == frozenset(KINDS)

Handler = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # a template: {name} matches one path segment
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    auth: str = "key"  # key | public | metrics | docs | admin (operators' keys): which setting guards it
    params: dict[str, Any] = field(default_factory=dict)  # fixed handler arguments
    errors: tuple[str, ...] = ()  # problem codes this route answers (besides auth)
    doc: dict[str, Any] = field(default_factory=dict)  # OpenAPI additions
    negotiated: bool = False  # its answer's media type is the one Accept picks (its answers say Vary: Accept)

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


def _state(request: Request) -> ServiceState:
    return request.scope["service"]


def _arrays_nbytes(call: Call) -> int:
    """Bytes of a parsed request's arrays: its inputs (cast to their dtypes) and vectors."""
    total = sum(getattr(a, "nbytes", 0) for a in call.args)
    for vectors in (call.vectors, call.cotangents):
        if vectors is not None:
            total += sum(getattr(leaf, "nbytes", 0) for leaf in tree_leaves(vectors))
    return total


# A query string's options and their lists' items are read one by one in Python on the
# front end's event loop: within the 32 KiB head limit, ?argnums= with 15,000 items took
# 41 ms to refuse on serve (another refusal: 0.4 ms), ?rows= 45 ms, 3,500 unknown options
# 18 ms. Past these bounds a 422 before any is read: there are fewer options than this,
# and no list an option takes (one item per input, a shape's dims) needs more items; a
# JSON body carries any number of them.
MAX_QUERY_OPTIONS = 64
MAX_QUERY_ITEMS = 256


def _query(request: Request) -> dict[str, str]:
    # Most calls have no query string: no parse for them.
    query = request.scope.get("query_string")
    if not query:
        return {}
    options = query.count(b"&") + 1
    if options > MAX_QUERY_OPTIONS:
        raise InvalidInput(f"the query string holds {options} options; at most {MAX_QUERY_OPTIONS} are read")
    commas = query.count(b",") + query.count(b"%2C") + query.count(b"%2c")  # (a ',' percent-encoded is one too)
    if commas > MAX_QUERY_ITEMS:
        raise InvalidInput(f"the query string's options hold {commas} ','; at most {MAX_QUERY_ITEMS} are read "
                           "(a JSON body's options take any number)")
    params = request.query_params
    if len(params.multi_items()) != len(params):  # ?argnums=0&argnums=1: which one was meant?
        # counted in one pass (getlist per item scanned them all: 15,000 `a&a&...` took 5 s)
        counts = collections.Counter(k for k, _ in params.multi_items())
        twice = sorted(k for k, n in counts.items() if n > 1)
        raise InvalidInput(f"query options given more than once: {', '.join(echo(k) for k in twice[:5])}")
    return dict(params)


def _accept(request: Request) -> str:
    """Every ``Accept`` header as one list (RFC 9110 5.3): a client (or a proxy) may send
    its media ranges in several; only the first was read (``text/html`` then
    ``application/json`` was a 406). Read from the scope's list as it is (names in lower
    case, as the server gives them): Starlette's ``Headers`` made and scanned per request
    cost ~2 us more."""
    return b", ".join([v for k, v in request.scope["headers"] if k == b"accept"]).decode("latin-1")


def _header(request: Request, name: bytes, default: str | None = None) -> str | None:
    return first_header(request.scope, name, default)


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


# ------------------------------------------------------------------ operations


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    why = "draining" if state.draining else state.engines.readiness()
    if why is None:
        return JSONResponse({"status": "ready"})
    raise Unavailable(f"not ready: {why}", headers={"Retry-After": "1"})


async def metrics(request: Request) -> Response:
    state = _state(request)
    body = await state.metrics.scrape(lambda: state.metrics.update_engines(state.engines.depth(),
                                                                           state.engines.engine_stats()))
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def info(request: Request) -> Response:
    from . import __version__

    state = _state(request)
    s = state.settings
    engine_info = state.engines.info()
    return JSONResponse({
        "version": __version__,
        # what an answer alone does not say (wire.CAPABILITIES): an SDK talking to an older
        # service, which lists none, falls back on what that one said
        "capabilities": list(wire.CAPABILITIES),
        "torch": engine_info["torch"],
        "python": platform.python_version(),
        "devices": state.engines.devices,
        "torch_threads": engine_info["torch_threads"],
        "engines": engine_info["engines"],
        # Per device: whether a warmed-up spare engine waits to take over (process layout).
        "spares": engine_info.get("spares", []),
        # The engine processes' pids, by device (for py-spy, top, a memory check).
        "engine_pids": engine_info.get("engine_pids", []),
        "front_ends": state.front_ends,
        "functions": len(state.registry),
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
            "memory_budget_bytes": engine_info["memory_budget_bytes"],
            "stream_threshold_bytes": s.stream_threshold_bytes,
            "body_budget_bytes": s.body_budget,  # per front-end process
            "stream_budget_bytes": state.streams.max_bytes,  # per front-end process
            "header_timeout_s": s.header_timeout_s,
            "read_idle_timeout_s": s.read_idle_timeout_s,
            "read_timeout_s": s.read_timeout_s,
            "send_timeout_s": s.send_timeout_s,
            "min_send_rate_bytes_per_s": s.min_send_rate_bytes_per_s,
            "max_streams_per_client": state.streams.per_client,  # per front-end process; 0: none
        },
        "auth": bool(state.api_keys),
    })


async def list_functions(request: Request) -> Response:
    return JSONResponse([spec.describe() for spec in _state(request).registry])


async def describe_function(request: Request, name: str) -> Response:
    return JSONResponse(_state(request).registry.get(name).describe())


async def release_function(request: Request, name: str) -> Response:
    """An operator's word: a quarantined function may run again."""
    state = _state(request)
    state.registry.get(name)
    preconditions.refuse_unrepresented(request.scope["headers"])  # (its own checks first: RFC 9110 13.2.1)
    released = state.engines.release(name)
    return JSONResponse({"function": name, "released": released})


# ------------------------------------------------------------------ derivatives


def _deadline(state: ServiceState, request: Request) -> float:
    return time.monotonic() + _timeout(state, request)


# X-Request-Timeout's seconds: digits, an optional fraction and exponent.
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _timeout(state: ServiceState, request: Request) -> float:
    """The server's timeout, shortened by the client's ``X-Request-Timeout`` (seconds)."""
    timeout = state.settings.request_timeout_s
    header = _header(request, b"x-request-timeout")
    if header:
        # One message for every refusal, naming the value: 'inf', 'nan' and '1e309' (a
        # float's infinity) were told the header 'must be a positive number of seconds'.
        # A decimal number as HTTP headers spell one: Python's float() also read "1_0"
        # as 10 and " 5 " as 5, which no other reader of the header (a proxy's, a
        # client's) takes for the same number, if for one at all.
        asked = float(header) if _SECONDS.fullmatch(header) else math.nan
        if not math.isfinite(asked) or asked <= 0:
            raise InvalidInput(f"X-Request-Timeout must be a positive, finite number of seconds, not {echo(header)} "
                               f"(it shortens the server's REQUEST_TIMEOUT_S, {timeout:g} s)")
        timeout = min(timeout, asked)
    return timeout


async def _offload(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    if size > _OFFLOAD_BYTES:
        value, error = await anyio.to_thread.run_sync(_outcome, fn, args)
        if error is not None:
            try:
                raise error
            finally:
                error = None  # (this frame is in the traceback raised: no cycle through it either)
        return value
    return fn(*args)


def _outcome(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, BaseException | None]:
    """``fn(*args)`` on the worker thread, its exception returned, not raised through the
    thread's future: a future that holds an exception whose traceback holds the awaiting
    frame, which holds the future, is a cycle, and everything its frames held (a rejected
    request's whole body, parsed or not: 4 MiB of malformed ``.npy``) stayed alive until
    the cyclic collector next ran, later still where the cycle had aged into an older
    generation under load, and each request's cycle cost the collector its walk."""
    try:
        return fn(*args), None
    except Exception as exc:  # (BaseException: a worker thread's KeyboardInterrupt is the loop's business)
        return None, exc


def _meta(info: JobInfo, result: Result) -> dict[str, Any]:
    meta = _common_meta(info, result)
    if result.sparse_meta:  # sparse results: sparsity, source, colors, products, nnz
        meta.update(result.sparse_meta)
    if result.batch_meta:  # evaluate: unbatched, aux_unbatched (per example), bfloat16, aux_bfloat16
        meta.update(result.batch_meta)
    return meta


def _common_meta(info: JobInfo, result: Result) -> dict[str, Any]:
    """Every answer's meta entries (a bare .npy's, all it has: its headers)."""
    return {
        "device": info.device,
        "chunk_size": result.chunk_size,
        "batch_size": info.batch_size,
        "mode": result.mode,
        "queue_ms": round(info.queue_s * 1e3, 3),
        "compute_ms": round(info.compute_s * 1e3, 3),
    }


def _sparse_media(media: list[str], dense_form: bool = True) -> list[str]:
    """A sparse matrix travels as JSON or .npz (SPEC 7), never as one .npy.
    ``dense_form``: the request may ask for ``sparse_format=dense`` instead (the POSTs;
    a GET's pattern has no dense form)."""
    kept = [m for m in media if m != wire.NPY]
    if not kept:
        raise NotAcceptable(
            f"a sparse result travels as {wire.NPZ} (scipy.sparse.save_npz members) or {wire.JSON}; "
            "ask for one of them" + (", or for sparse_format=dense" if dense_form else "")
        )
    return kept


def _could_be_single(call: Call, kind: str) -> bool:
    """Whether the result may be one bare array, judged before compute. A sparse
    derivative is one 2-D matrix whatever ``argnums`` and the outputs are (their columns
    and rows concatenated): as a dense ``.npy`` it was a 406 for ``argnums=0,1``."""
    if call.spec.has_aux or call.return_output:
        return False
    return kind in ("evaluate", "jvp") or call.sparsity != "dense" or call.single_primal()


def _why_not_one(call: Call, kind: str) -> tuple[str, str]:
    """What keeps this call's result from one bare .npy (a 406's words). An evaluate's or
    a jvp's result is shaped like the output, whatever ``argnums``."""
    by_input = kind not in ("evaluate", "jvp")
    tree = by_input and any(call.spec.inputs[p].tree is not None for p in call.params)
    return not_one_array(call.spec.has_aux, call.return_output, by_input and call.as_tuple, tree, kind)


async def derivative(request: Request, name: str, kind: str) -> Response:
    # What the request's arrays take (an .npz's expansion, then the parsed arrays) is held
    # on the body budget until the request is done with them (they go when _derivative's
    # frame does). Both count in the request's client's share of it, which bites only while
    # clients contend for it (connections.BodyBudget).
    state = _state(request)
    inputs = Charge(state.body_budget, client_of(request.scope, state.proxies))
    try:
        return await _derivative(request, name, kind, inputs)
    finally:
        inputs.give()


async def _derivative(request: Request, name: str, kind: str, inputs: Charge) -> Response:
    state = _state(request)
    started = time.monotonic()
    spec = state.registry.get(name)
    _refuse_other_sites(request)
    media = acceptable(_accept(request))
    content_type_header = _header(request, b"content-type")
    if not content_type_header and _header(request, b"origin") is not None:
        # A body with no Content-Type is read as JSON, for clients that leave it out; but
        # from a web page (it sends Origin) it is the one POST a page of any origin may
        # send without a CORS preflight: any site a user visits could have their browser
        # run Jacobians here (unread, but computed; no key needed where none is set).
        raise UnsupportedMediaType(f"a request from a web page must name its Content-Type ({wire.JSON}, {wire.NPY} "
                                   f"or {wire.NPZ}): then a page of an origin not allowed is stopped at the CORS "
                                   "preflight")
    content_type = media_type_of(content_type_header)
    if content_type == wire.JSON:
        check_json_charset(content_type_header)
    encodings = ([e.strip().lower() for e in request.headers.getlist("content-encoding")]
                 if _header(request, b"content-encoding") is not None else [])
    if any(e not in ("", "identity") for e in encodings):  # a gzip body read as JSON or .npy is only garbage
        shown = ", ".join(e for e in encodings if e not in ("", "identity"))
        # RFC 9110 15.5.16: a 415 for a coding says which codings are served (none)
        raise UnsupportedMediaType(f"Content-Encoding {echo(shown)} is not supported; send the body as it is",
                                   headers={"Accept-Encoding": "identity"})
    # Checked before the body is read, as the headers above: a malformed X-Request-Timeout
    # was told only once the whole body had come and been parsed (a 256 MB upload, its
    # body budget held, for a 422 its headers had decided).
    timeout = _timeout(state, request)
    check_head(spec, kind, content_type, _query(request))  # (content types parse_call does not take: 415 there)
    preconditions.refuse_unrepresented(request.scope["headers"])  # (after the checks above, before the body: 13.2.1)
    s = state.settings
    # The body is charged to the process's body budget as it arrives, before it is
    # buffered, and held there (JSON at its parse cost) until it is parsed; an .npz's
    # expanded size is charged before it is expanded, held in ``inputs``: connections.py.
    reader = read_body(request, state.body_budget, s.max_request_bytes, s.read_idle_timeout_s, s.read_timeout_s,
                       is_json=content_type == wire.JSON,
                       on_timeout=lambda phase: state.metrics.connection_timeouts.labels(phase).inc(),
                       client=inputs.client)
    limits = s.wire_limits
    async with reader as body:
        # A small deflated .npz can expand to a lot: decide by what decoding will take.
        size = reader.expand(body, content_type, inputs, limits)
        containers = None  # (a small JSON body's count of [ and {: the parse's depth check takes it too)
        if content_type == wire.JSON and size <= _OFFLOAD_BYTES and reader.json_counts is not None:
            commas, brackets = reader.json_counts  # (read_body's, which charged the parse by them: not counted again)
            if commas > _INLINE_JSON_ITEMS or (containers := brackets + body.count(b"{")) > _INLINE_JSON_CONTAINERS:
                size = _OFFLOAD_BYTES + 1  # (bytes.count: memory speed, nothing next to the parse)
        call: Call = await _offload(size, parse_call, spec, kind, content_type, body, _query(request), limits,
                                    containers)
    del body  # parsed: the arrays are the call's now
    # ... and held until the request ends (queued, computing), as much memory as the body
    # was (or more, cast to float): charged in its place, or requests waiting in the
    # queue held arrays the budget never saw (20 of 8 MB: +700 MB, the gauge at 0).
    if (more := _arrays_nbytes(call) - inputs.held) > 0:
        inputs.take(more, f"holding a request's arrays ({more} bytes)")
    call.deadline = time.monotonic() + timeout
    call.max_result_bytes = state.settings.max_result_bytes
    # The request's client, named once (clients.client_of, ~35 bytecodes a call, was asked
    # four times a request): the scope it is read from does not change after auth.
    call.client = inputs.client  # (its turn in the engine's queue)
    sparse = call.sparsity != "dense"
    if sparse and call.sparse_format != "dense":
        media = _sparse_media(media)
    elif not _could_be_single(call, kind):  # known before compute: answer 406 now, not after
        media = [m for m in media if m != wire.NPY]
        choose(media, single_array=False, why=lambda: _why_not_one(call, kind))
    # A large single-array Jacobian is streamed from the engine row chunk by row chunk,
    # as .npy or as JSON: the front end then holds one chunk, never the whole result.
    # (Only one bare array streams: .npy was refused above otherwise; JSON checks here.)
    # A sparse Jacobian or Hessian asked for as a dense .npy streams too: densified row
    # chunk by chunk (a Hessian's was a 413 where the same size of Jacobian streamed).
    streamable = (sparse and call.sparse_format == "dense" and media[0] == wire.NPY) or (
        kind == "jacobian" and not sparse
        and (media[0] == wire.NPY or (media[0] == wire.JSON and call.mode == "rev" and _could_be_single(call, kind))))
    client = inputs.client if state.streams.per_client else None  # (_share_client's)
    if not (sparse and streamable):  # (a sparse one's sizes are its CSR's: gathered small, else streamed)
        call.answer_room = state.streams.answer_room(client)  # (before a stream's room is taken)
    if not streamable:
        result, info = await _computed(request, state, kind, call, client)
    else:  # its stream's room reserved (or 503) before any work; the engine's chunks fit it
        # (the result's size is the same as .npy and as JSON: one key for both)
        stream_key = (kind, call.signature(), call.rows, call.chunk_size, call.mode, call.sparsity, call.sparse_format)
        hold = state.streams.admit(stream_key, *_stream_bounds(call, sparse, kind), inputs.client)
        call.stream_room = hold.room
        try:
            result, info = await _computed(request, state, f"{kind}_npy", call, client, hold.release)
        except BaseException:
            hold.release()
            raise
        state.streams.learn(stream_key, result.nbytes if isinstance(result, StreamHead) else 0)
        if not isinstance(result, StreamHead):
            hold.release()
    if isinstance(result, StreamHead):
        try:
            if media[0] != wire.NPY and result.nbytes > call.max_result_bytes:  # streamed .npy has no result limit
                raise ResultTooLarge(f"the Jacobian has {result.nbytes} bytes; the limit is {call.max_result_bytes} "
                                     f"(ask for {wire.NPY} to stream it without one)")
            release = hold.keep(_stream_hold(result))
        except ServiceError:
            hold.release()
            state.engines.close_stream(result)
            raise
        if media[0] == wire.NPY:
            return _stream(state, request, call, result, info, release, timeout)
        return _stream_json(state, spec.name, result, info, release, timeout)
    chosen = choose(media, is_single_array(result), lambda: _why_not_one(call, kind))
    encode_start = time.monotonic()
    if chosen == wire.NPY:
        # .npy: a header and views of the arrays, nothing built whatever the size (a
        # thread hop cost a 4 MB .npy answer more than its encoding): its size (a walk
        # of the result) is not needed. Its meta goes in its headers (meta_headers), which
        # say META_HEADERS' entries only (an evaluate's flags among them, not a dense form
        # of a sparse result's entries).
        response = encode(chosen, spec.name, wire.RESULT_KEY[kind], result, _meta(info, result))
    else:
        # Within the result limit: the engine's worker refused it otherwise (scheduler).
        nbytes = result.nbytes()
        encoding = (chosen, spec.name, wire.RESULT_KEY[kind], result, _meta(info, result), nbytes)
        if nbytes < _OFFLOAD_BYTES:
            response = encode(*encoding)
        else:
            async with state.encode_budget.hold(nbytes):
                response = await _offload(nbytes, encode, *encoding)
    response = _held_while_sent(request, response, result.value.nbytes if chosen == wire.NPY else nbytes)
    state.metrics.observe_all(state.metrics.latency, [
        (info.queue_s, (kind, "queue")),
        (info.compute_s, (kind, "compute")),
        (time.monotonic() - encode_start, (kind, "encode")),
        (time.monotonic() - started, (kind, "total")),
    ])
    return response


async def function_sparsity(request: Request, name: str) -> Response:
    """The sparsity pattern of a function's Jacobian (or Hessian) at the shapes in the
    query, its source, the colouring and the number of products a sparse call takes."""
    _refuse_other_sites(request)
    state = _state(request)
    spec = state.registry.get(name)
    accept = _accept(request)
    try:
        media = acceptable(accept)
    except NotAcceptable:
        # A pattern is never one .npy: "allows none of application/json,
        # application/x-npy, application/x-npz" sent a page to ask for .npy, a 406 again.
        raise NotAcceptable(f"Accept {echo(accept)} allows none of {wire.JSON}, {wire.NPZ} "
                            "(a sparsity pattern's forms)") from None
    media = _sparse_media(media, dense_form=False)
    kind, call = parse_sparsity_query(spec, _query(request), state.settings.wire_limits)
    call.deadline = _deadline(state, request)
    call.max_result_bytes = state.settings.max_result_bytes
    client = _share_client(request, state)
    call.answer_room = state.streams.answer_room(client)
    call.client = client_of(request.scope, state.proxies)
    result, info = await _computed(request, state, f"sparsity_{kind}", call, client)
    doc = {"function": spec.name, **(result.sparse_meta or {}),
           "meta": {"device": info.device, "queue_ms": round(info.queue_s * 1e3, 3),
                    "compute_ms": round(info.compute_s * 1e3, 3)}}
    said = meta_headers(doc["meta"])  # (as a derivative answer's: responses.META_HEADERS)
    if media[0] == wire.NPZ:
        response = Response(await _offload(result.nbytes(), wire.write_sparse_npz, result.value, doc),
                            media_type=wire.NPZ, headers={**attachment(spec.name, "sparsity", wire.NPZ), **said})
    else:
        response = Response(await _offload(result.nbytes(), sparse_json_body, doc, "matrix", result.value),
                            media_type=wire.JSON, headers=said)
    return _held_while_sent(request, response, len(response.body))  # (a pattern's indices may run to MBs too)


def _held_while_sent(request: Request, response: Response, nbytes: int) -> Response:
    """A gathered answer of ``nbytes`` (its result: what the front end keeps until the
    last piece has left, whatever the format) on the stream budget, in its client's
    share, until it has been sent or its connection is gone; or the budget's 503, or the
    share's 429. A gathered answer is held at its client's pace as a stream is (each
    piece may wait SEND_TIMEOUT_S), and was held on nothing: 20 connections that asked
    for a 1,400-input softmax Jacobian as JSON (7.8 MB, under the stream threshold) and
    read nothing grew a front end by 340 MB for as long as the send timeout let them,
    and a Hessian, a vjp or an evaluate is never streamed at all, up to MAX_RESULT_BYTES
    each. (Smaller answers fit the socket's buffers: not held.)"""
    if nbytes < HELD_ANSWER_BYTES:
        return response
    state = _state(request)
    hold = StreamHold(state.streams, 0, None, _share_client(request, state))
    return _HeldAnswer(response, hold.keep(nbytes))


def _share_client(request: Request, state: ServiceState) -> str | None:
    """Whose share of the stream budget a gathered answer counts in (None: no shares)."""
    return client_of(request.scope, state.proxies) if state.streams.per_client else None


async def _computed(request: Request, state: ServiceState, kind: str, call: Call, client: str | None,
                    release: Callable[[], None] | None = None) -> Any:
    """The engines' ``(result, info)`` for ``call`` (``_cancellable``). A gathered answer
    past ``call.answer_room`` was refused by the engine before it computed it
    (``errors.no_answer_room``): answered as the stream budget refuses it, 503 or 429,
    once the room this request reserved for a stream (``release``) is given back.

    The room is the one there was when the request was sent: one that waited in the
    queue while the answers holding it were sent was refused at its turn though the
    room had come back (a 7.84 MB Hessian, 503 with the whole budget free). Where the
    answer fits now, it is asked again, once, with the room there is now (the engine
    spent one forward pass on the first ask)."""
    try:
        return await _cancellable(request, state.engines.run, kind, call)
    except ServiceError as exc:
        if call.answer_room is None or "answer_bytes" not in exc.fields:
            raise
        if release is not None:
            release()  # (a stream's reservation: kept again, or refused, once the answer comes)
        if not state.streams.fits_answer(client, exc.fields["answer_bytes"]):
            state.streams.refuse_answer(client, exc.fields["answer_bytes"])
    call.answer_room = state.streams.answer_room(client)
    try:
        return await _cancellable(request, state.engines.run, kind, call)
    except ServiceError as exc:
        if call.answer_room is not None and "answer_bytes" in exc.fields:
            state.streams.refuse_answer(client, exc.fields["answer_bytes"])
        raise


class _HeldAnswer:
    """``response``, with ``release`` called once it has been sent (or has failed)."""

    def __init__(self, response: Response, release: Callable[[], None]) -> None:
        self._response, self._release = response, release
        weakref.finalize(self, release)  # (never sent: a task cancelled before the router sent it)

    def __getattr__(self, name: str) -> Any:  # (the router's Vary, the status the middleware reads)
        return getattr(self._response, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._response(scope, receive, send)
        finally:
            self._release()


def _stream_hold(head: StreamHead) -> int:
    """The chunk being sent and the one asked for ahead (at most the whole result): what
    a client that stops reading keeps in this front end (StreamBudget)."""
    return int(stream_hold(head.chunk_size * math.prod(head.shape[1:]) * np.dtype(head.dtype).itemsize, head.nbytes))


def _stream_bounds(call: Call, sparse: bool, kind: str = "jacobian") -> tuple[int, int, int, int | None]:
    """What a stream of ``call`` may hold, known before compute (StreamBudget.admit):
    a row's bytes, the most rows a chunk takes (an explicit ``chunk_size``, else the
    engine's bound: HOST_CHUNK_BYTES of rows, a densified sparse Jacobian's
    SPARSE_CHUNK_BYTES), the fewest, and the result's bytes where ``rows`` tells them, or
    the shapes (a Hessian: a row per input element) (0: the engine gathers it, never
    streamed: per-example, ``mode=fwd`` without ``rows``, or a derivative w.r.t. several
    arrays; engine.core's jacobian_npy. ``mode=auto`` may stream: reverse mode where
    forward would not pay or its result would pass the limit)."""
    row = call.row_nbytes()
    if kind == "hessian":  # (sparse: a dense Hessian is never streamed)
        return row, max(1, SPARSE_CHUNK_BYTES // max(1, row)), 1, sum(call.args[i].size for i in call.argnums) * row
    if not sparse and (call.batched or (call.rows is None and call.mode == "fwd") or not call.single_primal()):
        return row, 1, 1, 0
    if sparse:
        most, least = max(1, SPARSE_CHUNK_BYTES // max(1, row)), 1
    else:
        most = least = call.chunk_size or 0
        most = most or max(1, HOST_CHUNK_BYTES // max(1, row))
        least = least or 1
    return row, most, least, None if call.rows is None else (call.rows[1] - call.rows[0]) * row


def _refuse_other_sites(request: Request) -> None:
    """Computing endpoints serve a page of another site (Fetch Metadata:
    ``Sec-Fetch-Site: cross-site`` / ``same-site``) only through CORS from an origin
    CORS_ORIGINS allows, or as a link opened (a top-level GET navigation). The rest a
    page of any site may have a browser send with no preflight, so any site a user
    visited could have run work here, unread but computed (no key needed where none is
    set):

    * ``no-cors`` (an ``<img>``, ``fetch(..., {mode: "no-cors"})``, a beacon);
    * ``cors`` mode from an origin not allowed: a GET (or HEAD) of .../sparsity, or a
      POST whose type a page may send, asks no preflight: the browser hides the answer,
      after the server computed it;
    * a form posted (a POST navigation) from such an origin;
    * a frame (``<iframe>``, ``<object>``: a navigation the page makes unseen).

    Clients that are no browser send no such header, a page of this server's own
    origin says ``same-origin``, and a URL typed in ``none``: all served as before.
    (Not in the OpenAPI document's 403s, which say where a key is wanted: no client it
    describes sends such a request, and no script can read the answer.)"""
    if _header(request, b"sec-fetch-site") not in ("cross-site", "same-site"):
        return
    mode = _header(request, b"sec-fetch-mode", "")
    if mode == "no-cors":
        raise Forbidden("a page of another site may call this only through CORS (fetch in cors mode, from an origin "
                        "CORS_ORIGINS names), not as a no-cors request")
    if mode == "navigate" and request.method in ("GET", "HEAD"):
        dest = _header(request, b"sec-fetch-dest", "document")
        if dest == "document":
            return  # a link followed: the user asked for it
        raise Forbidden(f"a page of another site may open this only as a page of its own (a link followed), not "
                        f"load it into itself (Sec-Fetch-Dest: {echo(dest)}); or fetch it through CORS")
    origin = _header(request, b"origin", "")
    allowed = _state(request).settings.cors_origin_list
    if "*" in allowed or (origin and origin in allowed):
        return
    if origin == "null":
        raise Forbidden(f"a page of the origin 'null' may not call this: {NULL_ORIGIN_HINT}")
    raise Forbidden(f"a page of the origin {echo(origin or 'unknown')} may not call this: CORS_ORIGINS "
                    f"{'does not name it' if allowed else 'is empty (no page of another site may call the API)'}")


# A request still computing after this long starts watching for its client's disconnect.
_WATCH_AFTER_S = 0.02


async def _cancellable(request: Request, run: Callable[..., Awaitable[Any]], kind: str, call: Call) -> Any:
    """``run(kind, call)`` (the engines'), unless the client disconnects first (the
    engine then stops at its next chunk: leaving the await tells it). The watcher task
    starts only once the job has waited ``_WATCH_AFTER_S`` (or waits for an engine to
    come up): most requests are done sooner, and a task per request is a good part of
    a small request's cost. The engine client's deadline timer tells it when
    (``on_slow``): one loop timer per request, not two."""
    current = asyncio.current_task()
    gone = False
    watcher: asyncio.Future[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()  # type: ignore[union-attr]

    def start() -> None:
        nonlocal watcher
        if watcher is None:  # (once: a job sent again to another engine waits on)
            watcher = asyncio.ensure_future(watch())

    try:
        return await run(kind, call, on_slow=(_WATCH_AFTER_S, start))
    except asyncio.CancelledError:
        if gone:
            raise ClientGone("the client closed the connection; its work was cancelled") from None
        raise
    finally:
        if watcher is not None:
            watcher.cancel()


def _stream(state: ServiceState, request: Request, call: Call, head: StreamHead, info: JobInfo,
            release: Callable[[], None], timeout: float | None = None) -> Response:
    """A large Jacobian as ``.npy``, row chunk by row chunk, with O(chunk) memory.

    The header and Content-Length went out from the forward pass; each chunk is asked
    for while the previous one is being sent (one ahead, so a slow reader holds back the
    engine). A failure after the header aborts the connection, so a short body is never
    taken for a whole one.
    """
    header = wire.npy_header(head.shape, np.dtype(head.dtype))

    # A stream that keeps making progress is not timed out: each chunk gets the request's
    # timeout afresh once the first bytes are out. The request's: a client's shorter
    # X-Request-Timeout held for its head only, and each later chunk had the server's
    # 60 s (a chunk that hung held the engine, and a hung engine was killed, that long).
    # (None: the server's.)
    timeout = state.settings.request_timeout_s if timeout is None else timeout

    def next_deadline() -> float:
        return time.monotonic() + timeout

    async def body() -> AsyncIterator[bytes | memoryview]:
        done = False
        pending: asyncio.Future | None = None
        try:
            yield header
            pending = asyncio.ensure_future(state.engines.next_chunk(head, next_deadline()))
            while True:
                arr = await pending
                if arr is None:
                    done = True
                    return
                pending = asyncio.ensure_future(state.engines.next_chunk(head, next_deadline()))
                state.metrics.streamed_bytes.inc(arr.nbytes)
                yield memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")
        finally:
            release()
            if not done:
                _drop(pending)
                state.engines.close_stream(head)

    headers = {
        "Content-Length": str(len(header) + head.nbytes),
        **_stream_meta_headers(head, info),
        **attachment(call.spec.name, "jacobian", wire.NPY),
    }
    return ClosingStreamingResponse(_released(body(), release), media_type=wire.NPY, headers=headers)


def _released(body: AsyncIterator[Any], release: Callable[[], None]) -> AsyncIterator[Any]:
    """``body``, whose stream reservation is given back when it ends (its ``finally``)
    or, if it never started (the client gone before the response began), when it is
    collected: a body never iterated never runs its ``finally``."""
    weakref.finalize(body, release)
    return body


def _drop(pending: asyncio.Future | None) -> None:
    """The chunk asked for ahead of a stream the client left: cancelled, and its failure
    (the stream closed under it) taken, so that asyncio does not log it with a traceback
    as "Task exception was never retrieved"."""
    if pending is not None:
        pending.cancel()
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())


def _stream_json(state: ServiceState, function: str, head: StreamHead, info: JobInfo,
                 release: Callable[[], None], timeout: float | None = None) -> Response:
    """A large Jacobian as JSON, written from the engine's row chunks as they come (as
    :func:`_stream` does for ``.npy``): the same document as a gathered one, with
    ``meta`` last, so its times cover the whole stream. Chunked transfer: the length of
    the text is not known in advance."""
    started = time.monotonic()
    rows = JsonRows(head.shape)
    timeout = state.settings.request_timeout_s if timeout is None else timeout  # (as _stream's)

    async def body() -> AsyncIterator[bytes]:
        done = False
        pending: asyncio.Future | None = None
        try:
            yield (wire.dumps(function).join((b'{"function":', b',"jacobian":{"dtype":'))
                   + wire.dumps(np.dtype(head.dtype).name) + b',"shape":' + wire.dumps(list(head.shape)) + b',"data":')
            pending = asyncio.ensure_future(state.engines.next_chunk(head, time.monotonic() + timeout))  # as _stream's
            while True:
                arr = await pending
                if arr is None:
                    break
                pending = asyncio.ensure_future(state.engines.next_chunk(head, time.monotonic() + timeout))
                state.metrics.streamed_bytes.inc(arr.nbytes)
                # A chunk's text is several times its size: written a block of rows at a
                # time, each block's text sent before the next is made.
                step = max(1, _JSON_BLOCK_BYTES // max(1, arr[:1].nbytes))
                for start in range(0, len(arr), step):
                    yield await _offload(_OFFLOAD_BYTES + 1, rows.piece, arr[start:start + step])
            done = True
            meta = {"device": info.device, "chunk_size": head.chunk_size, "batch_size": info.batch_size, "mode": "rev",
                    "queue_ms": round(info.queue_s * 1e3, 3),
                    "compute_ms": round((info.compute_s + time.monotonic() - started) * 1e3, 3), **(head.meta or {})}
            yield rows.end() + b'},"meta":' + wire.dumps(meta) + b"}"
        finally:
            release()
            if not done:
                _drop(pending)
                state.engines.close_stream(head)

    # The headers the .npy stream sends: a page reads them before the body (its meta comes
    # last); X-Queue-Ms was the .npy stream's only, read as null from this one.
    return ClosingStreamingResponse(_released(body(), release), media_type=wire.JSON,
                                    headers=_stream_meta_headers(head, info))


def _stream_meta_headers(head: StreamHead, info: JobInfo) -> dict[str, str]:
    """What a stream's head says of its meta: what is known before its rows are computed
    (responses.META_HEADERS; the same values its JSON meta gives), with the engine's
    bfloat16 flags for it (``StreamHead.meta``: engine.core.derivative_half_meta, as a
    gathered answer's; a sparse result's dense form too: engine.sparse._half_meta)."""
    return meta_headers({"device": info.device, "chunk_size": head.chunk_size, "batch_size": info.batch_size,
                         "queue_ms": round(info.queue_s * 1e3, 3), **(head.meta or {})})


# ------------------------------------------------------------------ the table

_DERIVATIVE_ERRORS = (
    "malformed_body", "function_not_found", "not_acceptable", "request_timeout", "payload_too_large", "result_too_large",
    "unsupported_media_type", "invalid_input", "sparsity_not_found", "overloaded", "function_error", "unavailable",
    "function_quarantined", "timeout", "out_of_memory", "precondition_failed",
)
_SUMMARIES = {
    "jacobian": "The Jacobian, as torch.func.jacrev computes it",
    "hessian": "Second derivatives, as torch.func.hessian computes them",
    "evaluate": "The function's output (and aux)",
    "vjp": "Vector-Jacobian products, one or many cotangents",
    "jvp": "Jacobian-vector products, one or many tangents",
    "hvp": "Hessian-vector products (forward over reverse), one or many tangents",
}

_SPARSITY_PARAMETERS = [
    # Examples per function: openapi.py (one for all could fit no function but one).
    {"name": "shapes", "in": "query", "required": True, "schema": {"type": "string"},
     "description": "input shapes in order: ',' between sizes, ';' between inputs (empty: a 0-d input)"},
    {"name": "kind", "in": "query", "schema": {"type": "string", "enum": ["jacobian", "hessian"], "default": "jacobian"}},
    {"name": "sparsity", "in": "query", "schema": {"type": "string", "default": "auto"},
     "description": "auto (detected) or a declared pattern's name"},
    {"name": "mode", "in": "query", "schema": {"type": "string", "enum": ["auto", "fwd", "rev"], "default": "auto"},
     "description": "jacobian: colour columns (fwd, JVPs) or rows (rev, VJPs); auto takes fewer products"},
    {"name": "argnums", "in": "query", "schema": {"type": "string", "default": "0"},
     "description": "differentiated inputs: positions or names, comma-separated"},
    {"name": "dtypes", "in": "query", "schema": {"type": "string"}, "description": "input dtypes, ';' between inputs"},
    {"name": "format", "in": "query", "schema": {"type": "string", "enum": list(wire.SPARSE_FIELDS), "default": "csr"}},
]

ROUTES: list[Route] = [
    Route("GET", "/healthz", healthz, "healthz", "Liveness: 200 while the process serves", "operations", auth="public"),
    Route("GET", "/readyz", readyz, "readyz", "Readiness: 200 once every engine is up; 503 while draining",
          "operations", auth="public", errors=("unavailable",)),
    Route("GET", "/metrics", metrics, "metrics", "Prometheus metrics", "operations", auth="metrics"),
    Route("GET", "/v1/info", info, "info", "Version, devices and limits in force", "operations"),
    Route("GET", "/v1/functions", list_functions, "listFunctions", "Every registered function", "functions"),
    Route("GET", "/v1/functions/{name}", describe_function, "getFunction", "One function's description", "functions",
          errors=("function_not_found",)),
    Route("GET", "/v1/functions/{name}/sparsity", function_sparsity, "getSparsity",
          "A function's sparsity pattern, colouring and product count at given input shapes", "functions",
          errors=("function_not_found", "invalid_input", "sparsity_not_found", "not_acceptable", "payload_too_large",
                  "result_too_large", "function_error",
                  "overloaded", "unavailable", "function_quarantined", "timeout", "out_of_memory"),
          doc={"parameters": _SPARSITY_PARAMETERS}, negotiated=True),
    # An operator's action (ADMIN_KEYS): the function released may crash or hang its
    # engine again, which every request in flight there pays for.
    Route("DELETE", "/v1/functions/{name}/quarantine", release_function, "releaseFunction",
          "Release a quarantined function (operators)", "operations", auth="admin",
          errors=("function_not_found", "precondition_failed")),
    *[
        Route("POST", f"/v1/functions/{{name}}/{kind}", derivative, kind, summary, "derivatives",
              params={"kind": kind}, errors=_DERIVATIVE_ERRORS, negotiated=True)
        for kind, summary in _SUMMARIES.items()
    ],
]


class Router:
    """Dispatch by method and path from the table; 404 and 405 (with ``Allow``) as
    problems. A trailing slash is a 404 like any unknown path: no redirect built from
    the ``Host`` header."""

    # Paths whose matches are kept (most requests name a few paths again and again).
    CACHED_PATHS = 1024

    def __init__(self, routes: list[Route]) -> None:
        # Each pattern with the literal start of its path and its number of segments:
        # cheap string checks rule out most routes before a regular expression runs.
        self.routes = [(route, route.pattern, route.path.split("{", 1)[0], route.path.count("/")) for route in routes]
        # path -> its matches, shared by the requests for that path (never changed: the
        # handlers take the parameters as keywords). Bounded: clients may send any paths;
        # full, it starts again.
        self._cache: dict[str, list[tuple[Route, dict[str, str]]]] = {}
        # What the server takes on some path: the Allow of ``OPTIONS *``.
        self.server_allow = _allowed([(route, {}) for route in routes])

    def match(self, scope: dict[str, Any]) -> list[tuple[Route, dict[str, str]]]:
        """The routes whose path matches the request's, each with its path parameters.
        Kept in the scope: the access middleware labels the request from the same match."""
        state = scope.setdefault("state", {})
        matches = state.get("matches")
        if matches is None:
            matches = state["matches"] = [] if _encoded_slash(scope) else self._match(route_path(scope))
        return matches

    def _match(self, path: str) -> list[tuple[Route, dict[str, str]]]:
        matches = self._cache.get(path)
        if matches is None:
            segments = path.count("/")
            matches = [
                (route, m.groupdict()) for route, pattern, start, count in self.routes
                if count == segments and path.startswith(start) and (m := pattern.match(path))
            ]
            if len(self._cache) >= self.CACHED_PATHS:
                self._cache.clear()
            self._cache[path] = matches
        return matches

    def _slash_redirect(self, scope: dict[str, Any], method: str) -> Response | None:
        """A GET or HEAD of a path that is a route's but for a trailing slash (``/docs/``,
        ``/v1/functions/``, as typed into an address bar or joined by a client): the 307
        to the route's path (as Starlette's and FastAPI's routers answer), where the page
        was a 404 problem+json. Location is relative (``../docs``), so that it holds
        behind a proxy's prefix; the query goes along. Other methods keep the 404: a body
        re-sent on a redirect is the client's to decide: their 404 names the path."""
        path = route_path(scope)
        if not path.endswith("/") or path == "/" or not self._match(path[:-1]):
            return None
        if method not in ("GET", "HEAD"):
            raise NotFound(f"no route for {method} {_printable(path)}: the path takes no trailing slash "
                           f"({_printable(path[:-1])})")
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        last = raw[:-1].rsplit(b"/", 1)[-1].decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        return Response(status_code=307, headers={"Location": f"../{last}" + (f"?{query}" if query else "")})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        method = scope["method"]
        negotiated = False
        try:
            try:
                matches = self.match(scope)
                # ``OPTIONS *`` asks of the server, not of a path (RFC 9110 9.3.7: a client's
                # "ping"): answered below with what the server takes; it was a 404 "no
                # route for OPTIONS *".
                asterisk = method == "OPTIONS" and scope["path"] == "*"
                if not matches and not asterisk:
                    if _encoded_slash(scope):
                        raw = scope["raw_path"].decode("latin-1")
                        raise NotFound(f"no route for {method} {_printable(raw)}: an encoded '/' (%2F) is part of "
                                       "its path segment, never a separator, and no name holds one")
                    if (redirect := self._slash_redirect(scope, method)) is not None:
                        scope["state"]["code"] = "redirect"
                        raise _Answered(redirect)
                    # A browser pointed at the address serve prints lands on "/": say where to go.
                    root = scope.get("root_path", "")
                    prefix, path = _printable(root), route_path(scope)
                    if root and path.startswith(root.rstrip("/") + "/"):
                        # The prefix twice (a client past the proxy, or a proxy that keeps
                        # it): "the API is under /api/v1/functions" was said of a request
                        # for /api/v1/functions itself.
                        raise NotFound(f"no route for {method} {_printable(path)}: {prefix} is the prefix (ROOT_PATH) "
                                       "a proxy in front strips before passing requests on, and this request still "
                                       "has it (the proxy keeps it, or the request came past the proxy); without it "
                                       f"the path is {_printable(path[len(root.rstrip('/')):])}")
                    raise NotFound(f"no route for {method} {_printable(path)}; the API is under "
                                   f"{prefix}/v1/functions, its interactive docs at {prefix}/docs")
                for route, params in matches:
                    if route.method == method or (method == "HEAD" and route.method == "GET"):
                        negotiated = route.negotiated
                        response = await route.handler(request, **params, **route.params)
                        # (a GET's answer is a whole body, none a stream: one made and not sent ends nothing)
                        if route.method == "GET" and 200 <= response.status_code < 300 and \
                                preconditions.conditional(scope["headers"]):
                            response = preconditions.evaluated(scope["headers"], response, _request_id(request))
                        break
                else:
                    allowed = _allowed(matches) if matches else self.server_allow  # (none: OPTIONS *)
                    if method != "OPTIONS":
                        raise MethodNotAllowed(f"{method} is not allowed here; allowed: {allowed}",
                                               headers={"Allow": allowed})
                    # A plain OPTIONS (a CORS preflight is answered before this, by the
                    # CORS middleware) asks what the path takes (RFC 9110 9.3.7): it was a
                    # 405 whose Allow left OPTIONS out, though every path answers it. Past
                    # auth as every method is: without a key it is the 401 the path's
                    # GET or POST gets, and tells nothing the caller may not know.
                    scope["state"]["code"] = "options"  # not a call of the endpoint (as "preflight")
                    response = Response(status_code=204, headers={"Allow": allowed})
            except _Answered as answered:
                response = answered.response
            except ServiceError as exc:
                scope["state"]["code"] = exc.code
                response = problem_response(exc, _request_id(request))
            except ClientDisconnect:
                scope["state"]["code"] = "client_closed"
                response = Response(status_code=499)  # nobody is listening
            except MemoryError:
                scope["state"]["code"] = "out_of_memory"
                response = problem_response(OutOfMemory("out of memory while handling the request"), _request_id(request))
        except Exception:
            log.exception("unhandled error on %s %s", method, _printable(scope["path"]))
            scope["state"]["code"] = "internal_error"
            response = problem_response(InternalError("internal error; see the server log"), _request_id(request))
        if negotiated and method != "POST":  # (a POST's answer says Vary: * in its place: AccessMiddleware)
            _vary_accept(response)
        await response(scope, receive, send)


class _Answered(Exception):
    """The router's answer, found before any route ran (a redirect)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _allowed(matches: list[tuple[Route, dict[str, str]]]) -> str:
    """The ``Allow`` of a path (RFC 9110 10.2.1), from the routes its path matches: their
    methods, HEAD wherever GET is (the router serves it with GET's handler) and OPTIONS
    (which the router answers on every path), for a 405 and an OPTIONS alike."""
    methods = {r.method for r, _ in matches} | {"OPTIONS"}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _vary_accept(response: Response) -> None:
    """``Vary: Accept`` on every answer of a route whose media type the request's Accept
    picks (RFC 9110 12.5.5), its errors too (a 406 is Accept's). Without it a cache that
    keeps answers by URL, as the Cache API a page's service worker keeps them by (it
    honours Vary, not no-store), gave the JSON it held for a sparsity pattern to the
    page's request for the pattern's .npz: the page's .npz reader failed on JSON.
    (An answer to a POST says ``Vary: *`` in its place: middleware.VARY_ANY.)"""
    headers = response.raw_headers
    for i, (key, value) in enumerate(headers):
        if key == b"vary":
            headers[i] = (key, value + b", Accept")
            return
    headers.append((b"vary", b"Accept"))


def _encoded_slash(scope: dict[str, Any]) -> bool:
    """Whether the request's path, as sent, holds an encoded '/' (``%2F``). The server
    decodes it into the path like any other character, where it read as a separator:
    ``POST /v1/functions/sin%2Fjacobian`` computed sin's Jacobian and ``DELETE
    /v1/functions/f%2Fquarantine`` released a quarantine, past a proxy whose rules (on
    ``/v1/functions/*/quarantine``, say) match the path as sent, as Envoy's do by default.
    No function or route name holds a '/', so such a path names nothing here."""
    raw = scope.get("raw_path") or b""
    return b"%2" in raw and (b"%2f" in raw or b"%2F" in raw)


def route_path(scope: dict[str, Any]) -> str:
    """The path below ``root_path`` (a proxy's prefix), whichever way the server set it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _printable(text: str, limit: int = 200) -> str:
    """For messages and logs: control characters escaped, long text cut."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return cut.encode("unicode_escape").decode("ascii") if not cut.isprintable() else cut
