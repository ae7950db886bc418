"""A real browser as the outside testers use one, round 17: two services behind one
gateway, under two path prefixes of one origin.

One uvicorn serving two apps, each under its own prefix (as a gateway routes
``/jacobian-cpu/`` and ``/jacobian-gpu/`` to two deployments, each with its own API
keys), and one headless Chromium for the module:

* the docs pages keep the key a user gives them in the tab's ``sessionStorage``, which
  is the origin's, not the path's: under one name for every prefix, /jacobian-gpu/docs
  read the key given to /jacobian-cpu/docs and sent it to the other service (a 403, the
  key asked again, which then overwrote the first's). Each prefix now keeps its own key:
  the other service never sees it, and each page opens again without asking.

(What a page of CORS_ORIGINS does with fetch, from this round's probes that found nothing
to fix: .npy bodies built in JS (unpadded headers, big-endian, Float16Array, BigInt64Array,
a Blob with its type), .npz bodies zipped in JS (stored, deflate-raw, data descriptors,
members without ``.npy``), Accept with weights, refusals of large uploads read before
their bodies were sent, aborts of queued, computing, uploading and streamed requests
(the engine stops: its CPU time flat, the stream budget back to 0), through nginx under
a prefix with ``serve``; rounds 2 to 16 hold those.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests._cdp import Chromium, chromium_binary
from tests._client_support import real_app, serve

CPU, GPU = "/jacobian-cpu", "/jacobian-gpu"
KEYS = {CPU: "cpu-key", GPU: "gpu-key"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    """One headless Chromium for the module (round 5's)."""
    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """Two services, each with its own key, under CPU and GPU on one origin (their
    engines are never started: the pages need only the document)."""
    apps = {prefix: real_app(functions="jacobian_service.examples", api_keys=key, engine_standby=False)
            for prefix, key in KEYS.items()}
    outer = Starlette(routes=[Mount(prefix, app) for prefix, app in apps.items()])

    with serve(outer) as url:
        yield url


_ENTER_KEY = r"""(key => {
  const form = document.getElementById('api-key');
  form.elements.key.value = key;
  form.requestSubmit();
  return true;
})"""

_ASKED = "document.getElementById('api-key') && !document.getElementById('api-key').hidden"
_SHOWN = "document.querySelectorAll('.opblock').length > 10"


def _bearers(chromium: Chromium, url: str) -> set[str]:
    """The Authorization headers the pages sent to ``url``'s paths so far."""
    chromium.eval("true")  # (the events sent meanwhile, read)
    return {next((v for k, v in e["params"]["request"]["headers"].items() if k.lower() == "authorization"), "")
            for e in chromium.events if e["method"] == "Network.requestWillBeSent"
            and e["params"]["request"]["url"].startswith(url)} - {""}


def test_each_prefixs_docs_keep_their_own_key(gateway, browser):
    """A user gives /jacobian-cpu/docs its key, then opens /jacobian-gpu/docs in the same
    tab: that page asks for its own key (it sent the CPU service's key to the GPU
    service, was refused, and said "That key was refused"); given it, the page opens.
    Back on /jacobian-cpu/docs (and its /redoc) the page opens without asking,
    with its key (the GPU one had overwritten it: refused, asked again)."""
    browser.goto("about:blank")
    browser.events.clear()
    browser.goto(gateway + CPU + "/docs")
    browser.wait_for(_ASKED)
    browser.eval(f"{_ENTER_KEY}({json.dumps(KEYS[CPU])})")
    browser.wait_for(_SHOWN)

    browser.goto(gateway + GPU + "/docs")
    browser.wait_for(_ASKED)
    message = browser.eval("document.getElementById('api-key-message').textContent")
    assert message == "", message  # asked as a first visit is, not told a key was refused
    assert _bearers(browser, gateway + GPU) == set(), "the CPU service's key went to the GPU service"
    browser.eval(f"{_ENTER_KEY}({json.dumps(KEYS[GPU])})")
    browser.wait_for(_SHOWN)
    assert _bearers(browser, gateway + GPU) == {f"Bearer {KEYS[GPU]}"}

    browser.events.clear()
    for page in ("/docs", "/redoc"):
        browser.goto(gateway + CPU + page)
        browser.wait_for(_SHOWN if page == "/docs" else "document.querySelectorAll('.http-verb').length > 10",
                         timeout_s=60)
        assert not browser.eval(_ASKED), page
    assert _bearers(browser, gateway + CPU) == {f"Bearer {KEYS[CPU]}"}
    assert _bearers(browser, gateway + GPU) == set()
    browser.goto("about:blank")
