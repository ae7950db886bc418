"""Request ids: the ``X-Request-ID`` of a response whose client sent none."""

from __future__ import annotations

import hashlib
import itertools
import os

from .metrics import process_id

__all__ = ["new_request_id"]


class _RequestIds:
    """32 hex characters, unique across processes: a counter hashed with a random key
    per process (keyed BLAKE2b, 16 bytes: no two counts of one key meet in practice,
    and keys are drawn per process). ``uuid4`` reads the OS's random source, a system
    call per request; the hash is ~1 us of CPU.

    The id was a random prefix per process and then the counter in the clear: any client
    read from two of its answers' ids how many requests that front end had served
    between them (every other client's traffic, to the request), and could name the
    ids of other clients' requests, which the logs key on."""

    def __init__(self) -> None:
        self._pid = -1

    def __call__(self) -> str:
        if self._pid != process_id():  # a new process (fork): a new key
            self._pid = process_id()
            self._hash = hashlib.blake2b(key=os.urandom(16), digest_size=16)
            self._count = itertools.count(1)
        h = self._hash.copy()
        h.update(next(self._count).to_bytes(8, "little"))
        return h.hexdigest()


new_request_id = _RequestIds()
