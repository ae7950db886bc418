"""A response body's ``Content-Encoding`` undone in bounded pieces, and the size cap
every body the clients read is held to.

Why not httpx's own decoding (``iter_bytes``): it expands each piece read from the
socket whole, with no bound on what one piece becomes. Deflate expands up to about
1,000 to 1, so one 64 KiB read of a gzip body is 64 MiB at once; and httpx undoes every
coding the server lists, so ``Content-Encoding: gzip, gzip`` squares that (one read:
~64 GiB), before any size check of the caller's sees a byte. Here each coding is undone
with zlib's ``max_length``: no piece, at any layer, exceeds :data:`PIECE` bytes, and the
caller counts the pieces against its cap as they come.

Only the codings the clients ask for (``Accept-Encoding: gzip, deflate``) are read;
another (``br``, ``zstd``, ``compress``) is refused, where httpx passed it through as
if it were the body.
"""

from __future__ import annotations

import zlib
from typing import AsyncIterator, Iterator

import httpx

from ._errors import ResponseTooLarge, TransportError

__all__ = ["ACCEPT_ENCODING", "PIECE", "BodyDecoder", "adecoded", "decoded", "is_identity", "too_large"]

#: what the clients send as ``Accept-Encoding``: the codings :class:`BodyDecoder` reads
ACCEPT_ENCODING = "gzip, deflate"

#: the most bytes one decoded piece holds, at every layer of codings
PIECE = 1 << 16

_GZIP = zlib.MAX_WBITS | 16
_ZLIB = zlib.MAX_WBITS
_RAW = -zlib.MAX_WBITS


class _Inflate:
    """One gzip or deflate layer. ``deflate`` is zlib-wrapped by the RFC, raw deflate
    from some servers: the raw form is tried when the first bytes are no zlib header,
    as httpx does."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._wbits = _GZIP if coding in ("gzip", "x-gzip") else _ZLIB
        self._d = zlib.decompressobj(self._wbits)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._feed(data)
        except zlib.error as exc:
            if self._started or self._wbits != _ZLIB:
                raise TransportError(f"the response's {self._coding} body is unreadable: {exc}") from None
            self._wbits = _RAW
            self._d = zlib.decompressobj(_RAW)
            self._started = True
            yield from self.feed(data)

    def _feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            out = self._d.decompress(data, PIECE)
            if out:
                self._started = True
                yield out
            if self._d.eof:
                # Past the stream's end every byte left is in unused_data. CPython (3.11)
                # leaves a copy of them in unconsumed_tail too when the call that reached the
                # end had had input held back by max_length: read as more input, that copy
                # was a second gzip member read over and over, or bytes after a deflate
                # stream fed to it forever (a hang that no timeout ended).
                data = self._d.unused_data
                if data and self._wbits == _GZIP:
                    # gzip members one after another are one body (RFC 1952; a proxy that
                    # compresses a stream piece by piece writes them): httpx read the first only
                    self._d = zlib.decompressobj(_GZIP)
                    continue
                return  # after a deflate stream, or a last gzip member: nothing more is read
            data = self._d.unconsumed_tail
            # a full piece with no input left may still have output pending inside zlib
            if not data and len(out) < PIECE:
                return

    def flush(self) -> Iterator[bytes]:
        yield from self.feed(b"")  # what zlib held back, in pieces (flush() would give it whole)


class BodyDecoder:
    """``decode(raw)`` yields the decoded body in pieces of at most :data:`PIECE` bytes;
    ``flush()`` at the end. Codings are undone in the reverse of the order listed."""

    def __init__(self, content_encoding: str) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
        layers = []
        for coding in reversed(codings):
            if coding == "identity":
                continue
            if coding not in ("gzip", "x-gzip", "deflate"):
                raise TransportError(
                    f"the response's Content-Encoding {content_encoding[:100]!r} holds {coding[:40]!r}, which the "
                    f"client did not ask for (Accept-Encoding: {ACCEPT_ENCODING}) and cannot read")
            layers.append(_Inflate(coding))
        self._layers = layers

    def decode(self, raw: bytes) -> Iterator[bytes]:
        yield from self._through(0, raw)

    def flush(self) -> Iterator[bytes]:
        for i, layer in enumerate(self._layers):
            for piece in layer.flush():
                yield from self._through(i + 1, piece)

    def _through(self, i: int, data: bytes) -> Iterator[bytes]:
        if i == len(self._layers):
            if data:
                yield data
            return
        for piece in self._layers[i].feed(data):
            yield from self._through(i + 1, piece)


def is_identity(content_encoding: str) -> bool:
    """No coding at all: the header absent, empty, or listing only ``identity``."""
    return all(c.strip().lower() in ("", "identity") for c in content_encoding.split(","))


def too_large(what: str, size: int, limit: int, *, declared: bool = False) -> ResponseTooLarge:
    """The error for a body over the client's ``max_response_bytes``."""
    how = f"declares {size} bytes" if declared else f"is larger than that ({size} bytes read so far)"
    return ResponseTooLarge(
        f"{what}: the response {how}; the client's max_response_bytes is {limit}. A server (or a proxy) "
        "answering more than that is refused before it fills memory: pass max_response_bytes= (None: no "
        "limit) to allow a larger answer, or stream a large result to a file with out=")


# unasync: the async source of the sync code below (scripts/unasync.py writes that from this)


async def adecoded(response: httpx.Response) -> AsyncIterator[bytes]:
    """A streamed response's body, decoded in bounded pieces (close it with
    ``contextlib.aclosing`` when leaving early)."""
    if response.is_stream_consumed:
        for piece in _read_already(response):
            yield piece
        return
    decoder = BodyDecoder(response.headers.get("content-encoding", ""))
    async for raw in response.aiter_raw():
        for piece in decoder.decode(raw):
            yield piece
    for piece in decoder.flush():
        yield piece


# unasync: generated from the async source above by scripts/unasync.py (make unasync): edit that, never this


def decoded(response: httpx.Response) -> Iterator[bytes]:
    """A streamed response's body, decoded in bounded pieces (close it with
    ``contextlib.closing`` when leaving early)."""
    if response.is_stream_consumed:
        for piece in _read_already(response):
            yield piece
        return
    decoder = BodyDecoder(response.headers.get("content-encoding", ""))
    for raw in response.iter_raw():
        for piece in decoder.decode(raw):
            yield piece
    for piece in decoder.flush():
        yield piece


# unasync: end of the generated code


def _read_already(response: httpx.Response) -> Iterator[bytes]:
    """A response read before it reached the client (a test double's ``content=``,
    which httpx reads and decodes as it makes the response), in pieces."""
    content = response.content
    for start in range(0, len(content), PIECE):
        yield content[start:start + PIECE]
