"""Telling a client that half-closed its connection from one that left.

HTTP/1.1 lets a client shut down its sending side once its request is sent (RFC 9112
9.6: ``nc -N``, ``shutdown(SHUT_WR)``, some proxies) and still read the answer. The
server sees the same FIN from a client that closed its socket for good, whose request
must not keep an engine busy. They differ once something is written to them: a socket
closed for good answers any byte with a reset, a half-closed one takes it. So a request
whose client half-closed is answered, and at the FIN, where nothing else is being
written, an interim ``100 Continue`` is (RFC 9110 15.2: a client must parse 1xx responses
it did not ask for; Python's http.client, h11, curl skip it). The reset is reported by no
read (reading stopped at the FIN) and by a write only once one is tried, so
:class:`PeerWatch` looks at the socket's TCP state, soon after the FIN and then a few
times a second while the request runs: a connection the reset closed is given up at
once, and the engine stops its work at its next chunk (a client gone on this host is
found within milliseconds of its FIN). A client that reads the interim answer and then
closes is found by the next write (a stream's next chunk) or the request's deadline.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

__all__ = ["PROBE", "PeerWatch", "peer_reset"]

# An interim answer any HTTP/1.1 client skips (never sent to an HTTP/1.0 client, which
# may not take a 1xx, RFC 9110 15.2).
PROBE = b"HTTP/1.1 100 Continue\r\n\r\n"
# When the TCP state is looked at after the FIN (and the probe, written at once): soon (a
# reset comes back within a round trip, microseconds on a host or a LAN; a request of a
# client gone should stop as soon as it would have at a close seen at once), then every
# CHECK_EVERY_S (a client that half-closed, left the probe unread and then closed resets
# its connection at the close).
CHECKS_S = (0.001, 0.004, 0.015, 0.05)
CHECK_EVERY_S = 0.1
_TCP_CLOSE = 7  # include/net/tcp_states.h: the state of a connection a reset ended


def peer_reset(sock: Any) -> bool:
    """Whether the connection of ``sock`` was ended by the peer's reset (its TCP state is
    CLOSE while this side still holds it). False where the state cannot be read (not
    Linux, not TCP): such a connection waits for a write or its deadline."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (AttributeError, OSError, TypeError, ValueError):
        return False
    return len(info) > 0 and info[0] == _TCP_CLOSE


class PeerWatch:
    """While a half-closed connection's requests run: ``gone()`` once its peer has reset
    the connection (its caller writes :data:`PROBE` where nothing else is being written)."""

    __slots__ = ("_checks", "_gone", "_loop", "_sock", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: Any, gone: Callable[[], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._gone = gone
        self._checks = iter(CHECKS_S)
        self._timer: asyncio.TimerHandle | None = loop.call_later(CHECKS_S[0], self._check)
        next(self._checks)

    def _check(self) -> None:
        self._timer = None
        if peer_reset(self._sock):
            self._gone()
            return
        self._timer = self._loop.call_later(next(self._checks, CHECK_EVERY_S), self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
