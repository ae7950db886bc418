"""A real browser as the outside testers use one, round 12: what a page may keep of an
answer, and what it sends.

Round 10's API server (CORS_ORIGINS naming one page origin, an API key; the app run by
the tests' uvicorn) and round 5's headless Chromium for the module:

* a page (its service worker) keeping the answers it fetched in the Cache API, which
  honours ``Vary`` and not ``no-store``, and which takes no POST as a key: it kept a
  derivative's answer under its URL and, asked again with other inputs, was given the
  Jacobian of the first. Every answer to a POST (its derivatives' and its errors alike:
  what they say depends on the body, which no cache keys) now says ``Vary: *``, which
  the Cache API refuses to keep (a TypeError the page reads), and which tells any
  other cache that no request but this one is answered by it;
* the answers the connection writes below the app (a 431, a 400 for a head the parser
  cannot read) are about that connection's bytes, not the URL's: ``Vary: *`` too, in
  place of CORS' ``Origin`` (a raw socket to the connection layer: no browser needed);
* a page's WebSocket handshake (any page's: it asks no preflight) is served as the GET
  it also is, and writes no warning telling the operator to install a WebSocket library.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any, Iterator

import httpx
import pytest
import torch
import uvicorn

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _on_page
from .test_browser_round10 import api  # noqa: F401 (round 10's: the server, CORS_ORIGINS naming that page, a key)
from .test_connections import _read_to_close, _wait_for

KEY = {"Authorization": "Bearer k1"}
ORIGIN = "http://page.example"  # (the guarded connection layer's page)
SIN = "/v1/functions/sin/jacobian"


def _jacobian(x: list[float]) -> list[list[float]]:
    return torch.func.jacrev(torch.sin)(torch.tensor(x)).tolist()


_KEEP = """(async () => {
  const url = %s;
  const ask = x => fetch(url, {method: 'POST', body: JSON.stringify({inputs: [x]}),
    headers: {'Content-Type': 'application/json', Authorization: 'Bearer k1'}});
  const cache = await caches.open('posts');
  const first = await ask([0.5, 1.0]);
  let kept = 'kept';
  try { await cache.put(new Request(url), first.clone()); } catch (e) { kept = e.name + ': ' + e.message; }
  const reused = await cache.match(new Request(url));
  const second = reused || await ask([2.0, -1.0]);
  await caches.delete('posts');
  return {kept, reused: !!reused, first: (await first.json()).jacobian.data, second: (await second.json()).jacobian.data};
})()"""


def test_a_page_cannot_keep_a_jacobian_for_other_inputs(api, page, browser):
    """A page keeps what it fetches in the Cache API, by URL (the Cache API refuses a
    POST as a key, so a service worker that keeps POST answers keys them by a GET of the
    URL). The answer for x = [0.5, 1.0] was kept, and the page's call for x = [2.0, -1.0]
    was answered from it: the first Jacobian for the second inputs. Now the answer says
    ``Vary: *``, which nothing matches: a page of the API's own origin is refused the
    put (TypeError: it reads the header), a page of the allowed origin (to which ``Vary``
    is not exposed) has it kept and never matched; either way the second call goes to
    the service and is torch.func's Jacobian at its own inputs."""
    for where in (api + "/healthz", None):
        if where is None:
            _on_page(browser, page)
        else:
            browser.goto(where)
            browser.wait_for("document.body && document.body.textContent.includes('ok')")
        got = browser.eval(_KEEP % json.dumps(api + SIN))
        assert not got["reused"], (where, got)
        assert torch.allclose(torch.tensor(got["first"]), torch.tensor(_jacobian([0.5, 1.0])))
        assert torch.allclose(torch.tensor(got["second"]), torch.tensor(_jacobian([2.0, -1.0]))), (where, got)
        if where is not None:
            assert got["kept"].startswith("TypeError") and "Vary" in got["kept"], got
    browser.goto("about:blank")


def test_every_answer_to_a_post_varies_on_anything(api, page):
    """Over HTTP (no browser needed): every answer to a POST says ``Vary: *`` alone
    (RFC 9110 12.5.5: not beside the fields it covers), each format, its errors (the
    body's 400, Accept's 406, the key's 401 and 403, an unknown function's 404, a 405 of a
    path that takes no POST) and a page's call; the GET answers chosen by Accept keep
    ``Vary: Accept`` (beside ``Origin``), and a GET of one format ``Origin`` alone."""
    origin = {"Origin": page}
    with httpx.Client(base_url=api, headers=KEY, timeout=30) as http:
        calls = [
            ({"json": {"inputs": [[0.5]]}, "headers": {"Accept": "application/json"}}, 200),
            ({"json": {"inputs": [[0.5]]}, "headers": {"Accept": "application/x-npy"}}, 200),
            ({"json": {"inputs": [[0.5]]}, "headers": {"Accept": "application/x-npy", **origin}}, 200),
            ({"json": {"inputs": [[0.5]]}, "headers": {"Accept": "text/csv"}}, 406),
            ({"content": b"{", "headers": {"Content-Type": "application/json", **origin}}, 400),
            ({"json": {"inputs": [[0.5]]}, "headers": {"Authorization": "Bearer nope", **origin}}, 403),
        ]
        for kwargs, status in calls:
            r = http.post(SIN, **kwargs)
            assert (r.status_code, r.headers.get_list("vary")) == (status, ["*"]), (kwargs, r.headers)
        for path, status in [("/v1/functions/nope/jacobian", 404), ("/v1/functions", 405)]:
            r = http.post(path, json={"inputs": [[0.5]]}, headers=origin)
            assert (r.status_code, r.headers.get_list("vary")) == (status, ["*"]), (path, r.headers)
        r = httpx.post(api + SIN, json={"inputs": [[0.5]]}, headers=origin)  # (no key)
        assert (r.status_code, r.headers.get_list("vary")) == (401, ["*"]), r.headers
        r = http.get("/v1/functions/sin/sparsity?shapes=3", headers={"Accept": "application/x-npz", **origin})
        assert (r.status_code, r.headers["vary"]) == (200, "Accept, Origin")
        assert http.get("/v1/functions/sin").headers["vary"] == "Origin"  # (one format; CORS' answer per origin)


@pytest.fixture(scope="module")
def guarded() -> Iterator[int]:
    """The connection layer as ``serve`` runs it (guarded_protocol, no WebSocket: ws="none";
    CORS' headers for one page origin) in front of an app that answers 200: its port."""
    from jacobian_service.connections import guarded_protocol
    from jacobian_service.middleware import cors_answer_headers

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", ws="none",
                                           http=guarded_protocol(60.0, cors=cors_answer_headers((ORIGIN,)))))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: server.started, 10)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def _exchange(port: int, request: bytes) -> list[bytes]:
    """``request`` sent on a new connection, closed by its client once it is sent: the
    answer's head, line by line."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        return _read_to_close(s, 10).partition(b"\r\n\r\n")[0].split(b"\r\n")


def test_what_the_connection_answers_varies_on_anything(guarded):
    """The 431 (headers over the limit) and the 400 (a head the parser cannot read) that
    the connection writes itself, for a POST of a page of the allowed origin, said
    ``Vary: Origin`` (CORS'): a cache keeping answers by URL and Origin would give that
    error to the origin's next, good request of the URL. Now ``Vary: *`` alone, beside the
    CORS headers the page needs to read it."""
    post = b"POST /v1/functions/sin/jacobian HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\n" % ORIGIN.encode()
    for extra, status in [(b"X-Big: %s\r\n" % (b"a" * (40 << 10)), b"431"), (b"Bad Header: 1\r\n", b"400")]:
        head = _exchange(guarded, post + extra + b"Content-Length: 2\r\n\r\n{}")
        fields = [line.partition(b":") for line in head[1:]]
        assert head[0].split()[1] == status, head
        assert [v.strip() for k, _, v in fields if k.lower() == b"vary"] == [b"*"], head
        assert (b"access-control-allow-origin", b" " + ORIGIN.encode()) in [(k.lower(), v) for k, _, v in fields]


def test_a_431_finds_the_origin_after_a_url_or_header_line_of_any_size_a_browser_sends(guarded):
    """A page's GET whose query passed 64 KiB (Chromium sends URLs up to 2 MiB, its Origin
    after them), or one header line past it (the gateway passes 64 KiB lines), read
    "Failed to fetch": the connection kept the rest of the head it read for the Origin,
    at most twice the head limit, and the Origin past that was never seen: a 431 with no
    CORS headers. Now the rest is read, each long line dropped as it comes, up to
    connections.REFUSAL_READ_BYTES (the test below: its bounds), and what follows the
    head is never read as one of its lines."""
    origin = b"Origin: %s\r\n" % ORIGIN.encode()
    allowed = (b"access-control-allow-origin", b" " + ORIGIN.encode())
    for before in (b"GET /v1/functions?q=%s HTTP/1.1\r\nHost: t\r\n" % (b"a" * (1 << 20)),
                   b"GET /v1/functions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n" % (b"a" * (300 << 10))):
        head = _exchange(guarded, before + b"User-Agent: Mozilla/5.0\r\n" + origin + b"\r\n")
        assert head[0].split()[1] == b"431", head
        assert allowed in [(k.lower(), v) for k, _, v in (line.partition(b":") for line in head[1:])], head
    # What follows the head's end is never read as one of its lines.
    head = _exchange(guarded, b"POST / HTTP/1.1\r\nX-Big: %s\r\nContent-Length: 50\r\n\r\n%sxx"
                     % (b"a" * (300 << 10), origin))
    assert head[0].split()[1] == b"431", head
    assert not [line for line in head if line.lower().startswith(b"access-control-")], head


def test_the_origin_skim_of_a_refused_head_is_bounded():
    """The skim that reads a refused head's rest for its Origin (above) keeps no long line
    and looks at a browser's worth of lines: one piece at a time, each dropped."""
    from jacobian_service.connections import REFUSAL_LINE_BYTES, REFUSAL_LINES, REFUSAL_READ_BYTES, _OriginSkim

    origin = b"Origin: %s\r\n" % ORIGIN.encode()
    skim = _OriginSkim(b"rt of a request line\r\nOrig")  # (begins in a line: a part, skipped)
    for piece in (b"in: %s\r\nX-A: 1\r" % ORIGIN.encode(), b"\n", b"a" * 100_000, b"\r\n\r", b"\n", b"not read"):
        if skim.feed(piece):
            break
    assert (skim.origins, piece) == ([ORIGIN.encode()], b"\n")
    skim = _OriginSkim(b"Origin: http://part.example\r\n" + b"a: b\r\n" * REFUSAL_LINES)
    assert skim.feed(origin) and skim.origins == []  # (a line more than its bound)
    skim = _OriginSkim(b"\n")
    for _ in range(2 * REFUSAL_LINE_BYTES):
        skim.feed(b"a")
    assert len(skim.line) == 0 and not skim.feed(b"\r\n" + origin) and skim.origins == [ORIGIN.encode()]
    skim = _OriginSkim(b"\nOrigin: " + b"a" * REFUSAL_LINE_BYTES + b"\r\n")  # longer than any origin
    assert skim.origins == [] and not skim.feed(b"a" * (REFUSAL_READ_BYTES - skim.read - 1))
    assert skim.feed(b"a") and len(skim.line) == 0


def test_a_websocket_handshake_writes_no_warning(guarded):
    """A page's ``new WebSocket(...)`` (any page: a handshake asks no preflight), or curl's
    h2c upgrade, is served as the GET it also is; uvicorn logged two warnings for each,
    one telling the operator to install a WebSocket library. Now none: the request is in
    the access log as any other."""
    logger = logging.getLogger("uvicorn.error")
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for upgrade in (b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
                        b"dGhlIHNhbXBsZSBub25jZQ==\r\n", b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"):
            head = _exchange(guarded, b"GET /v1/functions HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\n"
                                      b"Connection: Upgrade\r\n%s\r\n" % (ORIGIN.encode(), upgrade))
            assert head[0].split()[1] == b"200", head
    finally:
        logger.removeHandler(handler)
    assert seen == [], seen
