"""/docs and /redoc work without internet: every asset comes from the server itself.

Two layers:

* over HTTP (always runs): the pages name no other host, and every script, style and icon
  they name answers 200 from this server, also under a path prefix (``root_path``);
* in a real browser (Debian's ``chromium``, headless; skipped when it is not installed):
  the pages are rendered with every host but 127.0.0.1 unresolvable, and the rendered
  DOM lists every operation of ``/openapi.json``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from html.parser import HTMLParser

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests._cdp import chromium_binary
from tests._client_support import real_app, serve

PREFIX = "/jacobian"


class _Refs(HTMLParser):
    """The URLs a page loads: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and ((tag == "script" and key == "src") or (tag == "link" and key == "href")
                          or (tag == "img" and key == "src")):
                self.urls.append(value)


def _inline_urls(html: str) -> list[str]:
    """URLs Swagger UI and ReDoc are told in inline script (the OpenAPI document)."""
    return re.findall(r"""(?:url:\s*|spec-url=|data-spec=)['"]([^'"]+)['"]""", html)


@pytest.fixture(scope="module")
def app():
    return real_app(functions="jacobian_service.examples")


@pytest.fixture(scope="module", params=["", PREFIX], ids=["root", "prefixed"])
def site(request, app):
    """(base URL, prefix): the app at the root, or mounted under PREFIX."""
    prefix = request.param
    target = Starlette(routes=[Mount(prefix, app)]) if prefix else app
    with serve(target) as url:
        yield url, prefix


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_from_this_server(site, page):
    url, prefix = site
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.get(prefix + page)
        assert response.status_code == 200
        html = response.text
        parser = _Refs()
        parser.feed(html)
        refs = parser.urls + _inline_urls(html)
        assert any(r.split("?")[0].endswith(".js") for r in parser.urls), html
        assert f"{prefix}/openapi.json" in refs, refs
        for ref in refs:
            assert ref.startswith(prefix + "/"), f"{ref} is not on this server under {prefix or '/'}"
            asset = http.get(ref)
            assert asset.status_code == 200, ref
            assert len(asset.content) > 1000, ref
            if ref.split("?")[0].endswith(".js"):
                assert "javascript" in asset.headers["content-type"]
            elif ref.split("?")[0].endswith(".css"):
                assert asset.headers["content-type"].startswith("text/css")
        # No CDN, no web fonts: nothing that needs the internet.
        assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html), html


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_send_a_content_security_policy(app, page):
    """Only this server's scripts run and only this server is reached: no inline script
    (the loader is a file), images and connections from 'self'."""
    with serve(app) as url:
        r = httpx.get(url + page, timeout=30)
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["img-src"] == "'self' data:"
    assert re.findall(r"<script[^>]*>", r.text) and all("src=" in tag for tag in re.findall(r"<script[^>]*>", r.text))


def test_docs_assets_are_versioned_immutable_and_revalidated(app):
    """The pages name each asset with its digest: that URL is cached for a year as
    immutable; any other URL of it is revalidated; If-None-Match gets a 304 (the assets
    were cached for a day on unversioned URLs and never answered 304). (The plain form:
    the gzip form's tags are test_browser_round2.py's.)"""
    with serve(app) as url, httpx.Client(base_url=url, timeout=30, headers={"Accept-Encoding": "identity"}) as http:
        parser = _Refs()
        parser.feed(http.get("/docs").text)
        versioned = [ref for ref in parser.urls if ref.startswith("/docs-assets/")]
        assert versioned and all(re.fullmatch(r"/docs-assets/[\w.-]+\?v=[0-9a-f]{16}", ref) for ref in versioned)
        for ref in versioned:
            first = http.get(ref)
            assert first.status_code == 200
            assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
            etag = first.headers["etag"]
            assert etag == '"' + ref.split("?v=")[1] + '"'
            again = http.get(ref, headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            assert http.get(ref, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
            assert http.get(ref, headers={"If-None-Match": '"other"'}).status_code == 200
            plain = http.get(ref.split("?")[0])
            assert plain.status_code == 200 and plain.headers["cache-control"] == "no-cache"
            assert plain.content == first.content
            stale = http.get(ref.split("?")[0] + "?v=0000000000000000")
            assert stale.headers["cache-control"] == "no-cache"


def test_docs_assets_are_not_in_the_openapi_document(app):
    with serve(app) as url:
        doc = httpx.get(url + "/openapi.json", timeout=30).json()
    assert not [p for p in doc["paths"] if p.startswith(("/docs", "/redoc"))]


# ---------------------------------------------------------------- headless Chromium
def _render(url: str) -> str:
    """The DOM of ``url`` after its scripts ran, with every other host unreachable."""
    browser = chromium_binary()
    if browser is None:
        pytest.skip("no chromium binary (apt-get install chromium) to render the docs pages")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             # Offline: only loopback resolves, as on a cluster without internet.
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             # Run the page's scripts (fetching /openapi.json, rendering) before dumping.
             "--virtual-time-budget=20000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=False,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _operations(url: str, headers: dict[str, str] | None = None) -> set[tuple[str, str]]:
    doc = httpx.get(url, headers=headers, timeout=30).json()
    ops = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert ("POST", "/v1/functions/{name}/jacobian") in ops
    return ops


def test_swagger_ui_renders_every_operation_offline(site):
    url, prefix = site
    dom = _render(f"{url}{prefix}/docs")
    shown = set(re.findall(
        r'class="opblock-summary-method">(\w+)</span>.*?class="opblock-summary-path" data-path="([^"]+)"',
        dom, re.S))
    assert shown == _operations(f"{url}{prefix}/openapi.json"), dom[:2000]
    assert "Failed to load API definition" not in dom


def test_redoc_renders_every_operation_offline(site):
    url, prefix = site
    dom = _render(f"{url}{prefix}/redoc")
    shown = {(m.upper(), p) for m, p in re.findall(
        r'class="[^"]*\bhttp-verb\b[^"]*">(\w+)</span><span[^>]*>([^<]+)</span>', dom)}
    assert shown == _operations(f"{url}{prefix}/openapi.json"), dom[:2000]


def test_the_pages_load_openly_and_the_document_follows_docs_auth():
    """With API keys the pages still load without one (a page load cannot send a key:
    they ask for it); /openapi.json wants the key while DOCS_AUTH is on (the default);
    the Swagger UI and ReDoc files are public code; a name outside the asset list is a 404."""
    from jacobian_service.docs_ui import ASSETS_URL

    with serve(real_app(functions="jacobian_service.examples", api_keys="k1")) as url:
        for page in ("/docs", "/redoc"):
            r = httpx.get(url + page, timeout=30)
            assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
            assert 'id="api-key"' in r.text
        assert httpx.get(url + "/openapi.json", timeout=30).status_code == 401
        assert httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer no"}, timeout=30).status_code == 403
        assert httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer k1"}, timeout=30).status_code == 200
        assert httpx.get(url + f"{ASSETS_URL}/swagger-ui.css", timeout=30).status_code == 200
        assert httpx.get(url + f"{ASSETS_URL}/docs.js", timeout=30).status_code == 200
        missing = httpx.get(url + f"{ASSETS_URL}/..%2Fsettings.py", timeout=30)
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")
    with serve(real_app(functions="jacobian_service.examples", api_keys="k1", docs_auth=False)) as url:
        assert httpx.get(url + "/openapi.json", timeout=30).status_code == 200
        assert httpx.get(url + "/v1/info", timeout=30).status_code == 401  # the API keeps its key


# ---------------------------------------------------------------- a user, with a key
# Swagger UI's "Try it out" on one operation: opens it, picks the function, sets the
# body, executes, and reads the status shown.
_TRY_IT = r"""
(async (path, name, body) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (f, t = 30000) => { const end = Date.now() + t;
    while (Date.now() < end) { const v = f(); if (v) return v; await sleep(100); } return null; };
  const block = [...document.querySelectorAll('.opblock')].find(
    e => e.querySelector('.opblock-summary-path')?.getAttribute('data-path') === path);
  block.querySelector('.opblock-summary-control').click();
  (await until(() => block.querySelector('.try-out__btn'))).click();
  const select = await until(() => block.querySelector('.parameters select'));
  Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype, 'value').set.call(select, name);
  select.dispatchEvent(new Event('change', {bubbles: true}));
  if (body === null) {  // the examples of the function picked (those that name it)
    await until(() => [...block.querySelectorAll('select.examples-select-element')].every(
      list => list.value === name || ![...list.options].some(o => o.value === name)), 5000);
  } else {
    const text = await until(() => block.querySelector('textarea.body-param__text'));
    Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(text, body);
    text.dispatchEvent(new Event('input', {bubbles: true}));
  }
  await sleep(200);
  block.querySelector('.execute').click();
  await until(() => block.querySelector('.live-responses-table .response .response-col_status'), 60000);
  return {status: block.querySelector('.live-responses-table .response .response-col_status').textContent.trim(),
          curl: block.querySelector('.curl')?.textContent || ''};
})
"""

_ENTER_KEY = r"""
(key => {
  const form = document.getElementById('api-key');
  form.elements.key.value = key;
  form.requestSubmit();
  return true;
})
"""


@pytest.fixture(scope="module", params=["", PREFIX], ids=["root", "prefixed"])
def keyed_site(request):
    """A server with API keys and DOCS_AUTH on (the default), at the root or under PREFIX."""
    app = real_app(functions="jacobian_service.examples", api_keys="k1")
    prefix = request.param
    with serve(_mounted(app, prefix) if prefix else app) as url:
        yield url, prefix


def _mounted(app, prefix: str):
    """``app`` under ``prefix``, its lifespan run (Starlette runs no mounted app's), so
    that its engines serve "Try it out"."""
    outer = Starlette(routes=[Mount(prefix, app)])

    async def asgi(scope, receive, send):
        await (app if scope["type"] == "lifespan" else outer)(scope, receive, send)

    return asgi


def test_a_user_with_a_key_reads_and_tries_the_api_in_a_real_browser(keyed_site):
    """What a user of a production server does: open /docs (no key can go with a page
    load), be asked for the key, see every operation, "Try it out" with the key; then
    /redoc in the same tab without being asked again. Nothing leaves this server."""
    from tests._cdp import Chromium

    url, prefix = keyed_site
    ops = _operations(f"{url}{prefix}/openapi.json", headers={"Authorization": "Bearer k1"})
    with Chromium() as browser:
        browser.goto(f"{url}{prefix}/docs")
        browser.wait_for("document.getElementById('api-key') && !document.getElementById('api-key').hidden")
        assert browser.eval("document.querySelectorAll('.opblock').length") == 0
        browser.eval(f"{_ENTER_KEY}('wrong')")
        browser.wait_for("document.getElementById('api-key-message').textContent.includes('refused')")
        browser.eval(f"{_ENTER_KEY}('k1')")
        browser.wait_for(f"document.querySelectorAll('.opblock').length === {len(ops)}")
        # (kept per prefix: test_browser_round17)
        stored = "jacobian-service-api-key" + (f" {prefix}" if prefix else "")
        assert browser.eval(f"sessionStorage.getItem({stored!r})") == "k1"
        tried = browser.eval(f"{_TRY_IT}('/v1/functions/{{name}}/jacobian', 'sin', '{{\"inputs\": [[0.5, 1.0]]}}')",
                             timeout_s=90)
        assert tried["status"] == "200", tried
        assert "Bearer k1" in tried["curl"] and f"{url}{prefix}/v1/functions/sin/jacobian" in tried["curl"], tried
        assert _outside(browser.requests(), url) == []
        assert _csp_violations(browser.messages()) == []  # the CSP holds Swagger UI back from nothing

        browser.goto(f"{url}{prefix}/redoc")
        browser.wait_for(f"document.querySelectorAll('.http-verb').length >= {len(ops)}")
        assert browser.eval("document.getElementById('api-key').hidden") is True
        # (ReDoc's logo on cdn.redoc.ly is out of our copy of its bundle: test_browser_round7.py)
        assert _outside(browser.requests(), url) == []
        assert _csp_violations(browser.messages()) == [], browser.messages()


def _csp_violations(messages: list[str]) -> list[str]:
    return [m for m in messages if "Content Security Policy" in m]


def _outside(requests: list[str], url: str) -> list[str]:
    """The requests that left this server (a blob: or data: URL is made in the page)."""
    return [u for u in requests if not u.startswith((url + "/", "data:", f"blob:{url}/"))]


def test_picking_a_function_in_try_it_out_picks_its_example(keyed_site):
    """The examples are per function, but Swagger UI kept the first function's whatever
    function "Try it out" picked: Execute sent add_square's x and y to sin (a 422), and
    the sparsity query add_square's shapes. Picking the function now picks its examples,
    and Execute with nothing else touched answers 200."""
    from tests._cdp import Chromium

    url, prefix = keyed_site
    with Chromium() as browser:
        browser.goto(f"{url}{prefix}/docs")
        browser.wait_for("document.getElementById('api-key') && !document.getElementById('api-key').hidden")
        browser.eval(f"{_ENTER_KEY}('k1')")
        browser.wait_for("document.querySelectorAll('.opblock-summary-path').length > 0")
        tried = browser.eval(f"{_TRY_IT}('/v1/functions/{{name}}/jacobian', 'sin', null)", timeout_s=90)
        assert tried["status"] == "200", tried
        assert '"x"' in tried["curl"] and '"y"' not in tried["curl"], tried
        tried = browser.eval(f"{_TRY_IT}('/v1/functions/{{name}}/sparsity', 'reaction_diffusion', null)", timeout_s=90)
        assert tried["status"] == "200" and "shapes=3%2C3&" in tried["curl"], tried
