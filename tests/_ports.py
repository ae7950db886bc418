"""A loopback port that refuses connections for as long as a test needs it to.

``free_port`` (conftest, _client_support) closes its socket at once: right for a server
about to bind the port, wrong for a port a test keeps as one nobody answers on (a dead
replica, a dead proxy). Closed, the port is free for the next bind, and xdist's workers
start servers at the same time (conftest.live_server has seen a port it picked taken by
another test's server): a "dead" port that came alive answered what the test expected
refused. Here the socket stays bound, never listening, so a connection to the port is
refused (ECONNREFUSED) and no other socket can bind it until the block ends.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

__all__ = ["dead_port"]


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses every connection until the block ends."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
