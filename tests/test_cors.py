"""Browsers on other origins may call the API when CORS_ORIGINS names them.

Over HTTP (preflights, headers on answers and on refusals, auth still in force), and in
a real browser (Debian's ``chromium``, headless; skipped when it is not installed): a
page served from another origin posts a Jacobian request with an API key and reads the
answer, and the same page against a server without CORS_ORIGINS is blocked by the
browser.
"""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests._client_support import real_app, serve
from tests.test_docs_ui import _render

PAGE_ORIGIN = "http://page.example"
PREFLIGHT = {
    "Origin": PAGE_ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-request-timeout",
}
SIN = "/v1/functions/sin/jacobian"


@pytest.fixture(scope="module")
def url():
    with serve(real_app(functions="jacobian_service.examples", api_keys="k1",
                        cors_origins=f"https://other.example, {PAGE_ORIGIN}")) as url:
        yield url


def test_a_preflight_is_answered_before_auth(url):
    r = httpx.options(url + SIN, headers=PREFLIGHT, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-request-timeout"} <= allowed
    # A named origin may send credentials (test_browser_round3.py has why), by name only.
    assert r.headers["access-control-allow-credentials"] == "true"


def test_answers_and_refusals_carry_the_headers_a_script_needs(url):
    ok = httpx.post(url + SIN, json={"inputs": [[0.5, 1.0]]},
                    headers={"Origin": PAGE_ORIGIN, "Authorization": "Bearer k1"}, timeout=30)
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(ok.json()["jacobian"]["data"], np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    assert ok.headers["access-control-allow-origin"] == PAGE_ORIGIN
    exposed = {h.strip().lower() for h in ok.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after"} <= exposed
    # A refusal is readable too (else a script sees only "failed to fetch"), and auth holds.
    refused = httpx.post(url + SIN, json={"inputs": [[0.5]]}, headers={"Origin": PAGE_ORIGIN}, timeout=10)
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert refused.headers["access-control-allow-origin"] == PAGE_ORIGIN


def _exposed(response: httpx.Response) -> set[str]:
    return {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}


def test_every_header_the_service_sends_for_scripts_is_exposed():
    """A browser hides from a script every response header not in Expose-Headers: a
    streamed Jacobian's X- headers, a 405's Allow, a 401's WWW-Authenticate, a binary
    answer's Content-Disposition must all be readable."""
    with serve(real_app(functions="jacobian_service.examples", api_keys="k1", cors_origins=PAGE_ORIGIN,
                        stream_threshold_bytes=0)) as api:
        key = {"Origin": PAGE_ORIGIN, "Authorization": "Bearer k1"}
        streamed = httpx.post(api + SIN, json={"inputs": [[0.5, 1.0]]}, headers={**key, "Accept": "application/x-npy"},
                              timeout=30)
        assert streamed.status_code == 200, streamed.text
        # (X-Content-Type-Options is the browser's own, for no script)
        sent = {h for h in streamed.headers if h.startswith("x-") and h not in ("x-request-id", "x-content-type-options")}
        assert sent == {"x-chunk-size", "x-device", "x-queue-ms", "x-batch-size"}  # (no mode, no compute time: streamed)
        assert sent <= _exposed(streamed)
        wrong_method = httpx.delete(api + SIN, headers=key, timeout=10)
        assert wrong_method.status_code == 405 and "allow" in _exposed(wrong_method)
        no_key = httpx.get(api + "/v1/info", headers={"Origin": PAGE_ORIGIN}, timeout=10)
        assert no_key.status_code == 401 and "www-authenticate" in _exposed(no_key)
        assert _exposed(streamed) == {"x-request-id", "retry-after", "content-length", "content-disposition",
                                      "www-authenticate", "allow", "x-chunk-size", "x-device", "x-queue-ms",
                                      "x-batch-size", "x-mode", "x-compute-ms", "x-bfloat16", "x-unbatched", "server-timing",
                                      "accept-encoding"}  # (a 415's: test_browser_round7.py)


def test_other_origins_get_no_permission(url):
    other = {**PREFLIGHT, "Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in httpx.options(url + SIN, headers=other, timeout=10).headers
    r = httpx.post(url + SIN, json={"inputs": [[0.5]]}, headers={"Origin": "http://evil.example",
                                                                 "Authorization": "Bearer k1"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_without_the_setting_there_are_no_cors_headers():
    with serve(real_app(functions="jacobian_service.examples")) as plain:
        r = httpx.options(plain + SIN, headers=PREFLIGHT, timeout=10)  # (a plain OPTIONS here: what the path takes)
        assert (r.status_code, r.headers["allow"]) == (204, "OPTIONS, POST")
        assert not any(k.startswith("access-control-") for k in r.headers)


_PAGE = """<!doctype html><html><body data-result="pending"><script>
fetch("%(api)s/v1/functions/sin/jacobian", {
  method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer k1"},
  body: JSON.stringify({inputs: [[0.5, 1.0]]}),
}).then(r => r.json().then(doc => document.body.setAttribute("data-result", JSON.stringify(
  {status: r.status, request_id: r.headers.get("X-Request-ID"), jacobian: doc.jacobian.data}))))
  .catch(e => document.body.setAttribute("data-result", JSON.stringify({error: String(e)})));
</script></body></html>"""


def _browser_result(page_url: str) -> dict:
    dom = _render(page_url)
    found = re.search(r'data-result="([^"]*)"', dom)
    assert found, dom[:2000]
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_a_page_of_another_origin_calls_the_api_in_a_real_browser():
    apis: dict[str, str] = {}

    async def page(request):
        return HTMLResponse(_PAGE % {"api": apis[request.path_params["which"]]})

    with serve(Starlette(routes=[Route("/{which}", page)])) as page_url:
        # The page's origin differs from the API's by port: the browser asks first.
        with serve(real_app(functions="jacobian_service.examples", api_keys="k1", cors_origins=page_url)) as api, \
                serve(real_app(functions="jacobian_service.examples", api_keys="k1")) as closed:
            apis.update(open=api, closed=closed)
            got = _browser_result(page_url + "/open")
            assert got.get("status") == 200, got
            np.testing.assert_allclose(got["jacobian"], np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
            assert len(got["request_id"]) == 32
            # The same page against a server that names no origin: the browser blocks it.
            assert "error" in _browser_result(page_url + "/closed")


def test_origins_are_written_as_browsers_send_them():
    """An origin copied from the address bar (a trailing /, capitals, the default port)
    matches the Origin the browser sends; before, it silently never matched."""
    from jacobian_service.settings import Settings

    settings = Settings(cors_origins="http://127.0.0.1:18090/, HTTP://LocalHost:18090,https://App.Example:443,*")
    assert settings.cors_origin_list == ("http://127.0.0.1:18090", "http://localhost:18090", "https://app.example", "*")
    with serve(real_app(functions="jacobian_service.examples", cors_origins="HTTP://Page.Example/")) as api:
        r = httpx.options(api + SIN, headers=PREFLIGHT, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE_ORIGIN


@pytest.mark.parametrize("entry", ["http://page.example/app", "page.example", "page.example:80", "http://h:99999",
                                   "http://h/?x", "http://user@h", "http://h//", "https://bücher.example"])
def test_an_entry_that_is_no_origin_stops_start_up(entry):
    from pydantic import ValidationError

    from jacobian_service.settings import Settings

    with pytest.raises(ValidationError, match=f"CORS_ORIGINS entry {re.escape(repr(entry))} is not an origin"):
        Settings(cors_origins=f"https://ok.example,{entry}")


@pytest.mark.parametrize("entry", ["https://*.example.org", "https://%61.org", "http://[1::2::3]"])
def test_an_entry_no_browser_can_send_stops_start_up(entry):
    """A wildcard or an escaped host never arrives in an Origin header: it matched nothing, silently."""
    from pydantic import ValidationError

    from jacobian_service.settings import Settings

    with pytest.raises(ValidationError, match=f"CORS_ORIGINS entry {re.escape(repr(entry))}"):
        Settings(cors_origins=f"https://ok.example,{entry}")
    assert Settings(cors_origins="http://[0:0::1]:8080").cors_origin_list == ("http://[::1]:8080",)


def test_preflights_count_under_their_endpoint(url):
    """A preflight counts under the route its path names, apart from the calls (code
    "preflight"): it was counted as endpoint "_unrouted" (no route has method OPTIONS)."""
    labels = 'code="preflight",endpoint="jacobian",function="sin",status="200"'

    def count() -> float:
        text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k1"}, timeout=10).text
        found = re.search(r"^jacobian_service_requests_total\{" + re.escape(labels) + r"\} ([0-9.e+]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = count()
    assert httpx.options(url + SIN, headers=PREFLIGHT, timeout=10).status_code == 200
    assert count() == before + 1
    assert 'endpoint="_unrouted"' not in httpx.get(url + "/metrics", headers={"Authorization": "Bearer k1"}, timeout=10).text


_ALLOWED_HEADERS = ("accept, accept-language, authorization, b3, baggage, cache-control, content-encoding, "
                    "content-language, content-type, expires, if-match, if-modified-since, if-none-match, if-range, "
                    "if-unmodified-since, pragma, range, sentry-trace, traceparent, tracestate, uber-trace-id, x-amzn-trace-id, x-b3-flags, x-b3-parentspanid, x-b3-sampled, x-b3-spanid, "
                    "x-b3-traceid, x-datadog-origin, x-datadog-parent-id, x-datadog-sampling-priority, "
                    "x-datadog-trace-id, x-request-id, x-request-timeout, x-requested-with")


@pytest.mark.parametrize("headers, refused", [
    ({**PREFLIGHT, "Origin": "http://evil.example"}, "the origin 'http://evil.example' is not among CORS_ORIGINS"),
    ({**PREFLIGHT, "Access-Control-Request-Headers": "content-type, x-not-allowed"},
     f"the request header 'x-not-allowed' cannot be sent (allowed: {_ALLOWED_HEADERS})"),
    ({**PREFLIGHT, "Access-Control-Request-Method": "QUERY", "Access-Control-Request-Headers": "x-a, x-b"},
     "the method 'QUERY' is not allowed (allowed: GET, POST, DELETE, HEAD, OPTIONS; PUT and PATCH, which no path "
     "takes, pass to read their 405); "
     f"the request headers 'x-a, x-b' cannot be sent (allowed: {_ALLOWED_HEADERS})"),
])
def test_a_refused_preflight_is_a_problem_like_every_other_error(url, headers, refused):
    """Starlette answered it in plain text ("Disallowed CORS origin"); then the problem
    said "this headers is not allowed here (CORS_ORIGINS)", naming neither the header
    refused nor the right setting. It says what was refused, by name."""
    r = httpx.options(url + SIN, headers={**headers, "X-Request-ID": "pre-1"}, timeout=10)
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "malformed_request" and body["request_id"] == "pre-1" == r.headers["x-request-id"]
    assert body["detail"] == f"CORS preflight refused: {refused}"
