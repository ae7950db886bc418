"""A real browser as the outside testers use one, round 5: what the registry puts in
the pages.

One server for the module serving tests/browser5_functions.py, whose function names,
input names and descriptions carry HTML, markdown and script (as a careless or hostile
module might register them), and one headless Chromium:

* /docs and /redoc draw every such name as the text it is: no element made from it,
  nothing run, nothing fetched, no CSP violation (the CSP is the second line, not the
  first);
* Swagger UI's Execute calls such a function by its name, and answers what torch.func
  gives;
* an API URL typed into the address bar shows a readable answer, a control character
  of a name escaped in it.
"""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests import browser5_functions as fns
from tests._cdp import Chromium, chromium_binary
from tests._client_support import real_app, serve
from tests.test_browser_round2 import _EXECUTE, _OPEN

IMG_NAME = fns.IMG + "x"
NAMES = [IMG_NAME, '" onmouseover="window.__pwned=5" x="', "{{constructor.constructor('window.__pwned=7')()}}",
         "a?b#c%41 é", "hasOwnProperty", "__proto__", "plain"]


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    # (one front end, an engine that is never restarted here: no spare to start)
    app = real_app(functions="tests.browser5_functions", workers=1, engine_standby=False)
    with serve(app, ready_path="/readyz") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


def _violations(browser: Chromium) -> list[str]:
    """Console lines of a CSP refusal, a failed load or an exception."""
    return [m for m in browser.messages() if m.startswith(("error:", "exception:", "console.error:"))]


def test_the_registry_is_text_in_the_docs(api, browser):
    """Swagger UI wrote the path parameter's "Available values" (the function names)
    through its Markdown renderer, which reads HTML: a function named
    ``<img src=x onerror=...>x`` was drawn as an image, fetched from /x, its handler
    stopped by the page's CSP alone ("Executing inline event handler violates ...").
    Now the names are text there; neither page runs, fetches or makes anything from
    the registry, and ReDoc too shows each name as written.

    A function named as a property every JavaScript object has (hasOwnProperty) left
    /redoc blank ("TypeError: Cannot convert undefined or null to object"): the
    document's examples were keyed by it. Such a function now has no example, and
    inputs so named (__proto__, toString) are given by position in theirs."""
    names = [f["name"] for f in httpx.get(api + "/v1/functions", timeout=30).json()]  # (the enum's order)
    assert sorted(names) == sorted(NAMES)
    browser.events.clear()
    browser.goto(api + "/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 10")
    # One operation with the name parameter opened (Swagger UI draws each slowly): its
    # values are those of every such operation.
    browser.eval("[...document.querySelectorAll('.opblock-summary-path')].find(p => p.getAttribute('data-path') === "
                 "'/v1/functions/{name}').closest('.opblock').querySelector('.opblock-summary-control').click(); true")
    line = browser.wait_for("document.querySelector('.parameter__enum')?.textContent")
    assert line == "Available values : " + ", ".join(names)
    found = browser.eval("[...document.querySelectorAll('#swagger-ui img, #swagger-ui svg[onload], "
                         "#swagger-ui [onerror], #swagger-ui [onmouseover], #swagger-ui a[href]:not([href^=\"#\"])')]"
                         ".filter(e => !e.closest('.info, .models, .download-contents')).map(e => e.outerHTML)")
    assert found == [], found
    assert browser.eval("String(window.__pwned)") == "undefined"

    browser.goto(api + "/redoc")
    browser.wait_for("document.body.innerText.includes('Available values') || "
                     "document.querySelectorAll('[data-section-id]').length > 10")
    text = browser.eval("document.getElementById('redoc').innerText")
    assert IMG_NAME in text and NAMES[1] in text and "hasOwnProperty" in text, text[:500]
    assert browser.eval("String(window.__pwned)") == "undefined"
    assert not [u for u in browser.requests() if u.startswith(api) and u.split("?")[0].rsplit("/", 1)[-1] == "x"]
    assert _violations(browser) == []


def test_execute_calls_a_function_by_its_hostile_name(api, browser):
    """Swagger UI's Execute sends the name percent-encoded in the path (its ``<``, ``"``,
    ``?``, ``#``, ``%`` and non-ASCII), and the answer is torch.func's."""
    browser.goto(api + "/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 10")
    path = "/v1/functions/{name}/jacobian"
    assert browser.eval(f"{_OPEN}({json.dumps(path)}, 'post')")
    got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', {json.dumps(IMG_NAME)}, 'application/json', null)",
                       timeout_s=90)
    assert got["status"] == "200", got
    answer = json.loads(got["text"])
    assert answer["function"] == IMG_NAME
    want = torch.func.jacrev(fns.img_name)(torch.full((3,), 0.5))  # the example: n sized 3, every number 0.5
    J = answer["jacobian"]
    np.testing.assert_allclose(np.float32(J["data"]).reshape(J["shape"]), want.numpy(), rtol=1e-6)
    # A function named as an object's own property has no example: picked for vjp, the
    # page looked its example up as examples[name], found Object.prototype's
    # hasOwnProperty, and threw (a TypeError in the console). The body typed runs.
    vjp = "/v1/functions/{name}/vjp"
    assert browser.eval(f"{_OPEN}({json.dumps(vjp)}, 'post')")
    body = json.dumps({"inputs": [[0.25, 0.75]], "cotangents": [1.0, 1.0]})
    got = browser.eval(f"{_EXECUTE}({json.dumps(vjp)}, 'post', 'hasOwnProperty', 'application/json', {json.dumps(body)})",
                       timeout_s=90)
    assert got["status"] == "200" and json.loads(got["text"])["vjp"]["data"] == [3.0, 3.0], got
    for name, fn in [(NAMES[1], fns.quote_name), (NAMES[3], fns.url_name), ("hasOwnProperty", fns.has_own_property)]:
        status, body = browser.eval(
            f"fetch('/v1/functions/' + encodeURIComponent({json.dumps(name)}) + '/jacobian', {{method: 'POST', "
            "headers: {'content-type': 'application/json'}, body: JSON.stringify({inputs: [[0.25, 0.75]]})})"
            ".then(async r => [r.status, await r.json()])")
        assert status == 200 and body["function"] == name, body
        want = torch.func.jacrev(fn)(torch.tensor([0.25, 0.75]))
        np.testing.assert_allclose(np.float32(body["jacobian"]["data"]), want.numpy(), rtol=1e-6)
    assert _violations(browser) == []


def test_an_api_url_typed_into_the_address_bar_reads(api, browser):
    """A POST route opened as a page (GET), an unknown name holding an RTL override and
    markup: the page shows the problem as JSON text, the override escaped (it would turn
    the text around it), the markup not drawn."""
    for path, status, code in [("/v1/functions/" + "%3Cb%3Ex%E2%80%AEfdp.exe", 404, "function_not_found"),
                               ("/v1/functions/" + "a%3Fb%23c%2541%20%C3%A9" + "/jacobian", 405, "method_not_allowed")]:
        browser.goto(api + path)
        shown = browser.wait_for("document.contentType.includes('json') && document.body.innerText")
        problem = json.loads(shown)
        assert (problem["status"], problem["code"]) == (status, code), problem
        assert "\u202e" not in shown and browser.eval("document.querySelectorAll('b').length") == 0
        if status == 404:
            assert "\\u202e" in shown and problem["detail"] == "no function named '<b>x\\u202efdp.exe'", shown
