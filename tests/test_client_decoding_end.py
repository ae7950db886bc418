"""What follows the end of a compressed stream in a response body, read by the SDK's own
decoder (``_decoding``): a second gzip member, or bytes after a deflate stream, when the
read that holds the end also holds output past one piece (64 KiB). CPython's zlib then
leaves the bytes past the end in ``unconsumed_tail`` as well as ``unused_data``; read as
more input, the second member was decoded over and over (answers without end, refused at
last as too large) and a deflate stream's trailing bytes were fed back forever (the
client spun, no timeout ending it). In process: fast, no server."""

from __future__ import annotations

import gzip
import zlib

import httpx
import numpy as np
import pytest

import jacobian_client as jc
from jacobian_client._decoding import PIECE, BodyDecoder, decoded

# a Jacobian of zeros, 312 KiB: a few hundred bytes compressed, so that one read holds
# its end and output past a piece
FIRST = np.zeros((100, 800), np.float32).tobytes()
SECOND = bytes(range(256)) * 40


def _decode(coding: str, body: bytes, read: int) -> bytes:
    """The body decoded from reads of ``read`` bytes, stopped (as a failure) once it is
    longer than any right answer, so that a runaway fails instead of hanging."""
    decoder, out, most = BodyDecoder(coding), bytearray(), len(FIRST) + len(SECOND)
    for at in range(0, len(body), read):
        for piece in decoder.decode(body[at:at + read]):
            assert len(piece) <= PIECE
            out += piece
            assert len(out) <= most, "decoded past the end of the body"
    for piece in decoder.flush():
        out += piece
    return bytes(out)


@pytest.mark.parametrize("read", [4096, 1 << 20])
def test_two_gzip_members_are_read_once_each(read: int) -> None:
    # read=4096: the first member's last read also starts the second; 1 MiB: one read
    assert _decode("gzip", gzip.compress(FIRST) + gzip.compress(SECOND), read) == FIRST + SECOND


@pytest.mark.timeout(20)  # the deflate case spun without output, a hang: this fails it instead
@pytest.mark.parametrize("coding, compress", [("deflate", zlib.compress), ("gzip", gzip.compress)])
def test_bytes_after_a_single_stream_end_its_body(coding: str, compress) -> None:
    body = compress(FIRST) + b"\x00" * 16
    if coding == "deflate":  # ignored after a deflate stream, as before
        assert _decode(coding, body, 4096) == FIRST
    else:  # after a gzip member they would be another: no gzip header, refused, as before
        with pytest.raises(jc.TransportError, match="gzip body is unreadable: .*incorrect header check"):
            _decode(coding, body, 4096)


def test_a_streamed_response_of_two_members_decodes_whole() -> None:
    # through the SDK's decoded(), from an httpx response read 4 KiB at a time
    body = gzip.compress(FIRST) + gzip.compress(SECOND)

    class Reads(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for at in range(0, len(body), 4096):
                yield body[at:at + 4096]

    response = httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Reads())
    out = bytearray()
    for piece in decoded(response):
        out += piece
        assert len(out) <= len(FIRST) + len(SECOND), "decoded past the end of the body"
    assert bytes(out) == FIRST + SECOND
