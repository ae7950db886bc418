"""Functions for tests/test_parity_round35.py, round 35 of PyTorch's own torch.func test
cases replayed over HTTP (test_eager_transforms.py's TestHessian, TestLinearize,
TestHigherOrder, TestComposability, TestFunctionalize, ensembling; outputs that are the
inputs, views of them, the same tensor twice, empty, integer or boolean)."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register


@register(inputs=[Input("x", shape=("n",))])
def same_twice(x):
    """One tensor returned twice in a tuple: jacrev's two blocks, vjp's cotangents summed."""
    y = x.sin()
    return y, y


@register(inputs=[Input("x", shape=("n",))])
def input_twice(x):
    """The input itself, twice."""
    return x, x


@register(inputs=[Input("x", shape=("n",))])
def ident(x):
    """The identity: the output is the input tensor."""
    return x


@register(inputs=[Input("x", shape=("m", "n"))])
def transpose_view(x):
    """A transposed view of the input (not contiguous)."""
    return x.T


@register(inputs=[Input("x", shape=("n",))])
def expand_view(x):
    """An expanded view of the input (stride 0 over the new dim)."""
    return x.expand(3, x.shape[0])


@register(inputs=[Input("x", shape=("n",))])
def strided_view(x):
    """Every other element: a strided view."""
    return x[::2]


@register(inputs=[Input("x", shape=("n",))])
def first_elem(x):
    """A 0-d view of the input."""
    return x[0]


@register(inputs=[Input("x", shape=("n",))])
def empty_out(x):
    """An output of no elements."""
    return x[:0] * 2


@register(inputs=[Input("x", shape=("n",))])
def empty_and_sin(x):
    """An empty leaf beside a non-empty one."""
    return x[:0] * 2, x.sin()


@register(inputs=[Input("x", shape=("n",))])
def sum_sq(x):
    """A scalar; with x of size 0, an empty gradient and Hessian."""
    return (x ** 2).sum()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def value_aux(x):
    """grad_and_value-like: the loss, and aux holding the same loss and the input."""
    y = (x.sin() * x).sum()
    return y, {"y": y, "x": x}


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_is_input(x):
    """Aux is the input tensor itself."""
    return x.sin(), x


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_int(x):
    """An integer aux (argmax) beside a floating output."""
    return x.sin(), x.argmax()


@register(inputs=[Input("p", tree={"w": Array(("n",)), "b": Array(())}), Input("x", shape=("n",))])
def tree_loss(p, x):
    """A scalar of a dict parameter and a plain one (hvp / hessian over argnums tuples)."""
    return ((p["w"] * x).sum() + p["b"]) ** 2 + (x ** 3).sum()


@register(inputs=[Input("x", shape=("n",))])
def inplace_view(x):
    """In-place writes through views of a clone (TestFunctionalize's cases)."""
    y = x.clone()
    y[0].mul_(2)
    y.view(-1)[1:].add_(y[0])
    return y * y


@register(inputs=[Input("x", shape=("n",))])
def x_and_view(x):
    """The input beside a view of it."""
    return x, x[0]


def _cube_sum(y):
    return (y ** 3).sum() + (y[:-1] * y[1:]).sum()


@register(inputs=[Input("x", shape=("n",))])
def inner_grad(x):
    """torch.func.grad inside the function (grad of grad: its Jacobian is a Hessian)."""
    return torch.func.grad(_cube_sum)(x)


@register(inputs=[Input("x", shape=("n",))])
def inner_jacrev(x):
    """torch.func.jacrev inside: a matrix output."""
    return torch.func.jacrev(torch.sin)(x * x)


@register(inputs=[Input("x", shape=("n",))])
def inner_jvp(x):
    """torch.func.jvp inside (forward mode under reverse and forward mode)."""
    return torch.func.jvp(torch.sin, (x,), (x.cos(),))[1]


@register(inputs=[Input("x", shape=("n",))])
def inner_vmap(x):
    """torch.func.vmap inside, over a stack the function builds."""
    return torch.func.vmap(lambda r: (r * x).sin())(torch.stack([x, 2 * x]))


@register(inputs=[Input("x", shape=("n",))])
def inner_functionalize(x):
    """torch.func.functionalize of an in-place write into a view."""
    def g(y):
        z = y.clone()
        z.view(-1)[0].mul_(3)
        return z.exp()
    return torch.func.functionalize(g)(x)


@register(inputs=[Input("x", shape=("n",))])
def inner_hessian_sum(x):
    """torch.func.hessian inside: third derivatives on /hessian."""
    return torch.func.hessian(_cube_sum)(x).sum(0)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def inner_grad_and_value(x):
    """torch.func.grad_and_value inside; the value as aux."""
    g, v = torch.func.grad_and_value(_cube_sum)(x)
    return g * v, v
