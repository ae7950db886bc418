"""A real browser as the outside testers use one, round 4.

One API server run as ``serve`` runs it (uvicorn under server.py's configuration: the
guarded protocol that answers oversized and slow heads itself), without API keys,
CORS_ORIGINS naming one page origin, and one headless Chromium for the module:

* errors written below the app (431, 408, 400, the connection cap's 503) carry the CORS
  headers the app gives its own answers, so a page of an allowed origin reads them;
* tracing headers that browser instrumentation adds pass the preflight;
* browsers without Fetch Metadata (Safari < 16.4, Firefox < 90): nothing they send
  without a preflight computes; nor does a beacon or a keepalive fetch of another site;
* every answer says ``nosniff`` and ``no-store``; a dashboard page polls the probes;
* /docs with a key, by keyboard alone, console clean; the docs behind a real nginx
  that strips ROOT_PATH (served under PREFIX, and at / as the proxy passes it on).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from jacobian_client import wire
from tests._cdp import Chromium, chromium_binary
from tests._client_support import free_port, real_app, serve
from tests.test_connections import _read_to_close, _wait_for

SIN = "/v1/functions/sin/jacobian"
PREFIX = "/jacobian"
CORS_KEYS = ("access-control-allow-origin", "access-control-allow-credentials", "access-control-expose-headers")


@contextlib.contextmanager
def _served_as_serve_does(app: Any) -> Iterator[str]:
    """``app`` under uvicorn configured as ``serve`` configures it (server.py), on a thread."""
    from jacobian_service.server import _uvicorn_config

    config = _uvicorn_config(app, app.settings)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{app.settings.port}"
    try:
        assert _wait_for(lambda: server.started, 30)
        assert _wait_for(lambda: httpx.get(url + "/readyz", timeout=5).status_code == 200, 30)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


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
    app = real_app(functions="jacobian_service.examples", cors_origins=pages[0], host="127.0.0.1", port=free_port(),
                   header_timeout_s=1, root_path=PREFIX,
                   stream_threshold_bytes=1 << 16)  # (served at / too: the proxy strips the prefix)
    with _served_as_serve_does(app) as url:
        yield url


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module (a client per call costs its set-up each time)."""
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


def _open(browser: Chromium, url: str) -> None:
    browser.goto(url + "/")
    browser.wait_for("document.body && document.body.textContent === 'page'")


def _raw(url: str, data: bytes, then: bytes = b"", wait_s: float = 0) -> tuple[dict[str, str], dict[str, Any]]:
    """Send ``data`` on a new connection (then ``then`` after ``wait_s``), read the answer
    to its close: its headers (lower-cased names) and its JSON body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(data)
        if then:
            time.sleep(wait_s)
            s.sendall(then)
        answer = _read_to_close(s, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    headers[":status"] = lines[0].split()[1]
    return headers, wire.loads(body)


def _cors(headers: Any) -> dict[str, str]:
    return {k: headers[k] for k in CORS_KEYS if k in headers}


# ---------------------------------------------------------------- below the app


def test_errors_written_below_the_app_carry_the_apps_cors_headers(api, pages, http):
    """A 431 (headers over 32 KiB), a 408 (headers too slow) and a 400 (a head the
    parser cannot read) are written by the connection itself, with no middleware: they
    had no CORS headers, so a page of an allowed origin read "Failed to fetch" where it
    reads every other error. Now each carries the very CORS headers the app gives its
    own answers to that origin (and none to an origin not allowed)."""
    allowed, other = pages
    app_answer = http.get(api + "/v1/functions/nope", headers={"Origin": allowed})
    assert app_answer.status_code == 404
    want = _cors(app_answer.headers)
    assert want["access-control-allow-origin"] == allowed and want["access-control-allow-credentials"] == "true"

    big = b"GET /healthz HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\nX-Big: %s\r\n\r\n"
    for origin, cors in [(allowed, want), (other, {})]:
        headers, problem = _raw(api, big % (origin.encode(), b"a" * (40 << 10)))
        assert (headers[":status"], problem["code"]) == ("431", "headers_too_large")
        assert _cors(headers) == cors, headers
    # The head in several pieces, Origin in the first (the parser has read it), the limit
    # passed in the last.
    headers, problem = _raw(api, b"GET /healthz HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\nX-Big: " % allowed.encode(),
                            b"a" * (40 << 10), wait_s=0.1)
    assert (headers[":status"], problem["code"], _cors(headers)) == ("431", "headers_too_large", want)
    # (browser round 20) The Origin after the header that passes the limit, in a later
    # piece (a browser writes it after the page's own headers): answered at once it had
    # none; the rest of the head is read for it now.
    headers, problem = _raw(api, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (40 << 10),
                            b"a" * (30 << 10) + b"\r\nOrigin: %s\r\n\r\n" % allowed.encode(), wait_s=0.1)
    assert (headers[":status"], problem["code"], _cors(headers)) == ("431", "headers_too_large", want)

    headers, problem = _raw(api, b"GET /healthz HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\nX-Slow: 1\r\n" % allowed.encode())
    assert (headers[":status"], problem["code"], _cors(headers)) == ("408", "request_timeout", want)

    headers, problem = _raw(api, b"GET /healthz HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\nBad Header: 1\r\n\r\n"
                            % allowed.encode())
    assert (headers[":status"], problem["code"], _cors(headers)) == ("400", "malformed_request", want)


def test_the_cors_headers_written_below_the_app_are_the_apps_under_a_star_too():
    """One rule for both: for every kind of origin (named, covered by ``*`` only, and,
    without ``*``, not allowed) the headers written below the app are those the app's
    CORS middleware gives its own answers (none where it grants none)."""
    from jacobian_service.middleware import cors_answer_headers

    for origins in ("*, http://named.example", "http://named.example"):
        client = TestClient(real_app(functions="jacobian_service.examples", cors_origins=origins))
        below = cors_answer_headers(client.app.settings.cors_origin_list)
        for origin in ("http://named.example", "http://any.example"):
            answer = client.get("/healthz", headers={"Origin": origin})
            written = {k.lower(): v for k, v in below(origin)}
            granted = _cors(answer.headers) if "access-control-allow-origin" in answer.headers else {}
            assert granted == _cors(written), (origins, origin)  # (Starlette names the exposed headers to anyone)
            # (and the app lets the origins it grants read its calls' timing)
            assert answer.headers.get("timing-allow-origin") == answer.headers.get("access-control-allow-origin")


def test_the_connection_caps_503_waits_for_the_head_to_name_its_origin(monkeypatch):
    """Where every connection a front end keeps has a request in progress, a new one was
    answered 503 the moment it connected, before its request came: no Origin known, no
    CORS headers, and a page of an allowed origin could not read the Retry-After it
    should honour. Now the refusal reads the head first (not parsed, at most 1 s) and
    answers with that origin's CORS headers."""
    import asyncio

    from jacobian_service import connections
    from jacobian_service.connections import guarded_protocol
    from jacobian_service.middleware import cors_answer_headers

    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    origin = "http://page.example"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
                                           http=guarded_protocol(60.0, max_connections=1,
                                                                 cors=cors_answer_headers((origin,)))))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: server.started, 10)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        with socket.create_connection(url[7:].split(":")) as busy:
            busy.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(0.2)
            head = (b"POST /v1/functions/sin/jacobian HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}" % origin.encode())
            headers, problem = _raw(url, head[:-3], head[-3:], wait_s=0.1)  # its blank line split over two pieces
            assert (headers[":status"], problem["code"], headers["retry-after"]) == ("503", "unavailable", "1")
            assert _cors(headers) == {"access-control-allow-origin": origin, "access-control-allow-credentials": "true",
                                      "access-control-expose-headers": headers["access-control-expose-headers"]}
            assert "X-Request-ID" in headers["access-control-expose-headers"]
            # One that sends nothing gets the 503 within the second. At most REFUSALS_WAITING
            # (here 1) such refusals hold a descriptor at once, waiting or lingering as they
            # close: past them, one is refused as it connects, with no Origin to go by.
            monkeypatch.setattr(connections, "REFUSALS_WAITING", 1)
            started = time.monotonic()
            with socket.create_connection(url[7:].split(":")) as silent:
                assert _read_to_close(silent, 5).startswith(b"HTTP/1.1 503 ") and time.monotonic() - started < 5
            head = b"GET / HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\n\r\n" % origin.encode()
            with socket.create_connection(url[7:].split(":")) as lingering:  # answered, not closed by its client
                lingering.sendall(head)
                lingering.settimeout(5)
                assert lingering.recv(65536).startswith(b"HTTP/1.1 503 ")
                try:
                    headers, _ = _raw(url, head)
                    assert headers[":status"] == "503" and not _cors(headers)
                except ConnectionResetError:  # (its head came after the close)
                    pass
            release.set()
            busy.settimeout(5)
            assert busy.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def test_a_page_reads_the_431_of_a_request_whose_headers_are_too_large(api, pages, browser):
    """From a page of the allowed origin: a request whose headers pass 32 KiB (a large
    bearer token, say) read "TypeError: Failed to fetch"; now it reads the 431's
    problem+json and its X-Request-ID."""
    _open(browser, pages[0])
    # (browser round 20: a 70 KB token, whose Origin header Chromium writes after it,
    # past the first piece the server reads, read "Failed to fetch" still)
    for size in (40 << 10, 70 << 10):
        got = browser.eval(f"""(async () => {{
          const r = await fetch({json.dumps(api + SIN)}, {{method: 'POST', credentials: 'include',
            headers: {{'Content-Type': 'application/json', Authorization: 'Bearer ' + 'a'.repeat({size})}},
            body: JSON.stringify({{inputs: [[0.5]]}})}}).catch(e => e);
          if (r instanceof Error) return String(r);
          return {{status: r.status, id: r.headers.get('x-request-id'), body: await r.json()}};
        }})()""")
        assert isinstance(got, dict), (size, got)
        assert got["status"] == 431 and got["body"]["code"] == "headers_too_large", got
        assert got["body"]["request_id"] == got["id"]
    browser.goto("about:blank")


def test_a_page_with_tracing_instrumentation_is_served(api, pages, browser):
    """OpenTelemetry's fetch instrumentation (and Sentry's, Datadog's) adds
    ``traceparent``, ``tracestate`` and ``baggage`` to a page's calls: the preflight
    refused those headers, so every call of an instrumented page failed ("Failed to
    fetch"). Now they pass, and the Jacobian is torch.func's; and the call's Resource
    Timing, which such instrumentation records, is the page's to read
    (Timing-Allow-Origin: it was zeros past the start)."""
    _open(browser, pages[0])
    got = browser.eval(f"""(async () => {{
      const r = await fetch({json.dumps(api + SIN)}, {{method: 'POST', headers: {{'Content-Type': 'application/json',
        traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', tracestate: 'rojo=00f067aa0ba902b7',
        baggage: 'userId=alice', 'sentry-trace': '4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1',
        'x-datadog-trace-id': '1', 'x-datadog-parent-id': '2', 'x-datadog-origin': 'rum',
        'x-datadog-sampling-priority': '1', b3: '4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1'}},
        body: JSON.stringify({{inputs: [[0.5]]}})}}).catch(e => e);
      if (r instanceof Error) return String(r);
      const body = await r.json(), timing = performance.getEntriesByName({json.dumps(api + SIN)}).pop();
      return {{status: r.status, body, firstByte: timing.responseStart, started: timing.requestStart}};
    }})()""")
    assert isinstance(got, dict) and got["status"] == 200, got
    # The instrumentation reads the call's timing: without Timing-Allow-Origin, zeros.
    assert got["firstByte"] > 0 and got["started"] > 0, got
    want = torch.func.jacrev(torch.sin)(torch.tensor([0.5])).numpy()
    np.testing.assert_allclose(np.float32(got["body"]["jacobian"]["data"]), want, rtol=1e-6)
    browser.goto("about:blank")


def _counted(http: httpx.Client, api: str, endpoint: str, function: str, status: str, code: str) -> float:
    text = http.get(api + "/metrics").text
    found = re.search(r'^jacobian_service_requests_total\{code="' + code + r'",endpoint="' + endpoint
                      + r'",function="' + function + r'",status="' + status + r'"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_browser_without_fetch_metadata_cannot_have_a_jacobian_computed(api, http):
    """Safari before 16.4 and Firefox before 90 send no Sec-Fetch-* headers, so the 403
    of a cross-site request never fires there. What such a browser sends from a page of
    any site without a preflight is a POST of a CORS-safelisted type (each form
    encoding, ``text/plain`` among them, whose ``name=value`` a page shapes into a JSON
    body; a beacon; a no-cors fetch) or one with no type (a no-cors fetch of a Blob, a
    beacon of one), with Origin: each is refused by its type (415) before its body is
    read, and nothing is computed. A JSON body needs ``application/json``, which needs
    the preflight that CORS_ORIGINS answers."""
    evil = "http://evil.example"
    page = {"Origin": evil, "Referer": evil + "/", "User-Agent": "Mozilla/5.0 (Macintosh) Safari/605.1.15"}
    body = '{"inputs": [[0.5]], "pad": "="}\r\n'  # <input name='{"inputs": [[0.5]], "pad": "' value='"}'>
    sent = [("text/plain", body), ("text/plain;charset=UTF-8", body[:-2]),  # a form's, a beacon's string
            ("text/plain; application/json", body), ("application/x-www-form-urlencoded", "a=1"),
            ("multipart/form-data; boundary=b", '--b\r\nContent-Disposition: form-data; name="inputs"\r\n\r\n[[0.5]]\r\n--b--\r\n'),
            (None, body[:-2])]  # a Blob of no type
    before = _counted(http, api, "jacobian", "sin", "200", "")
    for content_type, content in sent:
        headers = {**page, **({"Content-Type": content_type} if content_type else {})}
        r = http.post(api + SIN, content=content, headers=headers)
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", (content_type, r.text)
    assert _counted(http, api, "jacobian", "sin", "200", "") == before
    # The same body, as a client that is no browser sends it, is computed.
    r = http.post(api + SIN, content=body[:-2].replace(', "pad": "="', ""))
    assert r.status_code == 200 and _counted(http, api, "jacobian", "sin", "200", "") == before + 1


def test_every_answer_says_its_type_is_not_to_be_sniffed_and_not_to_be_stored(api, pages, http):
    """No answer carried X-Content-Type-Options or Cache-Control: a browser could sniff
    a problem+json (which echoes what the request sent) or /metrics' text as another
    type, and a cache in front (Varnish keeps an answer with neither header 2 minutes)
    could serve /readyz, /metrics or a caller's Jacobian to whoever asks next. Now every
    answer, app's, preflight's, streamed, binary, and those the connection writes itself,
    carries ``nosniff`` and ``no-store``; the docs files keep their own caching."""
    x = np.linspace(0.1, 1.0, 200).astype(np.float32)  # 160 kB, over the module's stream threshold: streamed
    npy = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    answers = {
        "json": http.post(api + SIN, json={"inputs": [[0.5]]}),
        "npy": http.post(api + SIN, content=_npy(x[:3]),
                          headers=npy),
        "streamed": http.post(api + "/v1/functions/softmax/jacobian", content=_npy(x), headers=npy),
        "npz": http.post(api + "/v1/functions/polar/jacobian", json={"inputs": [[1.0], [0.5]], "argnums": [0, 1]},
                          headers={"Accept": "application/x-npz"}),
        "problem": http.get(api + "/v1/functions/%3Cb%3Enope"),
        "refused": http.post(api + SIN, content="{}", headers={"Content-Type": "text/plain", "Origin": pages[1]}),
        "preflight": http.options(api + SIN, headers={"Origin": pages[0], "Access-Control-Request-Method": "POST"}),
        "readyz": http.get(api + "/readyz"),
        "metrics": http.get(api + "/metrics"),
        "docs": http.get(api + "/docs"),
    }
    expected = {"json": 200, "npy": 200, "streamed": 200, "npz": 200, "problem": 404, "refused": 415, "preflight": 200,
                "readyz": 200, "metrics": 200, "docs": 200}
    assert {k: r.status_code for k, r in answers.items()} == expected, {k: r.text[:200] for k, r in answers.items()}
    assert "x-compute-ms" not in answers["streamed"].headers  # (streamed row chunk by row chunk)
    headers, _ = _raw(api, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % (b"a" * (40 << 10)))
    for name, h in [*((k, r.headers) for k, r in answers.items()), ("431", headers)]:
        assert (h.get("x-content-type-options"), h.get("cache-control")) == ("nosniff", "no-store"), (name, h)
    asset = http.get(api + "/favicon.ico")
    assert asset.headers["cache-control"] == "no-cache" and asset.headers["x-content-type-options"] == "nosniff"


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_dashboard_page_polls_the_probes_and_a_beacon_computes_nothing(api, pages, browser, http):
    """A status page of the allowed origin polls /readyz and /metrics (fetch in cors
    mode, as a dashboard polls): each read is fresh, never a browser cache's
    copy (the metrics move between two polls). A page of another origin that fires
    ``navigator.sendBeacon`` and a ``keepalive`` fetch at the API as it unloads has
    nothing computed (403 before the body is read, by Fetch Metadata)."""
    _open(browser, pages[0])
    got = browser.eval(f"""(async () => {{
      const api = {json.dumps(api)}, polls = [];
      const key = 'jacobian_service_requests_total{{code="",endpoint="readyz",function="",status="200"}} ';
      for (let i = 0; i < 2; i++) {{
        const ready = await fetch(api + '/readyz');
        const metrics = await (await fetch(api + '/metrics')).text();
        const line = metrics.split('\\n').find(l => l.startsWith(key)) || '';
        polls.push({{ready: ready.status, body: await ready.json(), count: Number(line.slice(key.length))}});
      }}
      return polls;
    }})()""")
    assert [p["ready"] for p in got] == [200, 200], got
    assert got[1]["count"] > got[0]["count"] >= 1, got  # fresh: the first poll's /readyz is counted in the second

    _open(browser, pages[1])
    before = (_counted(http, api, "jacobian", "sin", "200", ""), _counted(http, api, "jacobian", "sin", "403", "forbidden"))
    sent = browser.eval(f"""(async () => {{
      const url = {json.dumps(api + SIN)}, body = JSON.stringify({{inputs: [[0.5]]}});
      const beacon = navigator.sendBeacon(url, body);
      const kept = await fetch(url, {{method: 'POST', keepalive: true, mode: 'no-cors', body}}).then(r => r.type, e => e.name);
      return {{beacon, kept}};
    }})()""")
    assert sent == {"beacon": True, "kept": "opaque"}, sent
    _wait(lambda: _counted(http, api, "jacobian", "sin", "403", "forbidden") == before[1] + 2)
    assert _counted(http, api, "jacobian", "sin", "200", "") == before[0]
    browser.goto("about:blank")


def _wait(done, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _press(browser: Chromium, key: str, text: str = "") -> None:
    """A key pressed and released, as a user's (Tab, Enter)."""
    code = {"Tab": 9, "Enter": 13}[key]
    browser.send("Input.dispatchKeyEvent", type="keyDown", key=key, code=key, windowsVirtualKeyCode=code, text=text)
    browser.send("Input.dispatchKeyEvent", type="keyUp", key=key, code=key, windowsVirtualKeyCode=code)


def test_the_docs_with_a_key_by_keyboard_alone_and_a_clean_console(browser):
    """/docs with API keys, by keyboard alone: the key prompt has the focus, the key typed
    and Enter show the operations, Tab reaches an operation and Enter opens it. The page
    first asked for the document without a key, and its 401 was an error in the console
    of every new tab ("Failed to load resource: ... 401"); the page now says that the
    document wants a key, so the key is asked first, and the console stays clean."""
    with serve(real_app(functions="jacobian_service.examples", api_keys="k1")) as url:
        browser.events.clear()
        browser.goto(url + "/docs")
        browser.wait_for("document.activeElement && document.activeElement.name === 'key'", timeout_s=60)
        browser.send("Input.insertText", text="k1")
        _press(browser, "Enter", "\r")
        browser.wait_for("document.querySelectorAll('.opblock').length > 5", timeout_s=60)
        for _ in range(40):
            _press(browser, "Tab")
            if browser.eval("document.activeElement.matches('.opblock-summary-control')"):
                break
        focused = browser.eval("document.activeElement.closest('.opblock').querySelector('.opblock-summary-path')"
                               ".getAttribute('data-path')")
        _press(browser, "Enter", "\r")
        browser.wait_for("!!document.querySelector('.opblock.is-open')")
        assert browser.eval("document.querySelector('.opblock.is-open .opblock-summary-path')"
                            ".getAttribute('data-path')") == focused
        spec = [e["params"]["response"]["status"] for e in browser.events if e["method"] == "Network.responseReceived"
                and e["params"]["response"]["url"] == url + "/openapi.json"]
        assert spec == [200], spec  # asked once, with the key
        assert not [m for m in browser.messages() if m.startswith(("error", "exception", "console.error"))], \
            browser.messages()
        browser.goto("about:blank")


# ---------------------------------------------------------------- behind nginx


@pytest.fixture(scope="module")
def proxied(api, tmp_path_factory):
    """nginx on a free port passing ``PREFIX/...`` to the API with the prefix stripped
    (deploy.md's ``location /jacobian/ { proxy_pass http://upstream/; }``)."""
    import shutil
    import subprocess

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("no nginx (apt-get install nginx-light)")
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    temp = "".join(f"{kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # The shipped front's header buffers (deploy/nginx.conf.template), as they are.
    template = (Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf.template").read_text()
    buffers = re.search(r"^\s*(large_client_header_buffers [^;]+;)", template, re.M).group(1)
    (folder / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off; {temp}
  server {{
    listen 127.0.0.1:{port};
    {buffers}
    location {PREFIX}/ {{
      proxy_pass {api}/;
      proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_buffering off;
    }}
  }}
}}""")
    proc = subprocess.Popen([nginx, "-p", str(folder), "-e", f"{folder}/error.log", "-c", str(folder / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url + PREFIX + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is None and False
        assert _wait_for(up, 10), (folder / "error.log").read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_docs_behind_nginx_under_a_prefix(proxied, http):
    """The docs as a user opens them behind a real nginx that strips ROOT_PATH: the page
    names its scripts under the prefix, they load through it (gzipped, immutable), the
    OpenAPI document's server is the prefix, and the request Swagger UI's "Try it out"
    then sends (its ``servers`` URL joined to the operation's path) answers torch.func's
    Jacobian. (Swagger UI itself runs "Try it out" under a prefix in test_docs_ui.py.)"""
    page = http.get(proxied + PREFIX + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    scripts = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assets = [u for u in scripts if "/docs-assets/" in u]
    assert assets and all(u.startswith(PREFIX + "/docs-assets/") for u in assets), scripts
    for url in assets:
        r = http.get(proxied + url, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200 and "immutable" in r.headers["cache-control"], (url, r.status_code)
    document = http.get(proxied + PREFIX + "/openapi.json").json()
    assert [s["url"] for s in document["servers"]] == [PREFIX]
    r = http.post(proxied + document["servers"][0]["url"] + SIN, json={"inputs": [[0.5, 1.0]]})
    assert r.status_code == 200, r.text
    want = torch.func.jacrev(torch.sin)(torch.tensor([0.5, 1.0])).numpy()
    np.testing.assert_allclose(np.float32(r.json()["jacobian"]["data"]), want, rtol=1e-6)


def test_headers_too_large_behind_the_shipped_nginx_are_the_servers_431(proxied, pages, http):
    """Behind deploy/nginx.conf.template, a request with a 40 KiB header (a large bearer
    token) got nginx's own HTML 400 ("Request Header Or Cookie Too Large": its buffers
    took 8 KiB a line), without CORS headers: a page of an allowed origin read "Failed to
    fetch". The template's buffers now pass it on, and the server's 431 problem+json
    comes back, readable by that page; a 20 KiB token is served."""
    token = {"Origin": pages[0], "Authorization": "Bearer " + "a" * (40 << 10)}
    r = http.get(proxied + PREFIX + "/healthz", headers=token)
    assert r.status_code == 431 and r.headers["content-type"] == "application/problem+json", r.text[:300]
    assert r.json()["code"] == "headers_too_large" and r.headers["access-control-allow-origin"] == pages[0]
    r = http.get(proxied + PREFIX + "/healthz", headers={**token, "Authorization": "Bearer " + "a" * (20 << 10)})
    assert r.status_code == 200, r.text[:300]
