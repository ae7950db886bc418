"""A real browser as the outside testers use one, round 11: what the document leaves
out, and a page's conditional requests.

Round 10's API server (CORS_ORIGINS naming one page origin, an API key; the app run by
the tests' uvicorn) and round 5's headless Chromium for the module:

* OPTIONS and HEAD are answered on every path and are not operations of the OpenAPI
  document (as FastAPI leaves them out; schemathesis' checks hold the server to that):
  the document says so where /docs and /redoc show it, both pages render it with no
  console error, and every path's plain OPTIONS ``Allow``, less those two, is the methods
  the document lists for it, every other method a 405 (httpx: no browser needed);
* a page of the allowed origin revalidating (If-None-Match, If-Unmodified-Since,
  If-Range; If-Modified-Since passed already) reads the whole answer, as any other
  client does: no answer carries a validator (no ETag, no Last-Modified), and none of
  fetch's cache modes keeps or revalidates one.
"""

from __future__ import annotations

import json

import httpx

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _console_errors, _on_page
from .test_browser_round10 import api  # noqa: F401 (round 10's: the server, CORS_ORIGINS naming that page, a key)

KEY = {"Authorization": "Bearer k1"}


# What schemathesis sends a path for its unsupported_method check (its coverage phase's
# default unexpected methods), and the methods it takes as implicit (allow_header_conformance).
_PROBED = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "QUERY"}
_IMPLICIT = {"HEAD", "OPTIONS"}


def test_options_and_head_are_told_once_and_not_listed(api):
    """The document lists exactly the table's operations, no OPTIONS nor HEAD, and says
    in its description (which /docs and /redoc show) that every path answers them; on
    every path a plain OPTIONS is the 204 whose ``Allow``, less OPTIONS and HEAD, names
    exactly the methods the document lists, and every other method schemathesis tries is
    the 405 with that ``Allow``."""
    from jacobian_service.routes import ROUTES

    with httpx.Client(base_url=api, headers=KEY, timeout=30) as c:
        doc = c.get("/openapi.json").json()
        listed = {path: {method.upper() for method in ops} for path, ops in doc["paths"].items()}
        table: dict[str, set[str]] = {}
        for route in ROUTES:
            table.setdefault(route.path, set()).add(route.method)
        assert listed == table
        description = doc["info"]["description"]
        assert "`OPTIONS` (204" in description and "`HEAD`" in description, description
        for path, methods in listed.items():
            url = path.replace("{name}", "sin")
            r = c.options(url)
            assert r.status_code == 204, (path, r.text)
            allow = set(r.headers["allow"].split(", "))
            assert allow - _IMPLICIT == methods and allow >= {"OPTIONS"}, (path, allow)
            for method in sorted(_PROBED - methods - _IMPLICIT):
                r = c.request(method, url)
                assert (r.status_code, r.headers.get("allow"), r.json()["code"]) == (405, ", ".join(sorted(allow)),
                                                                                   "method_not_allowed"), (path, method)


def test_the_docs_pages_tell_it_and_render_with_no_console_error(api, browser):
    """/docs and /redoc (the key given, as their prompt keeps it; each typed with a trailing
    slash, and redirected) draw the document's description, the sentence on OPTIONS and
    HEAD, and every operation, with nothing in the console."""
    browser.goto(api + "/healthz")  # (the key the pages' prompt keeps in this tab, given before they load)
    browser.eval("sessionStorage.setItem('jacobian-service-api-key', 'k1'); true")
    browser.events.clear()
    browser.goto(api + "/docs/")  # (typed with a trailing slash: redirected)
    browser.wait_for("document.querySelectorAll('.opblock').length >= 14", 60)
    assert browser.eval("location.pathname") == "/docs"
    info = browser.wait_for("document.querySelector('.info .markdown, .info .renderedMarkdown')?.textContent")
    assert "Every path also answers OPTIONS (204" in info, info
    assert browser.eval("document.querySelectorAll('.opblock-options, .opblock-head').length") == 0
    assert _console_errors(browser) == []
    browser.events.clear()
    browser.goto(api + "/redoc/")
    text = browser.wait_for("document.body.innerText.includes('Every path also answers') && "
                            "document.body.innerText.includes('Every registered function') && document.body.innerText", 60)
    assert "not listed as operations" in text and browser.eval("location.pathname") == "/redoc"
    assert _console_errors(browser) == []
    browser.goto("about:blank")


# A page's revalidations: each conditional header a library or a page sends (an ETag a
# gateway in front added; If-Range beside a Range that is not the simple one).
_CONDITIONS = {
    "If-None-Match": '"a5f0", W/"b1"',
    "If-Modified-Since": "Mon, 26 Jul 1997 05:00:00 GMT",
    "If-Unmodified-Since": "Mon, 26 Jul 1997 05:00:00 GMT",
    "If-Range": '"a5f0"',
}


def test_a_page_revalidating_reads_the_whole_answer(api, page, browser):
    """A page of the allowed origin sending If-None-Match, If-Unmodified-Since or If-Range
    (with a Range) read "TypeError: Failed to fetch": its preflight refused the header
    (only If-Modified-Since passed), where any other client read the answer. Now each is
    the 200 a plain call gets, its very bytes, with no validator (ETag, Last-Modified) and
    ``no-store``; so are fetch's cache modes (no-store, no-cache, reload, force-cache), a
    second call never served from a cache."""
    _on_page(browser, page)
    calls = {
        "functions": ["/v1/functions", {}],
        "document": ["/openapi.json", {}],
        "sparsity": ["/v1/functions/lorenz96/sparsity?shapes=4", {}],
        "jacobian": ["/v1/functions/sin/jacobian", {"method": "POST", "body": json.dumps({"inputs": [[0.5, 1.0]]})}],
    }
    got = browser.eval(f"""(async () => {{
      const api = {json.dumps(api)}, conditions = {json.dumps(_CONDITIONS)}, out = {{}};
      const headers = {{Authorization: 'Bearer k1', 'Content-Type': 'application/json'}};
      const read = (path, init) => fetch(api + path, init).then(async r => [r.status, r.headers.get('etag'),
        r.headers.get('last-modified'), r.headers.get('cache-control'), await r.text(), r.headers.get('x-request-id')],
        e => String(e));
      for (const [name, [path, init]] of Object.entries({json.dumps(calls)})) {{
        out[name] = {{plain: await read(path, {{...init, headers}})}};
        for (const [condition, value] of Object.entries(conditions)) {{
          const more = condition === 'If-Range' ? {{Range: 'bytes=0-9, 20-29'}} : {{}};
          out[name][condition] = await read(path, {{...init, headers: {{...headers, ...more, [condition]: value}}}});
        }}
        for (const cache of ['no-store', 'no-cache', 'reload', 'force-cache', 'default'])
          out[name][cache] = await read(path, {{...init, headers, cache}});
      }}
      return out;
    }})()""", timeout_s=60)
    served = [answer[5] for answers in got.values() for answer in answers.values() if isinstance(answer, list)]
    assert len(set(served)) == len(served), served  # each answered by the server, none from a cache
    for name, answers in got.items():
        status, etag, modified, cache_control, body, _ = answers.pop("plain")
        assert (status, etag, modified, cache_control) == (200, None, None, "no-store"), (name, answers)
        # (the computed answers' meta, timings and the pattern's cache, differ call to call)
        result = {"jacobian": "jacobian", "sparsity": "matrix"}.get(name)
        for how, answer in answers.items():
            assert isinstance(answer, list), (name, how, answer)
            assert answer[:4] == [200, None, None, "no-store"], (name, how, answer)
            if result:
                assert json.loads(answer[4])[result] == json.loads(body)[result], (name, how)
            else:
                assert answer[4] == body, (name, how)
    browser.goto("about:blank")


def test_a_path_typed_with_a_trailing_slash_is_redirected_to_the_route(api):
    """``/docs/`` (typed so into an address bar), ``/v1/functions/``, ``/openapi.json/``
    were 404 problem+json; with API keys ``/docs/`` was even a 401, the pages' openness
    being for ``/docs`` alone. Now a GET or HEAD of a route's path but for a trailing slash
    is the 307 to it (as Starlette's and FastAPI's routers answer), relative (``../docs``:
    it holds behind a proxy's prefix) and with its query; past the key check as every
    request (a guarded path without the key: the 401). Other methods keep a 404 that
    names the path; ``/`` and ``/docs//`` stay 404s. (/docs/ and /redoc/ in Chromium: below.)"""
    with httpx.Client(base_url=api, timeout=30) as c:
        for path, where, key in [("/docs/", "../docs", False), ("/redoc/", "../redoc", False),
                                 ("/v1/functions/", "../functions", True), ("/openapi.json/", "../openapi.json", True),
                                 ("/v1/functions/lorenz96/sparsity/?shapes=4", "../sparsity?shapes=4", True)]:
            for method in ("GET", "HEAD"):
                r = c.request(method, path, headers=KEY)
                assert (r.status_code, r.headers.get("location"), r.content) == (307, where, b""), (method, path)
                if key:
                    assert c.request(method, path).status_code == 401, (method, path)
        r = c.get("/v1/functions/lorenz96/sparsity/?shapes=4", headers=KEY, follow_redirects=True)
        assert (r.status_code, str(r.url)) == (200, api + "/v1/functions/lorenz96/sparsity?shapes=4"), r.text
        r = c.post("/v1/functions/sin/jacobian/", headers=KEY, json={"inputs": [[0.5]]})
        assert (r.status_code, r.json()["detail"]) == (404, "no route for POST /v1/functions/sin/jacobian/: the path "
                                                            "takes no trailing slash (/v1/functions/sin/jacobian)"), r.text
        for path in ("/", "/docs//"):
            assert c.get(path, headers=KEY).status_code == 404, path
