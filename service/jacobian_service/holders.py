"""Which peer address holds the most of a front end's connections, kept as they come and
go, so that the connection cap (``connections.guarded_protocol``) takes room from that
peer, not from whoever waited longest.

Counts move by one at a time, so the peers holding the most are found at once (peers are
bucketed by how many they hold): one client churning connections at the cap costs a
front end as little per connection as before, however many addresses are connected.
"""

from __future__ import annotations

import collections
from typing import Any, Hashable

__all__ = ["Holders"]


class Holders:
    def __init__(self) -> None:
        self._of: dict[Hashable, collections.OrderedDict[Any, None]] = {}  # peer -> its connections, least recently heard first
        self._holding: collections.defaultdict[int, dict[Hashable, None]] = collections.defaultdict(dict)  # n -> peers holding n
        self.most = 0

    def add(self, peer: Hashable, conn: Any) -> None:
        conns = self._of.setdefault(peer, collections.OrderedDict())
        self._move(peer, len(conns), len(conns) + 1)
        conns[conn] = None
        self.most = max(self.most, len(conns))

    def remove(self, peer: Hashable, conn: Any) -> None:
        conns = self._of.get(peer)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        self._move(peer, len(conns) + 1, len(conns))
        if not conns:
            del self._of[peer]
        while self.most and not self._holding.get(self.most):
            self.most -= 1

    def heard(self, peer: Hashable, conn: Any) -> None:
        conns = self._of.get(peer)
        if conns is not None and conn in conns:
            conns.move_to_end(conn)

    def count(self, peer: Hashable) -> int:
        return len(self._of.get(peer, ()))

    def greediest(self) -> collections.OrderedDict[Any, None]:
        """The connections of a peer holding the most, least recently heard first."""
        if not self.most:
            return collections.OrderedDict()
        return self._of[next(iter(self._holding[self.most]))]

    def _move(self, peer: Hashable, before: int, after: int) -> None:
        if before:
            bucket = self._holding[before]
            bucket.pop(peer, None)
            if not bucket:
                del self._holding[before]
        if after:
            self._holding[after][peer] = None
