"""A real browser as the outside testers use one, round 19.

Round 17's gateway (deploy/nginx.conf.template's error pages in front of the service,
CORS_ORIGINS naming the page's origin) and its headless Chromium:

* a page's call with a key (or any call a preflight precedes) while the replica it was
  sent to did not answer in the gateway's timeouts (a replica's host gone without a
  reset, its connect timeout; one wedged) read "Failed to fetch", the console "does
  not have HTTP ok status": the gateway answered the preflight itself with its 504,
  where a call without a preflight reads that 504's problem+json. The preflight passes
  now, as it does while no replica answers (round 17), and the page reads the 504;
* the gateway's own preflights (those two) said nothing of Private Network Access, which
  the service grants the origins it allows: they grant it too. (Chromium 156, here,
  sends no such preflight: its Local Network Access asks the user instead, with no
  header a server can answer; older Chromium sends it. So this is shown over HTTP.)
* a page that sends its own ``X-Request-ID`` (to quote it, as the service echoes it)
  read nginx's id in the gateway's own refusals instead, an id its access log did not
  hold (it logged the client's, or "-"). The gateway echoes the client's id as the
  service does, logs the id it answers, and passes it to the replica. Those refusals'
  Resource Timing was zeros for the page: they allow it, as the service's answers do.

(Probed and found right, in Chromium, directly and behind the whole template in front of
``serve`` with an API key: a 16 MB .npy answer's Content-Length read by a page, as a
progress total, streamed or not; an 18 MB JSON Jacobian, chunked, read through a reader,
its first bytes after 33 ms where its whole text takes 245 ms to encode (no length is
known before: the encoding is written as it goes; buffering it to count would hold it
all and delay the first byte); an abort mid-stream giving its stream budget back; a
deadline past mid-stream cut as a reset, which nginx passes on as a cut, never as an end;
422s read with their request ids.)
"""

from __future__ import annotations

import json

import httpx

from .test_browser_round7 import _console_errors, _on_page
from . import test_browser_round17 as round17
from .test_browser_round17 import CPU

# Round 17's fixtures (one Chromium, the page, the services under their prefixes, nginx
# with the shipped template's error pages: /silent/ a replica that never answers, read
# timeout 1 s; /down/ one that is gone), bound here so that pytest finds them.
browser, page, gateway, nginx = round17.browser, round17.page, round17.gateway, round17.nginx


_SILENT = r"""(async () => {
  const API = %(api)s, out = {};
  const read = async r => ({status: r.status, type: r.headers.get('content-type'), id: r.headers.get('x-request-id'),
                            body: await r.json()});
  const H = {'Content-Type': 'application/json', Authorization: 'Bearer cpu-key'};
  for (const credentials of ['same-origin', 'include'])
    out[credentials] = await fetch(API + '/silent/v1/functions/sin/jacobian', {method: 'POST', credentials, headers: H,
      body: '{"inputs": [[0.5]]}'}).then(read, e => String(e));
  return out;
})()"""


def test_a_page_reads_the_gateways_timeout_of_a_call_with_a_preflight(nginx, page, browser):
    """A page's keyed call (preflighted) to a replica that never answers: "Failed to
    fetch" (the gateway's 504 was the preflight's answer); it reads the 504 now, with
    or without credentials, as a call without a preflight does. Over HTTP, the
    gateway's own preflights (this one and no replica's) grant Private Network Access
    to the allowed origin as the service does, and nothing to another origin."""
    _on_page(browser, page)
    got = browser.eval(_SILENT % {"api": json.dumps(nginx)}, timeout_s=60)
    for credentials, answer in got.items():
        assert isinstance(answer, dict), (credentials, answer)  # (it was "TypeError: Failed to fetch")
        assert (answer["status"], answer["type"], answer["body"]["code"], answer["body"]["request_id"]) == (
            504, "application/problem+json", "timeout", answer["id"]), (credentials, answer)
    assert [m for m in _console_errors(browser) if "CORS" in m] == []
    browser.goto("about:blank")

    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type",
             "Access-Control-Request-Private-Network": "true"}
    service = httpx.options(nginx + CPU + "/v1/functions/sin/jacobian", headers={**asked, "Origin": page}, timeout=10)
    assert service.headers["access-control-allow-private-network"] == "true"  # (the service's own, through)
    for path in ("/silent/", "/down/"):
        r = httpx.options(nginx + path + "v1/functions/sin/jacobian", headers={**asked, "Origin": page}, timeout=10)
        assert (r.status_code, r.headers.get("access-control-allow-origin"),
                r.headers.get("access-control-allow-private-network")) == (204, page, "true"), (path, r.headers)
        # (not asked: not granted)
        r = httpx.options(nginx + path + "v1/functions/sin/jacobian", headers={
            **asked, "Origin": page, "Access-Control-Request-Private-Network": ""}, timeout=10)
        assert r.status_code == 204 and "access-control-allow-private-network" not in r.headers, (path, r.headers)
        r = httpx.options(nginx + path + "v1/functions/sin/jacobian", headers={**asked, "Origin": "http://elsewhere.example"},
                          timeout=10)
        assert r.status_code in (503, 504) and not {"access-control-allow-origin", "access-control-allow-private-network"} & set(
            r.headers), (path, r.headers)


_IDS = r"""(async () => {
  const API = %(api)s, out = {};
  const read = async r => ({status: r.status, header: r.headers.get('x-request-id'), body: (await r.json()).request_id});
  const H = {'Content-Type': 'application/json', Authorization: 'Bearer cpu-key'};
  const calls = {
    large: [%(cpu)s + '/v1/functions/sin/jacobian', {method: 'POST', headers: {...H, 'Content-Type': 'application/x-npy'},
            body: new Uint8Array(2 << 20)}],
    down: ['/down/v1/functions', {}],
    downKeyed: ['/down/v1/functions/sin/jacobian', {method: 'POST', headers: H, body: '{"inputs": [[0.5]]}'}],
    silent: ['/silent/v1/functions', {}],
    service: [%(cpu)s + '/v1/functions', {}],
  };
  for (const [name, [path, init]] of Object.entries(calls))
    for (const id of ['page-7f3a 2026-12-07', null]) {
      const headers = {...(init.headers || {})};
      if (id) headers['X-Request-ID'] = id;
      out[name + (id ? ' own' : ' none')] = await fetch(API + path, {...init, headers}).then(read, e => String(e));
    }
  return out;
})()"""


_TIMING = r"""(async () => {
  const API = %(api)s, out = {};
  for (const path of ['/down/v1/functions', '/silent/v1/functions', %(cpu)s + '/v1/functions']) {
    await fetch(API + path).then(r => r.text());
    out[path] = performance.getEntriesByName(API + path).pop().toJSON();
  }
  return out;
})()"""


def test_a_page_reads_its_own_request_id_in_the_gateways_refusals(nginx, page, browser):
    """A page that sends its own X-Request-ID reads it back, header and body, in each of
    the gateway's own refusals (413, 503 with and without a preflight, 504) as in the
    service's answers (it read nginx's id); without one, header and body hold one id."""
    _on_page(browser, page)
    got = browser.eval(_IDS % {"api": json.dumps(nginx), "cpu": json.dumps(CPU)}, timeout_s=60)
    for call, answer in got.items():
        assert isinstance(answer, dict), (call, answer)
        assert answer["header"] == answer["body"], (call, answer)
        if call.endswith(" own"):
            assert answer["header"] == "page-7f3a 2026-12-07", (call, answer)  # (was nginx's $request_id)
        else:
            assert len(answer["header"]) == 32, (call, answer)
    assert {a["status"] for a in got.values()} == {413, 503, 504, 401}, got
    # Their Resource Timing, as the service's answers give it (Timing-Allow-Origin): it
    # was zeros (no request or response start, no size).
    timing = browser.eval(_TIMING % {"api": json.dumps(nginx), "cpu": json.dumps(CPU)}, timeout_s=60)
    for path, entry in timing.items():
        assert entry["requestStart"] > 0 and entry["responseStart"] > 0 and entry["encodedBodySize"] > 0, (path, timing)
    browser.goto("about:blank")
    # Over HTTP: an id the service would not echo (over 128 characters), or one that
    # would break the JSON it is written into ('"', '\'), gets the gateway's own.
    for sent, echoed in (("x" * 128, True), ("x" * 129, False), ('a"b', False), ("a\\b", False)):
        r = httpx.get(nginx + "/down/v1/functions", headers={"X-Request-ID": sent}, timeout=10)
        assert r.status_code == 503 and r.json()["request_id"] == r.headers["x-request-id"], (sent, r.text)
        assert (r.headers["x-request-id"] == sent) is echoed and len(r.headers["x-request-id"]) in (32, 128), sent
