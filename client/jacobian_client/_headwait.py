"""The wait for a response's status line and headers, bounded by the call's deadline.

httpx reads a response's head inside ``send`` with its per-read timeout: a server that
sends its status line and headers a byte at a time, each within that timeout, held a
``timeout=2`` call for as long as it liked (the body is checked piece by piece by
:class:`~jacobian_client._protocol.Deadline`, but no piece of the head reaches the
client before ``send`` returns). So the clients wrap the network backend of the
connection pools they make: while :func:`head_deadline` is in force (around ``send``;
around the whole of a health probe, whose body is read there too),
every read and connect of the socket waits at most what is left of the attempt's
deadline, and one past it raises httpcore's ``ReadTimeout`` (httpx's, by the time it
reaches the client). The deadline travels in a context variable: the thread's for the
sync client, the task's for the async one, so calls on other threads or tasks sharing
the pool keep their own.

Pools are wrapped through httpcore's ``_network_backend`` attribute (httpx offers no
argument for it); a transport without one (``httpx.MockTransport``, a user's own) is left
as it is, with the head unbounded as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Any, Iterator

import httpcore
import httpx

__all__ = ["bound_head_reads", "head_deadline"]

_ENDS: contextvars.ContextVar[float | None] = contextvars.ContextVar("jacobian_client_head_ends", default=None)


@contextlib.contextmanager
def head_deadline(ends: float | None) -> Iterator[None]:
    """Within the block, socket reads wait at most until ``ends`` (``time.monotonic()``);
    None leaves them to httpx's own timeouts."""
    token = _ENDS.set(ends)
    try:
        yield
    finally:
        _ENDS.reset(token)


_LATE = "the response's status line and headers did not arrive within the call's timeout"


def _clamp(timeout: float | None) -> float | None:
    ends = _ENDS.get()
    if ends is None:
        return timeout
    left = ends - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout(_LATE)
    return left if timeout is None else min(timeout, left)


def _late() -> None:
    """A read that timed out: ours (say so) when the deadline is what ended it."""
    ends = _ENDS.get()
    if ends is not None and time.monotonic() >= ends:
        raise httpcore.ReadTimeout(_LATE) from None


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, _clamp(timeout))
        except httpcore.ReadTimeout:
            _late()
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> Any:
        return _Stream(self._inner.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        return _Stream(self._inner.connect_unix_socket(path, _clamp(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._inner.read(max_bytes, _clamp(timeout))
        except httpcore.ReadTimeout:
            _late()
            raise

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> Any:
        return _AsyncStream(await self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> Any:
        return _AsyncStream(await self._inner.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        return _AsyncStream(await self._inner.connect_unix_socket(path, _clamp(timeout), socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def bound_head_reads(client: httpx.Client | httpx.AsyncClient) -> None:
    """Wrap the network backend of every connection pool ``client`` holds (its transport
    and its proxy mounts) so that :func:`head_deadline` bounds their reads."""
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None or isinstance(backend, (_Backend, _AsyncBackend)):
            continue
        wrapper = _AsyncBackend if isinstance(backend, httpcore.AsyncNetworkBackend) else _Backend
        pool._network_backend = wrapper(backend)  # type: ignore[union-attr]
