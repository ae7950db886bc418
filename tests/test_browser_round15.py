"""A real browser as the outside testers use one, round 15.

A web developer's page (of the origin CORS_ORIGINS names, with an API key) calling the
service with fetch, in round 5's headless Chromium:

* a small .npy answer, read with a DataView, said nothing of its meta (no X-Queue-Ms,
  no device), where a streamed one said three of its entries in its head: every
  derivative answer now says ``meta``'s common entries in headers, whatever its format
  (a stream what is known before its rows: no mode, no compute time), all of them
  exposed to the page and described in the OpenAPI document, and its times as
  Server-Timing (the page's Resource Timing entry, the developer tools' timing);
* int64 values past 2**53: the JSON text carries every digit (SPEC's numbers), which
  ``JSON.parse`` rounds; the page reads them exactly as README says, from a .npy's
  ``getBigInt64`` or through JSON.parse's source text, and sends them with
  ``JSON.rawJSON``;
* the docs pages name their language (``<html lang="en">``) for screen readers, and
  are laid out at a phone's width (a viewport), not at 980 px shrunk to fit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests._client_support import real_app, serve

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _console_errors, _keyed, _on_page

KEY = {"Authorization": "Bearer k1"}
META = ["x-device", "x-chunk-size", "x-batch-size", "x-mode", "x-queue-ms", "x-compute-ms"]
BIG = 2**53 + 1


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[str]:
    """The service for the page: CORS_ORIGINS naming it, a key, this round's functions
    beside the built-ins; a Jacobian over 4 KiB streams (sin's at n = 64: 16 KiB)."""
    app = real_app(functions="jacobian_service.examples,tests.browser15_functions", cors_origins=page, api_keys="k1",
                   workers=1, engine_standby=False, stream_threshold_bytes=4096)
    with serve(app, ready_path="/readyz") as url:
        yield url


# The page's calls: a small .npy (read with a DataView), the same as JSON, a Hessian as
# .npz, and a streamed .npy; each answer's meta headers as the page reads them.
_META_CALLS = r"""(async () => {
  const API = %(api)s, META = %(meta)s;
  const H = {'Authorization': 'Bearer k1', 'Content-Type': 'application/json'};
  const head = r => Object.fromEntries(META.map(h => [h, r.headers.get(h)]));
  const call = (kind, n, accept) => fetch(API + '/v1/functions/sin/' + kind, {method: 'POST',
    headers: {...H, Accept: accept}, body: JSON.stringify({inputs: [Array.from({length: n}, (_, i) => 0.5 + i / 4)]})});
  const out = {};
  let r = await call('jacobian', 2, 'application/x-npy');
  const buf = await r.arrayBuffer(), view = new DataView(buf), start = 10 + view.getUint16(8, true);
  out.npy = {status: r.status, head: head(r), header: new TextDecoder().decode(new Uint8Array(buf, 10, start - 10)),
             data: Array.from({length: (buf.byteLength - start) / 4}, (_, i) => view.getFloat32(start + 4 * i, true))};
  r = await call('jacobian', 2, 'application/json');
  out.json = {status: r.status, head: head(r), meta: (await r.json()).meta};
  // (the same answer's times as Resource Timing shows them to the page: Server-Timing)
  const entries = performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v1/functions/sin/jacobian'));
  out.json.timing = entries[1].serverTiming.map(t => [t.name, t.duration]);
  r = await call('hessian', 2, 'application/x-npz');
  out.npz = {status: r.status, head: head(r), size: (await r.arrayBuffer()).byteLength};
  r = await call('jacobian', 64, 'application/x-npy');
  out.streamed = {status: r.status, head: head(r), size: (await r.arrayBuffer()).byteLength};
  r = await call('jacobian', 64, 'application/json');
  out.streamedJson = {status: r.status, head: head(r), meta: (await r.json()).meta};
  r = await fetch(API + '/v1/functions/lorenz96/sparsity?shapes=8', {headers: {...H, Accept: 'application/x-npz'}});
  out.sparsity = {status: r.status, head: head(r), size: (await r.arrayBuffer()).byteLength};
  return out;
})()"""


def test_a_page_reads_the_meta_of_any_answer_from_its_headers(api, page, browser):
    """A page that asked for sin's 2 x 2 Jacobian as .npy read ``null`` for every one of
    X-Queue-Ms, X-Device, X-Chunk-Size (a .npy has no room for meta, and only a streamed
    answer said them): it had no way to learn its times. Now every derivative answer,
    .npy, JSON or .npz, says meta's common entries in headers the page may read, equal to
    what its JSON meta says; a streamed one what is known before its rows are computed."""
    _on_page(browser, page)
    got = browser.eval(_META_CALLS % {"api": json.dumps(api), "meta": json.dumps(META)}, timeout_s=60)
    assert {k: v["status"] for k, v in got.items()} == dict.fromkeys(got, 200), got
    x = torch.tensor([0.5, 0.75])
    want = torch.func.jacrev(torch.sin)(x).numpy()
    assert "'<f4'" in got["npy"]["header"] and "(2, 2)" in got["npy"]["header"], got["npy"]["header"]
    np.testing.assert_allclose(np.array(got["npy"]["data"]).reshape(2, 2), want, rtol=1e-6)
    for name in ("npy", "json", "npz"):
        head = got[name]["head"]
        # every one, readable by the page (a Hessian's chunk_size is null: none)
        assert None not in [v for h, v in head.items() if (name, h) != ("npz", "x-chunk-size")], (name, head)
        assert head["x-device"] == "cpu" and head["x-batch-size"] == "1", (name, head)
        assert float(head["x-queue-ms"]) >= 0 and float(head["x-compute-ms"]) > 0, (name, head)
    assert got["npy"]["head"]["x-mode"] == "rev" and got["npy"]["head"]["x-chunk-size"] == "2"
    assert got["npz"]["head"]["x-mode"] not in ("", "rev") and got["npz"]["head"]["x-chunk-size"] is None
    # The JSON answer's headers say what its meta says.
    meta = got["json"]["meta"]
    assert got["json"]["head"] == {h: str(meta[h[2:].replace("-", "_")]) for h in META}, got["json"]
    assert got["json"]["timing"] == [["queue", meta["queue_ms"]], ["compute", meta["compute_ms"]]], got["json"]
    # Streamed: its head left before its rows were computed: no mode, no compute time.
    for name in ("streamed", "streamedJson"):
        head = got[name]["head"]
        assert (head["x-mode"], head["x-compute-ms"]) == (None, None), (name, head)
        assert head["x-device"] == "cpu" and int(head["x-chunk-size"]) >= 1 and head["x-batch-size"] == "1", head
        assert float(head["x-queue-ms"]) >= 0, head
    # A sparsity pattern's .npz (its meta in meta.json): the same, of the meta it has.
    head = got["sparsity"]["head"]
    assert head["x-device"] == "cpu" and float(head["x-queue-ms"]) >= 0 and float(head["x-compute-ms"]) > 0, head
    assert (head["x-chunk-size"], head["x-mode"], head["x-batch-size"]) == (None, None, None), head
    assert got["streamed"]["size"] > 64 * 64 * 4
    streamed = got["streamedJson"]
    assert float(streamed["head"]["x-queue-ms"]) == streamed["meta"]["queue_ms"], streamed
    assert int(streamed["head"]["x-chunk-size"]) == streamed["meta"]["chunk_size"], streamed
    assert not [m for m in _console_errors(browser) if "CORS" in m or "blocked" in m]  # (a page's favicon may 404)


def test_the_document_names_the_meta_headers_of_every_derivative_answer(api):
    """/openapi.json's 200 of every derivative operation lists the meta headers it sends
    (a client generator, or a reader of /docs, learns they are there): X-Chunk-Size and
    X-Mode only a Jacobian's and a Hessian's, the only answers that carry them."""
    document = httpx.get(api + "/openapi.json", headers=KEY, timeout=30).raise_for_status().json()
    kinds = [path for path in document["paths"] if path.startswith("/v1/functions/{name}/") and "post" in document["paths"][path]]
    assert {p.rsplit("/", 1)[1] for p in kinds} >= {"jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"}, kinds
    for path in kinds:
        headers = {h.lower() for h in document["paths"][path]["post"]["responses"]["200"]["headers"]}
        rows = {"x-chunk-size", "x-mode"}
        if path.rsplit("/", 1)[1] in ("jacobian", "hessian"):
            assert {*META, "server-timing"} <= headers, (path, headers)
        else:
            assert {*META, "server-timing"} - rows <= headers and not rows & headers, (path, headers)
    sparsity = document["paths"]["/v1/functions/{name}/sparsity"]["get"]["responses"]["200"]["headers"]
    assert {"X-Device", "X-Queue-Ms", "X-Compute-Ms", "Server-Timing"} <= set(sparsity), sparsity


_BIG_INTS = r"""(async () => {
  const API = %(api)s;
  const H = {'Authorization': 'Bearer k1', 'Content-Type': 'application/json'};
  const exact = (k, v, c) => Number.isInteger(v) && !Number.isSafeInteger(v) ? BigInt(c.source) : v;
  const post = (name, body, accept) => fetch(API + '/v1/functions/' + name + '/evaluate',
    {method: 'POST', headers: {...H, Accept: accept}, body: body});
  let r = await post('big_ids', JSON.stringify({inputs: [[0, 0]]}), 'application/json');
  const text = await r.text();
  const out = {status: r.status, plain: JSON.parse(text).output.data.map(String),
               exact: JSON.parse(text, exact).output.data.map(String)};
  r = await post('big_ids', JSON.stringify({inputs: [[0, 0]]}), 'application/x-npy');
  const buf = await r.arrayBuffer(), view = new DataView(buf), start = 10 + view.getUint16(8, true);
  out.npy = [0, 1].map(i => view.getBigInt64(start + 8 * i, true).toString());
  r = await post('echo_id', JSON.stringify({inputs: {x: [0, 0], id: JSON.rawJSON(%(big)s)}}), 'application/json');
  out.sent = JSON.parse(await r.text(), exact).output.data.map(String);
  r = await fetch(API + '/v1/functions/sin_big_aux/jacobian', {method: 'POST', headers: H,
    body: JSON.stringify({inputs: [[0.5]]})});
  const aux = JSON.parse(await r.text(), exact).aux;
  out.aux = [String(aux.id), ...aux.ids.data.map(String)];
  return out;
})()"""


def test_a_page_reads_and_sends_int64_past_2_53_exactly(api, page, browser):
    """int64 answers in JSON carry every digit (SPEC's numbers); a page's JSON.parse
    rounds those past 2**53 (README says so, and how to read them): its reviver's source
    text reads them exactly, as a .npy's getBigInt64 does, and JSON.rawJSON sends one
    an int64 input takes exactly."""
    _on_page(browser, page)
    got = browser.eval(_BIG_INTS % {"api": json.dumps(api), "big": json.dumps(str(BIG))}, timeout_s=60)
    assert got["status"] == 200, got
    digits = [str(BIG), str(BIG + 1)]
    assert got["plain"] == [str(BIG - 1), str(BIG + 1)]  # what README warns of: 2**53 + 1 read as 2**53
    assert got["exact"] == digits and got["npy"] == digits, got
    assert got["sent"] == [str(BIG)] * 2, got
    assert got["aux"] == [str(BIG), *digits], got


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_name_their_language(api, browser, path):
    """A screen reader reads a page in the language its ``<html lang>`` names: the docs
    pages named none (WCAG 3.1.1; Lighthouse's 'html element does not have a [lang]
    attribute')."""
    _keyed(browser, api, path)
    browser.wait_for("document.title.startsWith('jacobian-service')")
    assert browser.eval("document.documentElement.lang") == "en"


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_are_laid_out_at_a_phones_width(api, browser, path):
    """On a phone (390 px wide, as Chromium's device mode emulates one) the pages were
    laid out 980 px wide (no viewport) and shrunk to fit: text a third of its size.
    They are now laid out at the phone's width."""
    browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=3, mobile=True)
    try:
        _keyed(browser, api, path)
        browser.wait_for("document.title.startsWith('jacobian-service')")
        assert browser.eval("window.innerWidth") == 390
    finally:
        browser.send("Emulation.clearDeviceMetricsOverride")
