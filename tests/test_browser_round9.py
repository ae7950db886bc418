"""A real browser as the outside testers use one, round 9.

One API server (CORS_ORIGINS naming one page origin; the app run by the
tests' uvicorn, which speaks WebSocket) and round 5's headless Chromium for the module:

* a page's ``jvp`` / ``hvp`` with tangents keyed by the parameters' names, as it names
  ``inputs`` and ``argnums``, answers torch.func's products;
* a page's ``new WebSocket(...)`` on the API reads the answer the same GET gets (a 405
  on a POST-only route), never a 500.
"""

from __future__ import annotations

import json
import re
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch

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
