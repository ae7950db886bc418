"""A real browser as the outside testers use one, round 6: a 2 GB Jacobian streamed into
a page, and the page letting go of it.

One ``serve`` (a supervisor, one front end, one engine: every process measured; an API
key) and one headless Chromium for the module. The page asks for ``softmax``'s Jacobian at n = 23,000
as ``.npy`` (2.1 GB, streamed row chunk by row chunk) and reads it through a
ReadableStream reader:

* aborted (AbortController), navigated away from, or its tab closed mid-stream: the
  engine stops at its next chunk, the stream's room in the front end's budget is given
  back (the same request, refused 503 beside the running stream, is served at once),
  and no process's resident memory grows by more than 256 MB;
* read slowly, then not at all: the engine runs no further ahead of the page than the
  buffers between them hold, and goes on when the page reads again.

And a page of another origin that CORS_ORIGINS allows, calling as web apps' HTTP
libraries call (the headers they add to every request); /docs with the server's API key
(a key pasted with a character a header cannot carry; Try it out of hvp).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests._cdp import Chromium
from tests._client_support import serve

from .conftest import live_server
from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)

MiB = 1 << 20
N = 23_000  # softmax's Jacobian: N x N float32, 2.1 GB
BUDGET = 100 * MiB  # the front end's stream room: one such stream's two chunks, not two streams'
GROWTH = 256 * MiB  # what no process may grow by while a page takes and drops a stream
STREAMED = re.compile(r"^jacobian_service_streamed_bytes_total (\S+)$", re.M)

# The page's side: an .npy body made in the page, the stream read piece by piece
# (``pause`` set: not read until it is cleared), its state in window.__s.
_PAGE = r"""
window.__npy = (n) => {
  let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + n + ",), }";
  const total = Math.ceil((10 + h.length + 1) / 64) * 64;
  h = h + " ".repeat(total - 10 - h.length - 1) + "\n";
  const buf = new Uint8Array(total + 4 * n);
  buf.set([0x93, 78, 85, 77, 80, 89, 1, 0, h.length & 255, h.length >> 8]);
  for (let i = 0; i < h.length; i++) buf[10 + i] = h.charCodeAt(i);
  const x = new Float32Array(buf.buffer, total, n);
  for (let i = 0; i < n; i++) x[i] = (i % 100) / 100;
  return buf;
};
window.__ask = (n) => fetch('/v1/functions/softmax/jacobian', {method: 'POST', signal: window.__ctrl.signal,
  headers: {'Content-Type': 'application/x-npy', Accept: 'application/x-npy', Authorization: 'Bearer k1'},
  body: window.__npy(n)});
window.__start = (n) => {
  window.__s = {bytes: 0, pause: false};
  window.__ctrl = new AbortController();
  window.__ask(n).then(async r => {
    window.__s.status = r.status;
    window.__s.length = Number(r.headers.get('content-length'));
    window.__s.chunk = Number(r.headers.get('x-chunk-size'));
    const reader = r.body.getReader();
    for (;;) {
      while (window.__s.pause) await new Promise(ok => setTimeout(ok, 20));
      const {done, value} = await reader.read();
      if (done) { window.__s.done = true; break; }
      window.__s.bytes += value.length;
    }
  }).catch(e => { window.__s.error = e.name; });
  return true;
};
true
"""


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (the supervisor, front end, engine, helpers)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += _tree(int(child))
    return found


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(done: Callable[[], Any], timeout_s: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = done()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def page() -> Iterator[str]:
    """A page server: another origin (127.0.0.1 on another port), the one CORS_ORIGINS allows."""
    async def blank(request: Any) -> HTMLResponse:
        return HTMLResponse("<!doctype html><html><head><meta charset='utf-8'></head><body>page</body></html>")

    with serve(Starlette(routes=[Route("/", blank)])) as url:
        yield url


@pytest.fixture(scope="module")
def api(page: str) -> Iterator["_Server"]:
    # One front end and an engine never restarted here (no spare to start); a stream
    # budget that holds one such stream's two chunks and not a second stream's; a key
    # (the docs pages ask for it; /metrics too, as the client's httpx sends it).
    with live_server(WORKERS=1, ENGINE_STANDBY="false", WARMUP="false", BODY_BUDGET_BYTES=BUDGET,
                     FUNCTIONS="jacobian_service.examples", CORS_ORIGINS=page, API_KEYS="k1") as (url, proc):
        server = _Server(url, proc)
        try:
            yield server
        finally:
            server.http.close()


class _Server:
    """The served processes, as a page's stream moves them."""

    def __init__(self, url: str, proc: Any) -> None:
        self.url, self.pids = url, _tree(proc.pid)
        assert len(self.pids) >= 3, self.pids  # serve, its front end, its engine (and helpers)
        self.http = httpx.Client(timeout=30, headers={"Authorization": "Bearer k1"})

    def streamed(self) -> float:
        """Bytes of row chunks the front end has had from the engine, all streams."""
        found = STREAMED.search(self.http.get(self.url + "/metrics").text)
        return float(found.group(1)) if found else 0.0

    def mark(self) -> dict[int, int]:
        """Every process's resident size now, its high-water mark reset to it."""
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        return {pid: _status(pid, "VmRSS") for pid in self.pids}

    def growth(self, marked: dict[int, int]) -> dict[int, int]:
        """How far each process's resident size rose at its peak since ``marked``."""
        return {pid: _status(pid, "VmHWM") - rss for pid, rss in marked.items()}

    def still(self, seconds: float = 1.0) -> bool:
        """No chunk asked of the engine for ``seconds``, nor CPU spent by it."""
        before, cpu = self.streamed(), {pid: _cpu_s(pid) for pid in self.pids}
        time.sleep(seconds)
        spent = sum(_cpu_s(pid) - cpu[pid] for pid in self.pids)
        return self.streamed() == before and spent < 0.5 * seconds


def _page(browser: Chromium, url: str) -> None:
    browser.goto(url + "/healthz")
    browser.wait_for("document.body && document.body.textContent.includes('ok')")
    browser.eval(_PAGE)


def _state(browser: Chromium, target: str = "window") -> dict[str, Any]:
    return json.loads(browser.eval(f"JSON.stringify({target}.__s || {{}})"))


def _reading(browser: Chromium, past: int, target: str = "window") -> dict[str, Any]:
    """The page's stream once it has read ``past`` bytes."""
    def read() -> dict[str, Any] | None:
        s = _state(browser, target)
        return s if s.get("bytes", 0) > past or "error" in s or s.get("status", 200) != 200 else None

    state = _wait(read, what=f"the page reading {past} bytes")
    assert state["status"] == 200 and "error" not in state, state
    assert state["length"] == 128 + 4 * N * N, state  # the whole .npy announced: 2.1 GB
    return state


def test_a_page_that_lets_go_of_a_streamed_jacobian_stops_the_work(api, browser):
    """Aborted by an AbortController, then by navigating away, then by closing the
    tab, each mid-stream of a 2.1 GB Jacobian: the engine stops at the next chunk, the
    stream's room is given back (the same request beside the running stream is a 503
    the page reads with its Retry-After; once the page let go, it is served), and no
    process grows by more than 256 MB."""
    server = api
    _page(browser, server.url)
    marked = server.mark()

    # 1. AbortController, with a second stream refused beside the first and served after.
    browser.eval(f"window.__start({N})")
    _reading(browser, 20 * MiB)
    refused = browser.eval(f"""(async () => {{
      const r = await fetch('/v1/functions/softmax/jacobian', {{method: 'POST',
        headers: {{'Content-Type': 'application/x-npy', Accept: 'application/x-npy', Authorization: 'Bearer k1'}},
        body: window.__npy({N})}});
      return {{status: r.status, retry: r.headers.get('retry-after'), body: await r.json()}};
    }})()""")
    assert (refused["status"], refused["body"]["code"], refused["retry"]) == (503, "unavailable", "1"), refused
    browser.eval("window.__ctrl.abort(); true")
    assert _wait(lambda: _state(browser).get("error")) == "AbortError"
    assert _wait(server.still, 20, "the engine stopping after the abort")
    browser.eval(f"window.__start({N})")  # the room given back: served at once
    _reading(browser, 20 * MiB)

    # 2. Navigating away mid-stream (the stream of the request just served).
    browser.goto("about:blank")
    assert _wait(server.still, 20, "the engine stopping after the page went")

    # 3. The tab closed mid-stream: a tab of its own, opened by the page.
    _page(browser, server.url)
    opened = browser.send("Runtime.evaluate", expression="(window.__tab = window.open('/healthz', 'stream')) !== null",
                          userGesture=True, returnByValue=True)  # (a click's: no popup blocked)
    assert opened["result"]["value"] is True, opened
    browser.wait_for("window.__tab.document.readyState === 'complete' && "
                     "window.__tab.document.body.textContent.includes('ok')")
    browser.eval(f"window.__tab.eval({json.dumps(_PAGE)}); window.__tab.__start({N})")
    _reading(browser, 20 * MiB, "window.__tab")
    browser.eval("window.__tab.close(); true")
    assert _wait(server.still, 20, "the engine stopping after the tab closed")
    browser.eval(f"window.__start({N})")  # and its room given back too
    _reading(browser, 20 * MiB)
    browser.eval("window.__ctrl.abort(); true")
    assert _wait(server.still, 20)

    grown = server.growth(marked)
    assert max(grown.values()) < GROWTH, {pid: g // MiB for pid, g in grown.items()}
    browser.goto("about:blank")


def test_a_page_that_reads_slowly_holds_the_engine_back(api, browser):
    """A page that stops reading its stream (a ReadableStream reader not called) stops
    the engine once the buffers between them are full: the engine is never further
    ahead of the page than the front end's two chunks and the sockets' and the
    browser's buffers (64 MiB here, of a 2.1 GB Jacobian). Read again, it goes on."""
    server = api
    _page(browser, server.url)
    marked, before = server.mark(), server.streamed()
    browser.eval(f"window.__start({N})")
    state = _reading(browser, 20 * MiB)
    chunk = state["chunk"] * 4 * N
    browser.eval("window.__s.pause = true")
    assert _wait(server.still, 30, "the engine held back by a page that reads nothing")
    held = _state(browser)["bytes"]
    ahead = server.streamed() - before - held
    assert 0 <= ahead <= 2 * chunk + 64 * MiB, (ahead // MiB, chunk // MiB)
    browser.eval("window.__s.pause = false")
    _reading(browser, held + 4 * chunk)  # read again: the engine goes on
    browser.eval("window.__ctrl.abort(); true")
    assert _wait(server.still, 20)
    grown = server.growth(marked)
    assert max(grown.values()) < GROWTH, {pid: g // MiB for pid, g in grown.items()}
    browser.goto("about:blank")


def test_a_page_calls_as_its_http_library_does(api, page, browser):
    """Headers a web app's HTTP library or framework adds to every call: Laravel's (and
    Rails') axios set-up sends ``X-Requested-With: XMLHttpRequest``, "no-cache"
    interceptors (Angular's, the IE fix) ``Cache-Control``, ``Pragma``, ``Expires`` and
    ``If-Modified-Since``. None is CORS-safelisted, and the preflight refused each: every
    call of such a page of an allowed origin read "TypeError: Failed to fetch". Now they
    pass, and the Jacobian is torch.func's."""
    import numpy as np
    import torch

    browser.goto(page + "/")
    browser.wait_for("document.body && document.body.textContent === 'page'")
    headers = {"Content-Type": "application/json", "Authorization": "Bearer k1",
               "X-Requested-With": "XMLHttpRequest", "Cache-Control": "no-cache",
               "Pragma": "no-cache", "Expires": "0", "If-Modified-Since": "Mon, 26 Jul 1997 05:00:00 GMT"}
    got = browser.eval(f"""(async () => {{
      const r = await fetch({json.dumps(api.url + "/v1/functions/sin/jacobian")}, {{method: 'POST',
        headers: {json.dumps(headers)}, body: JSON.stringify({{inputs: [[0.5, 1.0]]}})}}).catch(e => e);
      if (r instanceof Error) return String(r);
      return {{status: r.status, body: await r.json()}};
    }})()""")
    assert isinstance(got, dict) and got["status"] == 200, got
    want = torch.func.jacrev(torch.sin)(torch.tensor([0.5, 1.0])).numpy()
    np.testing.assert_allclose(np.float32(got["body"]["jacobian"]["data"]), want, rtol=1e-6)
    browser.goto("about:blank")


def _press_enter(browser: Chromium) -> None:
    browser.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r")
    browser.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


def test_a_key_pasted_with_a_character_a_header_cannot_carry_is_asked_again(api, browser):
    """/docs with API keys: a key pasted with a zero-width space copied along (from a chat
    or a wiki page) made the page's fetch() throw before it sent anything; the page
    said "The API description could not be loaded: Failed to execute 'fetch' on
    'Window': ... non ISO-8859-1 code point" and disabled the key field: nothing to do
    but reload. Now the key is asked for again, the character named, and the key typed
    again shows the operations."""
    url = api.url
    browser.goto(url + "/healthz")
    browser.eval("sessionStorage.clear(); true")
    browser.goto(url + "/docs")
    browser.wait_for("document.activeElement && document.activeElement.name === 'key'", timeout_s=60)
    browser.send("Input.insertText", text="k1\u200b")
    _press_enter(browser)
    said = browser.wait_for("document.getElementById('api-key-message').textContent")
    assert "U+200B" in said and "type the key again" in said, said
    assert browser.eval("document.activeElement.name === 'key' && !document.activeElement.disabled")
    browser.send("Input.insertText", text="k1")
    _press_enter(browser)
    browser.wait_for("document.querySelectorAll('.opblock').length > 5", timeout_s=60)
    assert browser.eval("sessionStorage.getItem('jacobian-service-api-key')") == "k1"


def test_try_it_out_of_hvp_answers_for_a_function_of_any_output(api, browser):
    """hvp's examples (inputs and tangents) answer for a function of one scalar output
    only: "Try it out" of hvp with every other function's example (sin, mlp, the has_aux
    sin_aux: 11 of the 13 built-ins) was a 422 "hvp needs a function with one scalar (0-d) output, or
    'cotangents' shaped like its output". The page now writes such a function's body
    with cotangents of 0.5 shaped as its output (asked of /evaluate, as for vjp), and
    Execute answers torch.func's c . H t (the jvp of the vjp); a scalar function keeps
    its example."""
    import numpy as np
    import torch

    from jacobian_service import examples as ex
    from tests.test_browser_round2 import _EXECUTE, _OPEN

    if not browser.eval(f"location.href === {json.dumps(api.url + '/docs')} && "
                        "document.querySelectorAll('.opblock').length > 5"):  # (else the key test's page, drawn)
        browser.goto(api.url + "/healthz")
        browser.eval("sessionStorage.setItem('jacobian-service-api-key', 'k1'); true")
        browser.goto(api.url + "/docs")
        browser.wait_for("document.querySelectorAll('.opblock').length > 5", timeout_s=60)
    path = "/v1/functions/{name}/hvp"
    assert browser.eval(f"{_OPEN}({json.dumps(path)}, 'post')")
    clear = ("(() => { const t = [...document.querySelectorAll('.opblock-post')].find(e => e.querySelector("
             f"'.opblock-summary-path').getAttribute('data-path') === {json.dumps(path)}).querySelector('textarea'); "
             "Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(t, ''); "
             "t.dispatchEvent(new Event('input', {bubbles: true})); return true; })()")
    for name, fn, n in [("sin_aux", lambda x: ex.sin_aux(x)[0], 3)]:  # (a vector output, and aux beside it)
        browser.eval(clear)  # (a body written for the function before has cotangents too)
        got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', {json.dumps(name)}, 'application/json', null, "
                           "'cotangents')", timeout_s=90)
        assert got["status"] == "200", (name, got)
        x, t = torch.full((n,), 0.5), torch.full((n,), 0.5)
        c = torch.full_like(fn(x), 0.5)
        want = torch.func.jvp(lambda y: torch.func.vjp(fn, y)[1](c)[0], (x,), (t,))[1]
        hvp = json.loads(got["text"])["hvp"]
        np.testing.assert_allclose(np.float32(hvp["data"]).reshape(hvp["shape"]), want.numpy(), rtol=1e-5, atol=1e-6)
    # A function of one scalar output keeps its example (no cotangents): torch.func's H t.
    got = browser.eval(f"{_EXECUTE}({json.dumps(path)}, 'post', 'sum_sin', 'application/json', null)", timeout_s=90)
    assert got["status"] == "200", got
    x = torch.full((3,), 0.5)
    want = torch.func.jvp(torch.func.grad(ex.sum_sin), (x,), (x,))[1]
    np.testing.assert_allclose(np.float32(json.loads(got["text"])["hvp"]["data"]), want.numpy(), rtol=1e-5)
    assert "cotangents" not in browser.eval("[...document.querySelectorAll('textarea.body-param__text')].pop().value")
    browser.goto("about:blank")
