"""A real browser as the outside testers use one, round 13.

One API server (CORS_ORIGINS naming one page origin, an API key, MAX_REQUEST_BYTES
lowered to 1 MiB as an operator who takes small uploads sets it; the app run by the
tests' uvicorn) and round 5's headless Chromium for the module:

* a page holding streamed Jacobians of 9 MB at once (asked together, each read once
  every head is in) had its second refused 429: the stream budget was sized from
  MAX_REQUEST_BYTES (a limit on uploads), 64 MiB where 512 MiB by default, a client's
  share 32 MiB, and each 9 MB answer sent in one chunk was counted as two (18 MB).
  A stream now holds at most its own bytes, and the budget is no smaller than its
  default (BODY_BUDGET_BYTES where set);
* /metrics says what the stream budget holds: a page's streamed JSON Jacobian read
  through ``TextDecoderStream`` while it holds it, 0 once it aborted.
"""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests._client_support import real_app, serve

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _on_page
from .test_connections import _metric, _wait_for

KEY = {"Authorization": "Bearer k1"}
SOFTMAX = "/v1/functions/softmax/jacobian"
N = 1536  # softmax's Jacobian: 1536 x 1536 float32, 9.4 MB (streamed: over the 8 MiB threshold)


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[str]:
    app = real_app(functions="jacobian_service.examples", cors_origins=page, api_keys="k1", workers=1,
                   engine_standby=False, max_request_bytes=1 << 20)
    with serve(app, ready_path="/readyz") as url:
        yield url


def test_a_stream_sent_in_one_chunk_holds_its_bytes_once():
    """StreamBudget's count, without a server: a result smaller than two chunks (9.4 MB
    in one chunk of the engine's 32 MiB) holds its own bytes, as admitted before the
    engine runs (its size known from an equal request) and as held once its head says
    how the engine chunked it; it was counted twice (two chunks of the whole result)."""
    from jacobian_service.responses import StreamBudget
    from jacobian_service.routes import _stream_bounds, _stream_hold
    from jacobian_service.registry import Registry
    from jacobian_service.scheduler import StreamHead
    from jacobian_service.types import Call

    softmax = Registry.from_modules(["jacobian_service.examples"]).get("softmax")
    call = Call(softmax, [np.zeros(N, np.float32)], ["float32"])
    nbytes = N * N * 4
    budget = StreamBudget(64 << 20, per_client=8)
    budget.learn("k", nbytes)
    holds = [budget.admit("k", *_stream_bounds(call, sparse=False), "page") for _ in range(3)]  # (3 x 9.4 MB: a share of 32 MiB)
    assert [hold.held for hold in holds] == [nbytes] * 3 and budget.used == 3 * nbytes
    head = StreamHead(1, (N, N), "float32", chunk_size=N, nbytes=nbytes)  # one chunk, the whole result
    assert _stream_hold(head) == nbytes
    assert _stream_hold(StreamHead(1, (N, N), "float32", chunk_size=N // 4, nbytes=nbytes)) == nbytes // 2
    for hold in holds:
        hold.release()
    assert budget.used == 0


_STREAMS = """(async () => {
  const ask = x => fetch(%s, {method: 'POST', body: JSON.stringify({inputs: [x]}),
    headers: {'Content-Type': 'application/json', Accept: 'application/x-npy', Authorization: 'Bearer k1'}});
  const at = k => Array.from({length: %d}, (_, i) => k * Math.sin(i));
  const picks = %s;
  const values = async r => {
    if (!r.ok) return [r.status, await r.text()];
    const bytes = await r.arrayBuffer();
    const head = new DataView(bytes).getUint16(8, true) + 10;  // (.npy 1.0: its header's length)
    const all = new Float32Array(bytes, head);
    return [r.status, all.length, picks.map(i => all[i])];
  };
  const first = await values(await ask(at(1)));  // (its size learned: the next ones' reserved before any work)
  const held = await Promise.all([2, 3, 4, 5].map(k => ask(at(k))));  // four at once, bodies unread
  const out = [first];
  for (const r of held) out.push(await values(r));
  return out;
})()"""


def test_a_page_holds_four_streamed_jacobians_at_once(api, page, browser):
    """Four 9.4 MB streams held at once by one page (37.7 MB: past a share of the 64 MiB
    budget MAX_REQUEST_BYTES=1 MiB made) are all served, each the Jacobian torch.func
    gives at its inputs; /v1/info says the budget in force: the default's, whatever the
    upload limit."""
    from jacobian_service.settings import Settings

    info = httpx.get(api + "/v1/info", headers=KEY, timeout=30).json()["limits"]
    assert info["max_request_bytes"] == 1 << 20
    assert info["stream_budget_bytes"] == Settings().stream_budget  # (the default's: no smaller for a smaller upload limit)
    picks = np.random.default_rng(13).integers(0, N * N, 64).tolist()
    _on_page(browser, page)
    got = browser.eval(_STREAMS % (json.dumps(api + SOFTMAX), N, json.dumps(picks)))
    for k, answer in enumerate(got, start=1):
        assert answer[:2] == [200, N * N], (k, answer[:2])
        x = k * torch.sin(torch.arange(N, dtype=torch.float64)).float()
        expected = torch.func.jacrev(lambda v: torch.softmax(v, dim=-1))(x).flatten()[picks]
        np.testing.assert_allclose(answer[2], expected.numpy(), rtol=1e-5, atol=1e-9)


_READ_SOME = """(async () => {
  window.stop13 = new AbortController();
  const r = await fetch(%s, {method: 'POST', signal: window.stop13.signal,
    body: JSON.stringify({inputs: [Array.from({length: %d}, (_, i) => Math.cos(i))]}),
    headers: {'Content-Type': 'application/json', Accept: 'application/json', Authorization: 'Bearer k1'}});
  window.text13 = r.body.pipeThrough(new TextDecoderStream()).getReader();
  const first = await window.text13.read();
  return [r.status, r.headers.get('content-type'), r.headers.get('x-chunk-size'), first.value.slice(0, 40)];
})()"""

_ABORT = """(async () => {
  window.stop13.abort();  // (what the decoder had queued may still be read: then the abort)
  try { while (!(await window.text13.read()).done); return 'read to the end'; } catch (e) { return e.name; }
})()"""


def test_a_page_that_aborts_a_json_stream_frees_its_room_at_once(api, page, browser):
    """A page reading a streamed JSON Jacobian through ``ReadableStream`` and
    ``TextDecoderStream``, then aborting it (AbortController): /metrics said nothing of
    the stream budget (the bytes its 503 and 429 name), so no one could see the room
    held, nor given back. ``jacobian_service_stream_bytes_held`` now says it: the
    stream's 9.4 MB while the page holds it unread, 0 once it has aborted (the page
    reads AbortError)."""
    _on_page(browser, page)
    status, media, chunk, start = browser.eval(_READ_SOME % (json.dumps(api + SOFTMAX), N))
    assert (status, media) == (200, "application/json") and start.startswith('{"'), (status, media, start)
    assert chunk == str(N)  # (one chunk: its room, the result's size where known, holds it whole)
    assert _metric(api, "jacobian_service_stream_bytes_held", headers=KEY) == N * N * 4  # (its two chunks: the whole result, once)
    assert browser.eval(_ABORT) == "AbortError"
    assert _wait_for(lambda: _metric(api, "jacobian_service_stream_bytes_held", headers=KEY) == 0, 5)
