#!/usr/bin/env python3
"""Write the SDK's synchronous code from its asynchronous code.

``client/jacobian_client/_async.py`` is the one source of the clients; this script
rewrites it into ``_sync.py`` by substitution, as httpcore's ``scripts/unasync.py`` makes
its ``_sync/`` from ``_async/``. Two hand-kept copies drifted apart in more than
``async``/``await`` (23 duplicated runs, a 25-line argument docstring among them); now a
change made once reaches both clients. The smaller pairs inside one module (the network
stream and backend of ``_headwait.py``, ``_decoding.py``'s ``adecoded``) are written the
same way, in place: the sync code between two marker comments (:data:`SYNC_MARK`,
:data:`END_MARK`) from the async code between :data:`ASYNC_MARK` and the first of them.

    python scripts/unasync.py           # rewrite _sync.py and the marked regions
    python scripts/unasync.py --check   # exit 1, with a diff, when any of them is stale

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

# Modules holding both forms of a few small classes or functions: the sync form is
# generated in place, below the async form it is written from.
IN_PLACE = [ROOT / "client" / "jacobian_client" / name for name in ("_headwait.py", "_decoding.py")]
ASYNC_MARK = "# unasync: the async source of the sync code below (scripts/unasync.py writes that from this)\n"
SYNC_MARK = ("# unasync: generated from the async source above by scripts/unasync.py (make unasync): "
             "edit that, never this\n")
END_MARK = "# unasync: end of the generated code\n"

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
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\baiter_raw\b", "iter_raw"),
    (r"\bhttpx\.AsyncBaseTransport\b", "httpx.BaseTransport"),
    (r"\bhttpcore\.AsyncNetwork(Stream|Backend)\b", r"httpcore.Network\1"),
    (r"\b_Async(Stream|Backend)\b", r"_\1"),
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
    return HEADER + _tokens(text)


def _tokens(text: str) -> str:
    for pattern, new in TOKENS:
        text = re.sub(pattern, new, text, flags=re.MULTILINE)
    return text


def in_place(text: str, name: str = "the module") -> str:
    """``text`` with its generated region rewritten from the async region above it."""
    marks = [ASYNC_MARK, SYNC_MARK, END_MARK]
    counts = [text.count(mark) for mark in marks]
    if counts != [1, 1, 1] or not text.index(ASYNC_MARK) < text.index(SYNC_MARK) < text.index(END_MARK):
        raise ValueError(f"unasync: {name} must hold each marker once, in this order (found {counts}):\n"
                         + "".join(marks))
    head, rest = text.split(ASYNC_MARK)
    source, rest = rest.split(SYNC_MARK)
    _, tail = rest.split(END_MARK)
    return head + ASYNC_MARK + source + SYNC_MARK + _tokens(source) + END_MARK + tail


def generated() -> dict[Path, str]:
    """Each file this script writes, and what it writes there."""
    files = {TARGET: unasync(SOURCE.read_text(encoding="utf-8"))}
    for path in IN_PLACE:
        files[path] = in_place(path.read_text(encoding="utf-8"), path.name)
    return files


def stale() -> str:
    """A unified diff from the committed files to what this script writes ('' when
    they agree)."""
    diff = []
    for path, want in generated().items():
        have = path.read_text(encoding="utf-8") if path.exists() else ""
        source = SOURCE.name if path == TARGET else "its async code"
        diff += difflib.unified_diff(
            have.splitlines(keepends=True), want.splitlines(keepends=True),
            fromfile=f"{path.name} (committed)", tofile=f"{path.name} (from {source})")
    return "".join(diff)


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print(__doc__, file=sys.stderr)
        return 2
    if argv == ["--check"]:
        diff = stale()
        if diff:
            sys.stdout.write(diff)
            print("generated code is stale: run `make unasync`", file=sys.stderr)
            return 1
        return 0
    for path, text in generated().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
