"""Functions for tests/test_parity_round26.py, round 26 of PyTorch's own torch.func test
cases replayed over HTTP: outputs and aux whose dicts are keyed by any hashable, as
torch's pytree takes them, which the wire writes as their text."""

from __future__ import annotations

from typing import Any

from jacobian_service import Input, register

# name -> the output for the input x (a float64 vector): dicts with two keys written alike
# on the wire, at the top or nested, and one whose non-string keys are all distinct as text
KEYED: dict[str, Any] = {
    "int_and_text": lambda x: {1: x.sin(), "1": x.cos() * 2},
    "nested": lambda x: (x.exp(), {"k": {None: x * 2, "None": x**2}}),
    "bool_and_text": lambda x: {"True": x.sin(), True: {"a": x * 3}},
    "distinct": lambda x: {1: x.sin(), "2": x.cos() * 2, (3, "a"): x**2},
}


def _register(name: str, fn: Any) -> None:
    register(name=f"keys_{name}", inputs=[Input("x", shape=("n",))], description=f"a dict output: {name}")(
        lambda x: fn(x))


for _name, _fn in KEYED.items():
    _register(_name, _fn)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_keyed(x):
    """An aux keyed by ints, a tuple and a float, as torch's pytree takes any hashable key."""
    return x.sin() * x, {0: x.sum(), 1: {"h": x.cos(), 2: x[0]}, (3, "a"): [x * 2], 2.5: x.exp()}


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_alike(x):
    """An aux with two keys written alike: 1 and "1"."""
    return x.sin(), {1: x.sum(), "1": x.cos()}


@register(inputs=[Input("x", shape=("n",))])
def slash_keys(x):
    """A dict output keyed "a/b" beside "a" (whose "c" spells the same path) and "": keys
    an .npz member's path cannot name."""
    return {"a/b": x.sin() * x, "a": {"c": x.exp()}, "": x**3}


@register(inputs=[Input("x", shape=("n",))])
def array_keys(x):
    """A dict output keyed as an array object is ("dtype", "shape", "data")."""
    return {"dtype": x.sin(), "shape": x.cos() * x, "data": x**2}
