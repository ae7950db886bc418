"""A real browser as the outside testers use one, round 16.

A page of the origin CORS_ORIGINS names (with an API key) calling the service with
fetch, in round 5's headless Chromium, one server for the module:

* an evaluate in bfloat16 asked as .npy read '<f4' and nothing more: the page could not
  tell it from a float32 answer (JSON and .npz say ``meta.bfloat16``). Every answer now
  says an evaluate's per-output flags in headers too (X-Bfloat16, X-Unbatched), exposed
  to the page;
* sparse answers (CSR and COO JSON, .npz members) read by the page hold torch.func's
  Jacobian; a .npy of one is a 406 it reads;
* a streamed .npy cancelled with its reader stops the engine and frees its room;
* refusals a page meets (401, 403, 429 with Retry-After, a 504 of its own
  X-Request-Timeout, which the preflight lets through) are readable problem+json;
  preflights are kept by the browser (one per URL);
* /docs' Try it out of a sparse Jacobian draws its CSR object.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import scipy.sparse
import torch
from jacobian_service import examples

from tests._client_support import real_app, serve

from .test_browser_round2 import _EXECUTE, _OPEN
from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _keyed, _on_page

KEY = {"Authorization": "Bearer k1"}
HELD = re.compile(r"^jacobian_service_stream_bytes_held (\S+)$", re.MULTILINE)
STREAMED = re.compile(r"^jacobian_service_streamed_bytes_total (\S+)$", re.MULTILINE)
N = 3000  # sin's Jacobian at n = 3000: 36 MB of .npy, streamed


class _Preflights:
    """The app, counting the preflights (OPTIONS with Access-Control-Request-Method) it is sent, per path."""

    def __init__(self, app: Any) -> None:
        self.app, self.seen = app, Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            self.seen[scope["path"]] += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[tuple[str, _Preflights]]:
    """The service for the page: CORS_ORIGINS naming it, a key, a queue of two (a third
    request waiting is a 429) and one batch member at a time; tests.browser16_functions'
    ``slow`` beside the built-ins; a Jacobian over 4 KiB streams."""
    app = _Preflights(real_app(functions="jacobian_service.examples,tests.browser16_functions", cors_origins=page,
                               api_keys="k1", workers=1, engine_standby=False, stream_threshold_bytes=4096,
                               max_queue=2, max_batch_size=1))
    with serve(app, ready_path="/readyz") as url:
        yield url, app


_EVALUATES = r"""(async () => {
  const API = %(api)s;
  const H = {'Authorization': 'Bearer k1', 'Content-Type': 'application/json'};
  const flags = r => ({status: r.status, bf: r.headers.get('x-bfloat16'), unbatched: r.headers.get('x-unbatched')});
  const call = (body, accept) => fetch(API + '/v1/functions/sin/evaluate', {method: 'POST',
    headers: {...H, Accept: accept}, body: JSON.stringify(body)});
  const bf = {inputs: [{dtype: 'bfloat16', shape: [3], data: [0.5, 1.0, 1.5]}]};
  const out = {};
  let r = await call(bf, 'application/x-npy');
  const buf = await r.arrayBuffer(), view = new DataView(buf), start = 10 + view.getUint16(8, true);
  out.npy = {...flags(r), header: new TextDecoder().decode(new Uint8Array(buf, 10, start - 10)),
             data: Array.from({length: (buf.byteLength - start) / 4}, (_, i) => view.getFloat32(start + 4 * i, true))};
  r = await call(bf, 'application/json');
  out.json = {...flags(r), meta: (await r.json()).meta};
  r = await call(bf, 'application/x-npz');
  out.npz = {...flags(r), size: (await r.arrayBuffer()).byteLength};
  r = await call({inputs: [[0.5, 1.0]]}, 'application/x-npy');  // float32: no half precision, no flag
  out.float32 = {...flags(r), size: (await r.arrayBuffer()).byteLength};
  r = await call({inputs: [[[0.5, 1.0], [1.5, 2.0]]], batched: true}, 'application/x-npy');  // per example
  out.batched = {...flags(r), size: (await r.arrayBuffer()).byteLength};
  r = await call({inputs: [[[0.5, 1.0], [1.5, 2.0]]], batched: true}, 'application/json');
  out.batchedJson = {...flags(r), meta: (await r.json()).meta};
  return out;
})()"""


def test_a_page_tells_a_bfloat16_evaluate_from_a_float32_one_in_any_format(api, page, browser):
    """sin evaluated in bfloat16 and asked as .npy: the page read ``'<f4'`` and no flag
    (X-Bfloat16 null), so it could not tell bfloat16's values from float32 ones, where
    JSON's and .npz's meta say ``bfloat16: [true]``. Every answer now says the flags an
    evaluate's meta holds in headers the page reads: X-Bfloat16 (and a per-example
    evaluate's X-Unbatched), equal to its meta; none where no half precision took part."""
    url, _ = api
    _on_page(browser, page)
    got = browser.eval(_EVALUATES % {"api": json.dumps(url)}, timeout_s=60)
    assert {k: v["status"] for k, v in got.items()} == dict.fromkeys(got, 200), got
    want = torch.sin(torch.tensor([0.5, 1.0, 1.5], dtype=torch.bfloat16)).float().numpy()
    assert "'<f4'" in got["npy"]["header"] and "(3,)" in got["npy"]["header"], got["npy"]
    np.testing.assert_array_equal(np.array(got["npy"]["data"], dtype=np.float32), want)
    assert got["json"]["meta"]["bfloat16"] == [True], got["json"]
    for name in ("npy", "json", "npz"):
        assert (got[name]["bf"], got[name]["unbatched"]) == ("true", None), (name, got[name])
    assert (got["float32"]["bf"], got["float32"]["unbatched"]) == (None, None), got["float32"]
    assert got["batchedJson"]["meta"]["unbatched"] == [False], got["batchedJson"]
    for name in ("batched", "batchedJson"):
        assert (got[name]["bf"], got[name]["unbatched"]) == (None, "false"), (name, got[name])


def test_the_document_names_the_evaluate_flag_headers(api):
    """/openapi.json's evaluate 200 lists X-Bfloat16 and X-Unbatched (their form as a
    pattern the answers match); the Jacobian's X-Bfloat16 alone."""
    url, _ = api
    paths = httpx.get(url + "/openapi.json", headers=KEY, timeout=30).raise_for_status().json()["paths"]
    evaluate = paths["/v1/functions/{name}/evaluate"]["post"]["responses"]["200"]["headers"]
    jacobian = paths["/v1/functions/{name}/jacobian"]["post"]["responses"]["200"]["headers"]
    assert {"X-Bfloat16", "X-Unbatched"} <= set(evaluate), evaluate
    for value in ("true", "false", "true, false, true"):
        assert re.fullmatch(evaluate["X-Bfloat16"]["schema"]["pattern"], value)
    said = httpx.post(url + "/v1/functions/sin/evaluate", headers={**KEY, "Accept": "application/x-npy"}, timeout=30,
                      json={"inputs": [{"dtype": "bfloat16", "shape": [2], "data": [0.5, 1.0]}]}).headers["x-bfloat16"]
    assert re.fullmatch(evaluate["X-Bfloat16"]["schema"]["pattern"], said), said
    # every derivative says X-Bfloat16 too (tests/test_wire_round5.py); X-Unbatched is an evaluate's alone
    assert "X-Bfloat16" in jacobian and "X-Unbatched" not in jacobian, jacobian


_SPARSE = r"""(async () => {
  const API = %(api)s, X = %(x)s;
  const H = {'Authorization': 'Bearer k1', 'Content-Type': 'application/json'};
  const call = (format, accept) => fetch(API + '/v1/functions/lorenz96/jacobian', {method: 'POST',
    headers: {...H, Accept: accept}, body: JSON.stringify({inputs: [X], sparsity: 'auto', sparse_format: format})});
  const out = {};
  for (const format of ['csr', 'coo']) {
    const r = await call(format, 'application/json');
    out[format] = {status: r.status, body: await r.json()};
  }
  let r = await call('csr', 'application/x-npz');
  const buf = await r.arrayBuffer(), view = new DataView(buf), names = [];
  // the zip's central directory: each member's name, as a page's unzip reads them
  const end = buf.byteLength - 22;
  for (let p = view.getUint32(end + 16, true), i = 0; i < view.getUint16(end + 10, true); i++) {
    const n = view.getUint16(p + 28, true), extra = view.getUint16(p + 30, true), c = view.getUint16(p + 32, true);
    names.push(new TextDecoder().decode(new Uint8Array(buf, p + 46, n)));
    p += 46 + n + extra + c;
  }
  let bin = ''; new Uint8Array(buf).forEach(b => bin += String.fromCharCode(b));
  out.npz = {status: r.status, names, b64: btoa(bin), disposition: r.headers.get('content-disposition')};
  r = await call('csr', 'application/x-npy');
  out.npy = {status: r.status, body: await r.json()};
  return out;
})()"""


def test_a_page_reads_a_sparse_jacobian_in_each_form(api, page, browser):
    """lorenz96's Jacobian asked with ``sparsity: auto`` from the page: CSR and COO JSON
    objects and the .npz's members (scipy.sparse.save_npz's, meta.json beside them), each
    holding torch.func.jacrev's matrix; as .npy, a 406 problem the page reads."""
    url, _ = api
    x = [0.1 * i for i in range(10)]
    _on_page(browser, page)
    got = browser.eval(_SPARSE % {"api": json.dumps(url), "x": json.dumps(x)}, timeout_s=60)
    want = torch.func.jacrev(examples.lorenz96)(torch.tensor(x)).numpy()
    csr, coo = got["csr"]["body"]["jacobian"], got["coo"]["body"]["jacobian"]
    assert (got["csr"]["status"], got["coo"]["status"], csr["format"], coo["format"]) == (200, 200, "csr", "coo")
    dense = scipy.sparse.csr_matrix((csr["data"], csr["indices"], csr["indptr"]), shape=csr["shape"]).toarray()
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
    dense = scipy.sparse.coo_matrix((coo["data"], (coo["row"], coo["col"])), shape=coo["shape"]).toarray()
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
    assert got["csr"]["body"]["meta"]["source"] == "detected" and got["csr"]["body"]["meta"]["format"] == "csr"
    npz = got["npz"]
    assert npz["status"] == 200 and {"indices.npy", "indptr.npy", "data.npy", "format.npy", "shape.npy"} <= set(npz["names"])
    assert npz["disposition"].startswith("attachment"), npz["disposition"]
    matrix = scipy.sparse.load_npz(io.BytesIO(base64.b64decode(npz["b64"])))
    np.testing.assert_allclose(matrix.toarray(), want, rtol=1e-5, atol=1e-6)
    assert (got["npy"]["status"], got["npy"]["body"]["code"]) == (406, "not_acceptable"), got["npy"]


_CANCEL = r"""(async () => {
  const API = %(api)s;
  const H = {'Authorization': 'Bearer k1', 'Content-Type': 'application/json', Accept: 'application/x-npy'};
  const body = JSON.stringify({inputs: [Array.from({length: %(n)d}, (_, i) => i / %(n)d)]});
  const r = await fetch(API + '/v1/functions/sin/jacobian', {method: 'POST', headers: H, body});
  const reader = r.body.getReader();
  let read = 0;
  while (read < 400000) { const {done, value} = await reader.read(); if (done) break; read += value.length; }
  await reader.cancel();
  return {status: r.status, length: Number(r.headers.get('content-length')), read};
})()"""


def _metric(url: str, pattern: re.Pattern[str]) -> float:
    found = pattern.search(httpx.get(url + "/metrics", headers={"Authorization": "Bearer k1"}, timeout=30).text)
    return float(found.group(1)) if found else 0.0


def test_a_page_that_cancels_its_streams_reader_frees_the_stream(api, page, browser):
    """A streamed .npy (36 MB) read with a ReadableStream reader and cancelled after
    400 kB: the engine stops (no more chunks streamed), the stream's held bytes go back
    to 0, and the same request is then served."""
    url, _ = api
    _on_page(browser, page)
    got = browser.eval(_CANCEL % {"api": json.dumps(url), "n": N}, timeout_s=60)
    assert got["status"] == 200 and got["length"] == 128 + 4 * N * N and 400000 <= got["read"] < got["length"], got
    deadline = time.monotonic() + 10
    while _metric(url, HELD) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(url, HELD) == 0
    streamed = _metric(url, STREAMED)
    time.sleep(0.5)
    assert _metric(url, STREAMED) == streamed < 4 * N * N / 2  # stopped, far short of the whole
    got = browser.eval(_CANCEL % {"api": json.dumps(url), "n": N}, timeout_s=60)
    assert got["status"] == 200, got


_REFUSALS = r"""(async () => {
  const API = %(api)s;
  const J = {'Content-Type': 'application/json'};
  const read = async r => ({status: r.status, type: r.headers.get('content-type'), retry: r.headers.get('retry-after'),
                            auth: r.headers.get('www-authenticate'), body: await r.json()});
  const post = (name, headers, body) => fetch(API + '/v1/functions/' + name + '/evaluate',
    {method: 'POST', headers: {...J, ...headers}, body: JSON.stringify(body)});
  const out = {};
  out.noKey = await read(await post('sin', {}, {inputs: [[1]]}));
  out.badKey = await read(await post('sin', {Authorization: 'Bearer nope'}, {inputs: [[1]]}));
  out.timeout = await read(await post('slow', {Authorization: 'Bearer k1', 'X-Request-Timeout': '0.1'}, {inputs: [[1]]}));
  out.inTime = await read(await post('sin', {Authorization: 'Bearer k1', 'X-Request-Timeout': '30'}, {inputs: [[1]]}));
  await new Promise(r => setTimeout(r, 500));  // (the slow call above let go of the engine)
  out.crowd = await Promise.all(Array.from({length: 5}, (_, i) => post('slow', {Authorization: 'Bearer k1'},
                                                                       {inputs: [[i]]}).then(read)));
  for (let i = 0; i < 3; i++) await read(await post('sin', {Authorization: 'Bearer k1', 'X-Request-Timeout': '30'}, {inputs: [[i]]}));
  return out;
})()"""


def test_a_page_reads_each_refusal_it_meets(api, page, browser):
    """From the page: no key (401, WWW-Authenticate), a wrong key (403), its own
    X-Request-Timeout (allowed by the preflight) past (504) and not (200), and a crowd
    past the queue (429s with Retry-After): each a problem+json the page reads, with the
    headers it needs. Each URL's preflight is asked once (kept: Access-Control-Max-Age),
    though the calls add X-Request-Timeout."""
    url, preflights = api
    _on_page(browser, page)
    preflights.seen.clear()
    got = browser.eval(_REFUSALS % {"api": json.dumps(url)}, timeout_s=90)
    problem = "application/problem+json"
    assert (got["noKey"]["status"], got["noKey"]["type"], got["noKey"]["body"]["code"], got["noKey"]["auth"]) == (
        401, problem, "unauthorized", "Bearer"), got["noKey"]
    assert (got["badKey"]["status"], got["badKey"]["type"], got["badKey"]["body"]["code"]) == (403, problem, "forbidden")
    assert (got["timeout"]["status"], got["timeout"]["body"]["code"]) == (504, "timeout"), got["timeout"]
    assert got["inTime"]["status"] == 200 and got["inTime"]["body"]["output"]["data"] == [pytest.approx(np.sin(1.0))]
    crowd = got["crowd"]
    refused = [c for c in crowd if c["status"] == 429]
    assert refused and all(c["status"] in (200, 429) for c in crowd), crowd
    assert all((c["type"], c["body"]["code"], c["retry"]) == (problem, "overloaded", "1") for c in refused), refused
    # (sin's kept since the first test's: the same page and URL)
    assert preflights.seen["/v1/functions/slow/evaluate"] == 1 and max(preflights.seen.values()) == 1, preflights.seen


_SPARSE_BODY = json.dumps({"inputs": {"x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, "sparsity": "auto"})


def test_try_it_out_of_a_sparse_jacobian_in_docs(api, browser):
    """/docs' Try it out of lorenz96's Jacobian with ``sparsity: auto`` added to its body
    draws the CSR object torch.func's matrix fills; asked as .npy, the 406 that says to
    ask for JSON or .npz."""
    url, _ = api
    _keyed(browser, url, "/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 10")
    path = "/v1/functions/{name}/jacobian"
    assert browser.eval(f"{_OPEN}({json.dumps(path)}, 'post')")
    got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', 'lorenz96', 'application/json', "
                       f"{json.dumps(_SPARSE_BODY)})", timeout_s=90)
    assert got["status"] == "200", got
    csr = json.loads(got["text"])["jacobian"]
    want = torch.func.jacrev(examples.lorenz96)(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])).numpy()
    dense = scipy.sparse.csr_matrix((csr["data"], csr["indices"], csr["indptr"]), shape=csr["shape"]).toarray()
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
    got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', 'lorenz96', 'application/x-npy', "
                       f"{json.dumps(_SPARSE_BODY)})", timeout_s=90)
    assert got["status"] == "406" and "not_acceptable" in got["text"], got
    browser.goto("about:blank")
