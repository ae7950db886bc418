"""Functions with pytree parameters (tuples, lists, dicts of arrays), for test_pytree_inputs."""

from __future__ import annotations

import torch

from jacobian_service import Array, Input, register


@register(
    inputs=[
        Input("pair", tree=(Array(("n",)), {"scale": Array(()), "shift": Array(("n",))})),
        Input("x", shape=("n",)),
    ],
    has_aux=True,
    description="A tuple parameter holding a dict; a tuple output and aux.",
)
def tree_fn(pair, x):
    a, p = pair
    y = p["scale"] * torch.sin(a * x) + p["shift"]
    return (y, (y**2).sum() * x[0]), {"norm": y.norm()}


@register(
    inputs=[Input("x", shape=("n",)), Input("params", tree={"w": Array(("n",)), "c": [Array(()), Array(("n",))]})],
    description="A scalar of a dict parameter holding a list: for hessian and hvp.",
)
def tree_scalar(x, params):
    c0, c1 = params["c"]
    return (torch.sin(params["w"] * x) * c0 + c1**3 * x).sum()


@register(
    inputs=[Input("cfg", tree={"w": Array(("n",)), "k": Array((), "int64")}), Input("x", shape=("n",))],
    description="A dict parameter with an integer leaf.",
)
def tree_int(cfg, x):
    return cfg["w"] * x * cfg["k"].to(x.dtype)


@register(
    inputs=[Input("params", tree={"w": Array(("m", "n")), "b": Array(("m",))}), Input("x", shape=("n",))],
    description="A layer whose output depends on data: vmap cannot batch it.",
)
def tree_branchy(params, x):
    y = params["w"] @ x + params["b"]
    if y.sum().item() > 0:  # .item() defeats vmap
        return y**2
    return -y


@register(inputs=[Input("x", shape=("n",))], description="A dict output keyed by numbers, not in their order.")
def numeric_keys(x):
    return {"1": x * 1.0, "0": x * 2.0}


@register(
    inputs=[Input("p", tree={"1": Array(("n",)), "0": Array(("n",))})],
    description="A dict parameter keyed by numbers, not in their order.",
)
def numeric_key_param(p):
    return p["1"] * 10.0 + p["0"]
