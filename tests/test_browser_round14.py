"""A real browser as the outside testers use one, round 14.

Round 10's API server (CORS_ORIGINS naming one page origin, an API key; the app run by
the tests' uvicorn; tests/user_functions.py beside the built-ins) and round 5's headless
Chromium for the module:

* /docs draws every description of every operation (its parameters, its answers and
  their headers) as the document writes it: Swagger UI reads descriptions as Markdown
  with its HTML, so ``filename="<function>-<what>.npy"`` was drawn ``filename="-.npy"``
  (two tags dropped) and Vary's ``* on every answer`` as a bullet without its ``*``;
  the document's every description, its schemas' too, renders to its own text;
* a page's NaN and infinities, which JSON.stringify writes as ``null``, are refused with
  a 422 that says so and how to spell them (it said 'a missing value is "NaN"', or of a
  0-d input "got NoneType"); spelled so, they answer torch.func's derivatives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests._client_support import real_app, serve

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _console_errors, _keyed, _on_page

KEY = {"Authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def api(page: str) -> Iterator[str]:
    """Round 10's server (CORS_ORIGINS naming the page, a key), the test functions beside the built-ins."""
    app = real_app(functions="jacobian_service.examples,tests.user_functions", cors_origins=page, api_keys="k1",
                   workers=1, engine_standby=False)
    with serve(app, ready_path="/readyz") as url:
        yield url


def _document(api: str) -> dict[str, Any]:
    return httpx.get(api + "/openapi.json", headers=KEY, timeout=30).raise_for_status().json()


def _as_written(description: str) -> str:
    """What a description says, read as text: its code spans' text, spaces collapsed."""
    return " ".join(re.sub(r"`([^`]*)`", r"\1", description).split())


# Every operation opened, and the text of each piece of Markdown Swagger UI drew in it.
_OPEN_ALL = r"""(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (f, t = 60000) => { const end = Date.now() + t;
    while (Date.now() < end) { const v = f(); if (v) return v; await sleep(100); } return null; };
  await until(() => document.querySelectorAll('.opblock').length > 10);
  const blocks = [...document.querySelectorAll('.opblock')];
  for (const block of blocks) if (!block.classList.contains('is-open')) block.querySelector('.opblock-summary-control').click();
  await until(() => blocks.every(b => b.querySelector('.responses-wrapper .responses-table')));
  return blocks.map(b => [b.querySelector('.opblock-summary-method').textContent.toLowerCase(),
    b.querySelector('.opblock-summary-path').getAttribute('data-path'),
    [...b.querySelectorAll('.markdown, .renderedMarkdown')].map(e => e.innerText.replace(/\s+/g, ' ').trim())]);
})()"""


def test_the_docs_draw_every_description_as_written(api, browser):
    """Opened, every operation of /docs shows each of its parameters', answers' and
    answer headers' descriptions as the document writes them. The binary answers'
    Content-Disposition read ``attachment; filename="-.npy"`` (``<function>`` and
    ``<what>`` taken for HTML tags and dropped), and a POST's Vary a bullet, "on every
    answer", without the ``*`` it describes (a line starting "* " is a Markdown list)."""
    document = _document(api)
    _keyed(browser, api, "/docs")
    drawn = browser.eval(_OPEN_ALL, timeout_s=120)
    assert len(drawn) == sum(len(methods) for methods in document["paths"].values()), drawn
    missing = []
    for method, path, texts in drawn:
        operation = document["paths"][path][method]
        described = [p.get("description") for p in operation.get("parameters", [])]
        for answer in operation["responses"].values():
            described += [answer.get("description"), *(h.get("description") for h in answer.get("headers", {}).values())]
        missing += [(method, path, _as_written(d)) for d in described if d and _as_written(d) not in texts]
    assert missing == [], missing
    binary = next(texts for method, path, texts in drawn if path == "/v1/functions/{name}/jacobian")
    assert 'binary answers (.npy / .npz): attachment; filename="<function>-<what>.npy"' in binary
    assert "* on every answer, errors included: it depends on the body, which no cache keys" in binary
    assert _console_errors(browser) == []
    browser.goto("about:blank")


_PROSE = frozenset({"p", "code", "em", "strong", "a", "br"})


class _Text(HTMLParser):
    """The text of rendered Markdown, and the elements it made that prose does not."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.made: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag not in _PROSE:
            self.made.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_every_description_renders_to_its_own_text(api):
    """Every description and summary of the document, its schemas' included (which
    /docs shows only deep in a response's schema), read as CommonMark with HTML, as
    Swagger UI and ReDoc read it, is its own text and makes no element but prose: the
    pytree schema's ``<input>/<key or position>/...`` made an ``<input>`` element (a
    text box, in ReDoc) and lost the member path it spelled."""
    markdown_it = pytest.importorskip("markdown_it")
    render = markdown_it.MarkdownIt("commonmark", {"html": True}).render
    wrong = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("description", "summary") and isinstance(value, str):
                    parsed = _Text()
                    parsed.feed(render(value))
                    text = " ".join("".join(parsed.text).split())
                    if text != _as_written(value) or parsed.made:
                        wrong.append((f"{where}/{key}", value, text, parsed.made))
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(_document(api), "")
    assert wrong == [], json.dumps(wrong, indent=1)[:3000]


# Values as a page computes them: JSON.stringify writes each non-finite one as null.
_NON_FINITE = "[0.5, NaN, Infinity, -Infinity]"
_SPELL = "(k, v) => typeof v === 'number' && !Number.isFinite(v) ? String(v) : v"  # String(-Infinity): '-Infinity'
_NULL_SAYS = ('null (JSON.stringify writes NaN, Infinity and -Infinity as null): spell them "NaN", "Infinity", '
              '"-Infinity"')


def _spelled(array: dict[str, Any]) -> np.ndarray:
    """A JSON answer's array, its non-finite values spelled as strings ("NaN", ...)."""
    return np.array(array["data"], dtype=object).astype(np.float64).astype(array["dtype"]).reshape(array["shape"])


def test_a_pages_non_finite_numbers_are_named_and_then_computed(api, page, browser):
    """A page sends what it computed (a log of 0, a 0/0) with JSON.stringify, which
    writes NaN, Infinity and -Infinity as ``null``: an array holding one was a 422 'array
    data holds null; a missing value is "NaN"' (an infinity "fixed" by it became a NaN),
    a 0-d input or cotangents of one "expected an array ..., got NoneType" (Python's
    name). Each now names JSON.stringify's nulls and the spellings; sent spelled (a
    replacer: String(v) is that spelling), each answers torch.func's result, non-finite
    values spelled alike in the answer."""
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const x = {_NON_FINITE}, out = {{}};
      const headers = {{Authorization: 'Bearer k1', 'Content-Type': 'application/json'}};
      const call = (path, body, replacer) => fetch({json.dumps(api)} + path, {{method: 'POST', headers,
        body: JSON.stringify(body, replacer)}}).then(async r => [r.status, await r.json()], e => String(e));
      const bodies = {{
        jacobian: ['/v1/functions/sin/jacobian', {{inputs: [x]}}],
        typed: ['/v1/functions/sin/jacobian', {{inputs: [{{dtype: 'float64', shape: [4], data: x}}]}}],
        scalar: ['/v1/functions/scalar_square/jacobian', {{inputs: [Math.log(0)]}}],
        vjp: ['/v1/functions/sin/vjp', {{inputs: [[1, 2, 3, 4]], cotangents: x}}],
        scalar_vjp: ['/v1/functions/scalar_square/vjp', {{inputs: [2], cotangents: 0 / 0}}],
      }};
      for (const [name, [path, body]] of Object.entries(bodies))
        out[name] = [await call(path, body), await call(path, body, {_SPELL})];
      return out;
    }})()""", timeout_s=60)
    for name, (plain, spelled) in got.items():
        assert isinstance(plain, list) and plain[0] == 422, (name, plain)
        assert plain[1]["code"] == "invalid_input" and plain[1]["detail"].endswith(_NULL_SAYS), (name, plain)
        assert isinstance(spelled, list) and spelled[0] == 200, (name, spelled)
    x = torch.tensor([0.5, float("nan"), float("inf"), float("-inf")])
    for name, dtype in (("jacobian", torch.float32), ("typed", torch.float64)):
        want = torch.func.jacrev(torch.sin)(x.to(dtype))
        np.testing.assert_array_equal(_spelled(got[name][1][1]["jacobian"]), want.numpy())
    scalar = torch.func.jacrev(lambda t: t * t)(torch.tensor(float("-inf")))
    np.testing.assert_array_equal(_spelled(got["scalar"][1][1]["jacobian"]), scalar.numpy())
    _, pullback = torch.func.vjp(torch.sin, torch.tensor([1.0, 2, 3, 4]))
    np.testing.assert_array_equal(_spelled(got["vjp"][1][1]["vjp"]), pullback(x)[0].numpy())
    _, pullback = torch.func.vjp(lambda t: t * t, torch.tensor(2.0))
    np.testing.assert_array_equal(_spelled(got["scalar_vjp"][1][1]["vjp"]),
                                  pullback(torch.tensor(float("nan")))[0].numpy())


def test_a_page_reads_a_streamed_jsons_headers_as_the_npys(api, page, browser):
    """A page streaming softmax's 1500 x 1500 Jacobian (9 MB: over the stream threshold)
    reads the headers the README names for a streamed Jacobian (X-Chunk-Size, X-Device,
    X-Queue-Ms) before any of the body, as JSON as it does as .npy: the JSON stream sent
    no X-Queue-Ms (null to the page), where its meta, the body's last key, says the same
    queue time. Both bodies are torch.func's Jacobian."""
    n = 1500
    _on_page(browser, page)
    got = browser.eval(f"""(async () => {{
      const x = Array.from({{length: {n}}}, (_, i) => (i % 17) / 16), out = {{}};
      const heads = r => Object.fromEntries(['x-chunk-size', 'x-device', 'x-queue-ms', 'content-length']
        .map(h => [h, r.headers.get(h)]));
      for (const accept of ['application/json', 'application/x-npy']) {{
        const r = await fetch({json.dumps(api)} + '/v1/functions/softmax/jacobian', {{method: 'POST',
          headers: {{Authorization: 'Bearer k1', 'Content-Type': 'application/json', Accept: accept}},
          body: JSON.stringify({{inputs: [x]}})}});
        const head = heads(r);
        if (accept === 'application/json') {{
          const doc = await r.json();
          const J = doc.jacobian.data;
          out.json = {{status: r.status, head, meta: doc.meta, shape: doc.jacobian.shape, row: J[7],
                       diagonal: J.map((row, i) => row[i])}};
        }} else {{
          const bytes = new Uint8Array(await r.arrayBuffer());
          const headerLength = new DataView(bytes.buffer).getUint16(8, true);
          const J = new Float32Array(bytes.buffer, 10 + headerLength);
          out.npy = {{status: r.status, head, size: bytes.length, row: Array.from(J.subarray(7 * {n}, 8 * {n})),
                      diagonal: Array.from({{length: {n}}}, (_, i) => J[i * {n} + i])}};
        }}
      }}
      return out;
    }})()""", timeout_s=180)
    from jacobian_service import examples

    want = torch.func.jacrev(examples.softmax)(torch.arange(n).remainder(17).float() / 16)
    for media in ("json", "npy"):
        answer = got[media]
        assert answer["status"] == 200, answer.get("status")
        head = answer["head"]
        assert head["x-device"] == "cpu" and int(head["x-chunk-size"]) >= 1, (media, head)
        assert head["x-queue-ms"] is not None and float(head["x-queue-ms"]) >= 0, (media, head)
        np.testing.assert_allclose(np.float32(answer["row"]), want[7].numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.float32(answer["diagonal"]), want.diagonal().numpy(), rtol=1e-5, atol=1e-9)
    assert got["json"]["head"]["content-length"] is None and got["json"]["shape"] == [n, n]  # (chunked: streamed)
    assert float(got["json"]["head"]["x-queue-ms"]) == got["json"]["meta"]["queue_ms"]
    assert int(got["json"]["head"]["x-chunk-size"]) == got["json"]["meta"]["chunk_size"]
    assert int(got["npy"]["head"]["content-length"]) == got["npy"]["size"]
