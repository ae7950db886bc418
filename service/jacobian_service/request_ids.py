"""Request ids: the ``X-Request-ID`` of a response whose client sent none."""

from __future__ import annotations

import itertools
import os

from .metrics import process_id

__all__ = ["new_request_id"]


class _RequestIds:
    """32 hex characters, unique across processes: a random prefix per process, then a
    counter. (``uuid4`` reads the OS's random source, a system call per request.)"""

    def __init__(self) -> None:
        self._pid = -1

    def __call__(self) -> str:
        if self._pid != process_id():  # a new process (fork): a new prefix
            self._pid = process_id()
            self._prefix = os.urandom(8).hex()
            self._count = itertools.count(1)
        return f"{self._prefix}{next(self._count):016x}"


new_request_id = _RequestIds()
