"""A real browser as the outside testers use one, round 14.

Round 10's API server (CORS_ORIGINS naming one page origin, an API key; the app run by
the tests' uvicorn) and round 5's headless Chromium for the module:

* /docs draws every description of every operation (its parameters, its answers and
  their headers) as the document writes it: Swagger UI reads descriptions as Markdown
  with its HTML, so ``filename="<function>-<what>.npy"`` was drawn ``filename="-.npy"``
  (two tags dropped) and Vary's ``* on every answer`` as a bullet without its ``*``;
  the document's every description, its schemas' too, renders to its own text.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from .test_browser_round5 import browser  # noqa: F401 (round 5's fixture: one Chromium for the module)
from .test_browser_round6 import page  # noqa: F401 (round 6's: a page of the origin CORS_ORIGINS allows)
from .test_browser_round7 import _console_errors, _keyed
from .test_browser_round10 import api  # noqa: F401 (round 10's: the server, CORS_ORIGINS naming that page, a key)

KEY = {"Authorization": "Bearer k1"}


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
