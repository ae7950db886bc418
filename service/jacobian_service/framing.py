"""HTTP/1 message framing held alike under both of uvicorn's HTTP implementations.

The server parses requests with httptools (llhttp) where it is installed, else with h11
(``connections.guarded_protocol`` takes either). A request that one parser frames one way
and another parser (a proxy in front) another way is how requests are smuggled, and a
client must get the same answer from either server. Two gaps:

* **h11 read what llhttp refuses**: two Content-Length fields of one value, or a list of
  them (``Content-Length: 24, 24``), a header folded onto the next line (obs-fold), lines
  ending in a bare LF, a chunk size followed by whitespace or an extension that is no
  token or quoted string, trailer fields that frame (Content-Length, Transfer-Encoding),
  any HTTP/1.x version, any token for a method (llhttp knows a list), and a request
  asking to switch protocols with a body (which llhttp, and perhaps a proxy in front,
  take for the new protocol's bytes); it took an absolute-form target
  (``http://host/path``, which a server must accept) for a path (404); a chunk size line
  ending in a bare LF left the request waiting for its body's timeout; a control
  character (0x01-0x08, 0x0e-0x1f, DEL) in a header or trailer field's value was read
  into it; an HTTP/1.1 request with no Host or two was h11's bare 400 "Invalid HTTP
  request received" (httptools: the app's 400 saying so), and so were the transfer
  codings llhttp refuses (chunked not last, twice); ``Transfer-Encoding: ,chunked`` (an
  empty element, which llhttp ignores) was a 501 or a 400.
  :class:`StrictReceiveBuffer`, h11's receive buffer, refuses them (400) where llhttp
  does; it skips empty lines before a request line, as llhttp does and RFC 9112 2.2 asks
  (h11 answered a client that sent CRLF after a body 400 at its next request), and reads
  a chunk size's leading zeros, as llhttp does. A transfer coding before chunked
  (``gzip, chunked``), which llhttp passes and the app answers 501, is that 501 (h11
  refused it 400).
* **httptools answered HTTP/1.0 with chunked framing**: uvicorn chunked every answer
  without a Content-Length (a streamed or large JSON Jacobian) whatever the request's
  version, and an HTTP/1.0 client, which knows no transfer coding (RFC 9112 6.1: a
  server must not send one to it), read the chunk sizes as part of the JSON.
  :func:`http10` ends such an answer by closing the connection, as h11 does, and sends
  such a client no ``100 Continue``, which uvicorn sent it (and it took for its answer).
"""

from __future__ import annotations

import re
import types
from typing import Any, Callable

import h11
from h11._receivebuffer import ReceiveBuffer  # (uvicorn's h11 protocol reads through one per connection)

from .errors import HeadersTooLarge, MalformedRequest, RequestTimeout, ServiceError, UnsupportedTransferCoding

__all__ = ["FEW_CHUNKS", "MIN_CHUNK_BYTES", "UNSUPPORTED_CODING", "UPGRADE_WITH_BODY", "StrictReceiveBuffer", "framing_too_large",
           "has_body", "head_too_large", "hosts_fault", "http10", "strict_h11_buffer", "tiny_chunks"]

# (RFC 9112 6.1: 501 for a transfer coding the server does not understand; middleware.py says it too)
UNSUPPORTED_CODING = "the only transfer coding served is chunked; send the body as it is"
# llhttp takes what follows such a head for the new protocol's bytes (a proxy in front may
# too: a tunnel), so its body is never read as HTTP/1.1 (connections.py refuses it there).
UPGRADE_WITH_BODY = ("a request asking to switch protocols (Connection: upgrade) with a body, which this server "
                     "cannot read as HTTP/1.1: it speaks HTTP/1.1 only; send the request without 'Connection: upgrade'")


def hosts_fault(hosts: int) -> MalformedRequest:
    """The 400 of an HTTP/1.1 request with no Host or more than one (RFC 9112 3.2: which
    host did a proxy in front route it for?), whichever parser reads it."""
    return MalformedRequest(f"an HTTP/1.1 request needs one Host header; it has {hosts}")


def head_too_large(limit: int) -> HeadersTooLarge:
    """The 431 of a head past ``limit`` bytes, whichever parser reads it."""
    return HeadersTooLarge(f"the request's headers are over the limit of {limit} bytes")


def framing_too_large(limit: int) -> HeadersTooLarge:
    """The 431 of chunk size lines and trailer fields past ``limit`` bytes between two
    pieces of a body, whichever parser reads them."""
    return HeadersTooLarge(f"the request's chunk framing and trailer fields are over the limit of {limit} bytes")


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a head's (lower-cased) fields announce a body: a Content-Length other than 0,
    or a Transfer-Encoding."""
    return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip().lstrip(b"0") != b"")
               for name, value in headers)


def http10(cycle: Any) -> None:
    """An HTTP/1.0 request's answer under uvicorn's httptools protocol (``cycle``, its
    request-response cycle, before its app runs): one without a Content-Length is sent as
    it is, its end the connection's close, never chunked; and no ``100 Continue`` goes
    before it (RFC 9110 10.1.1 and 15.2: such a request's ``Expect: 100-continue`` is
    ignored, and no 1xx is sent to HTTP/1.0, whose clients take it for their answer).
    uvicorn sent one once the app asked for the body, h11's protocol none."""
    cycle.waiting_for_100_continue = False
    send = cycle.send
    unsized = False

    async def send_to_http10(cycle: Any, message: dict[str, Any]) -> None:
        nonlocal unsized
        if message["type"] == "http.response.start":
            unsized = (cycle.scope["method"] != "HEAD" and message["status"] not in (204, 304)
                       and not any(k.lower() in (b"content-length", b"transfer-encoding")
                                   for k, _ in message.get("headers", ())))
            if unsized:
                cycle.keep_alive = False  # (its answer says so, and the connection closes after its last byte)
                cycle.chunked_encoding = False
        elif unsized:
            # uvicorn counts the body down from a Content-Length: each piece is what is left.
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    # (read by run_asgi once it runs, after this.) A method of the cycle, as uvicorn's own:
    # connections.abort_connection and unsent_bytes find the connection as its __self__'s
    # transport (a plain function had none: an HTTP/1.0 reader too slow was never cut off).
    cycle.send = types.MethodType(send_to_http10, cycle)


# A chunk's size line as llhttp reads it: hex digits (any leading zeros, at most 64 bits
# of value), then extensions, each a token name and perhaps "=" and a token or a quoted
# string (either of the two may be empty, not both); no whitespace anywhere (RFC 9112
# 7.1.1 allows some around ";" and "=", which llhttp refuses; h11 took anything after the
# first ";").
_TOKEN_CHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXT_VALUE = rb"=(?:%s*|%s)" % (_TOKEN_CHAR, _QUOTED)
_CHUNK_LINE = re.compile(rb"(?P<size>[0-9A-Fa-f]+)(?:;(?:%s+(?:%s)?|%s))*\r\n" % (_TOKEN_CHAR, _EXT_VALUE, _EXT_VALUE))
_BARE_LF = re.compile(rb"(?<!\r)\n")
# A control character in a field's value (RFC 9110 5.5: visible characters, spaces and
# tabs, and obs-text), which llhttp refuses; h11 refuses only NUL and what Python's regex
# calls whitespace, and read the rest (0x01-0x08, 0x0e-0x1f, DEL) into the value. (A CR is
# h11's to refuse: it does.)
_VALUE_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_LINE = re.compile(rb"\n\r?\n")  # (where h11 ends a head)
_CODINGS_LINE = re.compile(rb"(?im)^(transfer-encoding:[ \t]*)([^\r\n]*?)(?=[ \t]*\r?$)")
_EMPTY_FIRST_CODING = re.compile(rb"(?im)^transfer-encoding:[ \t]*,")
_HTTP1 = (b"HTTP/1.1", b"HTTP/1.0")
# The methods llhttp reads in an HTTP/1 request (httptools 0.9; CONNECT and PRI it reads
# otherwise): any other token (a lower-case "post", "FOO") it refuses, 400, where h11
# passed it to the app, which answered 405.
_LLHTTP_METHODS = frozenset(b"""DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH
    SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH
    PURGE MKCALENDAR LINK UNLINK SOURCE QUERY PRI""".split())


def _head_fault(head: bytes, trailers: bool) -> str | ServiceError | None:
    """What llhttp refuses and h11 reads in a whole head (or trailer section), its blank
    line included, in words (llhttp's where it has some), or None; or the error the app
    answers where llhttp passes what h11 refuses (a transfer coding before chunked, 501)."""
    if _BARE_LF.search(head) is not None:
        return "a line ends in a bare LF: lines end in CRLF (RFC 9112 2.2)"
    lines = head.split(b"\r\n")
    version = b""
    if not trailers:
        if lines[0].partition(b" ")[0] not in _LLHTTP_METHODS:
            return "Invalid method encountered"
        version = lines[0].rpartition(b" ")[2]
        if version not in _HTTP1:
            return (f"{(version or b'no version').decode('latin-1')[:20]} in a request line framed as HTTP/1: this "
                    "server speaks HTTP/1.1 and HTTP/1.0")
        lines = lines[1:]
    lengths = hosts = 0
    codings: list[bytes] = []
    trailing_comma = False
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            return "Unexpected whitespace after header value"  # (a folded line: header_fault names it)
        name, _, value = line.partition(b":")
        if _VALUE_CONTROL.search(value) is not None:
            return "Invalid header value char"  # (llhttp's words; connections.header_fault names the field)
        name = name.lower()
        fields.append((name, value))
        hosts += name == b"host"
        if name == b"content-length":
            if trailers:
                return "a trailer field cannot frame the body: Content-Length in the trailer section"
            lengths += 1
            if lengths > 1:
                return "Duplicate Content-Length"
            if b"," in value:
                return "Invalid character in Content-Length"
        elif name == b"transfer-encoding":
            if trailers:
                return "a trailer field cannot frame the body: Transfer-Encoding in the trailer section"
            # (an empty element is none, RFC 9110 5.6.1: ", chunked" is chunked, as llhttp and
            # the middleware read it; it was h11's 501 here. llhttp refuses one at the end.)
            codings.extend(c.strip().lower() for c in value.split(b",") if c.strip())
            trailing_comma = trailing_comma or value.rstrip().endswith(b",")
    if version == b"HTTP/1.1" and hosts != 1:
        return hosts_fault(hosts)  # (the middleware's answer under httptools)
    if codings and not lengths and version == b"HTTP/1.1":
        # llhttp's words where it refuses a request's transfer codings (RFC 9112 6.3: chunked
        # not last is a 400), h11's were "Invalid HTTP request received"
        if codings[-1] != b"chunked" and b"chunked" not in codings:
            return "Request has invalid `Transfer-Encoding`"
        if codings[-1] != b"chunked" or codings.count(b"chunked") > 1 or trailing_comma:
            return "Invalid `Transfer-Encoding` header value"
        if len(codings) > 1:
            # (llhttp passes "gzip, chunked" to the app, whose answer is 501; h11 refused it 400)
            return UnsupportedTransferCoding(UNSUPPORTED_CODING)
    if not trailers and has_body(fields) and any(n == b"upgrade" for n, _ in fields) and any(
            t.strip().lower() == b"upgrade" for n, v in fields if n == b"connection" for t in v.split(b",")):
        return UPGRADE_WITH_BODY  # (h11 read the body and kept the connection; llhttp cannot)
    return None


# An absolute-form target (RFC 9112 3.2.2, which a server must accept): llhttp reads its
# path and query, h11 gave the whole URL as the path (404).
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(?P<path>/[^#]*)(?:#.*)?")


def _origin_form(target: bytes) -> bytes | None:
    """A request target as uvicorn's httptools protocol reads it: a path and query, a
    fragment dropped (no client sends one; llhttp drops it); None where llhttp refuses it
    (no path: an authority-form target, one without its "/")."""
    if target[:1] == b"/" or target == b"*":
        return target.partition(b"#")[0]
    match = _ABSOLUTE.fullmatch(target)
    return match["path"] if match is not None else None


# Each chunk of a chunked body costs a front end a parser callback and a copy of the body
# not yet read (uvicorn's ``body += chunk``), whatever its size: two clients sending
# 1-byte chunks as fast as they could (6 bytes of framing a byte) took another client's
# median latency from 15 ms to 2.7 s. Past FEW_CHUNKS chunks a body's chunks must average
# MIN_CHUNK_BYTES (connections.py holds a body's pieces, which see none of this, to the same).
FEW_CHUNKS = 1024
MIN_CHUNK_BYTES = 64


def tiny_chunks(chunks: int, nbytes: int) -> ServiceError:
    """The 408 of a chunked body whose ``chunks`` average under MIN_CHUNK_BYTES."""
    return RequestTimeout(f"the body trickled: {nbytes} bytes in {chunks} chunks; past {FEW_CHUNKS} chunks they must "
                          f"average at least {MIN_CHUNK_BYTES} bytes (send it in larger chunks)")


def strict_h11_buffer(conn: Any, on_fault: Callable[[str | ServiceError], None], limit: int) -> None:
    """Give h11's connection ``conn`` a :class:`StrictReceiveBuffer` (before it has read
    anything); ``on_fault`` is told why it refuses a request (a reason for a 400, or the
    error to answer), before h11 raises. ``limit``: the most bytes a head, or the chunk
    framing and trailers between two pieces of a body, may hold (431 past it)."""
    if type(getattr(conn, "_receive_buffer", None)) is ReceiveBuffer:  # (an h11 whose insides differ: left as it is)
        conn._receive_buffer = StrictReceiveBuffer(conn, on_fault, limit)
        # h11's own limit on an unfinished head or line (uvicorn's 16 KiB), reached first,
        # was its 400 "Invalid HTTP request received" for a head of 16 to 32 KiB come in
        # pieces (httptools: 200), or one past 32 KiB (431), and for trailers of 16 KiB: the
        # buffer's limit above is the one met, h11's never.
        conn._max_incomplete_event_size = limit


class StrictReceiveBuffer(ReceiveBuffer):
    """h11's receive buffer, refusing what llhttp refuses (above) as h11 reads it."""

    def __init__(self, conn: Any, on_fault: Callable[[str | ServiceError], None], limit: int) -> None:
        super().__init__()
        self._conn = conn
        self._on_fault = on_fault
        self._limit = limit
        self._chunks = 0  # chunk size lines of the body being read ...
        self._body_bytes = 0  # ... and its bytes (with each chunk's CRLF)

    def maybe_extract_at_most(self, count: int) -> Any:
        """Body bytes (and each chunk's CRLF)."""
        data = super().maybe_extract_at_most(count)
        if data is not None:
            self._body_bytes += len(data)
        return data

    def _refuse(self, reason: str | ServiceError) -> None:
        self._on_fault(reason)
        raise h11.RemoteProtocolError(str(reason))

    def maybe_extract_lines(self) -> Any:
        """A head (the client idle), or a chunked body's trailer section."""
        data = self._data
        trailers = self._conn.their_state is not h11.IDLE
        if not trailers and data[:2] == b"\r\n":
            end = 0
            while data[end:end + 2] == b"\r\n":  # empty lines before a request line are skipped
                end += 2
            self._extract(end)
        if data[:1] == b"\n":
            self._refuse("a line ends in a bare LF: lines end in CRLF (RFC 9112 2.2)")
        if data[:2] != b"\r\n":  # (else an empty trailer section, which h11 reads as it is)
            match = _BLANK_LINE.search(data, self._multiple_lines_search)
            if match is None:
                if len(data) > self._limit:  # (a head's bytes are counted before this, connections.py: the same 431)
                    self._refuse(framing_too_large(self._limit) if trailers else head_too_large(self._limit))
                self._multiple_lines_search = max(0, len(data) - 2)
                return None
            fault = _head_fault(bytes(data[:match.end()]), trailers)
            if fault is not None:
                self._refuse(fault)
            if not trailers:
                self._chunks = self._body_bytes = 0  # (a new request)
                self._codings(match.end())
                self._request_line(data.find(b"\r\n"))
        return super().maybe_extract_lines()

    def _codings(self, end: int) -> None:
        """A head's Transfer-Encoding values without their empty elements (RFC 9110 5.6.1:
        ignored), for h11 to read: it refused ``Transfer-Encoding: ,chunked`` (400), which
        llhttp reads as chunked, the framing a proxy in front may read too."""
        head = bytes(self._data[:end])
        if b",," not in head and _EMPTY_FIRST_CODING.search(head) is None:
            return
        written = _CODINGS_LINE.sub(lambda m: m[1] + b", ".join(c.strip() for c in m[2].split(b",") if c.strip()), head)
        if written != head:
            self._data[:end] = written
            self._multiple_lines_search = 0  # (the blank line moved)

    def _request_line(self, end: int) -> None:
        """The request line as llhttp reads it, for h11 to read: its target in
        origin-form, and one space between its parts (llhttp reads several)."""
        line = bytes(self._data[:end])
        parts = [p for p in line.split(b" ") if p]
        if len(parts) != 3:
            return  # (h11 refuses it, as llhttp does)
        origin = _origin_form(parts[1])
        if origin is None:
            self._refuse(f"the request target {parts[1][:60].decode('latin-1')!r} is no path (origin-form) nor URL "
                         "(absolute-form) (RFC 9112 3.2)")
        written = b" ".join((parts[0], origin, parts[2]))
        if written != line:
            self._data[:end] = written
            self._multiple_lines_search = 0  # (the blank line moved)

    def is_next_line_obviously_invalid_request_line(self) -> bool:
        return self._data != b"\r" and super().is_next_line_obviously_invalid_request_line()  # (a CRLF half in)

    def maybe_extract_next_line(self) -> Any:
        """A chunk's size line (h11 reads no other line alone)."""
        start = max(0, self._next_line_search - 1)
        line = super().maybe_extract_next_line()
        if line is None:
            if self._data.find(b"\n", start) >= 0:
                self._refuse("a chunk size line ends in a bare LF: lines end in CRLF (RFC 9112 2.2)")
            if len(self._data) > self._limit:
                self._refuse(framing_too_large(self._limit))
            return None
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            self._refuse("Invalid character in chunk size or its extensions")
        size = match["size"].lstrip(b"0") or b"0"
        if len(size) > 16:
            self._refuse("Chunk size overflow")
        self._chunks += 1
        if self._chunks > FEW_CHUNKS and self._body_bytes < MIN_CHUNK_BYTES * self._chunks:
            self._refuse(tiny_chunks(self._chunks, self._body_bytes))
        return bytearray(size + b"\r\n")  # (h11 reads at most 20 digits, and drops extensions)
