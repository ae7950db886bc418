"""A real browser as the outside testers use one, round 10: OPTIONS and ``Allow``.

One API server (CORS_ORIGINS naming one page origin, an API key; the app run by the
tests' uvicorn) and round 5's headless Chromium for the module:

* a page's ``fetch(..., {method: 'OPTIONS'})`` (after its preflight) reads the methods
  the path takes, OPTIONS among them, where it read a 405 whose ``Allow`` left OPTIONS
  out; without the key, on a path the key guards, the 401 every method gets;
* on every path of the table (docs, metrics and probes included) the methods a page
  finds answered are those ``Allow`` names, HEAD wherever GET is;
* with no CORS origins configured, a plain OPTIONS is answered alike, and a keyed
  path's stays the 401 (httpx, in-process: no browser is needed to show it);
* ``OPTIONS *`` (no browser sends it; a socket) says what the server takes.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Iterator

import pytest

from tests._client_support import real_app, serve

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _on_page


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[str]:
    app = real_app(functions="jacobian_service.examples", cors_origins=page, api_keys="k1", workers=1,
                   engine_standby=False)
    with serve(app, ready_path="/readyz") as url:
        yield url


def _paths() -> dict[str, set[str]]:
    """Every path of the one routing table (the app's: its docs routes too), a function's
    name and a docs file put in, with the methods its routes name."""
    from jacobian_service.app import create_app
    from jacobian_service.settings import Settings

    paths: dict[str, set[str]] = {}
    for route in create_app(Settings(warmup=False, functions="jacobian_service.examples")).routes:
        url = route.path.replace("{name}", "sin").replace("{file}", "swagger-ui.css")
        paths.setdefault(url, set()).add(route.method)
    return paths


# (/metrics wants the key with keys set: METRICS_AUTH defaults to true)
_OPEN = {"/healthz", "/readyz", "/docs", "/redoc", "/docs-assets/swagger-ui.css", "/favicon.ico"}


def test_a_page_reads_what_a_path_takes_from_its_options(api, page, browser):
    """A page's ``fetch(url, {method: 'OPTIONS'})`` was a 405 (after a preflight that
    said OPTIONS may be sent) whose ``Allow`` did not name OPTIONS: the path refused the
    very method whose answer ``Allow`` is. Now a 204 naming what the path takes, OPTIONS
    and HEAD (wherever GET is) included, on every path; on a path the key guards, without
    the key, the same 401 a GET or POST gets (nothing of the path told), with it the 204."""
    paths = _paths()
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const ask = (path, more) => fetch({json.dumps(api)} + path, {{method: 'OPTIONS', headers: more}})
        .then(async r => [r.status, r.headers.get('allow'), r.headers.get('www-authenticate'), await r.text()],
              e => String(e));
      const out = {{}};
      for (const path of {json.dumps(sorted(paths))}) {{
        out[path] = [await ask(path, {{}}), await ask(path, {{Authorization: 'Bearer k1'}})];
      }}
      return out;
    }})()""")
    for path, methods in paths.items():
        allowed = methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
        plain, keyed = got[path]
        assert keyed == [204, ", ".join(sorted(allowed)), None, ""], (path, keyed)
        if path in _OPEN:
            assert plain == keyed, (path, plain)
        else:
            status, allow, challenge, body = plain
            assert (status, allow, challenge) == (401, None, "Bearer"), (path, plain)
            assert json.loads(body)["code"] == "unauthorized", (path, body)
    browser.goto("about:blank")


def test_every_path_serves_exactly_the_methods_its_allow_names(api, page, browser):
    """On every path of the table, the docs' and /metrics' included, a page tries each
    method it may send here (GET, HEAD, POST, DELETE, OPTIONS): those answered other than
    405 are the methods the 405's ``Allow`` names, which the page reads (it is exposed),
    no more and no fewer."""
    paths = _paths()
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const out = {{}};
      for (const path of {json.dumps(sorted(paths))}) {{
        out[path] = {{}};
        for (const method of ['GET', 'HEAD', 'POST', 'DELETE', 'OPTIONS']) {{
          out[path][method] = await fetch({json.dumps(api)} + path,
              {{method, headers: {{Authorization: 'Bearer k1', 'Content-Type': 'application/json'}},
                body: method === 'POST' ? '{{}}' : undefined}})
            .then(r => [r.status, r.headers.get('allow')], e => String(e));
        }}
      }}
      return out;
    }})()""")
    for path, answers in got.items():
        refused = {m: a for m, a in answers.items() if a[0] == 405}
        assert refused, (path, answers)  # (every path takes some of these and not others)
        allows = {a[1] for a in refused.values()}
        assert len(allows) == 1, (path, refused)
        served = {m for m, a in answers.items() if a[0] != 405}
        assert set(allows.pop().split(", ")) == served, (path, answers)
    browser.goto("about:blank")


@pytest.mark.parametrize("keys", [False, True])
def test_a_plain_options_without_cors_origins(make_client, keys):
    """No CORS_ORIGINS (no CORS middleware in front): a plain OPTIONS is the router's
    204 with ``Allow`` on an open path and, without keys, on every path; with keys a
    guarded path without one is the 401 its GET gets (no ``Allow``: what the path takes
    is not told), with one the 204. It counts apart from the endpoint's calls
    (code "options", as a preflight's "preflight")."""
    c = make_client(**({"api_keys": "k1"} if keys else {}))
    key = {"Authorization": "Bearer k1"}
    r = c.options("/v1/functions/sin/jacobian")
    if keys:
        assert (r.status_code, r.json()["code"], "allow" in r.headers) == (401, "unauthorized", False), r.text
        assert r.json()["detail"] == c.get("/v1/functions/sin/jacobian").json()["detail"]
        r = c.options("/v1/functions/sin/jacobian", headers=key)
    assert (r.status_code, r.headers["allow"], r.content) == (204, "OPTIONS, POST", b""), r.text
    r = c.options("/metrics", headers=key)  # (behind the key with keys set, as its GET)
    assert (r.status_code, r.headers["allow"]) == (204, "GET, HEAD, OPTIONS")
    r = c.get("/v1/functions/sin/jacobian", headers=key)
    assert (r.status_code, r.headers["allow"]) == (405, "OPTIONS, POST")
    assert r.json()["detail"] == "GET is not allowed here; allowed: OPTIONS, POST"
    text = c.get("/metrics", headers=key).text
    assert re.search(r'^jacobian_service_requests_total\{code="options",endpoint="jacobian",function="sin",'
                     r'status="204"\} 1\.0$', text, re.M), text
    assert c.options("/v1/nowhere", headers=key).status_code == 404


def _raw(url: str, request: bytes) -> bytes:
    """One request as sent (httpx cannot send the asterisk form), its answer read to the close."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_options_asterisk_says_what_the_server_takes(api):
    """``OPTIONS * HTTP/1.1`` asks of the server, not of one path (RFC 9110 9.3.7): it was
    a 404 "no route for OPTIONS *". Now a 204 whose ``Allow`` is every method some path
    takes; past the key check as every request (without the key, a 401)."""
    ask = b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n"
    head, _, body = _raw(api, ask % b"Authorization: Bearer k1\r\n").partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert (lines[0], body) == ("HTTP/1.1 204 No Content", b""), head
    assert "allow: DELETE, GET, HEAD, OPTIONS, POST" in lines, head
    refused = _raw(api, ask % b"")
    assert refused.startswith(b"HTTP/1.1 401 ") and b'"code":"unauthorized"' in refused, refused
