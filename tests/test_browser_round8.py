"""A real browser as the outside testers use one, round 8.

One API server (an API key; the built-ins and tests/browser8_functions.py, whose
functions are named in other scripts and with characters no file name of the server's
holds) and round 5's headless Chromium for the module:

* /docs' Try it out of a JSON answer too big to draw offers it as a file named as the
  server names its .npy / .npz answers, in an RFC 6266 Content-Disposition (filename,
  and filename* for a name in another script), which Chromium saves under that name;
* a JSON answer of many small values (a sparsity pattern's indices) is such a file
  too, however few its bytes.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import scipy.sparse
import torch

from jacobian_client import wire
from jacobian_service.responses import attachment
from tests import browser8_functions as fns
from tests._cdp import Chromium
from tests._client_support import real_app, serve
from tests.test_browser_round2 import _EXECUTE, _OPEN, _wait

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)

KEY = {"Authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    app = real_app(functions="tests.browser8_functions,jacobian_service.examples", workers=1, engine_standby=False,
                   api_keys="k1")
    with serve(app, ready_path="/readyz") as url:
        yield url


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


def _docs(browser: Chromium, api: str, downloads: Path) -> None:
    """/docs with the key in the tab (as the page keeps it once asked), files saved to
    ``downloads``; the page of the test before kept when it is that one."""
    if browser.eval(f"location.href === {json.dumps(api + '/docs')} && "
                    "document.querySelectorAll('.opblock').length > 10"):
        return
    browser.goto(api + "/healthz")
    browser.wait_for("document.body && document.body.textContent.includes('ok')")
    browser.eval("sessionStorage.setItem('jacobian-service-api-key', 'k1'); true")
    browser.events.clear()
    browser.goto(api + "/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 10", timeout_s=60)
    browser.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))


def _saved(browser: Chromium, file: Path) -> bytes:
    _wait(lambda: browser.eval("true") and file.is_file() and file.stat().st_size > 0, 30)
    return file.read_bytes()


# The answer's headers as Swagger UI lists them under the answer.
_HEADERS = ("(path => [...[...document.querySelectorAll('.opblock')].find(e => e.querySelector('.opblock-summary-path')"
            "?.getAttribute('data-path') === path).querySelectorAll('.live-responses-table pre')]"
            ".map(p => p.textContent).find(t => t.includes('content-type:')))")


def test_a_json_answer_saved_from_docs_is_named_as_the_servers_files(api, browser, downloads):
    """A JSON answer /docs offers as a file (here softmax's Jacobian at n = 120, 14,400
    numbers) was given a Content-Disposition of the page's making whose filename= held
    the URL's percent-encoded name: ``filename="gr%C3%B6%C3%9Fe-jacobian.json"`` among
    the answer's headers, which RFC 6266 reads as it is; and the name kept what the
    server's file names never hold: the answer of 'a;b%20"c" é' was saved as
    ``a;b%20_c_ é-jacobian.json``, its .npy as ``a_b_20_c__é-jacobian.npy``. Now the
    page names it as the server names the function's .npy and .npz answers
    (responses.attachment): the header is that one with .json, and Chromium saves the
    file under the name the server gives, the Jacobian torch.func's."""
    _docs(browser, api, downloads)
    path = "/v1/functions/{name}/jacobian"
    assert browser.eval(f"{_OPEN}({json.dumps(path)}, 'post')")
    want = torch.func.jacrev(fns.softmax)(torch.full((fns.N,), 0.5)).numpy()
    for name in fns.NAMES:
        got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', {json.dumps(name)}, 'application/json', null)",
                           timeout_s=90)
        header = attachment(name, "jacobian", wire.NPZ)["Content-Disposition"].replace(".npz", ".json")
        shown = browser.eval(f"{_HEADERS}({json.dumps(path)})")
        assert got["status"] == "200" and f"content-disposition: {header}" in shown, (got, shown)
        file = {"größe": "größe", 'a;b%20"c" é': "a_b_20_c__é"}[name] + "-jacobian.json"
        assert got["file"] == file, got
        answer = json.loads(_saved(browser, downloads / file))
        assert answer["function"] == name
        J = answer["jacobian"]
        np.testing.assert_allclose(np.float32(J["data"]).reshape(J["shape"]), want, rtol=1e-6, atol=1e-9)


def test_a_json_answer_of_many_values_is_a_file_however_few_its_bytes(api, browser, downloads):
    """/docs offered a JSON answer as a file when its text passed 1 MB; what freezes the
    tab is its values, each a line of its own once Swagger UI pretty-prints it, each made
    into elements by its highlighter. Try it out of a dense sparsity pattern (größe at
    n = 400: 0.9 MB, 320,000 indices) froze the tab past two minutes; at n = 120 (80 KB,
    14,400 indices) the page drew for seconds. Such an answer (over 10,000 values) is
    now a file, named as the server names the pattern's .npz, holding what the service
    answers (a small answer is still drawn in the page: rounds 5 and 6 read theirs)."""
    _docs(browser, api, downloads)
    path = "/v1/functions/{name}/sparsity"
    assert browser.eval(f"{_OPEN}({json.dumps(path)}, 'get')")
    got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'get', 'größe', 'application/json', null)", timeout_s=90)
    assert got["status"] == "200" and got["file"] == "größe-sparsity.json", {**got, "text": got["text"][:300]}
    shown = browser.eval(f"{_HEADERS}({json.dumps(path)})")
    assert 'filename="gr__e-sparsity.json"; filename*=UTF-8\'\'gr%C3%B6%C3%9Fe-sparsity.json' in shown, shown
    pattern = json.loads(_saved(browser, downloads / "größe-sparsity.json"))
    want = httpx.get(api + "/v1/functions/größe/sparsity", params={"shapes": fns.N}, headers=KEY, timeout=30).json()
    assert pattern["pattern"] == want["pattern"] and want["pattern"]["nnz"] == fns.N * fns.N
    browser.goto("about:blank")


def test_a_page_caching_answers_keeps_each_format_apart(api, browser):
    """A page (its service worker) that keeps answers in the Cache API, by request, to
    answer offline: the Cache API honours Vary (not no-store), and the service's answers
    chosen by Accept did not say so. The JSON it kept for sin's sparsity pattern was the
    match for its request of the pattern's .npz (the page's .npz reader then read JSON).
    Every answer of a route whose media type Accept picks now says ``Vary: Accept``
    (beside ``Origin`` where CORS adds it), its errors too: the request for the .npz
    misses, is asked of the service, and is the .npz scipy's load_npz reads."""
    browser.goto(api + "/healthz")
    browser.wait_for("document.body && document.body.textContent.includes('ok')")
    got = browser.eval("""(async () => {
      const ask = accept => new Request('/v1/functions/sin/sparsity?shapes=3',
        {headers: {Accept: accept, Authorization: 'Bearer k1'}});
      const cache = await caches.open('answers');
      await cache.put(ask('application/json'), await fetch(ask('application/json')));
      const kept = await cache.match(ask('application/json'));
      const other = (await cache.match(ask('application/x-npz'))) || await fetch(ask('application/x-npz'));
      await caches.delete('answers');
      return {kept: [kept.headers.get('content-type'), (await kept.json()).pattern.nnz],
              other: [other.headers.get('content-type'), other.headers.get('vary'),
                      btoa(String.fromCharCode(...new Uint8Array(await other.arrayBuffer())))]};
    })()""")
    assert got["kept"] == ["application/json", 3], got
    media, vary, body = got["other"]
    assert (media, vary) == ("application/x-npz", "Accept"), got["other"]
    pattern = scipy.sparse.load_npz(io.BytesIO(base64.b64decode(body)))
    assert pattern.shape == (3, 3) and pattern.nnz == 3
    # Over HTTP: every format of a derivative, its 406, and HEAD; CORS' Origin beside it.
    with httpx.Client(base_url=api, headers=KEY, timeout=30) as http:
        for accept, status in [("application/json", 200), ("application/x-npy", 200), ("application/x-npz", 200),
                               ("text/csv", 406)]:
            r = http.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5]]}, headers={"Accept": accept})
            # (round 12: a POST's answer depends on its body too, which no cache keys: Vary: *)
            assert (r.status_code, r.headers["vary"]) == (status, "*"), (accept, r.headers)
        r = http.head("/v1/functions/sin/sparsity?shapes=3", headers={"Accept": "application/x-npz"})
        assert (r.status_code, r.headers["vary"]) == (200, "Accept")
        assert "vary" not in http.get("/v1/functions/sin").headers  # (one format: nothing varies)
    browser.goto("about:blank")


def test_a_typed_array_a_page_stringified_is_named(api, browser):
    """A page's ``JSON.stringify`` of a Float32Array (what WebGL, WebAssembly and file
    readers give) writes an object keyed '0', '1', ...: sent as an input, the page read
    422 "unknown array keys ['0', '1', '10', '100', '1000', '10000', ...]" (every index in
    string order, cut at the problem's limit), as an array's data "array data is not a
    regular array of numbers", as vjp's cotangents "expected one array of shape [3], got
    3 entries of different shapes": nothing of what it had done. Each now names it and
    what to send; ``Array.from`` of it answers torch.func's Jacobian, and other unknown keys are
    listed ten at most."""
    browser.goto(api + "/healthz")
    browser.wait_for("document.body && document.body.textContent.includes('ok')")
    got = browser.eval("""(async () => {
      const send = (inputs, more = {}, to = 'jacobian') => fetch('/v1/functions/sin/' + to, {method: 'POST',
        body: JSON.stringify({inputs, ...more}), headers: {'Content-Type': 'application/json', Authorization: 'Bearer k1'}})
        .then(async r => [r.status, r.headers.get('content-type'), await r.json()]);
      const x = new Float32Array([0.25, 0.5, 1.0]), big = new Float32Array(20000);
      const keys = Object.fromEntries([...Array(12).keys()].map(i => ['k' + i, i]));
      return [await send([big]), await send([{dtype: 'float32', shape: [3], data: x}]),
              await send([Array.from(x)], {cotangents: new Float32Array([1, 1, 1])}, 'vjp'), await send([keys]),
              await send([Array.from(x)])];
    })()""")
    hint = ("what JSON.stringify makes of a typed array (Float32Array, Float64Array); send Array.from(it), "
            'or its bytes as {"dtype": ..., "shape": [...], "base64": ...}')
    details = [f"input 'x': an object keyed '0' to '19999': {hint}",  # (an input's refusal names it: gaps round 1)
               f"input 'x': array data holds an object keyed '0' to '2': {hint}",
               f"cotangents: expected one array of shape [3], got an object keyed '0' to '2': {hint}",
               "input 'x': unknown array keys ['k0', 'k1', 'k10', 'k11', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7'] and 2 more"]
    for (status, media, problem), detail in zip(got, details):
        assert (status, media, problem["code"], problem["detail"]) == (422, "application/problem+json",
                                                                       "invalid_input", detail), problem
    status, _, answer = got[4]
    want = torch.func.jacrev(torch.sin)(torch.tensor([0.25, 0.5, 1.0])).numpy()
    assert status == 200 and answer["function"] == "sin", answer
    np.testing.assert_allclose(np.float32(answer["jacobian"]["data"]), want, rtol=1e-6)
    browser.goto("about:blank")
