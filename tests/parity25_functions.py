"""Functions for tests/test_parity_round25.py, round 25 of PyTorch's own torch.func test
cases (test_eager_transforms.py's TestJac: test_outputs_can_any_pytree, negative argnums
through hessian; TestHessian in float16 and bfloat16) replayed over HTTP."""

from __future__ import annotations

from typing import Any

import torch
from jacobian_service import Input, register

# test_outputs_can_any_pytree's outputs torch.func refuses, and ones inside a pytree: name
# -> what the function returns for its input y (a float64 vector)
NOT_TENSORS: dict[str, Any] = {
    "none": lambda y: None,
    "empty_tuple": lambda y: (),
    "empty_dict": lambda y: {},
    "empty_list": lambda y: [],
    "nested_empty": lambda y: ((), {"a": []}),
    "number": lambda y: 12.2,
    "flag": lambda y: True,
    "text": lambda y: "abc",
    "none_inside": lambda y: (y.sin(), None),
    "int_inside": lambda y: {"a": [y.sin(), 3], "b": y},
}


def _register(name: str, fn: Any) -> None:
    register(name=f"out_{name}", inputs=[Input("x", shape=("n",))], description=f"returns {name.replace('_', ' ')}")(
        lambda x: fn(x))


for _name, _fn in NOT_TENSORS.items():
    _register(_name, _fn)


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("m",)), Input("z", shape=())])
def three_scalar(x, y, z):
    """A scalar of three inputs whose second derivatives in y are nonzero."""
    return (x.sin() * z).sum() * y.exp().sum() + z**3


@register(inputs=[Input("x", shape=("n",))])
def mixed(x):
    """Two outputs mixing every input: its Hessian's strategies round differently in float16."""
    return torch.stack([x.sin().sum() * x[0], x.exp().prod()]) * x[:2]
