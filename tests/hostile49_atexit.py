"""A function module that registers an ``atexit`` hook as it is imported (for
tests/test_hostile_round49.py): the hook writes ``HOSTILE49_AT_EXIT``'s path."""

from __future__ import annotations

import atexit
import os


def _hook() -> None:
    with open(os.environ["HOSTILE49_AT_EXIT"], "w") as f:
        f.write(str(os.getpid()))


atexit.register(_hook)
