"""Functions for tests/test_wire_round5.py: a builtin registered as it is (torch.sin),
bfloat16 results on every route, and a function of each declared dtype a JSON answer
writes (round-trip: what the service writes, it reads)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# A builtin, not a def: its name from __name__, recorded in this module (its own
# __module__ is "torch").
register(torch.sin, inputs=[Input("x", shape=("n",))])
register(torch.cos, name="builtin_cos", inputs=[Input("x", shape=("n",))])


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def bf16_aux(x):
    """x**2 in the dtype sent; aux: x in bfloat16 and 2x in float32."""
    return x**2, {"bf": x.to(torch.bfloat16), "f32": 2 * x.float()}


@register(inputs=[Input("x", shape=("n",))])
def to_bf16(x):
    """sin(x) returned in bfloat16 whatever the input's dtype."""
    return torch.sin(x).to(torch.bfloat16)


@register(inputs=[Input("x", shape=("n",)), Input("w", shape=("n",), dtype="float32")])
def mixed(x, w):
    """(x * w, w.sum() * x): a bfloat16 x beside a float32 w."""
    return (x * w.to(x.dtype), (w.sum() * x.float()))


def _echo(dtype: str):
    def f(x, y):
        return y * x.to(y.dtype).sum()

    f.__name__ = f"takes_{dtype}"
    return register(f, inputs=[Input("x", shape=("n",), dtype=dtype), Input("y", shape=())])


for _dtype in ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "bfloat16", "float32", "float64"):
    _echo(_dtype)


@register(inputs=[Input("x", shape=("n",))])
def of_dtype(x):
    """x in every dtype a JSON answer writes (a tuple; complex ones too)."""
    return tuple(x.to(d) for d in (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                   torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
                                   torch.float32, torch.float64, torch.complex64, torch.complex128))
