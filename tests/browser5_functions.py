"""Functions for tests/test_browser_round5.py: a registry whose names, descriptions and
input names carry HTML, markdown and script, as a careless or hostile module might
register them. The docs pages render them: none may run, and the pages still draw."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# Each payload, run, sets window.__pwned (what the test looks for), beside an alert.
IMG = '<img src=x onerror="window.__pwned=1">'
SCRIPT = "</script><script>window.__pwned=2</script>"  # (not a name: names hold no '/')
SVG = "<svg onload=window.__pwned=2>"
LINK = "[click](javascript:window.__pwned=3)"


@register(name=IMG + "x", inputs=[Input(SVG, shape=("n",))],
          description=f"{IMG} {SCRIPT} {LINK} <a href=\"javascript:window.__pwned=4\">a</a>")
def img_name(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@register(name='" onmouseover="window.__pwned=5" x="', inputs=[Input(LINK, shape=(2,))],
          description="# heading\n\n<script>window.__pwned=6</script>\n\n" + LINK)
def quote_name(x: torch.Tensor) -> torch.Tensor:
    return x * x


@register(name="{{constructor.constructor('window.__pwned=7')()}}", inputs=[Input("x", shape=(2,))],
          description="template injection")
def template_name(x: torch.Tensor) -> torch.Tensor:
    return x.exp()


@register(name="a?b#c%41 é", inputs=[Input("x", shape=(2,))], description="URL characters in a name")
def url_name(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


# Names that every JavaScript object already has as properties (the pages hold the
# document in objects keyed by them).
@register(name="hasOwnProperty", inputs=[Input("x", shape=(2,))], description="an Object.prototype name")
def has_own_property(x: torch.Tensor) -> torch.Tensor:
    return 3 * x


@register(name="__proto__", inputs=[Input("__proto__", shape=(2,)), Input("constructor", shape=(2,))],
          description="an Object.prototype name, its inputs too")
def proto(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b


@register(name="plain", inputs=[Input("toString", shape=(2,))], description="an input named as a prototype's")
def plain(x: torch.Tensor) -> torch.Tensor:
    return x.cos()
