"""Connections hold bounded memory for bounded time.

A client can hold a front end's memory in three places; each gets a clock, and request
bodies also get a byte budget:

* **headers**: a connection must finish a request's headers within ``header_timeout_s``
  of connecting (or of its previous response), however slowly it trickles bytes in
  (uvicorn's keep-alive timer restarts on every byte, so a slow-headers client would
  otherwise never be timed out), and in at most ``MAX_HEADER_BYTES``.
  :func:`guarded_protocol` adds both to uvicorn's own protocol class.
* **bodies**: :func:`read_body` waits at most ``read_idle_timeout_s`` for each piece of
  a body and ``read_timeout_s`` for the whole of it, then answers 408 and closes the
  connection. Each piece is charged to the process's :class:`BodyBudget` as it arrives,
  before it is buffered: a connection holds budget for the bytes it has sent, never
  for the ``Content-Length`` it only declares (idle connections declaring large bodies
  would otherwise hold the whole budget for ``read_timeout_s`` with a few bytes each).
  A declared length that does not fit in what is free now is answered 503 with
  ``Retry-After`` before its body is read, one that could never fit 413; a body whose
  charge cannot grow as it arrives is answered 503 then. A JSON body is charged what
  parsing it costs (Python objects for every number), estimated from its bytes before
  it is parsed; an ``.npz`` body its declared expanded size (:meth:`read_body.expand`),
  before a member is inflated, held until the request's arrays are gone.
* **responses**: :class:`SendGuard` sends bodies in pieces and gives each piece
  ``send_timeout_s`` to leave, and the client a minimum average rate while the server
  waits on it (``min_send_rate_bytes_per_s``); a client that stops reading, or reads
  more slowly, has its connection aborted, and the response (and the result it holds)
  is dropped.

The budget is per front-end process: ``serve`` runs ``workers`` of them, so the server
as a whole holds at most ``workers x body_budget_bytes`` of request bodies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import re
import socket
import struct
import termios
import time
from typing import Any, Callable

try:
    from builtins import BaseExceptionGroup  # type: ignore[attr-defined]
except ImportError:  # Python 3.10: anyio's backport
    from exceptiongroup import BaseExceptionGroup  # type: ignore[no-redef]

from jacobian_client import wire

from .clients import address_client
from .errors import ClientGone, HeadersTooLarge, MalformedBody, MalformedRequest, Overloaded, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable
from .framing import FEW_CHUNKS, MIN_CHUNK_BYTES, UPGRADE_WITH_BODY, framing_too_large, has_body, head_too_large, http10, strict_h11_buffer, tiny_chunks
from .half_close import PROBE, PeerWatch
from .holders import Holders
from .request_ids import new_request_id
from .responses import echo, problem_document

__all__ = ["BodyBudget", "Charge", "Expiry", "HeadWithBody", "SendGuard", "abort_connection", "first_header", "guarded_protocol", "json_parse_cost",
           "read_body", "unsent_bytes"]

log = logging.getLogger("jacobian_service")

# A response body larger than this is sent in pieces of this size, each under the send
# timeout: the transport then holds one piece, not the whole body, for a slow reader.
SEND_PIECE_BYTES = 1 << 20
# What parsing JSON costs per number on top of its text, at the peak: orjson's Python
# object and list slot for each (32 bytes for a float), numpy's float64 array of them,
# the checks' temporaries and the cast to the declared dtype. Measured peak RSS growth of
# parse_call on 2 M numbers: 25 bytes each for "0", 60 for "0.5", 68 for "0.123456789",
# 80 for "-1.2345678901234567e-05". Counted per separator (',' or '['): an upper bound
# on the numbers.
JSON_BYTES_PER_NUMBER = 80
# Each piece of a body costs the front end its wake-ups whatever its size (~30-90 us:
# the parser, the request cycle, this loop), so a client that sent its body a byte per
# TCP segment (1-byte chunks, or a Content-Length body trickled) had a front end spend
# ~90 us a byte: one client could keep a core busy at 11 KB/s, for READ_TIMEOUT_S. Past
# FEW_PIECES pieces a body's pieces must average MIN_PIECE_BYTES (any client writing
# more than a few bytes at a time does; reads of whole segments are ~1,400 bytes).
FEW_PIECES = 1024
MIN_PIECE_BYTES = 64
# Refusals that leave a body unread close the connection: the client would otherwise
# go on sending a body nobody reads.
_CLOSE = {"Connection": "close"}


def json_parse_cost(body: bytes, counts: tuple[int, int] | None = None) -> int:
    """Bytes that parsing this JSON body may take at its peak, the body included.
    ``bytes.count`` runs at memory speed, so estimating costs nothing next to parsing.
    ``counts``: the body's ``(",", "[")`` counts, where the caller has them."""
    commas, brackets = (body.count(b","), body.count(b"[")) if counts is None else counts
    return len(body) + JSON_BYTES_PER_NUMBER * (commas + brackets + 1)


class Expiry:
    """``with Expiry(seconds) as e:``: if the block is still awaiting after ``seconds``,
    ``on_expire`` runs and the task is cancelled; the cancellation ends the block
    (swallowed) and ``e.expired`` says so. What ``anyio.move_on_after`` does, for the
    per-request hot path: one loop timer, where a cancel scope costs several times more
    (every request passes two of these: its body, and its response pieces).

    ``early``: ``(seconds, callback)``, a callback to run once if the block is still
    awaiting after those seconds (fewer than ``seconds``), on the same loop timer,
    which then waits the rest: a request's engine wait starts watching for its client's
    disconnect this way (``routes._cancellable``), where a second timer per request cost
    as much again."""

    __slots__ = ("_early", "_handle", "_on_expire", "_seconds", "_task", "expired")

    def __init__(self, seconds: float, on_expire: Callable[[], None] | None = None,
                 early: tuple[float, Callable[[], None]] | None = None) -> None:
        self._seconds = seconds
        self._on_expire = on_expire
        self._early = early if early is not None and early[0] < seconds else None
        self.expired = False

    def __enter__(self) -> "Expiry":
        self._task = task = asyncio.current_task()
        loop = task.get_loop()  # (asyncio.get_running_loop asks the process id on 3.11: a system call)
        if self._early is None:
            self._handle = loop.call_later(max(self._seconds, 0), self._fire)
        else:
            self._handle = loop.call_later(max(self._early[0], 0), self._fire_early)
        return self

    def _fire_early(self) -> None:
        after, callback = self._early  # type: ignore[misc]
        self._early = None
        self._handle = self._task.get_loop().call_later(max(self._seconds - after, 0), self._fire)  # type: ignore[union-attr]
        callback()

    def _fire(self) -> None:
        self.expired = True
        if self._on_expire is not None:
            self._on_expire()
        self._task.cancel()  # type: ignore[union-attr]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._handle.cancel()
        if self.expired and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            # Ours: swallowed, unless the task was also cancelled by someone else. The
            # timer can only fire while the task waits inside the block, so the
            # cancellation always lands here, never at a later await.
            uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
            return uncancel is None or uncancel() == 0
        return False


class BodyBudget:
    """Bytes of request bodies this process is receiving and parsing, bounded.

    No waiting: a request that does not fit is refused at once (503, Retry-After), as
    a full queue is; waiting would hold the connection and its socket buffers anyway.

    Shared among clients (``clients.py``) only while they contend: one client alone may
    take the whole budget (one large upload, or many bodies at once), but once a
    request of another client finds no room, the bodies the first is still *receiving*
    past half the budget are cut off there (429 ``overloaded``, Connection: close; the
    largest first) so that the other's fits now, and for ``WANT_S`` after another
    client was refused, a client may not grow past half (429 too). Before, one client
    holding the budget with bodies it trickled (a byte each ``read_idle_timeout_s``,
    for ``read_timeout_s``), or with requests queued behind a slow one, had every other
    client's every request refused 503 for as long as it kept doing so. Requests
    without a client (``client=None``) take no part in shares.

    The gauge follows ``used`` to within ``GAUGE_STEP`` bytes: in multiprocess mode each
    write is a locked write to a mapped file, and a small request would otherwise pay two
    of them for a figure that moves by a few KiB. Large bodies, and every return to
    zero after one, are written as they happen.
    """

    GAUGE_STEP = 64 << 10
    # How long a client refused for room counts as waiting (its Retry-After is 1 s).
    WANT_S = 2.0

    def __init__(self, max_bytes: int, gauge: Any = None) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._gauge = gauge
        self._shown = 0  # what the gauge says
        self._held: dict[str, int] = {}  # client -> bytes it holds (only clients holding some)
        self._receiving: dict[str, set[Any]] = {}  # client -> its readers still receiving a body
        self._wanting: dict[str, float] = {}  # client -> when it was last refused for room
        self._last_want = 0.0

    def check(self, nbytes: int, what: str, client: str | None = None) -> None:
        """Refuse ``nbytes`` as :meth:`take` would (413 if they could never fit, 503 if
        they do not fit now, 429 past ``client``'s share while another waits), taking
        nothing; another client's bodies past its share are cut off to make room first."""
        if nbytes > self.max_bytes:
            raise PayloadTooLarge(
                f"{what} needs {nbytes} bytes of this server's request memory; the most one request may "
                f"take is {self.max_bytes} (body_budget_bytes)", headers=_CLOSE)
        if client is not None and self.contended:
            self._check_share(nbytes, what, client)
        if self.used + nbytes > self.max_bytes:
            if client is not None and self._receiving:
                self._evict(client, self.used + nbytes - self.max_bytes)
            if self.used + nbytes <= self.max_bytes:
                return
            if client is not None:
                self._want(client)
            raise Unavailable(
                f"{what} needs {nbytes} bytes; the server is receiving other bodies and has "
                f"{self.max_bytes - self.used} of {self.max_bytes} free; retry shortly",
                headers={"Retry-After": "1", **_CLOSE})

    def take(self, nbytes: int, what: str, client: str | None = None) -> None:
        if self.used + nbytes > self.max_bytes or (client is not None and self._wanting and self.contended):
            self.check(nbytes, what, client)
        self._set(self.used + nbytes)
        if client is not None:
            self._held[client] = self._held.get(client, 0) + nbytes

    def give(self, nbytes: int, client: str | None = None) -> None:
        self._set(self.used - nbytes)
        if client is not None and nbytes:
            left = self._held.get(client, 0) - nbytes
            if left > 0:
                self._held[client] = left
            else:
                self._held.pop(client, None)

    def receiving(self, client: str | None, reader: Any, now: bool) -> None:
        """``reader`` (a :class:`read_body` of ``client``) is receiving its body (``now``),
        or no longer: only a body still arriving may be cut off for another client."""
        if client is None:
            return
        if now:
            self._receiving.setdefault(client, set()).add(reader)
        elif (readers := self._receiving.get(client)) is not None:
            readers.discard(reader)
            if not readers:
                del self._receiving[client]

    def _set(self, used: int) -> None:
        self.used = used
        if self._gauge is not None and abs(used - self._shown) >= (self.GAUGE_STEP if used else 1):
            self._shown = used
            self._gauge.set(used)

    @property
    def contended(self) -> bool:
        """Whether a client was refused room within ``WANT_S`` (its share then counts)."""
        if self._wanting and time.monotonic() - self._last_want > self.WANT_S:
            self._wanting.clear()  # (all stale: the common case costs one dict test)
        return bool(self._wanting)

    def _want(self, client: str) -> None:
        now = self._last_want = time.monotonic()
        if len(self._wanting) > 64:  # (kept short: only the last WANT_S count)
            for name, when in list(self._wanting.items()):
                if now - when > self.WANT_S:
                    del self._wanting[name]
        self._wanting[client] = now

    def _check_share(self, nbytes: int, what: str, client: str) -> None:
        """429 if ``client`` would hold more than half the budget while another client
        was refused room within ``WANT_S``."""
        held = self._held.get(client, 0)
        if held + nbytes <= self.max_bytes // 2:
            return
        now = time.monotonic()
        if any(name != client and now - when <= self.WANT_S for name, when in self._wanting.items()):
            raise Overloaded(
                f"{what} needs {nbytes} bytes; this client holds {held} of this server's {self.max_bytes} bytes "
                "of request memory while other clients wait for room, and may hold half of it then "
                "(body_budget_bytes); retry shortly", headers={"Retry-After": "1", **_CLOSE})

    def _evict(self, client: str, short: int) -> None:
        """Cut off bodies other clients are still receiving past half the budget, the
        largest first, until ``short`` bytes are free or none is left to cut."""
        half = self.max_bytes // 2
        for other, readers in list(self._receiving.items()):
            if other == client:
                continue
            for reader in sorted(readers, key=lambda r: r.held, reverse=True):
                if short <= 0 or self._held.get(other, 0) <= half:
                    break
                short -= reader.evict()


class Charge:
    """Bytes held on a :class:`BodyBudget` for one request beyond its body's block: what
    its arrays take once an ``.npz`` is expanded, until they are gone. ``give`` returns
    them all (again: nothing). ``client``: whose share of the budget it counts on (the
    request's body is read on the same share)."""

    __slots__ = ("_budget", "client", "held")

    def __init__(self, budget: BodyBudget, client: str | None = None) -> None:
        self._budget = budget
        self.client = client
        self.held = 0

    def take(self, nbytes: int, what: str) -> None:
        self._budget.take(nbytes, what, self.client)
        self.held += nbytes

    def give(self) -> None:
        held, self.held = self.held, 0
        if held:
            self._budget.give(held, self.client)


def first_header(scope: dict[str, Any], name: bytes, default: str | None = None) -> str | None:
    """A request header's first value (as Starlette's ``request.headers.get``). The
    computing endpoints read several, most of them absent (origin, fetch metadata,
    timeout, Content-Length): Starlette makes a ``Headers`` per request, scans the header
    list for each name, and raises and catches a KeyError for each absent one. Here one
    pass makes a map of them all, kept in the scope's state."""
    state = scope.setdefault("state", {})
    first = state.get("first_headers")
    if first is None:  # reversed: where a name repeats, the first value is the one kept
        first = state["first_headers"] = dict(reversed(scope["headers"]))
    value = first.get(name)
    return default if value is None else value.decode("latin-1")


class read_body:  # lower case: it reads as a function, ``async with read_body(...) as body``
    """The request's body, charged against ``budget`` piece by piece as it arrives and
    held there until the block ends (the caller parses inside it). 413 over ``limit``,
    503 when it does not fit, 408 when the client stalls. (A class, not an
    ``asynccontextmanager``: every request passes here, and the generator machinery
    cost more than reading a small body.)"""

    __slots__ = ("_args", "_budget", "_client", "_evicted", "_held", "_request", "_task", "json_counts")

    def __init__(self, request: Any, budget: BodyBudget, limit: int, idle_s: float, total_s: float,
                 is_json: bool = False, on_timeout: Any = None, client: str | None = None) -> None:
        self._request = request
        self._budget = budget
        self._args = (limit, idle_s, total_s, is_json, on_timeout)
        self._held = 0
        self._client = client  # whose share it counts in (None: none)
        self._evicted = 0  # bytes it held when it was cut off for another client (BodyBudget._evict)
        self._task: Any = None
        # A JSON body's counts of "," and "[" (its parse cost's), kept for the route's
        # inline-or-offload decision: each count is a pass over the body (~6 instructions a
        # byte), and the route counted both again (~18,000 instructions for a 1.4 KB body).
        self.json_counts: tuple[int, int] | None = None

    @property
    def held(self) -> int:
        return self._held

    def evict(self) -> int:
        """Cut this body off for another client (:meth:`BodyBudget._evict`): its bytes are
        given back now, so the other's request fits at once, and its request, waiting for
        its next piece, is answered 429. The bytes given back."""
        held, self._held = self._held, 0
        self._evicted = held or 1
        self._budget.give(held, self._client)
        self._budget.receiving(self._client, self, False)
        self._task.cancel()
        return held

    def expand(self, body: bytes, media_type: str, charge: Charge, limits: wire.Limits) -> int:
        """What decoding ``body`` will allocate (:func:`wire.expanded_size`), charged to
        ``charge`` before anything is decoded when it is an ``.npz``'s: its members are
        inflated into new buffers (the arrays are views of them) while the body is still
        held, so a small deflated body that expands to a lot is counted at what it
        expands to. 413 when the archive declares more than ``limit`` (as parsing would
        refuse it, but before a byte is inflated), 503 when it does not fit now. The
        caller gives ``charge`` back once the arrays are gone."""
        size = wire.expanded_size(body, media_type, limits)
        if media_type == wire.NPZ:
            limit = self._args[0]
            if size > limit:
                raise PayloadTooLarge(f"the .npz declares {size} uncompressed bytes; the limit is {limit}")
            if self._held + size > self._budget.max_bytes:  # body and expansion never fit together: 413, not 503
                raise PayloadTooLarge(f"an .npz of {len(body)} bytes that expands to {size} needs both at once; "
                                      f"the most one request may hold is {self._budget.max_bytes}")
            charge.take(size, f"expanding an .npz of {len(body)} bytes to {size}")
        return size

    async def __aenter__(self) -> bytes | bytearray:
        request, budget = self._request, self._budget
        limit, idle_s, total_s, is_json, on_timeout = self._args
        declared = first_header(request.scope, b"content-length")
        if declared is not None:
            if not declared.isascii() or not declared.isdigit():
                raise MalformedBody("Content-Length is not a number", headers=_CLOSE)
            if int(declared) > limit:
                raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit}", headers=_CLOSE)
            # Refused now if it does not fit (the client is spared sending it), but
            # nothing is held for it: its bytes are charged as they come.
            budget.check(int(declared), f"a body of {declared} bytes", self._client)
        client = self._client
        if client is not None:
            self._task = asyncio.current_task()
            budget.receiving(client, self, True)
        try:
            # One buffer, grown in place: the pieces kept in a list and joined at the end
            # held every body twice at its peak (the pieces and the join), while the budget
            # counted it once: five 100 MB bodies that fitted a 512 MiB budget grew a
            # front end by 1.06 GB. A body of one piece (most) is that piece, uncopied; a
            # longer one grows a bytearray, which realloc extends where it lies.
            body: bytes | bytearray = b""
            size = 0
            deadline = time.monotonic() + total_s  # (anyio.current_time looks up its backend each call)
            more = True
            pieces = 0
            while more:
                wait = min(idle_s, deadline - time.monotonic())
                try:
                    message = await _within(request.receive(), wait)
                except asyncio.CancelledError:
                    if not self._evicted:
                        raise
                    uncancel = getattr(self._task, "uncancel", None)  # (Python 3.11+)
                    if uncancel is not None:
                        uncancel()
                    raise Overloaded(
                        f"the body ({size} bytes in) was cut off: this client held over half of this server's "
                        f"{budget.max_bytes} bytes of request memory when another client's request found no room "
                        "(body_budget_bytes); retry shortly", headers={"Retry-After": "1", **_CLOSE}) from None
                if message is None:
                    if on_timeout is not None:
                        on_timeout("body")
                    stalled = "stalled" if wait == idle_s else "took too long"
                    raise RequestTimeout(
                        f"the body {stalled}: {size} bytes in; pieces must come within {idle_s:g} s and the "
                        f"whole body within {total_s:g} s", headers=_CLOSE)
                if message["type"] == "http.disconnect":
                    raise ClientGone("the client closed the connection while sending its body")
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(chunk)
                pieces += 1
                if pieces > FEW_PIECES and size < MIN_PIECE_BYTES * pieces:
                    if on_timeout is not None:
                        on_timeout("body")
                    raise RequestTimeout(
                        f"the body trickled: {size} bytes in {pieces} pieces; past {FEW_PIECES} pieces they must "
                        f"average at least {MIN_PIECE_BYTES} bytes (send it in larger writes)", headers=_CLOSE)
                if size > limit:
                    raise PayloadTooLarge(f"the body is over the limit of {limit} bytes", headers=_CLOSE)
                if size > self._held:  # charged as it arrives, before it is kept
                    if budget.used + size - self._held > budget.max_bytes or (client is not None and budget._wanting):
                        budget.check(size - self._held, f"the body ({size} bytes in"  # refused: say how far it got
                                     + (f" of {declared})" if declared is not None else ")"), client)
                    budget.take(size - self._held, "the body", client)
                    self._held = size
                if chunk:
                    if not body:
                        body = chunk
                    else:
                        if not isinstance(body, bytearray):
                            body = bytearray(body)
                        body += chunk
            if client is not None:  # (whole: no longer one that may be cut off)
                budget.receiving(client, self, False)
            if is_json:
                self.json_counts = (body.count(b","), body.count(b"["))
                cost = json_parse_cost(body, self.json_counts)
                if cost > budget.max_bytes:  # never fits, however long the client waits: 413, not 503
                    raise PayloadTooLarge(f"parsing this JSON body of {len(body)} bytes takes about {cost} bytes of "
                                          f"this server's request memory; the most one request may hold is "
                                          f"{budget.max_bytes} (binary .npy/.npz or base64 arrays cost their size)")
                if cost > self._held:
                    budget.take(cost - self._held, f"parsing a JSON body of {len(body)} bytes (about {cost} bytes; "
                                                   "binary .npy/.npz or base64 arrays cost their size)", client)
                    self._held = cost
            return body
        except BaseException:
            self._give()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self._give()

    def _give(self) -> None:
        held, self._held = self._held, 0
        self._budget.give(held, self._client)
        if self._client is not None:
            self._budget.receiving(self._client, self, False)


async def _within(awaitable: Any, seconds: float) -> Any:
    """What ``awaitable`` gives, or None if it is still waiting after ``seconds``. One
    that is done at once (a small body is there with its headers: most requests) runs
    no clock: a loop timer made and cancelled per request is a good part of reading a
    small body."""
    step = awaitable.__await__()
    try:
        waiting_on = step.send(None)
    except StopIteration as done:
        return done.value
    result = None
    with Expiry(seconds):
        result = await _Resumed(step, waiting_on)
    return result


class _SendTimedOut(Exception):
    """A response piece did not leave within the send timeout (the client stopped
    reading), or the client read under the minimum rate; says which."""


class SendGuard:
    """ASGI layer under the access log: every response body goes out in pieces of at most
    ``SEND_PIECE_BYTES``, each within ``send_timeout_s``, and at ``min_rate`` bytes a
    second on average while the server waits on the client. A piece that cannot leave (the
    client stopped reading, its window and our buffers are full), or a client that reads
    too slowly, aborts the connection (through ``scope["state"]["abort_connection"]``, set
    where the server's own ``send`` is at hand): the transport's buffer is dropped at once,
    not kept until the peer reads, and the app unwinds, freeing what the response held. The
    access log above sees the pieces, so a response cut off before its last one counts as
    aborted.

    The rate: a send waits only when the client reads slower than the server writes
    (flow control), so the time a response's sends wait is the client's, never the
    engine's. That time may reach ``send_timeout_s`` plus one second per ``min_rate``
    bytes the client has taken (sent, less what still waits in this process's transport
    and the kernel's send queue: ``scope["state"]["unsent"]``), checked as each wait ends.
    A response of N bytes then holds its connection, and a stream its engine's forward
    pass and its room on the stream budget, for at most its production time plus
    ``send_timeout_s`` (one piece's wait) plus ``send_timeout_s + N / min_rate`` of the
    client's. Before, only each wait was bounded, and a wait ends once the transport has
    drained to its low-water mark, which the kernel lets it do once its send queue has
    half drained (~1.4 MB read on loopback, tens of KB where the queue stays small): a
    client that read just fast enough never let one last 30 s, and kept its stream as
    long as it liked. ``min_rate`` 0: each wait alone is bounded, as before."""

    def __init__(self, app: Any, send_timeout_s: float, on_timeout: Any = None, min_rate: int = 0) -> None:
        self.app = app
        self.send_timeout_s = send_timeout_s
        self.on_timeout = on_timeout
        self.min_rate = min_rate

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = self.send_timeout_s
        min_rate = self.min_rate
        sent = 0  # body bytes handed to the server
        waited = 0.0  # seconds this response's sends have waited on the client

        def abort() -> None:  # the connection goes first: the send's buffer is dropped
            cut = scope.get("state", {}).get("abort_connection")
            if cut is not None:
                cut()

        async def send_one(message: dict[str, Any]) -> None:
            nonlocal sent, waited
            # Most pieces leave at once (the transport takes them without waiting): no
            # clock for those. A piece whose send has to wait (flow control) waits the
            # rest of the way under the clock.
            step = send(message).__await__()
            sent += len(message.get("body", b""))
            try:
                waiting_on = step.send(None)
            except StopIteration:
                return
            began = time.monotonic()
            with Expiry(timeout, abort) as expiry:
                await _Resumed(step, waiting_on)
            if expiry.expired:
                if self.on_timeout is not None:
                    self.on_timeout("send")
                raise _SendTimedOut(f"a client stopped reading its response for {timeout:.1f} s")
            if min_rate:
                waited += time.monotonic() - began
                if waited > timeout:  # (only then is the client's rate worth a look)
                    unsent = scope.get("state", {}).get("unsent")
                    taken = sent - (unsent() if unsent is not None else 0)
                    if waited > timeout + taken / min_rate:
                        abort()
                        if self.on_timeout is not None:
                            self.on_timeout("send")
                        raise _SendTimedOut(
                            f"a client took {taken} bytes of its response while the server waited "
                            f"{waited:.1f} s on it, under the minimum of {min_rate} bytes/s after "
                            f"{timeout:g} s (MIN_SEND_RATE_BYTES_PER_S)")

        async def guarded(message: dict[str, Any]) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= SEND_PIECE_BYTES:
                await send_one(message)
                return
            view = memoryview(body)
            more = message.get("more_body", False)
            for start in range(0, len(view), SEND_PIECE_BYTES):
                last = start + SEND_PIECE_BYTES >= len(view)
                await send_one({"type": "http.response.body", "body": view[start:start + SEND_PIECE_BYTES],
                                "more_body": more or not last})

        try:
            await self.app(scope, receive, guarded)
        except _SendTimedOut as cut:
            log.info("%s; connection aborted", cut)
        except BaseExceptionGroup as group:  # a task group's (StreamingResponse)
            if group.subgroup(_SendTimedOut) is None or group.subgroup(lambda e: not isinstance(e, _SendTimedOut)) is not None:
                raise
            cut = group.subgroup(_SendTimedOut)
            while isinstance(cut, BaseExceptionGroup):
                cut = cut.exceptions[0]
            log.info("%s; connection aborted", cut)


class _Resumed:
    """The rest of an awaitable already started, as an awaitable: ``step`` is its
    iterator, ``waiting_on`` what its first step yielded (the future it waits for).
    What the task sends or throws in (a result, a cancellation) goes on to it."""

    __slots__ = ("_step", "_waiting_on")

    def __init__(self, step: Any, waiting_on: Any) -> None:
        self._step = step
        self._waiting_on = waiting_on

    def __await__(self) -> Any:
        step, value = self._step, self._waiting_on
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # a cancellation (the clock's, or the caller's), passed on
                try:
                    value = step.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = step.send(sent)
                except StopIteration as stop:
                    return stop.value


def unsent_bytes(send: Any) -> int:
    """Bytes written on the connection of the server's ``send`` that its client has not
    taken yet: in the transport's buffer and the kernel's send queue (``TIOCOUTQ``: not
    yet acknowledged). (0 where neither can be read.)"""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return 0 if transport is None else _unsent(transport)


def _unsent(transport: Any) -> int:
    return transport.get_write_buffer_size() + _kernel_queue(transport, termios.TIOCOUTQ)


def _kernel_queue(transport: Any, which: int) -> int:
    """Bytes in the connection's socket queue ``which`` (``TIOCOUTQ``: sent, not yet
    acknowledged; ``FIONREAD``: received, not yet read); 0 where it cannot be read."""
    try:
        sock = transport.get_extra_info("socket")
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), which, b"\0\0\0\0"))[0]
    except (AttributeError, OSError, ValueError):  # not Linux, not a socket, closed
        return 0


def _arrived(transport: Any) -> int:
    """Bytes the client has sent that this process has not read yet (the socket's
    receive queue, ``FIONREAD``; 0 where it cannot be read). A connection idle since its
    last response with bytes here has its next request on the way in: closed now, the
    kernel answers those unread bytes with a reset, and the request is lost unanswered
    and unlogged (uvloop runs its due timers before it reads again, so a loop running
    late closed connections whose request had come: test_keepalive_race)."""
    return _kernel_queue(transport, termios.FIONREAD)


def abort_connection(send: Any) -> None:
    """Drop the connection of the server's ``send`` now, buffered bytes and all. uvicorn hands the app its
    request cycle's bound ``send``; its transport is the connection. (``close()`` would
    wait for the buffer to drain, which a client that never reads never lets happen.)"""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()


class HeadWithBody:
    """A connection's transport that sends a response's head with its body: one write
    (one TCP segment for a small answer), not two.

    uvicorn writes the status line and headers as soon as the app sends
    ``http.response.start``, then each body piece as it comes: two system calls, two
    segments the client wakes for, per response. Here a small write (a head) is held
    until the next write, which takes it along (``writelines``: one ``writev``), or
    until the end of the loop tick, whichever is first, so nothing waits behind an
    ``await``. Only one small write is ever held: flow control and the send timeout
    see every body piece as before.
    """

    __slots__ = ("_drain", "_flush_at", "_held", "_lingering", "_loop", "_on_linger", "_transport", "_unread")
    _HOLD_BYTES = 4096

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop, unread: Callable[[], bool] | None = None,
                 on_linger: Callable[[], None] | None = None, drain: tuple[float, float] | None = None) -> None:
        # (send_timeout_s, min_rate): how long an answer its client has not taken may
        # hold a connection being closed (None: closed at once, as asyncio closes)
        self._drain = drain
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_at: asyncio.Handle | None = None
        self._unread = unread  # whether the client may still be sending (a body, a head) as it is closed
        self._on_linger = on_linger  # told when a lingering close begins (the connection is gone for the app)
        self._lingering: asyncio.TimerHandle | None = None

    def write(self, data: Any) -> None:
        if self.is_closing():
            # The peer went (a write failed, or it reset the connection) and uvicorn has not
            # heard yet (connection_lost comes a loop tick later): nobody to send to, and
            # uvloop raises on a closed handle, which uvicorn logged as "Exception in ASGI
            # application" with a traceback, once per response then in flight (a client
            # that pipelines requests and resets: one traceback per connection).
            self._held = None
            return
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif len(data) <= self._HOLD_BYTES:
            self._held = bytes(data)
            if self._flush_at is None:
                self._flush_at = self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, pieces: Any) -> None:
        self.flush()
        if not self.is_closing():  # (as in write)
            self._transport.writelines(pieces)

    def flush(self) -> None:
        self._flush_at = None
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():  # the peer went meanwhile: nobody to tell
                self._transport.write(held)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def close(self) -> None:
        """Closed while the client may still be sending (an answer given before its body
        was read: a 413, a 401; a head cut off), the kernel answered the bytes still
        coming with a reset, and a client that sends its whole body before it reads
        failed on a write (EPIPE, ECONNRESET), never reading the answer waiting for it.
        A lingering close instead (nginx's, Apache's): the answer goes, then a FIN
        (``write_eof``); what still arrives is read and dropped (the protocol sees the
        transport closing) until the client closes too, or ``LINGER_S`` has passed."""
        self.flush()
        if self._lingering is not None or self._transport.is_closing():
            return
        if self._unread is not None and self._unread() and self._transport.can_write_eof():
            try:
                self._transport.write_eof()
                self._transport.resume_reading()  # (flow control may have paused it for an unread body)
            except (OSError, RuntimeError):  # gone meanwhile
                self._transport.close()
                return
            self._lingering = self._loop.call_later(LINGER_S, self._transport.close)
            if self._on_linger is not None:
                self._on_linger()
            return
        unsent = _unsent(self._transport) if self._drain is not None else 0
        if unsent:
            # An answer its client has not taken (a keep-alive closed after an answer the
            # client does not read: a page awaiting many answers' heads before reading
            # any body). Closed now, the kernel kept the socket (FIN-WAIT-1) with up to
            # its send buffer (4 MB) unsent for as long as the client kept its window
            # shut, minutes and more, memory no limit here counts. The answer now has
            # the send clock a response has (SendGuard: SEND_TIMEOUT_S plus its bytes at
            # MIN_SEND_RATE) to be taken, then the connection is reset: the kernel frees
            # it, and the client is told.
            timeout_s, min_rate = self._drain
            self._drain_until(self._loop.time() + timeout_s + (unsent / min_rate if min_rate else 0.0))
            return
        self._transport.close()

    def _drain_until(self, deadline: float, wait: float | None = None) -> None:
        """Close once the client has taken every byte, or reset at ``deadline``. Looked
        at again soon, then less often: the last bytes of any answer are unacknowledged
        for a round trip, and a client reading to the end of file (HTTP/1.0's unsized
        answers) waits for the close."""
        self._lingering = None
        if self._transport.is_closing():
            return
        if not _unsent(self._transport):
            self._transport.close()
        elif self._loop.time() >= deadline:
            self.abort()
        else:
            wait = _DRAIN_FIRST_S if wait is None else wait
            self._lingering = self._loop.call_later(wait, self._drain_until, deadline, min(2 * wait, _DRAIN_POLL_S))

    def is_closing(self) -> bool:
        return self._lingering is not None or self._transport.is_closing()

    def ended(self) -> None:
        """The connection is gone (lost, or the client closed while lingering)."""
        if self._lingering is not None:
            self._lingering.cancel()
            self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        if self._lingering is not None:
            self._lingering.cancel()
        if _unsent(self._transport):
            # A reset, not a FIN behind bytes the client is not taking (the kernel would
            # keep those, and the client's connection open, for as long as it reads none)
            with contextlib.suppress(AttributeError, OSError):
                self._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                     struct.pack("ii", 1, 0))
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's
        return getattr(self._transport, name)


# How long a connection closed while its client may still be sending reads on (and drops
# what it reads) before it is closed outright: long enough for a client's last writes of a
# body to go and for it to read the answer, short enough to hold no descriptor for long.
LINGER_S = 2.0
# How often a connection closed with an answer its client has not taken yet looks again:
# first after a round trip's time on a LAN, doubling to a quarter second.
_DRAIN_FIRST_S = 0.002
_DRAIN_POLL_S = 0.25

# Request headers (the request line included) past this many bytes are refused with 431,
# whatever the HTTP implementation: httptools sets no limit of its own, and a few MiB of
# short headers cost a front end ~12 times their size as Python objects (measured: 2 MB
# of "X-H1: v" lines grew it by 24 MB), held by a client for up to header_timeout_s.
# (uvicorn's h11 has a 16 KiB limit of its own, which it reported as an unreadable request,
# 400, when headers came in smaller pieces than that: framing.strict_h11_buffer sets it to
# this one.) Cookies and bearer tokens fit many times.
MAX_HEADER_BYTES = 32 << 10
# ... and in at most this many fields (either parser): within 32 KiB, 3,500 short fields
# ("a1:b") held ~420 KB of Python objects for as long as their request ran (a queued or
# streamed one: its deadline, its reader), where 256 fields of any size hold ~80 KB.
MAX_HEADER_FIELDS = 256

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            501: b"Not Implemented", 503: b"Service Unavailable"}


def _closing_problem(error: ServiceError, cors: list[tuple[str, str]] = []) -> bytes:  # noqa: B006 (never changed)
    """A whole problem+json response that closes its connection, for what is answered
    below the app (no request exists yet, so no middleware runs): bytes to write as
    they are. ``cors``: the CORS headers the app would give the page that sent it."""
    request_id = new_request_id()
    body = wire.dumps(problem_document(error, request_id))
    # Vary: * in place of CORS' Origin: the answer is about this connection's bytes (headers
    # too large, too slow, unreadable; no room), not any URL's, as middleware.VARY_ANY is
    # for a POST's: a cache keeping answers by URL (the Cache API) must not give it to the
    # next request of that URL.
    extra = b"".join(b"%s: %s\r\n" % (k.lower().encode(), v.encode("latin-1"))
                     for k, v in [*error.headers.items(), *cors] if k.lower() not in ("connection", "vary"))
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nx-request-id: %s\r\n%s"
            b"x-content-type-options: nosniff\r\ncache-control: no-store\r\nvary: *\r\n"  # as middleware.py's
            b"connection: close\r\n\r\n" % (error.status, _REASONS[error.status], wire.PROBLEM.encode(), len(body),
                                              request_id.encode(), extra) + body)


# A request line's end (RFC 9112 3: " HTTP/1.1" and its line break), to find in a piece of
# bytes where the head being read begins: a head pipelined behind a body follows it on the
# same line, so no start of a line is looked for (and this pattern, anchored on a space,
# stays linear in the piece, whatever its bytes); a header field's name (a token) and what
# a value may not hold (RFC 9110 5.5: controls other than a tab).
_REQUEST_LINE_END = re.compile(rb" [A-Z]+/[0-9]\.[0-9]\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


# Requests a connection may have pipelined behind the one being answered (httptools;
# h11 reads one request at a time). A client past them has the rest of what it sends
# dropped, and its connection closed once those are answered: RFC 9112 9.3.2 has a
# client that pipelines retry the requests a closed connection left unanswered.
MAX_PIPELINED = 16
# ... and their heads may hold this many bytes in all (request lines and header fields),
# as one head may: each waits parsed, as Python objects costing ~14 times its bytes in
# short fields, and 16 heads of 30 KB (3,500 fields each) behind a slow request grew a
# front end by 6.7 MB per connection (20 such connections: +131 MB), where an idle one
# costs ~5.5 KiB.
MAX_PIPELINED_HEAD_BYTES = 32 << 10

# The versions an HTTP/1 request line may name (uvicorn speaks no HTTP/2).
_HTTP1_VERSIONS = frozenset({"1.1", "1.0"})


# llhttp's reasons that say nothing to a client, in words that do.
_PARSER_REASONS = {
    "User callback error": "Invalid HTTP request received",  # (a CONNECT's authority target, which no route takes)
    "Pause on PRI/Upgrade": "an HTTP/2 connection preface: this server speaks HTTP/1.1 and 1.0",
}


def header_fault(piece: bytes | bytearray) -> str | None:
    """Which header line of the head in ``piece`` (the bytes the parser refused were in)
    is not HTTP, in words naming it, or None: a line folded onto the next (obs-fold,
    RFC 9112 5.2), a control character in a value (a NUL), a name that is no token
    (``Content-Length : 5``). Read from the last request line in the piece on (a piece
    may hold whole requests before it, a head pipelined behind a body beginning on its
    last line), or, with none, from its second line (its first may be a line's end); run
    only on a refusal."""
    piece = bytes(piece)
    start = None
    for start in _REQUEST_LINE_END.finditer(piece):  # (the last)
        pass
    lines = piece[start.end():].split(b"\n") if start is not None else piece.split(b"\n")[1:]
    name = None
    for line in lines:
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:  # the blank line that ends the head
            return None
        if line[:1] in (b" ", b"\t"):
            if name is None:
                return "the first header line starts with whitespace"
            return (f"the header {_shown(name)} is folded onto a next line that starts with whitespace "
                    "(obs-fold, RFC 9112 5.2): send each header on one line")
        field, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(field):
            return (f"the header line {_shown(line)} has no valid name: a name is a token, then ':' with no "
                    "whitespace before it (RFC 9112 5.1)")
        name = field
        control = _CONTROL.search(value)
        if control is not None:
            return (f"the header {_shown(name)} holds the byte 0x{control[0][0]:02x}, a control character: a "
                    "value is visible characters, spaces and tabs (RFC 9110 5.5)")
    return None


def _shown(raw: bytes) -> str:
    """A client's bytes quoted back in a message: cut short, escaped (responses.echo)."""
    return echo(raw.decode("latin-1"), 60)


def _origins_in(head: bytes | bytearray) -> list[bytes]:
    """The ``Origin`` values among the whole header lines of ``head``, a head's bytes
    from anywhere in it (its first line, perhaps a part, is skipped; so is a last line
    not yet ended), up to its blank line."""
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[:end + 2]
    lines = bytes(head).split(b"\n")[1:-1]  # [-1]: what follows the last line's end, or a line not yet ended
    return [value.strip() for name, colon, value in (line.partition(b":") for line in lines)
            if colon and name.lower() == b"origin"]


def connection_cap() -> int:
    """The most client connections one front end keeps: its open-file limit, less a
    reserve for its own files (engine channels, shared memory, logs: ~40) and for the
    accept that makes room. Past the limit itself uvloop cannot accept at all: it
    accepted each new connection and closed it at once (a reset), so a client holding
    that many idle connections refused everyone else for as long as it held them."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1 << 16
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        return 1 << 16
    return max(16, soft - max(128, soft // 16))


# A connection whose header deadline came with bytes in its receive queue that the loop
# (running late) has not read yet gets this long more (once per request) to read them:
# they came in time, and may be a whole request.
LATE_READ_S = 1.0

# A connection refused for the connection cap waits this long at most for its head, to
# learn the page's Origin (a browser sends its request as soon as it connects), then
# lingers as it closes; at most REFUSALS_WAITING such at once, waiting or lingering, each
# holding a descriptor (past them, refused at once and closed, as before).
REFUSAL_WAIT_S = 1.0
REFUSALS_WAITING = 32
# While it waits, the rest of such a head is read for its Origin line only, whatever
# comes before it: up to this many bytes (a browser sends a URL of up to 2 MiB, Chrome's
# limit, and the gateway passes header lines of up to 64 KiB), each dropped as it is
# read past the line it is in; at most REFUSAL_LINES lines of it looked at (a browser's
# head has a few dozen), and none kept past REFUSAL_LINE_BYTES (an Origin is far shorter).
REFUSAL_READ_BYTES = (2 << 20) + (64 << 10)
REFUSAL_LINES = 2 * MAX_HEADER_FIELDS
REFUSAL_LINE_BYTES = 4096


class _OriginSkim:
    """The rest of a refused head, read for its ``Origin`` values and its end only: the
    line it begins in is skipped (a part: the request line's, or a header's past the
    limit), and so is every line longer than REFUSAL_LINE_BYTES, unkept. Before, the
    bytes read were kept, up to twice the head limit: the Origin after a URL of 40 KB
    was found, after one of 70 KB (a GET's query, sent by a page) it was not, and the
    431 carried no CORS headers: the page read "Failed to fetch"."""

    __slots__ = ("line", "skipping", "origins", "read", "lines")

    def __init__(self, start: bytes | bytearray = b"") -> None:
        self.line = bytearray()
        self.skipping = True
        self.origins: list[bytes] = []
        self.read = self.lines = 0
        self.feed(start)

    def feed(self, data: bytes | bytearray) -> bool:
        """Reads ``data``; True once no more need be read: the head's blank line seen,
        or its bounds reached."""
        self.read += len(data)
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if self.lines >= REFUSAL_LINES:  # (a browser's head has far fewer)
                return True
            if nl < 0:
                if not self.skipping:
                    self.line += data[pos:pos + REFUSAL_LINE_BYTES + 1 - len(self.line)]
                    if len(self.line) > REFUSAL_LINE_BYTES:
                        self.line.clear()
                        self.skipping = True
                break
            if not self.skipping:
                self.line += data[pos:min(nl, pos + REFUSAL_LINE_BYTES + 1 - len(self.line))]
                if len(self.line) <= REFUSAL_LINE_BYTES:
                    if self.line in (b"", b"\r"):  # the blank line: the head's end
                        return True
                    name, colon, value = bytes(self.line).partition(b":")
                    if colon and name.lower() == b"origin":
                        self.origins.append(value.strip())
            self.line.clear()
            self.skipping = False
            self.lines += 1
            pos = nl + 1
        return self.read >= REFUSAL_READ_BYTES


def guarded_protocol(header_timeout_s: float, on_timeout: Any = None, base: type | None = None,
                     max_header_bytes: int = MAX_HEADER_BYTES, max_connections: int | None = None,
                     cors: Callable[[str | None], list[tuple[str, str]]] | None = None,
                     drain: tuple[float, float] | None = None) -> type:
    """uvicorn's HTTP protocol class (httptools, else h11) with a header deadline and a
    header size limit: from its connection (and after each response), a client has
    ``header_timeout_s`` to get a request's headers in, in at most ``max_header_bytes``;
    otherwise it is answered 408 (or 431) and closed. A request whose headers are in is
    left alone: its body and response have their own clocks and limits. ``base`` picks
    uvicorn's class (tests run both).

    At most ``max_connections`` (default :func:`connection_cap`) connections are kept:
    one more closes the connection that has waited longest without a request being
    answered on it (an idle keep-alive, or headers still coming), which any client must
    expect of an idle connection, of the peer address holding the most connections
    (:class:`holders.Holders`); where every one has a request in progress (or the address
    holding the most has none idle and the new one is its own), the new one is answered
    503 with ``Retry-After`` and closed.

    ``cors`` (``middleware.cors_answer_headers``) gives these answers written here the
    CORS headers the app gives its own, for the Origin of the request refused, where it
    came in: a page of an allowed origin reads them as it reads every other error.

    ``drain`` (``SEND_TIMEOUT_S``, ``MIN_SEND_RATE_BYTES_PER_S``): a connection closed
    with an answer its client has not taken yet is kept until it is taken, for that long
    at most, then reset (:meth:`HeadWithBody.close`)."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base
    cap = connection_cap() if max_connections is None else max_connections
    # This process's connections, least recently heard from first.
    live: collections.OrderedDict[Any, None] = collections.OrderedDict()
    holders = Holders()  # ... and by address, which holds the most (the cap takes room from it)
    waiting: set[Any] = set()  # connections refused for the cap that wait for their head, or linger as they close

    class HeaderDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: Any = None
        _header_deadline = 0.0  # loop time by which the next head must be in
        _heard = False  # any byte since the timer was armed
        _header_bytes = 0  # bytes of the head being received
        _tail = b""  # the last 3 of them
        _head_open = True  # httptools: what arrives is a head (the first, or the next after a whole request)
        _framing = 0  # httptools: bytes after the head since the parser last gave the app body bytes
        _body_fed = 0  # body bytes the parser gave in the current data_received
        _chunks = 0  # httptools: chunks of the body being received (chunked framing) ...
        _chunk_bytes = 0  # ... and the body bytes in them
        _refusal: Any = None  # (the cap's 503, the head it waits for, its timer) once refused for the cap
        _head_piece = b""  # the last piece of a head given to the parser
        _fault: str | ServiceError | None = None  # why a callback of ours stopped the parser (or an error to answer)
        _fields = 0  # header fields of the head being received (h11: its lines)
        _too_many_fields = False  # ... past MAX_HEADER_FIELDS: the parser stopped, a 431 is due
        _half_closed = False  # the client sent its FIN after whole requests: they are answered, then it closes
        _dropping = False  # httptools: past MAX_PIPELINED requests queued, the rest of what comes is dropped
        _peer_watch: PeerWatch | None = None  # meanwhile: whether the FIN was a client gone (half_close.py)
        _peer: str = ""  # the client's address (holders)
        _late_read = False  # the header deadline found bytes unread and waited for them (once per request)
        _taking: Any = None  # meanwhile: the timer looking whether the client has taken its last answer

        def connection_made(self, transport: Any) -> None:
            super().connection_made(HeadWithBody(transport, self.loop, self._may_be_sending, self._app_told_gone, drain))
            if getattr(self, "conn", None) is not None:  # h11: refusing what llhttp refuses (framing.py)
                strict_h11_buffer(self.conn, self._h11_fault, max_header_bytes)
            peer = transport.get_extra_info("peername")
            self._peer = address_client(peer[0]) if isinstance(peer, tuple) and peer else ""  # (a port is no client)
            live[self] = None
            holders.add(self._peer, self)
            if len(live) > cap:
                self._make_room()
            if self._refusal is None:
                self._arm_header_timer()

        def _h11_fault(self, reason: str | ServiceError) -> None:
            self._fault = reason  # (send_400_response says it)

        def _unsupported_upgrade_warning(self) -> None:
            # An upgrade asked for (a page's WebSocket handshake, curl's h2c) is served as
            # the plain HTTP request it also is (upgrades.py), in the access log as such.
            # uvicorn warned twice at each: "Unsupported upgrade request." and "No
            # supported WebSocket library detected. Please use pip install
            # 'uvicorn[standard]'": advice this service does not want (it has no WebSocket
            # endpoint), which any page a user opened could write into the log twice per
            # handshake (a WebSocket asks no CORS preflight).
            pass

        def _may_close(self, other: Any) -> bool:
            return (other is not self and other._idle() and other._refusal is None and not other.transport.is_closing()
                    and not _arrived(other.transport))  # (its next request has come: not idle)

        def _make_room(self) -> None:
            # The idle connection that waited longest, where its address holds as many as
            # any; else the longest-waiting idle one of the address holding the most. By
            # age alone, one client opening connections past the cap closed every other
            # client's idle keep-alive (theirs were older), each of its new ones costing
            # another client its connection. Behind a proxy every client is one address:
            # by age, as before.
            oldest = next((other for other in live if self._may_close(other)), None)
            greedy = False  # this new connection's address holds the most, none of them idle
            if oldest is not None and holders.count(oldest._peer) < holders.most:
                greediest = holders.greediest()
                other = next((c for c in greediest if self._may_close(c)), None)
                greedy = other is None and self in greediest
                oldest = None if greedy else other or oldest
            if oldest is not None:
                oldest.transport.close()  # (connection_lost takes it out of ``live``)
                return
            held = f", {holders.count(self._peer) - 1} of them this client address's" if greedy else ""
            refusal = Unavailable(f"this server holds its most connections ({cap}){held}, each with a request in "
                                  "progress; retry shortly", headers={"Retry-After": "1"})
            if cors is None or len(waiting) >= REFUSALS_WAITING:
                self._refuse(refusal)
                return
            # Answered once its head is in (never given to the parser), or after
            # REFUSAL_WAIT_S: a page of an allowed origin can read the 503 only with the
            # CORS headers of its Origin (at once, it read "Failed to fetch").
            waiting.add(self)
            self._refusal = (refusal, _OriginSkim(), self.loop.call_later(REFUSAL_WAIT_S, self._refuse_waiting))

        def _refuse_head(self, error: ServiceError, origins: list[bytes], scan: bytes) -> None:
            """A head refused before its end (431): where its Origin has not come yet (a
            browser writes it after the page's own headers: a 70 KB bearer token), the
            rest of the head is read for it, as a refusal for the cap is (at most
            ``REFUSAL_READ_BYTES`` more, ``REFUSAL_WAIT_S``), and the answer carries the CORS
            headers a page reads it by: answered at once, an allowed origin's page read
            "Failed to fetch" where a 40 KB token's 431 (the Origin within the first
            piece) was problem+json it reads."""
            if (origins or cors is None or b"\r\n\r\n" in scan or len(waiting) >= REFUSALS_WAITING
                    or self.transport.is_closing()):
                self._refuse(error, origins)
                return
            waiting.add(self)
            # (from the last line begun, where it may be an Origin line's start: the skim
            # skips the line it begins in, a part; a long one, the header past the limit, is
            # skipped so, not kept)
            line = scan.rfind(b"\n")
            self._refusal = (error, _OriginSkim(scan[line:] if 0 <= line >= len(scan) - REFUSAL_LINE_BYTES else b""),
                             self.loop.call_later(REFUSAL_WAIT_S, self._refuse_waiting))

        def _refuse_waiting(self) -> None:
            # (still counted in ``waiting`` while its close lingers: the descriptors held
            # for such refusals stay bounded, whatever clients do)
            refusal, skim, timer = self._refusal
            timer.cancel()
            self._refuse(refusal, skim.origins)

        def _idle(self) -> bool:
            """No request being answered here: a keep-alive between requests, or a head
            (or an unread body after its answer) still coming."""
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _may_be_sending(self) -> bool:
            """The client may still be sending: a body not read to its end, or part of a head."""
            return not self._in_head() or self._header_bytes > 0 or self._refusal is not None

        def _app_told_gone(self) -> None:
            """As uvicorn's ``connection_lost`` tells the app, when a lingering close
            begins: no more of the body comes (what arrives is dropped), so a request
            still reading it ends now, not when the client closes or the linger ends."""
            cycle = getattr(self, "cycle", None)
            if cycle is not None:
                if not cycle.response_complete:
                    cycle.disconnected = True
                cycle.message_event.set()

        def eof_received(self) -> bool | None:
            if self.transport.is_closing():  # lingering: the client has closed too
                self.transport.ended()
                return None
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle.response_complete or self._refusal is not None:
                return super().eof_received()
            # Whole requests, not all answered, and no more coming: a half-close (RFC
            # 9112 9.6), or a client gone (the same FIN). Answered: uvicorn's eof_received
            # said nothing, so the connection closed at once and the answer went nowhere
            # (logged 200, or a request waiting for an engine cancelled as if its client
            # had left). half_close.py tells a client that left by the reset its next
            # byte gets. What the FIN cut short can never be a request: a head begun is
            # dropped with the connection, a body (httptools: its request queued behind
            # whole ones) is never run.
            if self._in_head() or self._dropping:  # (dropping: what the FIN cut was never kept)
                self._half_close(cycle)
                return True  # (the transport stays open for writing)
            pipeline = getattr(self, "pipeline", None)
            if pipeline and pipeline[0][0] is cycle:
                pipeline.popleft()
                cycle.disconnected = True
                self._half_close(None)
                return True
            return super().eof_received()  # the request running was cut short: its client is gone

        def _half_close(self, cycle: Any) -> None:
            """``cycle``: the last whole request, where it is known (httptools keeps the
            one running nowhere once another is queued behind it)."""
            self._half_closed = True
            conn = getattr(self, "conn", None)  # h11: requests pipelined are bytes in its buffer
            if cycle is not None and (conn is None or not conn.trailing_data[0]):
                cycle.keep_alive = False  # the last request: its answer says the connection closes, then does
            if cycle is not None:
                self._probe_peer()
            self._peer_watch = PeerWatch(self.loop, self.transport.get_extra_info("socket"), self._peer_gone)

        def _probe_peer(self) -> None:
            """Where nothing is being written (an answer, a stream's chunks), whose bytes
            would draw the reset of a client gone, an interim answer does (HTTP/1.1 only)."""
            cycle = getattr(self, "cycle", None)
            if (cycle is not None and not cycle.response_started and not cycle.response_complete
                    and not getattr(self, "pipeline", None) and cycle.scope.get("http_version", "1.1") == "1.1"
                    and not self.transport.is_closing()):
                cycle.waiting_for_100_continue = False  # (uvicorn would send its own at the body's first read)
                self.transport.write(PROBE)

        def _peer_gone(self) -> None:
            """The half-closed connection's peer reset it: the client had closed, not
            half-closed. Dropped now, so that its request stops (uvicorn tells the app the
            client is gone), not at its answer."""
            self._peer_watch = None
            self.transport.abort()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or self._dropping:  # closing (lingering), or past the pipeline's
                return  # room: what still comes is dropped
            self._heard = True
            if self._refusal is not None:  # refused: the rest of its head is read for its Origin only
                if self._refusal[1].feed(data):  # (only what is new is read: a trickled head costs no more)
                    self._refuse_waiting()
                return
            if self in live:
                live.move_to_end(self)
                holders.heard(self._peer, self)
            in_head = self._in_head()
            if not in_head and getattr(self, "conn", None) is None:  # httptools, a body's bytes
                self._body_received(data)
                return
            if in_head:
                # Counted before the parser sees them, up to the blank line that ends them
                # (what follows is a body), so no header list past the limit is ever built.
                # (The last bytes of the previous piece go along: the blank line can span two.)
                # A head that begins later in the same piece, after a whole request (pipelined),
                # is counted from the next piece on: at most one piece (256 KiB) goes uncounted.
                scan = self._tail + data
                end = scan.find(b"\r\n\r\n")
                begun = self._header_bytes > 0  # the head began in an earlier piece (the parser has that part)
                in_piece = len(data) if end < 0 else end + 4 - len(self._tail)
                self._header_bytes += in_piece
                self._tail = scan[-3:] if end < 0 else b""
                if self._header_bytes > max_header_bytes:
                    self._refuse_head(head_too_large(max_header_bytes), self._parsed_origins(begun) + _origins_in(scan),
                                      scan)
                    return
                if getattr(self, "conn", None) is not None:
                    # h11 has no callback per field: its lines are counted here (the request
                    # line and the blank line besides the fields). Without, 3,000 short fields
                    # within h11's 16 KiB were read and held where httptools stops at 256.
                    self._fields += data.count(b"\n", 0, max(0, in_piece))
                    if self._fields > MAX_HEADER_FIELDS + 2:
                        self._refuse_head(HeadersTooLarge(f"the request's headers are over the limit of "
                                                          f"{MAX_HEADER_FIELDS} fields (and {max_header_bytes} bytes)"),
                                          self._parsed_origins(begun) + _origins_in(scan), scan)
                        return
                self._head_piece = data  # (what a 400 of the parser's reads the Origin from)
            super().data_received(data)

        def _body_received(self, data: bytes) -> None:
            """What follows a head, fed to httptools: the body, and under chunked framing
            each chunk's size line (with its extensions) and, after the last, trailer
            fields. Framing and trailers are held to the header limit between two pieces
            of body: httptools builds each trailer field by concatenating every piece of
            it (a 60 MB field took a front end's event loop 12 s, quadratic), and uvicorn
            kept every trailer field as a header (118 MB of them grew a front end by
            320 MB, answered 200). (The piece that holds body goes uncounted, as a head's
            first piece may: at most 256 KiB.)"""
            self._body_fed = 0
            super().data_received(data)
            if self._body_fed:
                self._framing = 0
                return
            self._framing += len(data)
            if self._framing > max_header_bytes and not self.transport.is_closing():
                cycle = getattr(self, "cycle", None)
                if cycle is not None and cycle.response_started:  # answered already: nobody to tell
                    self.transport.close()
                else:
                    self._refuse(framing_too_large(max_header_bytes), self._parsed_origins(True))

        def on_chunk_header(self) -> None:  # httptools
            """Chunks are counted: past FEW_CHUNKS of them a body's must average
            MIN_CHUNK_BYTES (framing.py says why; h11: its receive buffer counts them),
            else 408 before the app has the body. (``read_body``'s count of pieces sees
            none of it: the chunks of a TCP read come to the app as one piece.)"""
            self._chunks += 1
            if self._chunks > FEW_CHUNKS and self._chunk_bytes < MIN_CHUNK_BYTES * self._chunks:
                cycle = getattr(self, "cycle", None)
                if cycle is not None and cycle.response_started:  # answered already: nobody to tell
                    self.transport.close()
                self._fault = tiny_chunks(self._chunks, self._chunk_bytes)
                raise ValueError(str(self._fault))  # (the parser stops; send_400_response answers it)

        def on_body(self, body: bytes) -> None:  # httptools
            self._body_fed += len(body)
            self._chunk_bytes += len(body)
            if not self._dropping:  # (uvicorn adds it to its newest request's: one kept, whole)
                super().on_body(body)

        def on_header(self, name: bytes, value: bytes) -> None:  # httptools
            if self._head_open:
                self._fields += 1
                if self._fields > MAX_HEADER_FIELDS:  # (raised: the parser stops; send_400_response answers 431)
                    self._too_many_fields = True
                    raise ValueError("too many header fields")
                super().on_header(name, value)
            # else a trailer field: not a header (RFC 9110 6.5.1), and nothing here reads
            # trailers (uvicorn appended them to the request's headers after the app had
            # read them, where a later reader found them: X-Request-Timeout is read after the body)

        # Where a head begins and ends, from the parser, never from the response: a body
        # answered before it was read (a 404, a 401) is still body, and the head after it
        # (or one pipelined behind a response still being sent) still a head, counted.
        # uvicorn's own state cannot say it (it stops updating a request once answered).
        def on_headers_complete(self) -> None:  # httptools
            self._head_open, self._header_bytes, self._tail, self._framing, self._fields = False, 0, b"", 0, 0
            self._chunks = self._chunk_bytes = 0
            ahead = getattr(self, "cycle", None)  # (uvicorn queues this one behind it if not answered yet)
            waits = ahead is not None and not ahead.response_complete
            # (counted from what the parser gave, not from the bytes read: a head that
            # begins within a piece, after a whole request, is not counted there)
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) if waits else 0
            if self._dropping or len(self.pipeline) >= MAX_PIPELINED or (
                    waits and sum(c.head_bytes for c, _ in self.pipeline) + size > MAX_PIPELINED_HEAD_BYTES):
                self._drop_the_rest()
                return
            version = self.parser.get_http_version()
            if version not in _HTTP1_VERSIONS:
                # llhttp reads "GET / HTTP/2.0" (and HTTP/0.9 with headers) framed as
                # HTTP/1, and uvicorn served it, Host check and all skipped (the app checks
                # Host for 1.1): a request line no HTTP/1 client sends. Raised here, the
                # parser stops and uvicorn answers it unreadable (send_400_response).
                self._fault = (f"HTTP/{version} in a request line framed as HTTP/1: this server speaks "
                               "HTTP/1.1 and HTTP/1.0")
                raise ValueError(self._fault)
            if self.parser.get_method() == b"CONNECT":  # uvicorn said only "Invalid HTTP request received"
                self._fault = "CONNECT asks for a tunnel to another host: this server is no proxy"
                raise ValueError(self._fault)
            if self.parser.should_upgrade() and has_body(self.headers):
                # "Connection: upgrade" with an Upgrade (h2c, websocket, ...): llhttp takes
                # what follows the head for the new protocol's bytes, so the body never
                # reached the app, which answered a JSON body "a zero-length, empty
                # document" (400 malformed_body) and left the body unread on a connection
                # kept open. No protocol is switched to here (no 101), and a bodiless
                # upgrade request is served as the HTTP/1.1 request it also is.
                self._fault = UPGRADE_WITH_BODY  # (h11 read it: framing.py refuses it there too)
                raise ValueError(self._fault)
            super().on_headers_complete()
            self.cycle.head_bytes = size  # (what it holds while it waits in the pipeline)
            if version == "1.0":  # (uvicorn chunked an answer of no Content-Length to it, after a 100: framing.py)
                http10(self.cycle)
            if self.parser.should_upgrade():
                # Served as HTTP/1.1, and the connection closed after it: llhttp dropped
                # what came behind the head in the same piece (a request pipelined behind
                # it went unanswered, the connection left open) and stops framing
                # requests here.
                self.cycle.keep_alive = False

        def on_message_complete(self) -> None:  # httptools
            if not self._dropping:
                super().on_message_complete()
            self._head_open = True

        def _drop_the_rest(self) -> None:
            """More requests pipelined than MAX_PIPELINED wait behind the one being
            answered: the rest is dropped (what the parser has of it is read on, none of
            its requests kept; what comes later is not parsed), and the connection closes
            once the requests kept are answered. uvicorn made a request cycle for every head in each piece it
            read (256 KiB: ~9,000 short GETs), then read the next at each answer: 4 MB of
            pipelined GETs from a client that read nothing grew a front end by 260 MB."""
            if not self._dropping:
                self._dropping = True
                self.cycle.keep_alive = False  # (the newest kept, queued: it closes the connection)
                log.info("a client pipelined more than %d requests, or %d bytes of heads, behind the one being "
                         "answered; the rest are dropped, and its connection closes once those are answered",
                         MAX_PIPELINED, MAX_PIPELINED_HEAD_BYTES)

        def _in_head(self) -> bool:
            conn = getattr(self, "conn", None)
            if conn is not None:  # h11: the client's side of its state machine
                import h11

                return conn.their_state in (h11.IDLE, h11.DONE)
            return self._head_open

        def send_400_response(self, msg: str) -> None:
            """What the parser could not read (uvicorn answers it in plain text), with the
            parser's reason and, where a header line is at fault, which one: uvicorn says
            only "Invalid HTTP request received" of a folded header, a NUL in a value, two
            Content-Lengths or a chunk size that overflows alike."""
            if self._dropping:  # in what was dropped: nobody waits for its answer (the parser stops)
                return
            if self._too_many_fields:
                self._refuse(HeadersTooLarge(f"the request's headers are over the limit of {MAX_HEADER_FIELDS} fields "
                                             f"(and {max_header_bytes} bytes)"), self._parsed_origins(True))
                return
            # (httptools gives a header once the next one's name is read: one before the
            # fault is only in the piece's bytes)
            if isinstance(self._fault, ServiceError):  # (framing.py: what the app answers under the other parser)
                self._refuse(self._fault, self._parsed_origins(True) + _origins_in(self._head_piece))
                return
            reason = msg.rstrip(".")
            if self._fault is not None:  # one of ours, raised in a parser's callback
                reason = self._fault
            elif getattr(self, "conn", None) is None:  # httptools: a parser in error says why again
                try:
                    self.parser.feed_data(b"")
                except Exception as exc:  # noqa: BLE001 (HttpParserError and its kinds)
                    said = str(exc)
                    if type(exc).__name__ != "HttpParserUpgrade" and said:  # (a CONNECT's text is an offset)
                        reason = _PARSER_REASONS.get(said, said)
            fault = header_fault(self._head_piece)
            self._refuse(MalformedRequest(f"the request is not valid HTTP/1.1 ({reason})" + (f": {fault}" if fault else "")),
                         self._parsed_origins(True) + _origins_in(self._head_piece))

        def _parsed_origins(self, begun: bool) -> list[bytes]:
            """The Origin values of the head in progress that the parser has seen:
            httptools gives each header as it is read (``begun``: this head's, not the
            previous request's); h11 holds a head's bytes until it is whole."""
            conn = getattr(self, "conn", None)
            if conn is not None:
                return _origins_in(bytes(getattr(conn, "_receive_buffer", b"")))  # (from its request line)
            return [v for k, v in (self.headers or ()) if k == b"origin"] if begun else []

        def _refuse(self, error: ServiceError, origins: list[bytes] = []) -> None:  # noqa: B006 (never changed)
            if not self.transport.is_closing():
                # One Origin, and one the app would answer: the CORS headers it would give.
                origin = origins[0].decode("latin-1") if len(set(origins)) == 1 else None
                self.transport.write(_closing_problem(error, cors(origin) if cors is not None else []))
                self.transport.close()

        def on_response_complete(self) -> None:
            queued = bool(getattr(self, "pipeline", None))  # httptools: one is started next
            super().on_response_complete()
            if self._half_closed:  # no request can follow the last one answered
                cycle = getattr(self, "cycle", None)  # (h11: the next one, if it started one)
                if cycle is not None and not cycle.response_complete and not self._in_head():
                    # h11 started the next request from the bytes that came before the
                    # FIN, and the FIN cut its body: it can never be whole. Its client is
                    # gone for it at once (its body's first read says so), as httptools'
                    # (eof_received drops it from the pipeline); it waited for the rest
                    # of that body, and the connection with it, until the body's 408.
                    cycle.disconnected = True
                    cycle.message_event.set()
                if not queued and (cycle is None or cycle.response_complete or cycle.disconnected):
                    self._stop_peer_watch()
                    self.transport.close()
                return
            self._arm_header_timer()

        def _stop_peer_watch(self) -> None:
            if self._peer_watch is not None:
                self._peer_watch.stop()
                self._peer_watch = None

        def connection_lost(self, exc: Exception | None) -> None:
            live.pop(self, None)
            holders.remove(self._peer, self)
            self._stop_peer_watch()
            if self._refusal is not None:
                self._refusal[2].cancel()
                waiting.discard(self)
            self.transport.ended()
            if self._header_timer is not None:
                self._header_timer.cancel()
            if self._taking is not None:
                self._taking.cancel()
            super().connection_lost(exc)

        def timeout_keep_alive_handler(self) -> None:  # uvicorn's keep-alive timer, either parser
            if not self.transport.is_closing() and _arrived(self.transport):
                # The next request came before the loop read it: read it (its reads cancel
                # this timer), never close under it. The header deadline bounds the wait.
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
                return
            if self._still_taking():
                return
            super().timeout_keep_alive_handler()

        def _still_taking(self) -> bool:
            """Whether the client is still taking its last answer (bytes of it unsent, in
            this transport or the kernel's send queue): then the connection is not idle
            yet. Its idle clocks (keep-alive, header deadline) start again once the answer
            is taken, looked at as ``HeadWithBody`` does, within the drain's bound
            (``SEND_TIMEOUT_S`` plus the unsent bytes at ``MIN_SEND_RATE``; past it, reset
            as that drain resets). uvicorn starts them when the last byte is handed to the
            transport: a client reading a large answer slowly was still reading when they
            ran out, and the close came as it took the last byte, just as it sent its next
            request on the connection (reset, unanswered). (No drain given: as uvicorn.)"""
            if drain is None or self._taking is not None:
                return self._taking is not None
            unsent = _unsent(self.transport)
            if not unsent:
                return False
            timeout_s, min_rate = drain
            self._watch_taking(self.loop.time() + timeout_s + (unsent / min_rate if min_rate else 0.0), _DRAIN_FIRST_S)
            return True

        def _watch_taking(self, deadline: float, wait: float) -> None:
            self._taking = None
            if self.transport.is_closing() or not self._idle():  # closed, or a request since
                return
            if not _unsent(self.transport):  # taken: idle from now
                self._arm_header_timer()
                if getattr(self, "timeout_keep_alive_task", None) is not None:
                    self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
            elif self.loop.time() >= deadline:
                self.transport.abort()  # (HeadWithBody: a reset, the unsent bytes dropped)
            else:
                self._taking = self.loop.call_later(wait, self._watch_taking, deadline, min(2 * wait, _DRAIN_POLL_S))

        def _arm_header_timer(self) -> None:
            self._heard = False
            self._late_read = False
            if getattr(self, "conn", None) is not None:  # h11 has no head callbacks: a head begins after a response
                self._header_bytes, self._tail, self._fields = 0, b"", 0
            # The clock restarts after every response; the timer is not made again for it
            # (a loop timer cancelled and made per response, on a busy keep-alive
            # connection): the one running, due earlier, finds the deadline moved and
            # waits the rest.
            self._header_deadline = self.loop.time() + header_timeout_s
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            left = self._header_deadline - self.loop.time()
            if left > 0:  # the clock restarted since this timer was set
                self._header_timer = self.loop.call_later(left, self._header_timeout)
                return
            self._header_timer = None
            if self._refusal is not None:  # refused already: its own timer answers it
                return
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                return  # a request is being answered: its body and response are timed by the app
            if self.transport.is_closing():
                return
            if not self._in_head():  # the rest of a body nobody will read, after its response:
                self.transport.close()  # it got the next request's time to finish, no more
                return
            if not self._late_read and _arrived(self.transport):
                # Bytes came before the deadline and the loop, late, has not read them: a
                # request's first (most often all of it), or the rest of its head. Read
                # before anything is judged: a little longer, once per request (a client
                # cannot stretch it further).
                self._late_read = True
                self._header_deadline = self.loop.time() + min(header_timeout_s, LATE_READ_S)
                self._header_timer = self.loop.call_later(min(header_timeout_s, LATE_READ_S), self._header_timeout)
                return
            if not self._heard and self._still_taking():  # not idle yet: its clock starts once the answer is taken
                return
            if self._heard:  # part of a request: say why it is cut off
                if on_timeout is not None:
                    on_timeout("header")
                self._refuse(RequestTimeout(f"the request's headers were not complete within {header_timeout_s:g} s"),
                             self._parsed_origins(self._header_bytes > 0))
            self.transport.close()  # (an idle keep-alive connection just closes)

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadlineProtocol
