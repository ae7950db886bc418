"""A real browser as the outside testers use one, round 2.

One API server (API keys, CORS for one page origin, served under a proxy's prefix as
``ROOT_PATH`` says) and one headless Chromium for the module:

* /docs: what the browser transfers (the scripts gzipped), the key asked for, then
  Swagger UI's "Try it out" -> Execute on the operations with their OpenAPI examples,
  each answer compared with torch.func in-process, an .npy answer offered as a
  download whose bytes are the Jacobian, and an error example shown as problem+json;
* a page of the allowed origin using fetch(): an .npy body from an ArrayBuffer, an .npy
  answer, a streamed JSON Jacobian read from a ReadableStream, a stream aborted;
* over plain HTTP: gzip and its validators, a Private Network Access preflight.
"""

from __future__ import annotations

import io
import json
import re

import httpx
import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests._cdp import Chromium, chromium_binary
from tests._client_support import real_app, serve

PREFIX = "/jacobian"
KEY = {"Authorization": "Bearer k1"}


def _behind_proxy(app):
    """``app`` as uvicorn runs it with ``--root-path`` behind a proxy that strips
    PREFIX: the path keeps the prefix and ``root_path`` names it."""
    async def asgi(scope, receive, send):
        if scope["type"] == "http":
            scope = dict(scope, root_path=PREFIX)
        await app(scope, receive, send)

    return asgi


@pytest.fixture(scope="module")
def page_url():
    async def page(request):
        return HTMLResponse("<!doctype html><html><head><meta charset='utf-8'></head><body>page</body></html>")

    with serve(Starlette(routes=[Route("/", page)])) as url:
        yield url


@pytest.fixture(scope="module")
def api(page_url):
    """The API's base URL, PREFIX included."""
    app = real_app(functions="jacobian_service.examples", api_keys="k1", cors_origins=page_url, root_path=PREFIX,
                   stream_threshold_bytes=1 << 12, docs_auth=False)
    with serve(_behind_proxy(app)) as url:
        yield url + PREFIX


@pytest.fixture(scope="module")
def browser():
    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


# ---------------------------------------------------------------- plain HTTP


def test_the_docs_scripts_and_the_document_go_gzipped(api):
    """A browser opening /docs took 2.2 MB of scripts and styles and, at every load, the
    90 KB OpenAPI document, all uncompressed though it asked for gzip: now gzipped
    (made once), with Vary: Accept-Encoding on both forms and a tag per form."""
    from jacobian_service.docs_ui import ASSETS_URL, _asset_file

    with httpx.Client(base_url=api, timeout=30, headers=KEY) as http:
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "docs.js"):  # (ReDoc's: the same code path)
            body, digest = _asset_file(name)
            url = f"{ASSETS_URL}/{name}?v={digest}"
            packed = http.get(url, headers={"Accept-Encoding": "gzip, deflate, br, zstd"})
            assert packed.status_code == 200 and packed.headers["content-encoding"] == "gzip", name
            assert packed.content == body  # httpx inflated it
            assert int(packed.headers["content-length"]) < len(body) / 2, name
            assert packed.headers["etag"] == f'"{digest}-gzip"'
            assert "accept-encoding" in packed.headers["vary"].lower()
            assert packed.headers["cache-control"] == "public, max-age=31536000, immutable"
            for refused in ("identity", "gzip;q=0, *", "br"):
                plain = http.get(url, headers={"Accept-Encoding": refused})
                assert "content-encoding" not in plain.headers, refused
                assert plain.content == body and plain.headers["etag"] == f'"{digest}"'
                assert "accept-encoding" in plain.headers["vary"].lower()
            # Either form held: 304, naming the form held.
            for held in (f'"{digest}-gzip"', f'"{digest}"'):
                again = http.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": held})
                assert again.status_code == 304 and again.headers["etag"] == held
        png = http.get(f"{ASSETS_URL}/favicon.png", headers={"Accept-Encoding": "gzip"})
        assert png.status_code == 200 and "content-encoding" not in png.headers  # compressed already

        doc = http.get("/openapi.json", headers={"Accept-Encoding": "gzip"})
        assert doc.headers["content-encoding"] == "gzip" and int(doc.headers["content-length"]) < 20_000
        plain = http.get("/openapi.json", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers and doc.json() == plain.json()
        assert doc.json()["servers"] == [{"url": PREFIX}]
        # API answers stay as they are (numbers: ask for .npy for big ones).
        r = http.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5]]}, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200 and "content-encoding" not in r.headers


def test_accept_encoding_is_read_as_rfc_9110_says():
    from jacobian_service.compression import accepts_gzip

    for header, ok in [("gzip", True), ("GZIP;q=0.5", True), ("x-gzip", True), ("deflate, gzip;q=1.0", True),
                       ("*", True), ("br, *;q=0.1", True), ("gzip;q=0, *", False), ("*;q=0", False),
                       ("identity", False), ("br, zstd", False), ("gzip;q=0", False), ("gzip;q=x", False), ("", False)]:
        assert accepts_gzip(header) is ok, header


def test_a_private_network_preflight_of_an_allowed_origin_is_answered(api, page_url):
    """Chromium's Private Network Access: a page on a public origin that calls a service
    on a private address (a cluster's 10.x) asks the preflight with
    Access-Control-Request-Private-Network; it was refused (400, "this private-network
    is not allowed here (CORS_ORIGINS)") for an origin CORS_ORIGINS names, so every call
    of that page failed. Another origin is still refused, by name."""
    asked = {"Origin": page_url, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type", "Access-Control-Request-Private-Network": "true"}
    r = httpx.options(api + "/v1/functions/sin/jacobian", headers=asked, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-private-network"] == "true"
    assert r.headers["access-control-allow-origin"] == page_url
    other = httpx.options(api + "/v1/functions/sin/jacobian", headers={**asked, "Origin": "http://evil.example"}, timeout=10)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert other.json()["detail"] == "CORS preflight refused: the origin 'http://evil.example' is not among CORS_ORIGINS"


# ---------------------------------------------------------------- /docs in Chromium

# Open an operation and press "Try it out" (once per operation).
_OPEN = r"""
(async (path, method) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (f, t = 30000) => { const end = Date.now() + t;
    while (Date.now() < end) { const v = f(); if (v) return v; await sleep(50); } return null; };
  const block = [...document.querySelectorAll('.opblock.opblock-' + method)].find(
    e => e.querySelector('.opblock-summary-path')?.getAttribute('data-path') === path);
  if (!block.classList.contains('is-open')) block.querySelector('.opblock-summary-control').click();
  const button = await until(() => block.querySelector('.try-out__btn'));
  if (!button.classList.contains('cancel')) button.click();
  return !!(await until(() => block.querySelector('.execute')));
})"""

# Pick the function (its examples follow, docs.js) and the answer's media type, Execute,
# and read what Swagger UI shows: the status, the body's text, a download link's file
# name (the link clicked: the browser saves the file).
_EXECUTE = r"""
(async (path, method, name, media, body, ready) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (f, t = 30000) => { const end = Date.now() + t;
    while (Date.now() < end) { const v = f(); if (v) return v; await sleep(50); } return null; };
  const setSelect = (el, v) => { Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype, 'value').set.call(el, v);
    el.dispatchEvent(new Event('change', {bubbles: true})); };
  const block = [...document.querySelectorAll('.opblock.opblock-' + method)].find(
    e => e.querySelector('.opblock-summary-path')?.getAttribute('data-path') === path);
  const clear = block.querySelector('.btn-clear');
  if (clear) { clear.click(); await until(() => !block.querySelector('.live-responses-table')); }
  if (name !== null) {
    setSelect(await until(() => block.querySelector('tr[data-param-name="name"] select')), name);
    await until(() => [...block.querySelectorAll('select.examples-select-element')].every(
      list => list.value === name || ![...list.options].some(o => o.value === name)), 5000);
  }
  if (media !== null) setSelect(block.querySelector('.response-control-media-type select'), media);
  if (ready !== undefined) {  // the body docs.js writes (vjp): its member ready filled, not the schema's own
    // empty default ("cotangents": [], there at once: Execute clicked before the page's
    // /evaluate came back sent that, a 422, in the full suite once)
    const filled = () => { try { const v = JSON.parse(block.querySelector('textarea.body-param__text')?.value || '')[ready];
      return v !== undefined && v !== null && (typeof v !== 'object' || Object.keys(v).length > 0); } catch (e) { return false; } };
    await until(filled);
  }
  if (body !== null) {
    const text = await until(() => block.querySelector('textarea.body-param__text'));
    Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(text, body);
    text.dispatchEvent(new Event('input', {bubbles: true}));
  }
  await sleep(100);
  block.querySelector('.execute').click();
  const status = await until(() => block.querySelector('.live-responses-table .response .response-col_status'), 60000);
  const answer = block.querySelector('.live-responses-table .response .response-col_description');
  const link = answer.querySelector('a[download]');
  if (link) link.click();  // as the user does: the browser saves the file
  const code = answer.querySelector('.response-col_description__inner pre, pre.microlight, pre');
  return {status: status.textContent.trim(), text: code ? code.textContent : '',
          file: link ? link.getAttribute('download') : null,
          curl: block.querySelector('.curl')?.textContent || ''};
})"""


# Swagger UI's Authorize: the button, the key typed into the dialog, Authorize, Close.
_AUTHORIZE = r"""
(async (key) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (f, t = 30000) => { const end = Date.now() + t;
    while (Date.now() < end) { const v = f(); if (v) return v; await sleep(50); } return null; };
  document.querySelector('.auth-wrapper .authorize').click();
  const input = await until(() => document.querySelector('.modal-ux input[type=text], .modal-ux input[type=password]'));
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, key);
  input.dispatchEvent(new Event('input', {bubbles: true}));
  input.dispatchEvent(new Event('change', {bubbles: true}));
  (await until(() => document.querySelector('.modal-ux .modal-btn.authorize'))).click();
  (await until(() => document.querySelector('.modal-ux .modal-btn.btn-done'))).click();
  return true;
})"""


def _transferred(browser: Chromium) -> dict[str, int]:
    """Bytes on the wire (headers and body, as sent) per URL the page loaded."""
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in browser.events
            if e["method"] == "Network.requestWillBeSent"}
    return {urls[e["params"]["requestId"]]: int(e["params"]["encodedDataLength"]) for e in browser.events
            if e["method"] == "Network.loadingFinished" and e["params"]["requestId"] in urls}


def _wait(done, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _half(*shape: int) -> torch.Tensor:
    return torch.full(shape, 0.5)  # the documents' examples: every number 0.5, symbols sized 3


def test_docs_load_gzipped_and_large_answers_are_downloads(api, browser, tmp_path):
    """As a user with a key, behind a proxy's prefix: /docs transfers its scripts and
    the document gzipped (1.5 MB and 90 KB before), the key goes to Authorize
    (DOCS_AUTH=false: the document is open; the key prompt is test_docs_ui.py's), and "Try it out"
    -> Execute asking for application/x-npy offers the answer as a file named for what
    it holds, which the browser saves as the Jacobian torch.func gives; so is a JSON
    answer over 1 MB, which Swagger UI rendered whole, freezing the tab. (Swagger UI
    renders slowly on a loaded machine: one Execute here; every operation's example is
    checked over HTTP below, Try it out on others in test_docs_ui.py.)"""
    from jacobian_service import examples as ex

    browser.events.clear()
    browser.goto(api + "/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 10")
    assert browser.eval(_AUTHORIZE + "('k1')", timeout_s=60)
    sent = _transferred(browser)
    bundle = max(n for url, n in sent.items() if "/docs-assets/swagger-ui-bundle.js" in url)
    assert bundle < 600_000, sent
    spec = max(n for url, n in sent.items() if url.endswith(f"{PREFIX}/openapi.json"))
    assert spec < 20_000, sent

    browser.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(tmp_path))
    path = "/v1/functions/{name}/jacobian"
    assert browser.eval(f"{_OPEN}({json.dumps(path)}, 'post')")
    npy = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', 'softmax', 'application/x-npy', null)", timeout_s=90)
    assert npy["status"] == "200" and npy["file"] == "softmax-jacobian.npy", npy
    assert f"{api}/v1/functions/softmax/jacobian" in npy["curl"] and "Bearer k1" in npy["curl"], npy
    _wait(lambda: browser.eval("true") and any(e["method"].endswith(".downloadProgress")
                                               and e["params"]["state"] == "completed" for e in browser.events))
    J = np.load(tmp_path / "softmax-jacobian.npy", allow_pickle=False)
    np.testing.assert_allclose(J, torch.func.jacrev(ex.softmax)(_half(3)).numpy(), rtol=1e-5, atol=1e-7)

    # vjp: the body is written for the function picked (its output's shape, asked with
    # the key given to Authorize), and Execute answers torch.func.vjp's (every function
    # was a 422: the document has no example).
    vjp_path = "/v1/functions/{name}/vjp"
    assert browser.eval(f"{_OPEN}({json.dumps(vjp_path)}, 'post')")
    for name, fn, args in [("polar", ex.polar, (_half(3), _half(3)))]:  # a tuple output: cotangents nested
        got = browser.eval(f"{_EXECUTE}({json.dumps(vjp_path)}, 'post', {json.dumps(name)}, null, null, "
                           "'cotangents')", timeout_s=90)
        assert got["status"] == "200", got
        out, pullback = torch.func.vjp(fn, *args)
        half = tuple(torch.full_like(t, 0.5) for t in out) if isinstance(out, tuple) else torch.full_like(out, 0.5)
        want = pullback(half)[0]
        vjp = json.loads(got["text"])["vjp"]
        np.testing.assert_allclose(np.asarray(vjp["data"], np.float32).reshape(vjp["shape"]), want.numpy(), rtol=1e-5)

    # A JSON answer over 1 MB is offered as a file too: Swagger UI rendered it whole in
    # the page (mlp's Hessian, 14 MB, an example of the list: the tab froze for minutes).
    x = torch.arange(320, dtype=torch.float32) / 320  # 1.3 MB of JSON
    body = json.dumps({"inputs": {"x": x.tolist()}})
    big = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', 'softmax', 'application/json', {json.dumps(body)})",
                       timeout_s=120)
    assert big["status"] == "200" and big["file"] == "softmax-jacobian.json", {**big, "text": big["text"][:200]}
    _wait(lambda: browser.eval("true") and (tmp_path / "softmax-jacobian.json").is_file()
          and sum(e["method"].endswith(".downloadProgress") and e["params"]["state"] == "completed"
                  for e in browser.events) >= 2)
    doc = json.loads((tmp_path / "softmax-jacobian.json").read_text())
    assert doc["jacobian"]["shape"] == [320, 320]
    np.testing.assert_allclose(np.float32(doc["jacobian"]["data"]), torch.func.jacrev(ex.softmax)(x).numpy(),
                               rtol=1e-5, atol=1e-7)


def _expected(kind: str, name: str, body: dict) -> object:
    """torch.func's answer to an OpenAPI example (argnums 0, as the examples leave it)."""
    from jacobian_service import examples as ex

    fn = getattr(ex, name)
    inputs = body["inputs"]
    args = [torch.tensor(v) if not isinstance(v, dict) else {k: torch.tensor(w) for k, w in v.items()}
            for v in inputs.values()]
    if kind == "jacobian":
        return torch.func.jacrev(fn, has_aux=name == "sin_aux")(*args)
    if kind == "hessian":
        return torch.func.hessian(lambda *a: fn(*a)[0] if name == "sin_aux" else fn(*a))(*args)
    if kind == "evaluate":
        return fn(*args)
    tangent = body["tangents"]
    tangent = {k: torch.tensor(w) for k, w in tangent.items()} if isinstance(tangent, dict) else torch.tensor(tangent)
    if kind == "jvp":
        return torch.func.jvp(lambda a0: fn(a0, *args[1:]), (args[0],), (tangent,), has_aux=name == "sin_aux")[1]
    if kind == "hvp":
        return torch.func.jvp(torch.func.grad(lambda a0: fn(a0, *args[1:])), (args[0],), (tangent,))[1]
    raise AssertionError(kind)


def _close(got: object, want: object, where: str) -> None:
    """The service's JSON tree against torch.func's (tuples as lists, dicts by key)."""
    if isinstance(want, torch.Tensor):
        arr = np.asarray(got["data"], dtype=got["dtype"]).reshape(got["shape"])
        np.testing.assert_allclose(arr, want.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=where)
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    else:
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")


def test_every_operations_example_answers_as_torch_func_does(api):
    """What "Try it out" sends with each operation's own example (every function in
    its list) is answered as torch.func answers it in-process; an example a function
    cannot take (hvp of a vector function) is its problem+json."""
    with httpx.Client(base_url=api, headers=KEY, timeout=60) as http:
        doc = http.get("/openapi.json").json()
        checked = 0
        for kind in ("jacobian", "hessian", "evaluate", "jvp", "hvp"):
            examples = doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]["requestBody"]["content"][
                "application/json"]["examples"]
            for name, example in examples.items():
                if kind == "hessian" and name == "mlp":
                    continue  # 64 x 128 x 128: slow to check, as any Hessian of it
                r = http.post(f"/v1/functions/{name}/{kind}", json=example["value"])
                if kind == "hvp" and name not in ("sum_sin", "rosenbrock"):
                    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
                    assert r.json()["detail"] == ("hvp needs a function with one scalar (0-d) output, or 'cotangents' "
                                                  "shaped like its output (c . H t, a vector-Hessian-vector product)")
                    continue
                assert r.status_code == 200, (kind, name, r.text)
                key = "output" if kind == "evaluate" else kind
                want = _expected(kind, name, example["value"])
                if name == "sin_aux" and kind in ("jacobian", "evaluate", "jvp"):
                    want = want[0] if kind != "jvp" else want
                _close(r.json()[key], want, f"{kind} {name}")
                checked += 1
        functions = len(examples)
        assert checked == 4 * functions - 1 + 2  # every example (but mlp's Hessian), hvp of the two scalars
        patterns = doc["paths"]["/v1/functions/{name}/sparsity"]["get"]["parameters"]
        shapes = next(p for p in patterns if p["name"] == "shapes")["examples"]
        for name, example in shapes.items():
            r = http.get(f"/v1/functions/{name}/sparsity", params={"shapes": example["value"]})
            assert r.status_code == 200, (name, r.text)
            assert r.json()["function"] == name


# ---------------------------------------------------------------- a page of another origin

_NPY = r"""
const npy = (values) => {  // a float32 vector as an .npy file
  let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + values.length + ",), }";
  header += " ".repeat(63 - (10 + header.length) % 64) + "\n";
  const buffer = new ArrayBuffer(10 + header.length + 4 * values.length), bytes = new Uint8Array(buffer);
  bytes.set([0x93, 78, 85, 77, 80, 89, 1, 0]); new DataView(buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) bytes[10 + i] = header.charCodeAt(i);
  new Float32Array(buffer, 10 + header.length).set(values);
  return buffer;
};
const b64 = (buffer) => btoa(String.fromCharCode(...new Uint8Array(buffer)));
"""


def test_a_page_of_the_allowed_origin_posts_and_reads_binary_and_streams(api, page_url, browser):
    """fetch() from the allowed origin: an .npy body from an ArrayBuffer and an .npy
    answer (its headers readable); a streamed JSON Jacobian (over STREAM_THRESHOLD_BYTES)
    read whole from the ReadableStream equals jacrev; a stream the page aborts is
    closed on the server; an error is readable problem+json."""
    from jacobian_service import examples as ex

    browser.goto(page_url + "/")
    browser.wait_for("document.body && document.body.textContent === 'page'")
    got = browser.eval(f"""(async () => {{ {_NPY}
      const api = {json.dumps(api)}, key = {{Authorization: 'Bearer k1'}};
      const out = {{}};
      let r = await fetch(api + '/v1/functions/sin/jacobian', {{method: 'POST', body: npy([0.5, 1.0]),
        headers: {{...key, 'Content-Type': 'application/x-npy', Accept: 'application/x-npy'}}}});
      out.npy = {{status: r.status, file: r.headers.get('content-disposition'), id: r.headers.get('x-request-id'),
                 body: b64(await r.arrayBuffer())}};
      const x = Array.from({{length: 64}}, (_, i) => i / 64);
      r = await fetch(api + '/v1/functions/softmax/jacobian?chunk_size=8', {{method: 'POST',
        body: JSON.stringify({{inputs: [x]}}), headers: {{...key, 'Content-Type': 'application/json'}}}});
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let text = '';
      for (;;) {{ const {{done, value}} = await reader.read(); if (done) break; text += decoder.decode(value, {{stream: true}}); }}
      out.streamed = {{status: r.status, chunk: r.headers.get('x-chunk-size'), doc: JSON.parse(text)}};
      const abort = new AbortController();
      r = await fetch(api + '/v1/functions/softmax/jacobian?chunk_size=1', {{method: 'POST', signal: abort.signal,
        body: npy(Array.from({{length: 2048}}, (_, i) => i / 2048)),
        headers: {{...key, 'Content-Type': 'application/x-npy', Accept: 'application/x-npy'}}}});
      const first = await r.body.getReader().read();
      abort.abort();
      out.aborted = {{status: r.status, length: r.headers.get('content-length'), first: first.value.length}};
      r = await fetch(api + '/v1/functions/sin/jacobian', {{method: 'POST', body: '{{"inputs": [[1], [2]]}}',
        headers: {{...key, 'Content-Type': 'application/json'}}}});
      out.problem = {{status: r.status, type: r.headers.get('content-type'), id: r.headers.get('x-request-id'),
                     body: await r.json()}};
      return out;
    }})()""", timeout_s=120)

    assert got["npy"]["status"] == 200 and got["npy"]["file"] == 'attachment; filename="sin-jacobian.npy"'
    assert len(got["npy"]["id"]) == 32
    import base64

    J = np.load(io.BytesIO(base64.b64decode(got["npy"]["body"])), allow_pickle=False)
    np.testing.assert_allclose(J, np.diag(np.cos(np.float32([0.5, 1.0]))), rtol=1e-6)

    streamed = got["streamed"]
    assert streamed["status"] == 200 and streamed["chunk"] == "8"  # X-Chunk-Size: it was streamed
    x = torch.arange(64, dtype=torch.float32) / 64
    jac = streamed["doc"]["jacobian"]
    assert jac["shape"] == [64, 64]
    np.testing.assert_allclose(np.float32(jac["data"]), torch.func.jacrev(ex.softmax)(x).numpy(), rtol=1e-5, atol=1e-7)

    assert got["aborted"]["status"] == 200 and int(got["aborted"]["length"]) == 128 + 4 * 2048 * 2048
    # The server saw the client leave: the stream is counted as aborted, not as a 200.
    def aborted() -> float:
        text = httpx.get(api + "/metrics", headers={"Authorization": "Bearer k1"}, timeout=10).text
        found = re.search(r'^jacobian_service_requests_total\{code="",endpoint="jacobian",function="softmax",'
                          r'status="aborted"\} ([0-9.e+]+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    import time

    deadline = time.monotonic() + 30
    while aborted() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted() == 1

    problem = got["problem"]
    assert problem["status"] == 422 and problem["type"] == "application/problem+json"
    assert problem["body"]["code"] == "invalid_input" and problem["body"]["request_id"] == problem["id"]


def test_batched_with_one_examples_inputs_says_where_the_dimension_went(api):
    """Swagger UI's jacobian example with its batched box ticked: the 422 said
    "input 'x': expected shape (n,), got ()", of a (3,) the user sent, not saying that
    batched=true had taken the 3 as the batch."""
    r = httpx.post(api + "/v1/functions/sin/jacobian", params={"batched": "true"}, headers=KEY, timeout=30,
                   json={"inputs": {"x": [0.5, 0.5, 0.5]}})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == ("input 'x': expected shape (n,), got (), for each example: batched=true takes the "
                                  "leading dimension of (3,) as the batch (3 examples); send (batch,) + (n,)")
    fine = httpx.post(api + "/v1/functions/sin/jacobian", params={"batched": "true"}, headers=KEY, timeout=30,
                      json={"inputs": {"x": [[0.5, 0.5, 0.5]]}})
    assert fine.status_code == 200 and fine.json()["jacobian"]["shape"] == [1, 3, 3]


def test_a_page_of_another_site_cannot_make_the_browser_compute(browser):
    """A page of any site may have a browser send some requests with no CORS preflight
    (no-cors: an <img>, a fetch in no-cors mode; a POST whose body has no type, or
    text/plain): a body without Content-Type was read as JSON, and a GET of a sparsity
    pattern computes it, so any site a user visited could have their browser run work on
    a service without API keys (computed, answered 200, though unread by the page).
    Computing endpoints now refuse a no-cors request of another site (Fetch Metadata):
    403 before any work; and a body without Content-Type from a page (it sends Origin;
    browsers without Fetch Metadata) is a 415. A link opened, and clients that are no
    browser, are served as before."""
    async def page(request):
        return HTMLResponse("<!doctype html><html><body>elsewhere</body></html>")

    with serve(real_app(functions="jacobian_service.examples")) as open_api, \
            serve(Starlette(routes=[Route("/", page)])) as elsewhere:
        def counted(endpoint: str, function: str, status: str, code: str) -> float:
            text = httpx.get(open_api + "/metrics", timeout=10).text
            found = re.search(r'^jacobian_service_requests_total\{code="' + code + r'",endpoint="' + endpoint
                              + r'",function="' + function + r'",status="' + status + r'"\} ([0-9.e+]+)$', text, re.M)
            return float(found.group(1)) if found else 0.0

        sparsity = "/v1/functions/lorenz96/sparsity?shapes=8"
        browser.goto(elsewhere + "/")
        browser.wait_for("document.body && document.body.textContent === 'elsewhere'")
        sent = browser.eval(f"""Promise.all([
          fetch({json.dumps(open_api)} + '/v1/functions/sin/jacobian', {{method: 'POST', mode: 'no-cors',
                body: new Blob(['{{"inputs": [[0.5]]}}'])}}),
          fetch({json.dumps(open_api)} + '/v1/functions/sin/jacobian', {{method: 'POST', mode: 'no-cors',
                headers: {{'Content-Type': 'text/plain'}}, body: '{{"inputs": [[0.5]]}}'}}),
          fetch({json.dumps(open_api + sparsity)}, {{mode: 'no-cors'}}),
        ]).then(rs => rs.map(r => r.type)).catch(e => String(e))""")
        assert sent == ["opaque"] * 3  # sent, no preflight asked; the answers hidden from the page
        _wait(lambda: counted("jacobian", "sin", "403", "forbidden") == 2
              and counted("getSparsity", "lorenz96", "403", "forbidden") == 1)
        assert counted("jacobian", "sin", "200", "") == 0 and counted("getSparsity", "lorenz96", "200", "") == 0

        from_page = httpx.post(open_api + "/v1/functions/sin/jacobian", content=b'{"inputs": [[0.5]]}', timeout=30,
                               headers={"Origin": "http://elsewhere.example"})
        assert from_page.status_code == 415 and from_page.json()["code"] == "unsupported_media_type"
        plain = httpx.post(open_api + "/v1/functions/sin/jacobian", content=b'{"inputs": [[0.5]]}', timeout=30)
        assert plain.status_code == 200, plain.text
        browser.goto(open_api + sparsity)  # a navigation: served
        browser.wait_for("document.body && document.body.textContent.includes('lorenz96')")
        assert counted("getSparsity", "lorenz96", "200", "") == 1
        browser.goto("about:blank")  # off this server before it stops
