"""Sending a request and the wait for its response's status line and headers, bounded
by the call's deadline.

httpx reads a response's head inside ``send`` with its per-read timeout: a server that
sends its status line and headers a byte at a time, each within that timeout, held a
``timeout=2`` call for as long as it liked (the body is checked piece by piece by
:class:`~jacobian_client._protocol.Deadline`, but no piece of the head reaches the
client before ``send`` returns). So the clients wrap the network backend of the
connection pools they make: while :func:`head_deadline` is in force (around ``send``;
around the whole of a health probe, whose body is read there too),
every read, write and connect of the socket waits at most what is left of the attempt's
deadline, and one past it raises httpcore's ``ReadTimeout`` (``WriteTimeout`` for a
request body the server reads too slowly: httpx's per-write timeout let a server that
takes a little at a time hold the upload as long as it liked; httpx's, by the time they
reach the client). As a streamed answer's, the clock restarts with each MiB of the
request sent, and as each write of it ends (:class:`_Clock`). The deadline travels in a
context variable: the thread's for the sync client, the task's for the async one, so calls
on other threads or tasks sharing the pool keep their own.

The same wrappers stop sending a request body once the server has answered it with an
error (:func:`_refused`): a server (or a proxy) refusing a body over its limit answers 413
at once and closes. The sync client read that answer after its write failed; the async
one never did (asyncio drops what the socket holds when a write fails) and, after three
retries each sending the whole body again, raised a bare ``ReadError``.

Pools are wrapped through httpcore's ``_network_backend`` attribute (httpx offers no
argument for it); a transport without one (``httpx.MockTransport``, a user's own) is left
as it is, with the head unbounded as before. The wrappers for the sync client are written
from the async client's by ``scripts/unasync.py`` (``make unasync``), as the sync client
itself is: edit the async ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import select
import socket
import time
from typing import Any, Iterator, TypeVar

import httpcore
import httpx

__all__ = ["body_deadline", "bound_head_reads", "head_deadline"]

C = TypeVar("C", httpx.Client, httpx.AsyncClient)

#: sending restarts the clock each time this many bytes have left (as a streamed answer's does)
PROGRESS_BYTES = 1 << 20
_WRITE_PIECE = 64 << 10
_LATE = "the response's status line and headers did not arrive within the call's timeout"
_BODY_LATE = "the response's body did not arrive within the call's timeout"
_SLOW = "less than 1 MiB of the request could be sent within the call's timeout (the server reads it too slowly)"


class _Clock:
    """One attempt's time to send its request and get its response's head: ``seconds``,
    restarted each time ``PROGRESS_BYTES`` of the request have left and as each write
    httpcore makes ends (its head, each piece of the body; after the last, the server
    has the whole timeout to answer; a large body on a slow link goes on while it keeps
    going), never past ``cap``."""

    __slots__ = ("_cap", "_sent", "ends", "seconds")
    why = _LATE

    def __init__(self, seconds: float, cap: float | None) -> None:
        self.seconds = seconds
        self._cap = cap
        self._sent = 0
        self.ends = 0.0
        self.restart()

    def restart(self) -> None:
        ends = time.monotonic() + self.seconds
        self.ends = ends if self._cap is None else min(ends, self._cap)

    def sent(self, nbytes: int) -> None:
        self._sent += nbytes
        if self._sent >= PROGRESS_BYTES:
            self._sent = 0
            self.restart()


class _BodyClock:
    """A response body's time: the call's :class:`~jacobian_client._protocol.Deadline`,
    which restarts with each MiB that arrives. Its check runs only when a piece of the
    body comes out of httpx; bytes that make no piece (a chunked body's size line or
    chunk extensions trickled forever, trailers) never reached it, and each within
    httpx's per-read timeout held a ``timeout=3`` call for as long as the server sent
    them. Bounding the socket's reads by it ends those too."""

    __slots__ = ("_deadline",)
    why = _BODY_LATE

    def __init__(self, deadline: Any) -> None:
        self._deadline = deadline

    @property
    def ends(self) -> float:
        return self._deadline.ends

    def restart(self) -> None:  # nothing is sent while a body is read
        pass

    def sent(self, nbytes: int) -> None:
        pass


_CLOCK: contextvars.ContextVar[_Clock | _BodyClock | None] = contextvars.ContextVar(
    "jacobian_client_head_clock", default=None)


@contextlib.contextmanager
def head_deadline(seconds: float | None, cap: float | None = None) -> Iterator[None]:
    """Within the block, socket reads and writes wait at most ``seconds`` (see
    :class:`_Clock`), never past ``cap`` (``time.monotonic()``); None leaves them to
    httpx's own timeouts."""
    token = _CLOCK.set(None if seconds is None else _Clock(seconds, cap))
    try:
        yield
    finally:
        _CLOCK.reset(token)


@contextlib.contextmanager
def body_deadline(deadline: Any) -> Iterator[None]:
    """Within the block (reading a response's body), socket reads wait at most what is
    left of ``deadline`` (a :class:`~jacobian_client._protocol.Deadline`; one without
    ``seconds`` leaves them to httpx's own timeouts)."""
    token = _CLOCK.set(None if deadline.ends is None else _BodyClock(deadline))
    try:
        yield
    finally:
        _CLOCK.reset(token)


def _clamp(timeout: float | None, error: type[Exception] = httpcore.ReadTimeout, why: str | None = None) -> float | None:
    clock = _CLOCK.get()
    if clock is None:
        return timeout
    left = clock.ends - time.monotonic()
    if left <= 0:
        raise error(why or clock.why)
    return left if timeout is None else min(timeout, left)


def _late(error: type[Exception] = httpcore.ReadTimeout, why: str | None = None) -> None:
    """An operation that timed out: ours (say so) when the deadline is what ended it."""
    clock = _CLOCK.get()
    if clock is not None and time.monotonic() >= clock.ends:
        raise error(why or clock.why) from None


# an answer's status line, an error's: 4xx or 5xx
_ERROR_STATUS = re.compile(rb"HTTP/1\.[01] [45][0-9][0-9] ")


def _refused(stream: Any) -> bool:
    """Has the server already answered, with an error, the request still being sent?

    RFC 9112 9.5: a client sending a body watches for an error response meanwhile, and
    stops sending once one comes. Read by peeking at the socket (nothing is consumed:
    httpcore reads the answer as usual), so plaintext only: behind TLS the bytes are
    records (a session ticket, say), not a status line, and the body goes on as before."""
    info = getattr(stream, "get_extra_info", None)  # a network backend of the caller's may have none
    if info is None or info("ssl_object") is not None:
        return False
    raw = info("socket")
    if raw is None:
        return False
    try:  # nothing to read, the usual case, in one cheap call (the peek below takes several)
        if not _readable(raw.fileno()):
            return False
    except (OSError, AttributeError, ValueError):
        return False
    try:
        # A socket object of our own on the same descriptor, detached again (the descriptor
        # stays httpcore's): asyncio hands out a TransportSocket, which cannot recv, and a
        # socket with a timeout waits for data (up to that timeout) whatever MSG_DONTWAIT says.
        sock = socket.socket(fileno=raw.fileno())
    except (OSError, AttributeError, ValueError):
        return False
    try:
        head = sock.recv(13, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing yet (BlockingIOError), or a socket that failed: the write will say
        return False
    finally:
        sock.detach()
    return _ERROR_STATUS.match(head) is not None


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # Windows: no poll (its sockets are few)


def _sent(nbytes: int, done: bool) -> None:
    clock = _CLOCK.get()
    if clock is not None:
        clock.restart() if done else clock.sent(nbytes)


# unasync: the async source of the sync code below (scripts/unasync.py writes that from this)


class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._refused = False  # the server answered with an error mid-request: the rest is not sent

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._inner.read(max_bytes, _clamp(timeout))
        except httpcore.ReadTimeout:
            _late()
            raise

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # In pieces, each under what is left: a sync socket's timeout is per send (a server
        # that takes a little at a time keeps every send of one large buffer short), and the
        # clock restarts as each MiB of the request leaves (see _Clock).
        view = memoryview(buffer)
        for start in range(0, len(view), _WRITE_PIECE):
            if self._refused or _refused(self._inner):
                self._refused = True
                return  # httpcore goes on to read the answer
            piece = view[start:start + _WRITE_PIECE]
            try:
                await self._inner.write(piece, _clamp(timeout, httpcore.WriteTimeout, _SLOW))
            except httpcore.WriteTimeout:
                _late(httpcore.WriteTimeout, _SLOW)
                raise
            _sent(len(piece), False)
        _sent(0, True)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
            self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return _AsyncStream(await self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._refused:  # a body cut short: never reuse the connection
            return True
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def connect_tcp(
            self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
            socket_options: Any = None) -> Any:
        return _AsyncStream(await self._inner.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        return _AsyncStream(await self._inner.connect_unix_socket(path, _clamp(timeout), socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# unasync: generated from the async source above by scripts/unasync.py (make unasync): edit that, never this


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._refused = False  # the server answered with an error mid-request: the rest is not sent

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, _clamp(timeout))
        except httpcore.ReadTimeout:
            _late()
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # In pieces, each under what is left: a sync socket's timeout is per send (a server
        # that takes a little at a time keeps every send of one large buffer short), and the
        # clock restarts as each MiB of the request leaves (see _Clock).
        view = memoryview(buffer)
        for start in range(0, len(view), _WRITE_PIECE):
            if self._refused or _refused(self._inner):
                self._refused = True
                return  # httpcore goes on to read the answer
            piece = view[start:start + _WRITE_PIECE]
            try:
                self._inner.write(piece, _clamp(timeout, httpcore.WriteTimeout, _SLOW))
            except httpcore.WriteTimeout:
                _late(httpcore.WriteTimeout, _SLOW)
                raise
            _sent(len(piece), False)
        _sent(0, True)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
            self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._refused:  # a body cut short: never reuse the connection
            return True
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(
            self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
            socket_options: Any = None) -> Any:
        return _Stream(self._inner.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        return _Stream(self._inner.connect_unix_socket(path, _clamp(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# unasync: end of the generated code


def bound_head_reads(client: C) -> C:
    """Wrap the network backend of every connection pool ``client`` holds (its transport
    and its proxy mounts) so that :func:`head_deadline` bounds their reads; ``client``."""
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None or isinstance(backend, (_Backend, _AsyncBackend)):
            continue
        wrapper = _AsyncBackend if isinstance(backend, httpcore.AsyncNetworkBackend) else _Backend
        pool._network_backend = wrapper(backend)  # type: ignore[union-attr]
    return client
