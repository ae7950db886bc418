"""Functions for tests/test_parity_round15.py, round 15 of PyTorch's own torch.func test
cases replayed over HTTP: test_vmap.py's TestVmapAPI (outputs that are inputs, tuples of
several ranks, non-tensor outputs, in-place writes into a shared input) and
test_eager_transforms.py's TestJvp / TestVjp (aliasing outputs, an integer output beside
a float one, 0-d outputs) shapes rounds 7-13 did not replay."""

from __future__ import annotations

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def identity(x):
    """test_vmap's function returning its input unchanged; test_vjp / jvp of the identity."""
    return x


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def return_both(x, y):
    """Returns its inputs unchanged, swapped: a tuple output aliasing both inputs."""
    return y, x


@register(inputs=[Input("x", shape=(2, 3)), Input("y", shape=(3,))])
def pair_out(x, y):
    """A tuple output of two ranks, for out_dims given per output."""
    return x * y, (x ** 2).sum(0)


@register(inputs=[Input("x", shape=("n",))])
def returns_float(x):
    """A non-tensor output: vmap says it must only return Tensors."""
    return float(x.sum())


@register(inputs=[Input("x", shape=("n",))])
def returns_none(x):
    return None


@register(inputs=[Input("x", shape=("n",))])
def with_int_output(x):
    """A tuple output whose second element is not differentiable (an integer)."""
    return x.sin(), (x > 0).sum()


@register(inputs=[Input("x", shape=(), dtype="float64")])
def scalar_out(x):
    return x.sin() * 2


@register(inputs=[Input("x", shape=(3,)), Input("y", shape=(3,))])
def add_into_y(x, y):
    """test_vmap.py's test_inplace_fallback / unsupported in-place: y += x in place,
    which vmap refuses where y is shared and x batched."""
    y.add_(x)
    return y * 2
