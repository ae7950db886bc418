"""What the sync and async clients share besides the protocol: construction arguments.

Kept apart so both constructors read the same way and accept the same things.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any, Callable, Generic, Mapping, TypeVar

import httpx

from ._protocol import DEFAULT_LIMITS, DEFAULT_MAX_RESPONSE_BYTES, Protocol, RetryPolicy, check_api_key

__all__ = ["ClientConfig", "DEFAULT_TIMEOUT", "PerLoop", "PerProcess", "reduce_client"]

#: seconds; the connect phase gets at most 10 s of it so a dead host is noticed quickly
DEFAULT_TIMEOUT = 60.0


class ClientConfig:
    """Turns the public constructor arguments into a :class:`Protocol` and httpx kwargs."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int | None,
        retry: RetryPolicy | None,
        transport: str,
        limits: httpx.Limits | None,
        headers: Mapping[str, str] | None,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        api_key = _key_from_environment(base_url, api_key)
        # what a pickled client is made again from, in another process (see reduce_client)
        self.args: dict[str, Any] = {
            "base_url": base_url, "api_key": api_key, "timeout": timeout, "max_retries": max_retries,
            "retry": retry, "transport": transport, "limits": limits,
            "headers": None if headers is None else dict(headers), "max_response_bytes": max_response_bytes}
        _check_credentials(base_url, api_key)
        if retry is None:
            retry = RetryPolicy() if max_retries is None else RetryPolicy(max_retries=max_retries)
        elif max_retries is not None:
            raise TypeError("pass max_retries or retry, not both")
        # a number is also the deadline of each attempt (see Deadline): httpx's timeouts are
        # per read, which a trickling server never trips
        deadline = float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None
        self.protocol = Protocol(api_key=api_key, transport=transport, headers=headers, retry=retry, timeout=deadline,
                                 max_response_bytes=max_response_bytes)
        if isinstance(timeout, (int, float)):
            timeout = httpx.Timeout(float(timeout), connect=min(10.0, float(timeout)))
        self.httpx_kwargs: dict[str, Any] = {
            "base_url": base_url.rstrip("/"),
            "timeout": timeout,
            "limits": limits if limits is not None else DEFAULT_LIMITS,
            "headers": self.protocol.base_headers,
            "follow_redirects": False,
        }


#: the API key a client made without one sends (the command line's --api-key reads it too)
API_KEY_VARIABLE = "JACOBIAN_SERVICE_API_KEY"


def _key_from_environment(base_url: str, api_key: str | None) -> str | None:
    """``api_key``, or where none is given, ``$JACOBIAN_SERVICE_API_KEY`` (unset or empty:
    none). The command line read the variable, the SDK did not: the same key exported for
    both had ``jacobian-service call`` served and every ``Client(url)`` (a remote function
    in torch, JAX or SciPy, each with a client made without a key) answered 401. A URL
    carrying its own ``user:password@`` keeps its Basic auth (both cannot travel), and
    ``api_key=""`` sends no key whatever the environment says. A pickled client carries
    the key it found, not the variable's name."""
    if api_key is not None:
        return api_key
    key = os.environ.get(API_KEY_VARIABLE) or None
    if key is None:
        return None
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        return key
    if url.username or url.password:
        return None
    try:
        check_api_key(key)
    except ValueError:
        raise ValueError(f"${API_KEY_VARIABLE} holds a control or non-ASCII character; an HTTP header carries "
                         "printable ASCII only (the key is not shown here)") from None
    return key


def _check_credentials(base_url: str, api_key: str | None) -> None:
    """A base URL with ``user:password@`` is sent by httpx as Basic auth, which takes the
    Authorization header: with an api_key too, the key's Bearer token was silently
    replaced and every call answered 401. Both cannot travel; say so (without echoing
    either)."""
    if api_key is None:
        return
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        return  # httpx says what is wrong with it, as before
    if url.username or url.password:
        raise ValueError("base_url carries credentials (user:password@host), which are sent as Basic auth in the "
                         "Authorization header that api_key's Bearer token needs: give one of them (the credentials "
                         "are not shown here)")


H = TypeVar("H", httpx.Client, httpx.AsyncClient)

# How many forks this process is from the one that imported the SDK: counted by a hook
# (no system call per request, as comparing os.getpid() would cost).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):  # no fork on Windows
    os.register_at_fork(after_in_child=_count_fork)


class PerProcess(Generic[H]):
    """The httpx client of one process: a forked child (a DataLoader worker, a
    ``multiprocessing`` pool with the fork start method) gets one of its own at its first
    request. The child inherits the parent's pooled keep-alive connections; two processes
    writing to and reading from one socket interleave their requests (400s) or read each
    other's answers (a wrong result, silently). What the caller added to the old one
    (event hooks, headers, cookies) is carried over; an ``http_transport`` passed by the
    caller is reused as it is (it owns its connections: make it in the child instead)."""

    def __init__(self, make: Callable[[dict[str, Any]], H], kwargs: dict[str, Any]) -> None:
        self._make, self._kwargs = make, kwargs
        self._fork = _forks
        self._client = make(kwargs)

    def get(self) -> H:
        if self._fork != _forks:
            old = self._client
            if not old.is_closed:  # a client closed before the fork stays closed
                # the parent's connections are left alone, never closed from here: they are
                # the parent's (and closing a shared socket could end its request)
                self._client = self._make({**self._kwargs, "headers": old.headers, "cookies": old.cookies,
                                           "event_hooks": old.event_hooks})
            self._fork = _forks
        return self._client

    def close(self) -> None:
        """Close this process's client (the sync twin of :meth:`PerLoop.aclose`, which
        ``scripts/unasync.py`` maps it to)."""
        self.get().close()


class PerLoop(PerProcess[httpx.AsyncClient]):
    """The async httpx client of one process and one event loop. httpx's pooled
    connections belong to the loop that opened them: an ``AsyncClient`` used from a
    second loop (a script calling ``asyncio.run`` once per step, threads each running a
    loop of their own) reused the first loop's connections, and its request failed with
    "RuntimeError: Event loop is closed" (with the first loop still running in another
    thread, two loops drove one socket). The first loop that asks gets the first client;
    any other loop one of its own, made at its first request with what the caller added
    to the first (event hooks, headers, cookies) and dropped with its loop. Outside any
    loop it is the first client. ``aclose()`` closes the calling loop's client and the
    ``AsyncClient`` for every loop (the others' connections go with their loops: they
    cannot be closed from this one)."""

    def __init__(self, make: Callable[[dict[str, Any]], httpx.AsyncClient], kwargs: dict[str, Any]) -> None:
        super().__init__(make, kwargs)
        self._lock = threading.Lock()
        self._first = self._client
        self._home: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = \
            weakref.WeakKeyDictionary()
        self._closed: httpx.AsyncClient | None = None
        # each loop's closer (_close_with), held here: a loop holds its async generators weakly
        self._closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def get(self) -> httpx.AsyncClient:
        first = super().get()
        if self._closed is not None:
            return self._closed
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return first
        with self._lock:
            if first is not self._first:  # a forked child's new client: its loops start afresh
                self._first, self._home, self._by_loop = first, None, weakref.WeakKeyDictionary()
                self._closers = weakref.WeakKeyDictionary()
            if self._home is None:
                self._home = weakref.ref(loop)
                self._closers[loop] = _close_with(loop, first)
            if self._home() is loop:
                return first
            client = self._by_loop.get(loop)
            if client is None:
                client = self._make({**self._kwargs, "headers": first.headers, "cookies": first.cookies,
                                     "event_hooks": first.event_hooks})
                self._by_loop[loop] = client
                self._closers[loop] = _close_with(loop, client)
            return client

    async def aclose(self) -> None:
        client = self.get()
        self._closed = client
        await client.aclose()


_starting: set[asyncio.Task[Any]] = set()  # held until they ran: a loop keeps weak references to its tasks


def _close_with(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> Any:
    """Close ``client`` as ``loop`` ends (``asyncio.run`` finalizes a loop's live async
    generators before closing it): its connections can be closed from no other loop, and
    left open they were sockets unclosed at garbage collection (a ResourceWarning per
    loop)."""

    async def until_the_loop_ends() -> Any:
        try:
            yield
        finally:
            if not client.is_closed:
                await client.aclose()

    closer = until_the_loop_ends()

    async def start() -> None:
        await closer.__anext__()  # first iterated in this loop: the loop finalizes it

    task = loop.create_task(start())
    _starting.add(task)
    task.add_done_callback(_starting.discard)
    return closer  # to be held: collected, it would be finalized (the client closed) at once


def reduce_client(client: Any, args: dict[str, Any] | None) -> tuple[Any, ...]:
    """``__reduce__`` of a client: made again from its constructor's arguments (its
    connections stay behind; a new process opens its own). So a remote function or a
    SciPy objective holding one can go to a spawned DataLoader worker or a process pool,
    or be saved with the model that holds it. The API key travels with it, as any
    argument does. A client with an ``http_transport`` cannot: a transport owns live
    connections, or is a test double."""
    if args is None:
        raise TypeError(f"a {type(client).__name__} made with http_transport= cannot be pickled "
                        "(the transport holds connections); make the client in the other process instead")
    return (_rebuild, (type(client), args))


def _rebuild(cls: type, args: dict[str, Any]) -> Any:
    return cls(**args)
