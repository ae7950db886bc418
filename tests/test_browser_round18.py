"""A real browser as the outside testers use one, round 18.

Round 17's gateway (deploy/nginx.conf.template's error pages in front of the service,
CORS_ORIGINS naming the page's origin) and its headless Chromium:

* a page calling with ``credentials: 'include'`` (a sign-in proxy's cookie) read "Failed
  to fetch" for every refusal of the gateway itself (a body past client_max_body_size,
  no replica answering, one too slow), where a page without credentials read their
  problem+json: those answers carried no ``Access-Control-Allow-Credentials``, which
  the service's own answers to a named origin carry. They carry it now, for a named
  origin (not under ``*`` alone, as the service).
"""

from __future__ import annotations

import json

import httpx

from .test_browser_round7 import _on_page
from .test_browser_round17 import CPU, _THROUGH_THE_GATEWAY
from .test_browser_round17 import browser, gateway, nginx, page  # noqa: F401 (round 17's fixtures)


def test_a_page_with_credentials_reads_the_gateways_own_refusals(nginx, page, browser):
    """Each of round 17's refusals of the gateway, fetched with ``credentials: 'include'``
    (the keyed 503's preflight too): the problem+json a page without them reads, the
    status, code and request id; over HTTP, the credentials header names only what the
    service's own answer to that origin does (none for another origin)."""
    _on_page(browser, page)
    script = _THROUGH_THE_GATEWAY.replace("{method: 'POST',", "{credentials: 'include', method: 'POST',").replace(
        "fetch(API + '/down/v1/functions')", "fetch(API + '/down/v1/functions', {credentials: 'include'})").replace(
        "fetch(API + '/silent/v1/functions')", "fetch(API + '/silent/v1/functions', {credentials: 'include'})")
    assert script.count("credentials: 'include'") == 4, script
    got = browser.eval(script % {"api": json.dumps(nginx), "cpu": json.dumps(CPU)}, timeout_s=60)
    expected = {"large": (413, "payload_too_large"), "down": (503, "unavailable"), "downKeyed": (503, "unavailable"),
                "silent": (504, "timeout")}
    for name, (status, code) in expected.items():
        answer = got[name]
        assert isinstance(answer, dict), (name, answer)  # (it was "TypeError: Failed to fetch")
        assert (answer["status"], answer["type"], answer["body"]["code"], answer["body"]["request_id"]) == (
            status, "application/problem+json", code, answer["id"]), (name, answer)
    for origin, credentials in ((page, "true"), ("http://elsewhere.example", None)):
        r = httpx.get(nginx + "/down/v1/functions", headers={"Origin": origin}, timeout=10)
        assert r.status_code == 503 and r.headers.get("access-control-allow-credentials") == credentials, r.headers
        r = httpx.options(nginx + "/down/v1/functions", headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
                          timeout=10)
        assert r.headers.get("access-control-allow-credentials") == credentials, r.headers
    browser.goto("about:blank")
