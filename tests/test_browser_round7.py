"""A real browser as the outside testers use one, round 7.

One API server (an API key, CORS_ORIGINS naming one page origin) and round 5's headless
Chromium for the module:

* a page of the allowed origin that gzips its body (CompressionStream) reads the
  service's 415 and which codings it serves, where its preflight was refused;
* a preflight refused for a header or a method does not have the console blame the
  page's origin, which CORS_ORIGINS allows;
* /redoc leaves the console without an error;
* /docs: a key given to Authorize with a character a header cannot carry is named;
* an upload whose argnums names no parameter is refused before its body is sent;
* ROOT_PATH with a trailing slash is one prefix.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests._cdp import Chromium
from tests._client_support import real_app, serve

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)

SIN = "/v1/functions/sin/jacobian"


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[str]:
    app = real_app(functions="jacobian_service.examples", api_keys="k1", cors_origins=page)
    with serve(app, ready_path="/readyz") as url:
        yield url


def _on_page(browser: Chromium, page: str) -> None:
    browser.goto(page + "/")
    browser.wait_for("document.body && document.body.textContent === 'page'")
    browser.events.clear()


def _console_errors(browser: Chromium) -> list[str]:
    browser.eval("true")  # (the events sent meanwhile, read)
    return [m for m in browser.messages() if m.startswith(("error:", "exception:", "console.error:"))]


def test_a_page_that_gzips_its_body_reads_why_it_is_refused(api, page, browser):
    """A page of the allowed origin that gzips its JSON body (CompressionStream) and says
    so (Content-Encoding: gzip) read "TypeError: Failed to fetch": the preflight refused
    the header, so the service's 415, which says that no coding is served
    (Accept-Encoding: identity), never reached it. Now the page reads that 415 and its
    Accept-Encoding, and the same body sent as it is answers torch.func's Jacobian."""
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const text = JSON.stringify({{inputs: [[0.5, 1.0]]}});
      const gz = await new Response(new Blob([text]).stream().pipeThrough(new CompressionStream('gzip'))).arrayBuffer();
      const call = (body, more) => fetch({json.dumps(api + SIN)}, {{method: 'POST', body,
        headers: {{'Content-Type': 'application/json', Authorization: 'Bearer k1', ...more}}}})
        .then(async r => ({{status: r.status, type: r.headers.get('content-type'),
                            accepts: r.headers.get('accept-encoding'), body: await r.json()}}), e => String(e));
      return [await call(gz, {{'Content-Encoding': 'gzip'}}), await call(text, {{}})];
    }})()""")
    refused, plain = got
    assert isinstance(refused, dict), refused
    assert (refused["status"], refused["type"], refused["accepts"]) == (415, "application/problem+json", "identity")
    assert refused["body"]["code"] == "unsupported_media_type"
    assert refused["body"]["detail"] == "Content-Encoding 'gzip' is not supported; send the body as it is"
    assert plain["status"] == 200, plain
    want = torch.func.jacrev(torch.sin)(torch.tensor([0.5, 1.0])).numpy()
    np.testing.assert_allclose(np.float32(plain["body"]["jacobian"]["data"]), want, rtol=1e-6)
    assert [m for m in _console_errors(browser) if "CORS" in m] == []


def test_a_refused_preflight_does_not_blame_an_allowed_origin(api, page, browser):
    """A page of the allowed origin sending a header the service does not take, or a
    method it has nowhere (QUERY; PUT and PATCH pass to read their 405, round 18): the
    preflight is refused (the page reads "Failed to fetch", as CORS has it), but the console said "No 'Access-Control-Allow-Origin' header is
    present on the requested resource", sending the developer to CORS_ORIGINS, which
    names the origin: the refusal (a problem+json naming the header or method) had lost
    its Access-Control-Allow-Origin. It keeps it now: the console says the preflight
    was refused, and nothing of the origin."""
    _on_page(browser, page)
    for init in ("{method: 'POST', headers: {'Content-Type': 'application/json', 'X-Not-Taken': '1'}, body: '{}'}",
                 "{method: 'QUERY', headers: {'Content-Type': 'application/json'}, body: '{}'}"):
        browser.events.clear()
        got = browser.eval(f"fetch({json.dumps(api + SIN)}, {init}).then(r => r.status, e => String(e))")
        assert got == "TypeError: Failed to fetch", got
        cors = [m for m in _console_errors(browser) if "CORS policy" in m]
        assert len(cors) == 1 and "preflight" in cors[0], cors
        assert "Access-Control-Allow-Origin" not in cors[0], cors
    # Over HTTP: the refusal is still the problem naming what it refused, for the origin.
    r = httpx.options(api + SIN, headers={"Origin": page, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type, x-not-taken"}, timeout=10)
    assert (r.status_code, r.json()["code"]) == (400, "malformed_request"), r.text
    assert r.json()["detail"].startswith("CORS preflight refused: the request header 'x-not-taken' cannot be sent")
    assert (r.headers["access-control-allow-origin"], r.headers["access-control-allow-credentials"]) == (page, "true")


def _keyed(browser: Chromium, api: str, path: str) -> None:
    """``path`` (a docs page) opened with the key in the tab (as the page keeps it once asked)."""
    browser.goto(api + "/healthz")
    browser.wait_for("document.body && document.body.textContent.includes('ok')")
    browser.eval("sessionStorage.setItem('jacobian-service-api-key', 'k1'); true")
    browser.events.clear()
    browser.goto(api + path)


def test_redoc_leaves_the_console_without_an_error(api, browser):
    """ReDoc's bundle draws its maker's logo from cdn.redoc.ly in the sidebar, with no
    option to leave it out, and the page's CSP refused it: every /redoc opened showed
    "Loading the image 'https://cdn.redoc.ly/redoc/logo-mini.svg' violates the following
    Content Security Policy directive" as an error in the console. Our copy of the
    bundle names an empty image instead: no error, nothing asked of another host, the
    operations and the sidebar's link drawn."""
    _keyed(browser, api, "/redoc")
    browser.wait_for("document.querySelectorAll('.http-verb').length > 10", timeout_s=60)
    logo = browser.wait_for("document.querySelector('img[alt=\"redocly logo\"]')?.getAttribute('src')")
    assert _console_errors(browser) == []
    assert logo.startswith("data:image/svg+xml,"), logo
    assert "API docs by Redocly" in browser.eval("document.getElementById('redoc').textContent")
    assert [u for u in browser.requests() if not u.startswith((api + "/", "data:", f"blob:{api}/"))] == []
    browser.goto("about:blank")


# Swagger UI's Authorize dialog: Logout (the key the page was opened with), Close.
_LOGOUT = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (f, t = 30000) => { const end = Date.now() + t;
    while (Date.now() < end) { const v = f(); if (v) return v; await sleep(50); } return null; };
  document.querySelector('.auth-wrapper .authorize').click();
  (await until(() => [...document.querySelectorAll('.modal-ux .modal-btn')].find(b => b.textContent.trim() === 'Logout')))
    .click();
  (await until(() => document.querySelector('.modal-ux .modal-btn.btn-done'))).click();
  return true;
})"""


def test_a_key_given_to_authorize_that_a_header_cannot_carry_is_named(api, browser):
    """A key pasted into Swagger UI's Authorize dialog with a zero-width space copied
    along: Execute showed "TypeError: Failed to execute 'fetch' on 'Window': Failed to
    read the 'headers' property from 'RequestInit': String contains non ISO-8859-1 code
    point", naming neither the key nor the character, and the page's own call for vjp's
    body threw into the console (twice: on Try it out and on the function picked). Now
    Execute says that the key given to Authorize holds U+200B and what to do, and
    nothing is thrown."""
    from tests.test_browser_round2 import _AUTHORIZE, _EXECUTE, _OPEN

    _keyed(browser, api, "/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 5", timeout_s=60)
    assert browser.eval(f"{_LOGOUT}()", timeout_s=60)
    assert browser.eval(f"{_AUTHORIZE}('k1\\u200b')", timeout_s=60)
    shown = "[...document.querySelectorAll('.live-responses-table .response-col_description')].pop().innerText"
    vjp = "/v1/functions/{name}/vjp"
    assert browser.eval(f"{_OPEN}({json.dumps(vjp)}, 'post')")
    browser.eval(f"{_EXECUTE}({json.dumps(vjp)}, 'post', 'sin', null, null)", timeout_s=90)
    said = browser.eval(shown)
    assert "The key given to Authorize holds U+200B, which a header cannot carry" in said, said
    assert "Logout there and type the key again" in said, said
    assert _console_errors(browser) == []
    browser.goto("about:blank")


def _answer_to_head(url: str, head: str) -> bytes:
    """What the server answers a request's head alone (its body never sent)."""
    host, port = url.removeprefix("http://").split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head.encode())
        deadline = time.monotonic() + 10
        while b'"request_id"' not in got and time.monotonic() < deadline:
            piece = conn.recv(65536)
            if not piece:
                break
            got += piece
    return got


def test_an_upload_whose_argnums_names_no_parameter_is_refused_before_its_body(api, page, browser):
    """A page uploading an .npy with an argnums that names no parameter of the function
    (?argnums=y, ?argnums=7 for sin's one input) was told so only once its whole body
    had come and been parsed: a 16 MB upload of the wrong bytes read a 400 about the
    body (bad magic) instead of the 422 its URL had decided, and a right one waited for
    its whole upload. Now the head decides it, as it does the other options; so it does
    per-example dims an .npy's query gets wrong (in_dims without batched=true)."""
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const r = await fetch({json.dumps(api + SIN + "?argnums=y")}, {{method: 'POST', body: new Blob([new Uint8Array(16 << 20)]),
        headers: {{'Content-Type': 'application/x-npy', Authorization: 'Bearer k1'}}}});
      return {{status: r.status, body: await r.json()}};
    }})()""")
    assert (got["status"], got["body"]["code"]) == (422, "invalid_input"), got
    assert got["body"]["detail"] == "argnums: 'y' is not a parameter of 'sin'; it has ['x']"
    answer = _answer_to_head(api, f"POST {SIN}?argnums=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k1\r\n"
                                  "Content-Type: application/x-npy\r\nContent-Length: 67108864\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 422 ") and b"argnums: 7 is out of range for 'sin'" in answer, answer[:300]
    # So were per-example dims an .npy's query gets wrong: the body gives no options.
    answer = _answer_to_head(api, f"POST {SIN}?in_dims=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k1\r\n"
                                  "Content-Type: application/x-npy\r\nContent-Length: 67108864\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 422 ") and b"in_dims is for per-example requests" in answer, answer[:300]


def test_a_root_path_with_a_trailing_slash_is_one_prefix(builtins):
    """ROOT_PATH=/jacobian/ (as nginx's ``location /jacobian/`` reads) was written before
    every path as it was: the document's servers said /jacobian/, so the body /docs
    writes for vjp asked /jacobian//v1/functions/sin/evaluate, which a proxy that does
    not merge slashes (nginx with merge_slashes off) passed on as //v1/...: a 404, and
    Try it out of vjp a 422 (the 404's own hint read "the API is under
    /jacobian//v1/functions"). The prefix is now one, without its trailing slash; one
    that is no path stops start-up."""
    from jacobian_service.openapi import build_openapi
    from jacobian_service.routes import ROUTES
    from jacobian_service.settings import Settings

    settings = Settings(root_path="/jacobian/")  # (what serve hands uvicorn, and the document)
    assert settings.root_path == "/jacobian"
    assert build_openapi(ROUTES, builtins, settings.root_path)["servers"] == [{"url": "/jacobian"}]
    assert Settings(root_path="/").root_path == ""
    with pytest.raises(ValueError, match="root_path is a path prefix starting with '/'"):
        Settings(root_path="jacobian")
