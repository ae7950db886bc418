"""Content negotiation and result encoding (JSON, .npy, .npz) through the wire module."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import re
import traceback
import urllib.parse
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, NoReturn

import numpy as np
from starlette.responses import Response, StreamingResponse

from jacobian_client import wire

from .types import Result, is_sparse_matrix
from .errors import NotAcceptable, Overloaded, ServiceError, Unavailable
from .header_params import bounded_field, parameters, split_unquoted

__all__ = [
    "ClosingStreamingResponse", "EncodeBudget", "JsonRows", "META_HEADERS", "StreamBudget", "StreamHold", "attachment", "echo", "acceptable", "choose", "encode", "is_single_array", "not_one_array", "json_pieces",
    "meta_headers", "meta_raw_headers", "pieces_response", "problem_document", "problem_response", "qvalue", "sparse_json_body", "stream_hold",
]

_OFFERED = (wire.JSON, wire.NPY, wire.NPZ)
_JOIN_BYTES = 1 << 20


def acceptable(accept: str | None) -> list[str]:
    """Our media types the ``Accept`` header allows, best first (q, then header order).
    Clients send the same few headers again and again: each short one is read once and
    kept (a long one, which only a client making trouble sends, is read each time)."""
    if accept is not None and len(accept) <= _KEPT_ACCEPT_CHARS:
        return list(_kept_acceptable(accept))
    return _acceptable(accept)


_KEPT_ACCEPT_CHARS = 256


@functools.lru_cache(maxsize=256)
def _kept_acceptable(accept: str) -> tuple[str, ...]:
    return tuple(_acceptable(accept))  # (a refusal raises, and is not kept)


def _acceptable(accept: str | None) -> list[str]:
    if not accept or not accept.strip():
        return [wire.JSON]
    bounded_field("Accept", accept)
    ranked: list[tuple[float, int, str]] = []
    # RFC 9110 12.5.1: a type named outranks a range that covers it, whatever the two
    # weights: ``application/json;q=0, */*`` is anything but JSON, and was answered JSON
    # (the range stood for JSON alone). A range covers what is not named, JSON first.
    named: set[str] = set()
    ranges: list[tuple[float, int]] = []
    for order, part in enumerate(split_unquoted(accept, ",")):  # (a quoted value may hold a "," or ";")
        fields = split_unquoted(part, ";")
        media = fields[0].strip().lower()
        q = 1.0
        for key, value in parameters(fields[1:]):
            if key == "q":
                q = qvalue(value)
        if media in ("*/*", "application/*"):
            if q > 0:
                ranges.append((q, order))
        elif media in _OFFERED:
            named.add(media)
            if q > 0:
                ranked.append((q, order, media))
    for q, order in ranges:
        ranked.extend((q, order, media) for media in _OFFERED if media not in named)
    seen: list[str] = []
    for _, _, media in sorted(ranked, key=lambda r: (-r[0], r[1])):
        if media not in seen:
            seen.append(media)
    if not seen:
        raise NotAcceptable(f"Accept {echo(accept)} allows none of {', '.join(_OFFERED)}")
    return seen


def qvalue(text: str) -> float:
    """A weight (RFC 9110 12.4.2) in ``Accept`` or ``Accept-Encoding``: from 0 to 1; anything
    else (nan, inf, 2, 1e999, a word) is 0, which leaves its entry out: a NaN among the
    weights sorted the others in no order at all, and ``gzip;q=1e999`` (infinity) was read
    as wanting gzip where ``application/json;q=1e999`` was left out. Read as leniently as
    the grammar allows in practice: Java's default header says "q=.2"."""
    try:
        q = float(text)
    except ValueError:
        return 0.0
    return q if 0.0 <= q <= 1.0 else 0.0  # (NaN too)


def echo(value: str, limit: int = 100) -> str:
    """A client's header, quoted back in a message: cut short, control characters escaped."""
    cut = value[:limit] + ("..." if len(value) > limit else "")
    return repr(cut)


def choose(media: list[str], single_array: bool,
           why: Callable[[], tuple[str, str]] = lambda: ("several_arrays", "it has several arrays, aux or output")) -> str:
    """The first acceptable type that can carry the result; ``why()`` says what a refused
    ``.npy`` could not carry (``not_one_array``: its code and words), asked only then
    (it was worked out for every answer). The problem carries both as members,
    ``not_one_array`` (the code) and ``reason`` (the words, without the advice): a client
    that words the refusal its own way (the SDK's ``out=``) reads them, not the detail."""
    for m in media:
        if m != wire.NPY or single_array:
            return m
    code, reason = why()
    raise NotAcceptable(f"this result is not one bare array ({reason}); ask for {wire.NPZ} or {wire.JSON}",
                        fields={"not_one_array": code, "reason": reason})


# Whose tuple a tuple argnums' result is, by kind (not_one_array): every kind said
# "as jacrev gives it", a Hessian's and a vjp's or hvp's too
_TUPLE_OF = {"jacobian": "as jacrev gives it", "hessian": "as torch.func.hessian gives it",
             "vjp": "one per differentiated input, as torch.func.vjp's pullback gives them",
             "hvp": "one per differentiated input, shaped like it"}


def not_one_array(has_aux: bool, return_output: bool, as_tuple: bool, tree_param: bool,
                  kind: str = "jacobian") -> tuple[str, str]:
    """What keeps a result from being one bare ``.npy``: a code (the problem's
    ``not_one_array`` member: ``aux``, ``output``, ``tuple``, ``pytree``,
    ``several_arrays``) and its words, in the request's terms. "It has
    several arrays" answered ``argnums=0,`` (a tuple of one Jacobian, as ``jacrev`` gives
    for a one-element tuple ``argnums``): one array, in a tuple a bare .npy cannot say
    (SPEC 3.3: a tuple is a JSON list; .npy only for a single array). The JSON and .npz
    answers keep the tuple (a list of one, a ``jacobian/0.npy`` member), so the SDK reads
    the same tuple whatever the format."""
    if has_aux:
        return "aux", "the function's aux comes beside it"
    if return_output:
        return "output", "return_output puts the output beside it"
    if as_tuple:
        return "tuple", (f"argnums is a tuple, so the result is a tuple (of one array for one argnum, "
                         f"{_TUPLE_OF.get(kind, _TUPLE_OF['jacobian'])}), which a bare .npy cannot say; give argnums "
                         "as one int or name for one array")
    if tree_param:
        return "pytree", "it is differentiated with respect to a pytree parameter: one array per leaf"
    return "several_arrays", "it has several arrays: one per output leaf"


_EXTENSIONS = {wire.NPY: ".npy", wire.NPZ: ".npz"}


@functools.lru_cache(maxsize=1024)
def attachment(function: str, what: str, media: str) -> dict[str, str]:
    """The ``Content-Disposition`` of a binary answer: ``attachment; filename="sin-jacobian.npy"``.
    Every .npy and .npz body carries it (gathered, streamed, sparse, a sparsity pattern):
    a browser (Swagger UI's Download among them) saves the bytes as they are, under a
    name that says what they are, rather than showing them as text or saving them as a
    corrupted .txt. Made once per function and kind (the dict is shared: not to be
    changed). Characters outside [A-Za-z0-9._-] become ``_``: a quoted file name has no
    room for quotes, slashes or non-ASCII. A name with letters or digits of another
    script (``größe``, ``ヤコビ``) also gets them in ``filename*`` (RFC 6266, UTF-8),
    which browsers prefer: it was saved as ``gr__e-jacobian.npy``, ``___-jacobian.npy``
    (every function of such names under the same file name). Anything else (spaces,
    quotes, direction overrides, combining marks) is ``_`` there too."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"{function}-{what}")
    value = f'attachment; filename="{stem}{_EXTENSIONS[media]}"'
    wide = re.sub(r"[^\w.-]", "_", f"{function}-{what}")  # (\w: the letters and digits of every script)
    if wide != stem:
        value += "; filename*=UTF-8''" + urllib.parse.quote(wide + _EXTENSIONS[media], safe="")
    return {"Content-Disposition": value}


# ``meta``'s common entries, each also a header of every derivative answer, whatever its
# format: a bare .npy has no room for meta, and a page that asked for one (to read it
# with a DataView) had no way to learn its queue and compute times, its device or its
# batch, where the same answer streamed said three of them in its head. Streamed
# answers send their head before their rows are computed: they say what is known then
# (no X-Mode, no X-Compute-Ms; a JSON stream's meta, last in its body, says both).
# Exposed to pages of CORS_ORIGINS (middleware.EXPOSED_HEADERS is built from this).
#
# Per-array flags go the same way, where meta holds them: which arrays of the result (an
# evaluate's output, any derivative: engine.core.derivative_half_meta) stand for bfloat16
# (``meta.bfloat16``: float32 on the wire, numpy has none) and
# which a per-example evaluate left unbatched (``meta.unbatched``), one ``true`` /
# ``false`` per output array, comma-separated. A page that asked for a bfloat16
# evaluate as .npy read '<f4' and nothing else: it could not tell a bfloat16 answer
# from a float32 one, which JSON and .npz say in meta. (Aux and output flags need no
# header: a result with aux or output is never a bare .npy.)
META_HEADERS = {"device": "X-Device", "chunk_size": "X-Chunk-Size", "batch_size": "X-Batch-Size", "mode": "X-Mode",
                "queue_ms": "X-Queue-Ms", "compute_ms": "X-Compute-Ms",
                "bfloat16": "X-Bfloat16", "unbatched": "X-Unbatched"}


def meta_headers(meta: dict[str, Any]) -> dict[str, str]:
    """The headers of ``meta``'s common entries (those it holds, not null), and its times
    as ``Server-Timing`` (W3C Server Timing): the browser's developer tools show them in
    the request's timing, and a page reads them from its Resource Timing entry
    (``serverTiming``; Timing-Allow-Origin lets a page of CORS_ORIGINS)."""
    said, timing = _said(meta)
    headers = {header: text for header, _, text in said}
    if timing:
        headers["Server-Timing"] = timing
    return headers


def meta_raw_headers(meta: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """:func:`meta_headers` as an ASGI response's raw headers (lower case, as Starlette
    makes them), to add to a response made without them: every small .npy answer pays
    this, and the way through ``headers=`` (a dict made, merged, then each name
    lower-cased and encoded by Starlette at every request) cost as much again."""
    said, timing = _said(meta)
    raw = [(name, text.encode("latin-1")) for _, name, text in said]
    if timing:
        raw.append((b"server-timing", timing.encode("latin-1")))
    return raw


def _said(meta: dict[str, Any]) -> tuple[list[tuple[str, bytes, str]], str]:
    """``(header, raw name, value)`` of each of ``meta``'s common entries it holds, and
    its ``Server-Timing`` ("" if none): each value formatted once, for both."""
    said = []
    timing = ""
    for key, header, name, metric in _META:
        value = meta.get(key)
        if value is not None:
            text = str(value) if type(value) is not list else ", ".join("true" if v else "false" for v in value)
            said.append((header, name, text))
            if metric:
                timing = f"{timing}, {metric};dur={text}" if timing else f"{metric};dur={text}"
    return said, timing


# Each of META_HEADERS as (meta's key, the header, its raw name, its Server-Timing metric or "").
_SERVER_TIMING = {"queue_ms": "queue", "compute_ms": "compute"}
_META = tuple((key, header, header.lower().encode("latin-1"), _SERVER_TIMING.get(key, ""))
              for key, header in META_HEADERS.items())


def is_single_array(result: Result) -> bool:
    return isinstance(result.value, np.ndarray) and not result.has_aux and result.output is None


def encode(media: str, function: str, key: str, result: Result, meta: dict[str, Any], nbytes: int | None = None) -> Response:
    """Encode a gathered result. JSON and .npz are CPU-heavy for large results (the caller
    runs them off the loop); .npy is a header and views of the arrays. ``nbytes``: the
    result's ``nbytes()``, where the caller has it already."""
    if media == wire.NPY:
        pieces = wire.write_npy(result.value)
        if result.value.nbytes < _JOIN_BYTES:  # one plain body: cheaper than a streamed one
            response = Response(b"".join(pieces), media_type=wire.NPY, headers=attachment(function, key, media))
            response.raw_headers.extend(meta_raw_headers(meta))  # (meta_raw_headers says why not headers=)
            return response
        return pieces_response(pieces, wire.NPY, {**attachment(function, key, media), **meta_headers(meta)})
    trees: dict[str, Any] = {key: result.value}
    if result.has_aux:
        trees["aux"] = result.aux
    if result.output is not None:
        trees["output"] = result.output
    lists = wire.lists_meta(trees)
    if lists:  # JSON and .npz have one sequence: which were lists (absent where none was)
        meta = {**meta, "lists": lists}
    if media == wire.NPZ and is_sparse_matrix(result.value):
        # SPEC 7: the members scipy.sparse.save_npz writes, so load_npz reads the body;
        # aux / output and meta.json beside them.
        extra = {k: v for k, v in trees.items() if k != key}
        return Response(wire.write_sparse_npz(result.value, {"function": function, **meta}, extra), media_type=wire.NPZ,
                        headers={**attachment(function, key, media), **meta_headers(meta)})
    if media == wire.NPZ:
        return Response(wire.write_npz(trees, {"function": function, **meta}), media_type=wire.NPZ,
                        headers={**attachment(function, key, media), **meta_headers(meta)})
    document = {"function": function, **trees, "meta": meta}
    if (result.nbytes() if nbytes is None else nbytes) < _JOIN_BYTES:  # small: one body, encoded at once
        response = Response(wire.dumps(wire.encode_tree(document)), media_type=wire.JSON)
        response.raw_headers.extend(meta_raw_headers(meta))  # (as a small .npy's: meta_raw_headers says why)
        return response
    # Large: written piece by piece as it is sent (on a worker thread: Starlette iterates a
    # plain iterator there), so encoding holds O(piece), not the whole document.
    # (Closing: a client that leaves mid-answer must not leave the document pinned; see there.)
    return ClosingStreamingResponse(json_pieces(document), media_type=wire.JSON, headers=meta_headers(meta))


class ClosingStreamingResponse(StreamingResponse):
    """A streamed answer whose body is closed as the answer ends, however it ends.
    Starlette iterates the body with ``async for`` and leaves it open when sending
    fails (a client that stopped reading, aborted at the send timeout): its ``finally``,
    which gives back the stream's room on the budget and closes the engine's stream, ran
    only once the collector found the generator, held in the failure's reference cycle.
    With the front end's collector run rarely (``heap.FRONT_END_YOUNG``) that room stayed
    taken, and the next large answer of an idle server was a 503 for bytes nobody held.

    Nor does a failure keep what was being sent. A client that leaves mid-answer has
    Starlette cancel the sending task (its disconnect watch), and anyio keeps that
    cancellation in a reference cycle of its own (the exception, its traceback, the task
    group's frame naming it): the traceback's frames held the piece being sent and the
    one asked for ahead (Starlette's ``chunk``, a stream's ``arr``, a gathered JSON
    answer's whole document), mapped from the engine's result memfds, until the
    collector ran, rarely in a front end. The budget had them back at once: 100 clients
    that each left a 13.5 MB JSON Hessian after its first 100 kB grew an idle front end
    to 1.44 GB (76 results mapped, ``stream_bytes_held`` 0; its stream budget 512 MiB).
    The frames that failure left are cleared as it passes here, so those pieces go with
    the request."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        except BaseException as exc:
            # The frames below this one have ended (the exception left them); their locals
            # go now, not when the collector finds the cycle (this frame, still running,
            # is skipped by clear_frames: it holds no piece).
            traceback.clear_frames(exc.__traceback__)
            raise

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def json_pieces(tree: Any) -> Iterator[bytes]:
    """The JSON of ``wire.encode_tree(tree)``, in pieces: arrays over ``_JOIN_BYTES`` are
    written a block of rows (about ``_JOIN_BYTES`` of array) at a time, so what encoding
    holds at once is one block's text (and, for non-finite values, its spelled-out list),
    whatever the array's size. The text parses to the same document as the one-shot
    encoding."""
    if isinstance(tree, np.ndarray) and tree.nbytes >= _JOIN_BYTES and tree.ndim >= 1:
        head = wire.encode_tree(tree[:1])
        yield b'{"dtype":' + wire.dumps(head["dtype"]) + b',"shape":' + wire.dumps(list(tree.shape)) + b',"data":['
        rows = max(1, _JOIN_BYTES // max(1, tree[:1].nbytes))
        for start in range(0, tree.shape[0], rows):
            block = wire.dumps(wire.encode_tree(tree[start:start + rows])["data"])
            yield (b"," if start else b"") + block[1:-1]  # the block's rows, without its brackets
        yield b"]}"
    elif wire.is_sparse(tree):
        yield from _sparse_json_pieces(wire.encode_sparse_json(tree))
    elif isinstance(tree, dict) and not wire.is_sparse(tree):
        yield b"{"
        for i, (key, value) in enumerate(tree.items()):
            yield (b"," if i else b"") + wire.dumps(str(key)) + b":"
            yield from json_pieces(value)
        yield b"}"
    elif isinstance(tree, (list, tuple)):
        yield b"["
        for i, value in enumerate(tree):
            if i:
                yield b","
            yield from json_pieces(value)
        yield b"]"
    else:
        yield wire.dumps(wire.encode_tree(tree))


def _sparse_json_pieces(doc: dict[str, Any]) -> Iterator[bytes]:
    """A sparse object's JSON (``wire.encode_sparse_json``'s), its index and value arrays
    a block of ``_JOIN_BYTES`` at a time. Written in one ``wire.dumps``, a 16.7 M-entry
    pattern (113 MB of JSON) was one C call holding the GIL ~1 s on the encoding thread:
    every other connection of that front end, a ``/healthz`` too, waited for it."""
    yield b"{"
    for i, (key, value) in enumerate(doc.items()):
        yield (b"," if i else b"") + wire.dumps(key) + b":"
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.nbytes >= _JOIN_BYTES:
            step = _JOIN_BYTES // value.itemsize
            yield b"["
            for start in range(0, len(value), step):
                yield (b"," if start else b"") + wire.dumps(value[start:start + step])[1:-1]
            yield b"]"
        else:
            yield wire.dumps(value)
    yield b"}"


def sparse_json_body(doc: dict[str, Any], key: str, matrix: Any) -> bytes:
    """``doc`` with ``matrix`` under ``key``, last, as one JSON body, its sparse arrays
    encoded a block at a time (``_sparse_json_pieces``): built on a worker thread, the
    event loop runs between the blocks."""
    head = wire.dumps(doc)
    return b"".join([head[:-1], b"," if doc else b"", wire.dumps(key), b":",
                     *_sparse_json_pieces(wire.encode_sparse_json(matrix)), b"}"])


class JsonRows:
    """A Jacobian's ``"data"`` as nested JSON lists, written from row chunks that arrive
    in order (the flattened output's rows, as the engine streams them for ``.npy``): the
    text of one chunk at a time, with the brackets of the output's dimensions opened and
    closed where the rows cross them. ``shape`` is the whole Jacobian's; how many of its
    leading dimensions are the output's is read from the first chunk's rank."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.out_shape: tuple[int, ...] | None = None
        self.row = 0

    def piece(self, chunk: np.ndarray) -> bytes:
        if self.out_shape is None:
            self.out_shape = self.shape[: len(self.shape) - (chunk.ndim - 1)]
        if not self.out_shape:  # a scalar output: its one row is the whole array
            self.row += len(chunk)
            return _json_data(chunk.reshape(chunk.shape[1:]))
        inner = self.out_shape[-1]
        out: list[bytes] = []
        i = 0
        while i < len(chunk):
            r, pos = self.row + i, (self.row + i) % inner
            if r == 0:
                out.append(b"[" * len(self.out_shape))
            elif pos == 0:  # rows cross one or more output dimensions here
                depth = 1
                while depth < len(self.out_shape) and r % math.prod(self.out_shape[-depth - 1:]) == 0:
                    depth += 1
                out.append(b"]" * depth + b"," + b"[" * depth)
            else:
                out.append(b",")
            run = min(len(chunk) - i, inner - pos)
            out.append(_json_data(chunk[i:i + run])[1:-1])  # the run's rows, without its brackets
            i += run
        self.row += len(chunk)
        return b"".join(out)

    def end(self) -> bytes:
        if self.out_shape is None:  # no rows came: an empty array of this shape
            return _json_data(np.empty(self.shape, np.float32))
        return b"]" * len(self.out_shape)


def _json_data(arr: np.ndarray) -> bytes:
    return wire.dumps(wire.encode_tree(arr)["data"])


def pieces_response(pieces: Iterable[bytes | memoryview], media_type: str, headers: dict[str, str] | None = None) -> Response:
    """A body sent piece by piece with its length known up front (no join, no copy)."""
    return _PiecesResponse(list(pieces), media_type, headers)


class _PiecesResponse(Response):
    """The pieces, each one ASGI body message, straight after the head. Starlette's
    StreamingResponse would also run a task watching for the client leaving: the
    pieces are in memory already, and the server drops what is sent after a
    disconnect, so there is nothing to stop early."""

    def __init__(self, pieces: list[bytes | memoryview], media_type: str, headers: dict[str, str] | None) -> None:
        self.pieces = pieces
        length = sum(memoryview(p).nbytes for p in pieces)
        super().__init__(None, media_type=media_type, headers={**(headers or {}), "Content-Length": str(length)})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for i, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < last})
        if not self.pieces:
            await send({"type": "http.response.body", "body": b""})


class EncodeBudget:
    """Bytes of results being encoded at once, bounded: a burst of large results is
    encoded a few at a time rather than all together (JSON costs several times the
    result's size while it is built). One result larger than the whole budget still
    runs, alone."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        if nbytes < _JOIN_BYTES:  # small results never wait
            yield
            return
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.max_bytes)
            self.used += nbytes
        try:
            yield
        finally:
            async with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


class StreamBudget:
    """Bytes of streamed Jacobians' row chunks a front end may hold at once, bounded.

    A client that reads its stream slowly keeps the chunk being sent, and the one asked
    for ahead, in the front end for as long as it takes (a piece of 1 MiB may wait
    ``SEND_TIMEOUT_S``): 120 clients that asked for a 2000 x 2000 softmax and read
    nothing grew a front end by 1.9 GB, and ``MAX_QUEUE`` streams of 32 MiB chunks could
    take 16 GB. A request that may stream reserves its two chunks before it is sent to an
    engine (:meth:`admit`); one that does not fit now is refused there (503
    ``unavailable``, ``Retry-After``: its client retries, as for a body that does not fit
    the body budget), before the engine has run anything. Other requests are not
    touched, and a stream that started is never cut; the first always starts, whatever
    its size.

    Shared among clients (``clients.py``): one client holds at most ``per_client``
    streams and half the budget's bytes at once, or 429 ``overloaded`` (its first stream
    always starts). A stream is held at its client's pace (``SEND_TIMEOUT_S`` and the
    minimum rate bound it, per stream): one client that opened ``MAX_QUEUE`` streams and
    read none had the engine answer 429 to every other client's every request, and a few
    large ones held the whole budget, for as long as it kept opening them."""

    # Requests seen (their keys: see ``admit``) and their results' sizes, at most this many.
    KNOWN = 1024

    def __init__(self, max_bytes: int, stream_threshold: int = 8 << 20, per_client: int = 0, gauge: Any = None) -> None:
        self.max_bytes = max_bytes
        self.stream_threshold = stream_threshold  # the engines stream only results larger than this (and the result limit)
        self.per_client = per_client  # 0: no share per client
        # What ``used`` is, in /metrics (jacobian_service_stream_bytes_held): the 503s and
        # 429s name the bytes held, which an operator could not watch, nor see given back
        # when a page aborted its stream. (Written at each change: each is a stream or an
        # answer of 1 MiB or more, never a small request.)
        self._gauge = gauge
        self.used = 0
        self._known: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self._clients: dict[str, list[int]] = {}  # client -> [streams, bytes] it holds

    def admit(self, key: Any, row_nbytes: int, chunk_rows: int, least_rows: int, nbytes: int | None,
              client: str | None = None) -> StreamHold:
        """Room for the stream of a request about to be sent to an engine, or 503 now.

        A stream's size is known only from the forward pass (the output's shape): a
        refusal once the engine had answered cost it that pass, and a client retrying as
        told had the engine run it at every retry, for nothing (the first request of a
        kind too: only requests equal to one seen before were refused up front). So the
        room is reserved before: ``chunk_rows`` rows of ``row_nbytes`` a chunk at most
        (an explicit ``chunk_size``, or the engine's bound), ``least_rows`` at least, for
        a result of ``nbytes`` (None: not known; else given by ``rows``, or learned from
        an equal request, ``key``: the function, its input shapes and dtypes, and the
        options that shape the stream). A stream of unknown size takes half the room
        left, down to its least, and the engine sizes its chunks to what it got
        (``Call.stream_room``); one of known size takes its whole two chunks (at most
        the result: ``stream_hold``) or is refused. A result known to be gathered (not streamed) holds nothing."""
        known = self._known.get(key)
        if known is not None:
            self._known.move_to_end(key)
            nbytes = known if nbytes is None else nbytes
        client = client if self.per_client else None
        if nbytes is not None and nbytes <= self.stream_threshold:
            return StreamHold(self, 0, None, client)
        most = stream_hold(chunk_rows * row_nbytes, math.inf if nbytes is None else nbytes)
        least = most if nbytes is not None else min(most, 2 * least_rows * row_nbytes)
        free = (self.max_bytes - self.used) // 2
        if client in self._clients:  # ... and half of what its client's share has left
            free = min(free, (self.max_bytes // 2 - self._clients[client][1]) // 2)
        room = int(min(most, max(least, free)))
        hold = StreamHold(self, 0, room, client)
        hold.keep(room, stream=nbytes is not None)  # (one of unknown size is held to the share once it streams)
        return hold

    def learn(self, key: Any, nbytes: int) -> None:
        """The size of the result a request of ``key`` had (0: it was gathered, not streamed)."""
        self._known[key] = nbytes
        self._known.move_to_end(key)
        if len(self._known) > self.KNOWN:
            self._known.popitem(last=False)

    def answer_room(self, client: str | None) -> int | None:
        """The most bytes a gathered answer could hold beside what is held now (None: any;
        ``client``: whose share counts, None where there are no shares): what
        :meth:`StreamHold.keep` would take for it without a 503 or a 429. Sent with the
        request (``Call.answer_room``), so that an engine refuses a larger one before
        computing it (``errors.no_answer_room``), not the front end after."""
        room = self.max_bytes - self.used if self.used else None  # (the first always fits)
        streams, held = self._clients.get(client, (0, 0)) if client is not None else (0, 0)
        if streams:  # (its first always starts)
            share = 0 if streams >= self.per_client else self.max_bytes // 2 - held
            room = share if room is None else min(room, share)
        return None if room is None else max(room, 0)

    def refuse_answer(self, client: str | None, nbytes: int) -> NoReturn:
        """The refusal of a gathered answer of ``nbytes`` that an engine found no room
        for (``answer_room``) and did not compute: the budget's 503 or the share's 429 in
        their own words, as :meth:`StreamHold.keep` would have said after computing it;
        a 503 all the same where the room came back meanwhile (the engine stopped)."""
        not_computed = " (refused by the engine as soon as its size was known, before computing it)"
        try:
            self._refuse(nbytes)
            if client is not None:
                self._check_share(client, nbytes, 0, False)
        except ServiceError as exc:
            raise type(exc)(exc.detail + not_computed, headers=exc.headers) from None
        raise Unavailable(f"large answers being sent held the room this one needs ({nbytes} bytes) when it was asked"
                          f"{not_computed}; retry shortly", headers={"Retry-After": "1"})

    def fits_answer(self, client: str | None, nbytes: int) -> bool:
        """Whether a gathered answer of ``nbytes`` would be held now without a 503 or a 429."""
        room = self.answer_room(client)
        return room is None or nbytes <= room

    def _refuse(self, nbytes: int, own: int = 0) -> None:
        """503 if ``nbytes`` do not fit beside what others hold (``own``: held by the same request)."""
        others = self.used - own
        if others and others + nbytes > self.max_bytes:
            raise Unavailable(
                f"large answers being sent (streamed, or gathered) hold {others} of the {self.max_bytes} bytes this "
                f"front end gives them (BODY_BUDGET_BYTES); this one needs {nbytes}; retry shortly", headers={"Retry-After": "1"})

    def _check_share(self, client: str, nbytes: int, own: int, counted: bool) -> None:
        """429 if a stream of the client's holding ``own`` bytes (``counted``: already
        one of its streams) would pass its share at ``nbytes``. Its first stream always
        starts."""
        streams, held = self._clients.get(client, (0, 0))
        others, held = streams - counted, held - own
        if others and (others >= self.per_client or held + nbytes > self.max_bytes // 2):
            raise Overloaded(
                f"this client holds {others} large answers ({held} bytes) being sent; one client may hold "
                f"{self.per_client} and half of the {self.max_bytes} bytes this front end gives them at once "
                "(MAX_STREAMS_PER_CLIENT, BODY_BUDGET_BYTES): read those first, or retry shortly",
                headers={"Retry-After": "1"})

    def _set(self, used: int) -> None:
        if self._gauge is not None and used != self.used:
            self._gauge.set(used)
        self.used = used

    def _give_back(self, client: str, streams: int, nbytes: int) -> None:
        share = self._clients[client]
        share[0] -= streams
        share[1] -= nbytes
        if share == [0, 0]:
            del self._clients[client]


def stream_hold(chunk_nbytes: float, nbytes: float) -> float:
    """What a stream of ``nbytes`` sent in chunks of ``chunk_nbytes`` keeps in the front
    end while its client reads slowly: the chunk being sent and the one asked for ahead,
    two distinct parts of the result, so never more than the result. A 9 MB Jacobian
    sent in one chunk was counted as two (18 MB): a page's second such stream passed its
    share of a 64 MiB budget, 429, with 19 MB of it really held."""
    return min(2 * chunk_nbytes, nbytes)


class StreamHold:
    """What one request holds on a :class:`StreamBudget`. ``room``: what the engine's chunks
    must fit (None: no bound, the request was not expected to stream). ``client``: whose
    share it counts in once it holds bytes (None: no share per client)."""

    __slots__ = ("_budget", "client", "counted", "held", "room")

    def __init__(self, budget: StreamBudget, held: int, room: int | None, client: str | None = None) -> None:
        self._budget, self.held, self.room = budget, held, room
        self.client, self.counted = client, False

    def keep(self, nbytes: int, stream: bool = True) -> Callable[[], None]:
        """Hold ``nbytes`` (the stream's two chunks, as the engine sized them) in place of
        the room reserved; returns what gives them back (once, however often called: a
        stream's end and its body's collection may both call it). Within the room it
        always fits; a stream not expected (an equal request's result was gathered)
        takes its place now, or 503. ``stream``: a stream of the client's from here on,
        held to its share (429); else room for a result that may not stream at all
        (its size unknown before the forward pass), charged to the client's bytes only."""
        budget = self._budget
        if nbytes > self.held:
            budget._refuse(nbytes, self.held)
        if self.client is not None:
            if stream and (not self.counted or nbytes > self.held):
                budget._check_share(self.client, nbytes, self.held, self.counted)
            share = budget._clients.setdefault(self.client, [0, 0])
            share[0] += stream and not self.counted
            share[1] += nbytes - self.held
            self.counted = self.counted or stream
            if share == [0, 0]:  # (nothing held: an empty result's room)
                del budget._clients[self.client]
        budget._set(budget.used + nbytes - self.held)
        self.held = nbytes
        return self.release

    def release(self) -> None:
        budget = self._budget
        budget._set(budget.used - self.held)
        if self.client in budget._clients:
            budget._give_back(self.client, self.counted, self.held)
        self.counted = False
        self.held = 0


def problem_document(error: ServiceError, request_id: str) -> dict[str, Any]:
    """The problem+json body of ``error`` (SPEC 3.4), with its extension members
    (``error.fields``) after SPEC's, which they never replace."""
    doc = {
        "type": f"urn:jacobian-service:problem:{error.code}",
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
        "request_id": request_id,
    }
    doc.update((k, v) for k, v in error.fields.items() if k not in doc)
    return doc


def problem_response(error: ServiceError, request_id: str) -> Response:
    headers = {"X-Request-ID": request_id, **error.headers}
    return Response(wire.dumps(problem_document(error, request_id)), status_code=error.status, media_type=wire.PROBLEM,
                    headers=headers)
