"""A real browser as the outside testers use one, round 9.

One API server (CORS_ORIGINS naming one page origin; the app run by the
tests' uvicorn, which speaks WebSocket) and round 5's headless Chromium for the module:

* a page's ``jvp`` / ``hvp`` with tangents keyed by the parameters' names, as it names
  ``inputs`` and ``argnums``, answers torch.func's products;
* a page's ``new WebSocket(...)`` on the API reads the answer the same GET gets (a 405
  on a POST-only route), never a 500;
* an answer its client does not take (a page that awaits its answers' heads before it
  reads any body) is reset once the send clock has run out, never left to the kernel
  (the front end's connection, HeadWithBody, on loopback sockets).
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import socket
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch

from jacobian_service.connections import HeadWithBody
from tests._client_support import real_app, serve

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _console_errors, _on_page


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[str]:
    app = real_app(functions="jacobian_service.examples", cors_origins=page, workers=1,
                   engine_standby=False)
    with serve(app, ready_path="/readyz") as url:
        yield url


def test_a_page_sends_tangents_keyed_by_the_parameters_names(api, page, browser):
    """A page that names its inputs and argnums (``{"inputs": {"x": ..., "y": ...},
    "argnums": ["x", "y"]}``) writes its tangents the same way, ``{"x": tx, "y": ty}``:
    ``jvp`` read 422 "tangents: expected 2 entries", two entries given (only a list in
    argnums' order was taken), and so did ``hvp``. Each now answers torch.func's product
    (the object's key order does not matter; a stack of tangents per name with
    ``batched_vectors``, a pytree parameter's dict under its name), and keys that are not
    those names are a 422 naming both."""
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const call = (name, kind, body) => fetch({json.dumps(api)} + '/v1/functions/' + name + '/' + kind,
        {{method: 'POST', body: JSON.stringify(body), headers: {{'Content-Type': 'application/json'}}}}).then(async r => [r.status, await r.json()]);
      const inputs = {{x: [1, 2], y: [3, 4]}};
      return [
        await call('add_square', 'jvp', {{inputs, argnums: ['x', 'y'], tangents: {{y: [0, 1], x: [1, 0]}}}}),
        await call('add_square', 'jvp', {{inputs, argnums: ['x', 'y'], batched_vectors: true,
                                          tangents: {{x: [[1, 0], [0, 1]], y: [[0, 1], [0, 0]]}}}}),
        await call('add_square', 'jvp', {{inputs, argnums: 'y', tangents: {{y: [0.5, 1]}}}}),
        await call('dense_layer', 'jvp', {{inputs: {{params: {{w: [[1, 2], [3, 4]], b: [0, 0]}}, x: [0.1, 0.2]}},
          argnums: ['params', 'x'], tangents: {{x: [1, 0], params: {{w: [[0, 0], [0, 1]], b: [1, 1]}}}}}}),
        await call('add_square', 'hvp', {{inputs, argnums: ['x', 'y'], cotangents: [1, 1],
                                          tangents: {{x: [1, 0], y: [0, 1]}}}}),
        await call('add_square', 'jvp', {{inputs, argnums: ['x', 'y'], tangents: {{x: [1, 0], z: [0, 1]}}}}),
      ];
    }})()""")
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])

    def add_square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y ** 2

    def dense_layer(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(params["w"] @ x + params["b"])

    t = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    params = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.zeros(2)}
    tp = {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]]), "b": torch.ones(2)}
    stack = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    vjp_c = lambda x, y: torch.func.vjp(add_square, x, y)[1](torch.ones(2))  # noqa: E731 (c . H t: jvp of the vjp)
    want = [
        torch.func.jvp(add_square, (x, y), t)[1],
        torch.stack([torch.func.jvp(add_square, (x, y), (stack[0][i], stack[1][i]))[1] for i in range(2)]),
        torch.func.jvp(lambda y: add_square(x, y), (y,), (torch.tensor([0.5, 1.0]),))[1],
        torch.func.jvp(dense_layer, (params, torch.tensor([0.1, 0.2])), (tp, t[0]))[1],
        torch.func.jvp(vjp_c, (x, y), t)[1],
    ]
    for (status, answer), expected in zip(got, want):
        assert status == 200, answer
        value = answer.get("jvp", answer.get("hvp"))
        arrays = value if isinstance(value, list) else [value]
        expected = expected if isinstance(expected, tuple) else (expected,)
        assert len(arrays) == len(expected), answer
        for array, e in zip(arrays, expected):
            np.testing.assert_allclose(np.float32(array["data"]), e.numpy(), rtol=1e-6, atol=1e-7)
    status, problem = got[-1]
    assert (status, problem["code"], problem["detail"]) == (
        422, "invalid_input", "tangents: keys ['x', 'z'] are not the names of the parameters argnums names, "
        "['x', 'y']: send an object keyed by those, or a list in that order"), problem
    browser.goto("about:blank")


def test_a_websocket_on_the_api_reads_what_the_same_get_gets(api, page, browser):
    """The service has no WebSocket endpoint. Under an ASGI server that speaks WebSocket
    (uvicorn run by hand, the tests' own), the app was handed the handshake as a
    ``websocket`` scope, which its router asserted on: a page's ``new WebSocket(...)``
    read "Unexpected response code: 500" and the server logged a traceback. The
    handshake is now served as the GET it also is, as ``jacobian-service serve``
    (``ws="none"``) serves it: 405 on a POST-only route, 200 where a GET is answered
    (which no WebSocket can take; with API keys, a 401 first): the handshake fails
    cleanly, and no request is answered 500."""
    _on_page(browser, page)
    ws = api.replace("http://", "ws://")
    got = browser.eval(f"""(async () => {{
      const open = path => new Promise(done => {{
        const ws = new WebSocket({json.dumps(ws)} + path);
        ws.onopen = () => {{ ws.close(); done('open'); }};
        ws.onerror = () => done('error');
      }});
      return [await open('/v1/functions/sin/jacobian'), await open('/v1/functions'), await open('/healthz')];
    }})()""")
    assert got == ["error", "error", "error"], got
    refused = sorted(re.sub(r"^.*Unexpected response code: ", "", m) + " " + m.split("'")[1].split("/", 3)[3]
                     for m in _console_errors(browser) if "WebSocket connection" in m)
    assert refused == ["200 healthz", "200 v1/functions", "405 v1/functions/sin/jacobian"], _console_errors(browser)
    metrics = httpx.get(api + "/metrics", timeout=10).text
    assert re.findall(r'^jacobian_service_requests_total\{[^}]*status="500"\}.*$', metrics, re.MULTILINE) == []
    browser.goto("about:blank")


def test_an_answer_its_client_does_not_take_is_reset_not_left_to_the_kernel():
    """A page that awaits its answers' heads before it reads any body (``await
    Promise.all(urls.map(u => fetch(u)))``, then ``.arrayBuffer()``) takes none of them
    while it waits; Chromium stops reading the sockets. Eight such fetches of a 3.2 MB
    ``.npy`` stalled the page past three minutes (Chromium's six connections to the host
    held: docs/deploy.md tells pages how to read). The server's side of it: the answers
    went, the app was done, and the connection was closed (the keep-alive's end) or
    aborted (the send clock's cut-off of a stream, ``SendGuard``) with the answer's
    unsent bytes handed to the kernel, which kept each socket (FIN-WAIT-1, up to its
    4 MB send buffer) for as long as the client kept its window shut: seen past five
    minutes, the "aborted" stream's bytes all still readable, then an end of file, as
    if the answer had been whole. Now an answer not yet taken has the send clock
    (SEND_TIMEOUT_S plus its bytes at MIN_SEND_RATE_BYTES_PER_S) to be taken, then its
    connection is reset, and an abort is a reset: the kernel frees the socket at once,
    and the client is told (ECONNRESET). Here the front end's connection (HeadWithBody)
    on loopback sockets, to a client that reads nothing: 3 MB closed, then aborted."""
    size = 3 << 20

    async def told_reset(end: str) -> float:
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        class Answer(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = HeadWithBody(transport, loop, drain=(0.5, 8 << 20))  # (the clock: 0.5 s + 3 MB at 8 MB/s)
                conn.write(b"x" * size)
                getattr(conn, end)()
                ended.set_result(loop.time())

        server = await loop.create_server(Answer, "127.0.0.1", 0)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (a window that stays shut)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, server.sockets[0].getsockname())
            since = await ended
            # (SO_ERROR: the reset as it arrives, whatever the receive queue holds)
            while client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNRESET:
                assert loop.time() < since + 10, f"{end}: an answer not taken, never reset"
                await asyncio.sleep(0.02)
            return loop.time() - since
        finally:
            client.close()
            server.close()

    closed, aborted = asyncio.run(told_reset("close")), asyncio.run(told_reset("abort"))
    assert 0.5 <= closed < 5, closed  # the send clock's time to take it, then the reset
    assert aborted < 1, aborted  # at once


def test_a_closed_answers_last_bytes_are_looked_at_again_soon_then_less_often(monkeypatch):
    """The last bytes of any answer are unacknowledged for a round trip when its
    connection closes, so a close that waits for them to be taken must look again soon:
    at a fixed quarter second, a client reading to the end of file (an HTTP/1.0 unsized
    answer) waited that long for every close across a real network. First after 2 ms,
    doubling to a quarter second; closed once nothing is unsent (the loop and socket
    faked: what is scheduled, not how long it takes)."""
    from jacobian_service import connections

    unsent = [4096] * 9 + [0]  # (the close's own look, then one a wait)
    monkeypatch.setattr(connections, "_unsent", lambda transport: unsent.pop(0))

    class Loop:
        def __init__(self) -> None:
            self.later: list[tuple[float, object, tuple]] = []

        def time(self) -> float:
            return 0.0

        def call_later(self, delay, fn, *args):
            self.later.append((delay, fn, args))

    class Transport:
        closed = aborted = False

        def is_closing(self) -> bool:
            return self.closed or self.aborted

        def close(self) -> None:
            self.closed = True

        def abort(self) -> None:
            self.aborted = True

    loop, transport = Loop(), Transport()
    HeadWithBody(transport, loop, drain=(30.0, 32 << 10)).close()
    delays = []
    while loop.later:
        delay, fn, args = loop.later.pop()
        delays.append(delay)
        fn(*args)
    assert delays == [0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25], delays
    assert transport.closed and not transport.aborted
