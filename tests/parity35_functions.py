"""Functions for tests/test_parity_round35.py, round 35 of PyTorch's own torch.func test
cases replayed over HTTP (test_eager_transforms.py's TestHessian, TestLinearize,
TestHigherOrder, TestComposability, TestFunctionalize, ensembling; outputs that are the
inputs, views of them, the same tensor twice, empty, integer or boolean)."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register


@register(inputs=[Input("x", shape=("n",))])
def same_twice(x):
    y = x.sin()
    return y, y


@register(inputs=[Input("x", shape=("n",))])
def input_twice(x):
    return x, x


@register(inputs=[Input("x", shape=("n",))])
def ident(x):
    return x


@register(inputs=[Input("x", shape=("m", "n"))])
def transpose_view(x):
    return x.T


@register(inputs=[Input("x", shape=("n",))])
def expand_view(x):
    return x.expand(3, x.shape[0])


@register(inputs=[Input("x", shape=("n",))])
def strided_view(x):
    return x[::2]


@register(inputs=[Input("x", shape=("n",))])
def first_elem(x):
    return x[0]


@register(inputs=[Input("x", shape=("n",))])
def empty_out(x):
    return x[:0] * 2


@register(inputs=[Input("x", shape=("n",))])
def empty_and_sin(x):
    return x[:0] * 2, x.sin()


@register(inputs=[Input("x", shape=("n",))])
def sum_sq(x):
    return (x ** 2).sum()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def value_aux(x):
    y = (x.sin() * x).sum()
    return y, {"y": y, "x": x}


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_is_input(x):
    return x.sin(), x


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_int(x):
    return x.sin(), x.argmax()


@register(inputs=[Input("p", tree={"w": Array(("n",)), "b": Array(())}), Input("x", shape=("n",))])
def tree_loss(p, x):
    return ((p["w"] * x).sum() + p["b"]) ** 2 + (x ** 3).sum()


@register(inputs=[Input("x", shape=("n",))])
def inplace_view(x):
    y = x.clone()
    y[0].mul_(2)
    y.view(-1)[1:].add_(y[0])
    return y * y


@register(inputs=[Input("x", shape=("n",))])
def bool_out(x):
    return x > 0


@register(inputs=[Input("x", shape=("n",))])
def x_and_view(x):
    return x, x[0]


def _cube_sum(y):
    return (y ** 3).sum() + (y[:-1] * y[1:]).sum()


@register(inputs=[Input("x", shape=("n",))])
def inner_grad(x):
    return torch.func.grad(_cube_sum)(x)


@register(inputs=[Input("x", shape=("n",))])
def inner_jacrev(x):
    return torch.func.jacrev(torch.sin)(x * x)


@register(inputs=[Input("x", shape=("n",))])
def inner_jvp(x):
    return torch.func.jvp(torch.sin, (x,), (x.cos(),))[1]


@register(inputs=[Input("x", shape=("n",))])
def inner_vmap(x):
    return torch.func.vmap(lambda r: (r * x).sin())(torch.stack([x, 2 * x]))


@register(inputs=[Input("x", shape=("n",))])
def inner_functionalize(x):
    def g(y):
        z = y.clone()
        z.view(-1)[0].mul_(3)
        return z.exp()
    return torch.func.functionalize(g)(x)


@register(inputs=[Input("x", shape=("n",))])
def inner_hessian_sum(x):
    return torch.func.hessian(_cube_sum)(x).sum(0)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def inner_grad_and_value(x):
    g, v = torch.func.grad_and_value(_cube_sum)(x)
    return g * v, v


@register(inputs=[Input("x", shape=("n",))])
def inner_linearize(x):
    out, jvp_fn = torch.func.linearize(torch.sin, x)
    return jvp_fn(x.cos()) * out
