"""A real browser as the outside testers use one, round 18.

Round 17's gateway (deploy/nginx.conf.template's error pages in front of the service,
CORS_ORIGINS naming the page's origin) and its headless Chromium:

* a page calling with ``credentials: 'include'`` (a sign-in proxy's cookie) read "Failed
  to fetch" for every refusal of the gateway itself (a body past client_max_body_size,
  no replica answering, one too slow), where a page without credentials read their
  problem+json: those answers carried no ``Access-Control-Allow-Credentials``, which
  the service's own answers to a named origin carry. They carry it now, for a named
  origin (not under ``*`` alone, as the service);
* PUT and PATCH, which no path takes, had their preflight refused: a page read "Failed
  to fetch" where a DELETE on the same path reads the 405 naming what the path takes.
  They pass the preflight now, and read that 405;
* a sparsity pattern asked with an Accept of none of the service's types was a 406
  naming .npy among the forms (another 406): it names JSON and .npz.

(Probed and found right: every operation's Try it out under ROOT_PATH with its example,
and its 406 / 422 shown; the input-named 422s, the tuple-of-one 406 and a 33 MB sparse
JSON answer written in blocks, each read by a page; an abort mid-body stops encoding.)
"""

from __future__ import annotations

import json

import httpx

from .test_browser_round7 import _console_errors, _on_page
from . import test_browser_round17 as round17
from .test_browser_round17 import CPU, _THROUGH_THE_GATEWAY

# Round 17's fixtures (one Chromium, the page, the services under their prefixes, nginx
# with the shipped template's error pages), bound here so that pytest finds them.
browser, page, gateway, nginx = round17.browser, round17.page, round17.gateway, round17.nginx


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


_METHODS = r"""(async () => {
  const API = %(api)s, out = {};
  const H = {'Content-Type': 'application/json', Authorization: 'Bearer cpu-key'};
  const read = async r => ({status: r.status, allow: r.headers.get('allow'), body: await r.json()});
  for (const method of ['PUT', 'PATCH', 'DELETE'])
    for (const credentials of ['same-origin', 'include'])
      out[method + ' ' + credentials] = await fetch(API + '/v1/functions/sin/jacobian', {method, credentials, headers: H,
        body: '{"inputs": [[0.5]]}'}).then(read, e => String(e));
  out.unkeyed = await fetch(API + '/v1/functions/sin/jacobian', {method: 'PATCH', headers: {'Content-Type': 'application/json'},
    body: '{}'}).then(read, e => String(e));
  return out;
})()"""


def test_a_page_reads_why_put_and_patch_are_refused(gateway, page, browser):
    """No path takes PUT or PATCH: their preflight was refused (400), so a page (a REST
    library's ``update``) read "Failed to fetch" and the console "does not have HTTP ok
    status", where a DELETE on the same path reads the 405 naming what it takes. Their
    preflight passes now: with or without credentials, the page reads the 405 whose
    Allow, and detail, name what the path takes, as DELETE's; without the key, the 401
    every method gets."""
    _on_page(browser, page)
    got = browser.eval(_METHODS % {"api": json.dumps(gateway + CPU)}, timeout_s=60)
    for call, answer in got.items():
        if call == "unkeyed":
            assert isinstance(answer, dict) and (answer["status"], answer["body"]["code"]) == (401, "unauthorized"), answer
            continue
        assert isinstance(answer, dict), (call, answer)  # (it was "TypeError: Failed to fetch")
        method = call.split()[0]
        assert (answer["status"], answer["allow"], answer["body"]["code"], answer["body"]["detail"]) == (
            405, "OPTIONS, POST", "method_not_allowed", f"{method} is not allowed here; allowed: OPTIONS, POST"), (call, answer)
    assert [m for m in _console_errors(browser) if "CORS" in m] == []
    browser.goto("about:blank")


_PATTERN_406 = r"""(async () => {
  const API = %(api)s, H = {Authorization: 'Bearer cpu-key'};
  const r = await fetch(API + '/v1/functions/lorenz96/sparsity?shapes=8', {headers: {...H, Accept: 'image/png'}});
  const doc = await fetch(API + '/openapi.json', {headers: H}).then(r => r.json());
  return {status: r.status, type: r.headers.get('content-type'), body: await r.json(),
          offered: Object.keys(doc.paths['/v1/functions/{name}/sparsity'].get.responses['200'].content)};
})()"""


def test_a_pages_406_for_a_pattern_names_only_its_forms(gateway, page, browser):
    """A sparsity pattern asked with an Accept the service has no form for: the 406 said
    it "allows none of application/json, application/x-npy, application/x-npz", and a
    page that then asked for .npy met another 406 (a pattern is never one .npy). It
    names the forms a pattern has: those the document gives the operation's 200."""
    _on_page(browser, page)
    got = browser.eval(_PATTERN_406 % {"api": json.dumps(gateway + CPU)}, timeout_s=60)
    assert (got["status"], got["type"], got["body"]["code"]) == (406, "application/problem+json", "not_acceptable"), got
    assert got["offered"] == ["application/json", "application/x-npz"], got
    assert got["body"]["detail"] == ("Accept 'image/png' allows none of application/json, application/x-npz "
                                     "(a sparsity pattern's forms)"), got
    browser.goto("about:blank")
