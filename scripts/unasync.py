#!/usr/bin/env python3
"""Write the SDK's synchronous client from its asynchronous one.

``client/jacobian_client/_async.py`` is the one source; this script rewrites it into
``_sync.py`` by substitution, as httpcore's ``scripts/unasync.py`` makes its ``_sync/``
from ``_async/``. Two hand-kept copies drifted apart in more than ``async``/``await``
(23 duplicated runs, a 25-line argument docstring among them); now a change made once
reaches both clients.

    python scripts/unasync.py           # rewrite _sync.py
    python scripts/unasync.py --check   # exit 1, with a diff, when _sync.py is stale

Standard library only: the test (tests/test_unasync.py) and CI run it without the SDK's
dependencies. Where the clients differ in more than a token, the difference is a pair of
helpers the tokens map (``PerLoop.aclose`` / ``PerProcess.close``, ``adecoded`` /
``decoded``) or, for the few sentences of documentation that differ, a phrase below.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client" / "jacobian_client" / "_async.py"
TARGET = ROOT / "client" / "jacobian_client" / "_sync.py"

HEADER = ("# Generated from _async.py by scripts/unasync.py (make unasync): edit _async.py, "
          "never this file.\n")

# Whole sentences that read differently in the sync client (docstrings): replaced first,
# before the tokens below touch their words. Each must occur exactly once, so that a
# sentence edited in _async.py without its rule fails loudly instead of leaking
# "coroutine" into Client's documentation.
PHRASES: list[tuple[str, str]] = [
    ('''"""The asynchronous client: the same methods as :class:`Client`, as coroutines, over one
``httpx.AsyncClient``.

This file is the one source of both clients: ``scripts/unasync.py`` writes ``_sync.py``
from it by token substitution (``make unasync``; tests/test_unasync.py fails when the
committed ``_sync.py`` is not what it writes). Edit this file, never ``_sync.py``.''',
     '''"""The synchronous client: a thin loop over :mod:`._protocol` and one ``httpx.Client``.

Generated from ``_async.py`` by ``scripts/unasync.py``: edit that file, then run
``make unasync``.
'''),
    ("""This process's and this event loop's httpx client (a forked child, or another
        loop, makes its own: see PerLoop).""",
     "This process's httpx client (a forked child makes its own: see PerProcess)."),
    ("A connection-pooled asyncio client", "A connection-pooled client"),
    ('''    >>> async with AsyncClient("http://localhost:8000") as client:   # doctest: +SKIP
    ...     J = await client.jacobian("sin", x)

    Calls may run concurrently (``asyncio.gather``); they share the connection pool.
''', '''    >>> with Client("http://localhost:8000") as client:   # doctest: +SKIP
    ...     J = client.jacobian("sin", x)
'''),
    ('''"""Like ``torch.func.jacrev(f, argnums, chunk_size=...)``, as a coroutine function:
        ``await jac(x)`` gives the Jacobian (and aux, for has_aux functions)."""''',
     '''"""A callable like ``torch.func.jacrev(f, argnums, chunk_size=...)``: call it with
        the inputs to get the Jacobian (and aux, for has_aux functions)."""'''),
]

# Token substitutions, in order, each a regex over the whole text (httpcore's list, with
# this module's names).
TOKENS: list[tuple[str, str]] = [
    (r"^import anyio\n", ""),                    # time.sleep needs only time, imported already
    (r"\banyio\.sleep\b", "time.sleep"),
    (r"\bAwaitable, ", ""),
    (r"\bAwaitable\[(Any)\]", r"\1"),
    (r"\basync def ", "def "),
    (r"\basync with ", "with "),
    (r"\basync for ", "for "),
    (r"\bawait ", ""),
    (r"\bcontextlib\.aclosing\b", "contextlib.closing"),
    (r"\badecoded\b", "decoded"),
    (r"\bhttpx\.AsyncBaseTransport\b", "httpx.BaseTransport"),
    (r"\bAsyncClient\b", "Client"),
    (r"\bPerLoop\b", "PerProcess"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baclose\b", "close"),
]


def unasync(text: str) -> str:
    """The sync module's text for the async module's ``text``."""
    for old, new in PHRASES:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"unasync: expected this phrase once in {SOURCE.name}, found it {count} times "
                             f"(edit its rule in scripts/unasync.py with it):\n{old}")
        text = text.replace(old, new)
    for pattern, new in TOKENS:
        text = re.sub(pattern, new, text, flags=re.MULTILINE)
    return HEADER + text


def stale() -> str:
    """A unified diff from the committed ``_sync.py`` to what this script writes ('' when
    they agree)."""
    want = unasync(SOURCE.read_text(encoding="utf-8"))
    have = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    return "".join(difflib.unified_diff(
        have.splitlines(keepends=True), want.splitlines(keepends=True),
        fromfile=f"{TARGET.name} (committed)", tofile=f"{TARGET.name} (from {SOURCE.name})"))


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print(__doc__, file=sys.stderr)
        return 2
    if argv == ["--check"]:
        diff = stale()
        if diff:
            sys.stdout.write(diff)
            print(f"{TARGET} is stale: run `make unasync`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(unasync(SOURCE.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
