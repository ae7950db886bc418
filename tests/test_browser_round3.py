"""A real browser as the outside testers use one, round 3: pages of other origins.

One API server without API keys (so that nothing but the server's own rules stands
between a page and a computation), CORS_ORIGINS naming one page origin, and one
headless Chromium for the module:

* a page of the allowed origin calls with credentials (``credentials: "include"``),
  reads errors as problem+json with their headers, and many parallel calls share
  kept-alive connections;
* a page of an origin not allowed makes the browser send every request it can send
  without a preflight (fetch in cors mode, HEAD, form posts of each encoding, a frame):
  none is computed (the metrics say so), none readable;
* over plain HTTP: the preflight's cache lifetime, and credentials never with ``*``.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tests._cdp import Chromium, chromium_binary
from tests._client_support import real_app, serve

SIN = "/v1/functions/sin/jacobian"
SPARSITY = "/v1/functions/lorenz96/sparsity?shapes=8"


@pytest.fixture(scope="module")
def pages():
    """Two page servers: two origins (127.0.0.1 on two ports), the first allowed."""
    async def page(request):
        return HTMLResponse("<!doctype html><html><head><meta charset='utf-8'></head><body>page</body></html>")

    site = Starlette(routes=[Route("/", page)])
    with serve(site) as allowed, serve(site) as other:
        yield allowed, other


@pytest.fixture(scope="module")
def api(pages):
    app = real_app(functions="jacobian_service.examples", cors_origins=pages[0], max_request_bytes=1 << 20)
    with serve(app, ready_path="/readyz") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


def _open(browser: Chromium, url: str) -> None:
    browser.goto(url + "/")
    browser.wait_for("document.body && document.body.textContent === 'page'")


def _counted(api: str, endpoint: str, function: str, status: str, code: str) -> float:
    text = httpx.get(api + "/metrics", timeout=10).text
    found = re.search(r'^jacobian_service_requests_total\{code="' + code + r'",endpoint="' + endpoint
                      + r'",function="' + function + r'",status="' + status + r'"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _wait(done, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- plain HTTP


def test_preflights_are_cached_as_long_as_chromium_keeps_them(api, pages):
    """Access-Control-Max-Age was Starlette's 600 s: a page working for longer asked a
    preflight again for each URL (each function, endpoint and query string) every 10
    minutes. Now 7200 s, Chromium's cap."""
    r = httpx.options(api + SIN, timeout=10, headers={"Origin": pages[0], "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200 and r.headers["access-control-max-age"] == "7200"


def test_credentials_go_to_the_origins_named_and_never_with_a_star():
    """A browser reads a credentialed answer only with Access-Control-Allow-Credentials:
    true beside the page's own origin. Under ``*`` the answer stays ``*`` and grants no
    credentials (echoing any origin would let every site read answers with the user's
    cookies); an origin named beside ``*`` gets them, by name, and so does its preflight."""
    client = TestClient(real_app(functions="jacobian_service.examples", cors_origins="*, http://named.example"))
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for origin, allow, credentials in [("http://named.example", "http://named.example", "true"),
                                       ("http://any.example", "*", None)]:
        preflight = client.options(SIN, headers={**asked, "Origin": origin})
        answer = client.get("/healthz", headers={"Origin": origin, "Cookie": "session=1"})
        for r in (preflight, answer):
            assert r.status_code == 200, r.text
            assert r.headers["access-control-allow-origin"] == allow
            assert r.headers.get("access-control-allow-credentials") == credentials
            assert "origin" in r.headers["vary"].lower()


def test_a_page_of_another_site_is_refused_by_name_without_cors_origins():
    """Without CORS_ORIGINS no page of another site may have a Jacobian computed; the
    403 says why (a page of this server's own origin, and clients that are no browser,
    are served)."""
    client = TestClient(real_app(functions="jacobian_service.examples"))
    r = client.get(SPARSITY, headers={"Origin": "http://elsewhere.example", "Sec-Fetch-Site": "cross-site",
                                      "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"})
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == ("a page of the origin 'http://elsewhere.example' may not call this: CORS_ORIGINS is "
                                  "empty (no page of another site may call the API)")
    framed = client.get(SPARSITY, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                           "Sec-Fetch-Dest": "iframe"})
    assert framed.status_code == 403
    assert framed.json()["detail"] == ("a page of another site may open this only as a page of its own (a link "
                                       "followed), not load it into itself (Sec-Fetch-Dest: 'iframe'); or fetch it "
                                       "through CORS")


def test_a_page_opened_from_a_file_is_told_what_to_do():
    """A page opened from a file (a tester's saved HTML page) sends Origin: null. Its
    refused preflight said "the origin 'null' is not among CORS_ORIGINS", and
    CORS_ORIGINS=null then stopped start-up with "is not an origin: write '*' or
    scheme://host[:port]". The preflight, the 403 of a request sent without one, and
    the setting now say why null cannot be named and what to do instead."""
    from pydantic import ValidationError

    from jacobian_service.settings import NULL_ORIGIN_HINT, Settings

    assert "file://" in NULL_ORIGIN_HINT and "'*'" in NULL_ORIGIN_HINT
    client = TestClient(real_app(functions="jacobian_service.examples", cors_origins="http://named.example"))
    r = client.options(SIN, headers={"Origin": "null", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == "CORS preflight refused: " + NULL_ORIGIN_HINT
    sent = client.get(SPARSITY, headers={"Origin": "null", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"})
    assert sent.status_code == 403 and sent.json()["detail"] == "a page of the origin 'null' may not call this: " + NULL_ORIGIN_HINT
    with pytest.raises(ValidationError) as refused:
        Settings(cors_origins="http://named.example, null")
    assert "CORS_ORIGINS entry 'null': " + NULL_ORIGIN_HINT in str(refused.value)


def test_the_icon_browsers_ask_for_by_themselves_is_served_openly():
    """A browser asks for /favicon.ico beside every page that names no icon (a JSON
    answer opened, the 404 at /): each was a 404 in the access log and the metrics, and
    with API keys a 401 (one "unauthorized" per page a user opened). Now the pages'
    icon, open as the docs files are, revalidated by its ETag."""
    from jacobian_service.docs_ui import _asset_file

    client = TestClient(real_app(functions="jacobian_service.examples", api_keys="k1"))
    for method in ("GET", "HEAD"):
        r = client.request(method, "/favicon.ico")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert r.headers["etag"] == f'"{_asset_file("favicon.png")[1]}"'
    assert client.get("/favicon.ico").content == _asset_file("favicon.png")[0]
    again = client.get("/favicon.ico", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/v1/info").status_code == 401  # the API keeps its key


# ---------------------------------------------------------------- Chromium


def test_a_page_of_the_allowed_origin_calls_with_credentials_and_reads_errors(api, pages, browser):
    """fetch(..., {credentials: "include"}) from the allowed origin (a proxy's sign-in
    cookie, axios' withCredentials) failed every call with "Failed to fetch": the
    preflight and the answer lacked Access-Control-Allow-Credentials. Now the Jacobian
    is read and equals torch.func's; a 413 and a 406 are read as problem+json with their
    X-Request-ID; twelve calls at once (Chromium opens at most 6 connections to a
    host) all answer, over kept-alive connections."""
    _open(browser, pages[0])
    browser.events.clear()
    got = browser.eval(f"""(async () => {{
      const api = {json.dumps(api)}, out = {{}}, json = {{'Content-Type': 'application/json'}};
      document.cookie = 'session=signed-in; SameSite=Lax';  // as a sign-in proxy's cookie
      const read = async (r) => ({{status: r.status, type: r.headers.get('content-type'),
                                   id: r.headers.get('x-request-id'), body: await r.json()}});
      const call = (path, init) => fetch(api + path, {{credentials: 'include', ...init}}).then(read, e => String(e));
      out.jacobian = await call('{SIN}', {{method: 'POST', headers: json,
                                          body: JSON.stringify({{inputs: [[0.5, 1.0]]}})}});
      out.sparsity = await call('{SPARSITY}', {{}});
      out.large = await call('{SIN}', {{method: 'POST', headers: json, body: new Uint8Array(2 << 20).fill(32)}});
      out.npy = await call('/v1/functions/polar/jacobian', {{method: 'POST',
        headers: {{...json, Accept: 'application/x-npy'}}, body: JSON.stringify({{inputs: [[1.0], [0.5]]}})}});
      out.parallel = await Promise.all(Array.from({{length: 12}}, (_, i) => call('{SIN}', {{method: 'POST',
        headers: json, body: JSON.stringify({{inputs: [[i / 12]]}})}}).then(r => r.body ? r.body.jacobian.data[0][0] : r)));
      return out;
    }})()""", timeout_s=120)

    jacobian = got["jacobian"]
    assert isinstance(jacobian, dict), (got, browser.messages()[-5:])
    assert jacobian["status"] == 200 and jacobian["type"] == "application/json"
    want = torch.func.jacrev(torch.sin)(torch.tensor([0.5, 1.0])).numpy()
    np.testing.assert_allclose(np.float32(jacobian["body"]["jacobian"]["data"]), want, rtol=1e-6)
    assert got["sparsity"]["status"] == 200 and got["sparsity"]["body"]["function"] == "lorenz96"

    for name, status, code in [("large", 413, "payload_too_large"), ("npy", 406, "not_acceptable")]:
        problem = got[name]
        assert problem["status"] == status and problem["type"] == "application/problem+json", (name, problem)
        assert problem["body"]["code"] == code and problem["body"]["request_id"] == problem["id"], problem
    np.testing.assert_allclose(got["parallel"], np.cos(np.arange(12, dtype=np.float32) / 12), rtol=1e-6)

    # Kept alive: the twelve went over at most Chromium's six connections, reused (the
    # 413 closed its own: its body was left unread).
    answers = [e["params"]["response"] for e in browser.events if e["method"] == "Network.responseReceived"
               and e["params"].get("type") != "Preflight" and e["params"]["response"]["url"] == api + SIN
               and e["params"]["response"]["status"] == 200]
    assert len(answers) == 13
    parallel = answers[1:]
    assert len({a["connectionId"] for a in parallel}) <= 6
    assert sum(a["connectionReused"] for a in parallel) >= 6


def test_a_page_of_another_origin_gets_nothing_computed(api, pages, browser):
    """A page of an origin CORS_ORIGINS does not name can still have the browser send
    what needs no preflight: a GET or HEAD in cors mode (the answer hidden from it after
    the server computed it: .../sparsity ran the function's tracing), a form posted in
    each encoding, a frame. Each was served (sparsity 200s) or refused only by the body's
    type; now each computing endpoint refuses it first (403, counted), nothing runs, and
    the page reads nothing."""
    _open(browser, pages[1])
    before = {(e, f, s, c): _counted(api, e, f, s, c) for e, f, s, c in
              [("getSparsity", "lorenz96", "200", ""), ("jacobian", "sin", "200", ""),
               ("getSparsity", "lorenz96", "403", "forbidden"), ("jacobian", "sin", "403", "forbidden")]}
    got = browser.eval(f"""(async () => {{
      const api = {json.dumps(api)}, out = {{}};
      const settle = (p) => p.then(r => 'read ' + r.status, e => e.name);
      out.get = await settle(fetch(api + '{SPARSITY}'));
      out.head = await settle(fetch(api + '{SPARSITY}', {{method: 'HEAD'}}));
      out.text = await settle(fetch(api + '{SIN}', {{method: 'POST', headers: {{'Content-Type': 'text/plain'}},
                                                     body: '{{"inputs": [[0.5]]}}'}}));
      out.json = await settle(fetch(api + '{SIN}', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
                                                     body: '{{"inputs": [[0.5]]}}'}}));  // preflight refused
      const frame = (name) => {{
        const f = document.createElement('iframe'); f.name = name; document.body.append(f);
        return new Promise(resolve => f.addEventListener('load', () => resolve(name)));
      }};
      const loads = [];
      for (const enctype of ['application/x-www-form-urlencoded', 'multipart/form-data', 'text/plain']) {{
        const loaded = frame(enctype); loads.push(loaded);
        const form = document.createElement('form');
        Object.assign(form, {{method: 'post', action: api + '{SIN}', enctype, target: enctype}});
        const field = document.createElement('input');  // text/plain writes name=value: a JSON body
        Object.assign(field, {{name: '{{"inputs": [[0.5]], "pad": "', value: '"}}'}});
        form.append(field); document.body.append(form); form.submit();
      }}
      const framed = frame('sparsity'); loads.push(framed);
      document.querySelector('iframe[name=sparsity]').src = api + '{SPARSITY}';
      out.frames = await Promise.all(loads);
      return out;
    }})()""", timeout_s=120)
    assert got == {"get": "TypeError", "head": "TypeError", "text": "TypeError", "json": "TypeError",
                   "frames": ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain", "sparsity"]}

    # GET, HEAD, the frame; text/plain, three forms (the JSON post never left the browser).
    _wait(lambda: _counted(api, "getSparsity", "lorenz96", "403", "forbidden")
          == before[("getSparsity", "lorenz96", "403", "forbidden")] + 3
          and _counted(api, "jacobian", "sin", "403", "forbidden") == before[("jacobian", "sin", "403", "forbidden")] + 4)
    assert _counted(api, "getSparsity", "lorenz96", "200", "") == before[("getSparsity", "lorenz96", "200", "")]
    assert _counted(api, "jacobian", "sin", "200", "") == before[("jacobian", "sin", "200", "")]
    browser.goto("about:blank")  # off these servers before they stop
