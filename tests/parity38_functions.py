"""Functions for tests/test_parity_round38.py: test_eager_transforms.py's TestJac /
TestHessian / TestJvp cases as registered functions."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register


class _DynamicBackward(torch.autograd.Function):
    """test_chunk_jacrev_chunksize_one: a dynamic-shape op in backward (no vmap)."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        g.nonzero()
        return g


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def copy_into(x, y):
    """test_inplace: y.copy_(x); return y."""
    y.copy_(x)
    return y


@register(inputs=[Input("x", shape=(3,)), Input("y", shape=(2,)), Input("z", shape=(2,))])
def setitem_vstack(x, y, z):
    """test_inplace: x[:2] = y; vstack of two sums."""
    x[:2] = y
    return torch.vstack([(x**2).sum(), (z**3).sum()])


@register(inputs=[Input("x", shape=("n", 2)), Input("y", shape=(1, 2))])
def chunk_nested(x, y):
    """test_chunk_jacrev."""
    return (x.sin(), x + y), (x + 2, x.sum())


@register(inputs=[Input("x", shape=(2,))])
def chunk_composition(x):
    """test_chunk_jacrev_composition (per example)."""
    return (x.sin(), x), (x + 2, x.sum())


@register(inputs=[Input("x", shape=("a", "b"))])
def dynamic_backward(x):
    """test_chunk_jacrev_chunksize_one."""
    return _DynamicBackward.apply(x)


@register(inputs=[Input("x", shape=(5,))])
def take(x):
    """test_take."""
    return torch.take(x, torch.ones(3, dtype=torch.long))


@register(inputs=[Input("x", shape=(2, 4))])
def diff_numel(x):
    """test_diff_numel."""
    return x[0, 1:].unsqueeze(-1)


@register(inputs=[Input("x", shape=(5, 3)), Input("y", shape=(3, 5))])
def multi_out(x, y):
    """test_against_reference_multi_input_multi_output."""
    return (x * x) @ y, x @ (x.sum(1) * y), y.sum()


@register(inputs=[Input("x", shape=())])
def stack0(x):
    """test_against_reference_zero_dim: g."""
    return torch.stack([x, x, x])


@register(inputs=[Input("x", shape=()), Input("y", shape=(1,))])
def mixed0(x, y):
    """test_against_reference_zero_dim: h."""
    return y.sum(), x * y


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def default_arg(x, y, z=3.0):
    """test_against_reference_default_arg."""
    return x * y * z


@register(inputs=[Input("x", shape=(2, 3)), Input("y", shape=(3, 5)), Input("z", shape=(5, 5))])
def relu_chain(x, y, z):
    """TestHessian multi_input."""
    return ((x.relu() * x) @ y.sin() @ z).sum()


@register(inputs=[Input("x", shape=(2,)), Input("y", shape=(3,))])
def unrelated_one(x, y):
    """TestHessian unrelated to y."""
    return (x**2).sum()


@register(inputs=[Input("x", shape=(2,)), Input("y", shape=(3,))])
def unrelated_all(x, y):
    """TestHessian unrelated to every input."""
    return torch.ones([])


@register(inputs=[Input("A", shape=(2, 2)), Input("x1", shape=("n", 2)), Input("x2", shape=("n", 2))])
def lsq_loss(A, x1, x2):
    """test_jacfwd_different_levels."""
    x2_hat = (A @ (x1.T)).T
    return ((x2 - x2_hat) ** 2).sum()


@register(inputs=[Input("x", shape=("a", "b"))])
def new_tensor(x):
    """test_jvp_new_tensor."""
    return x + x.new_tensor(0.5)


_Y = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)


@register(inputs=[Input("x", shape=(2, 3))])
def unrelated_output(x):
    """test_unrelated_output: a captured float64 tensor."""
    return _Y


@register(inputs=[Input("x", shape=(3,))])
def sin_square(x):
    """test_nested_jac_simple's foo."""
    return x.sin().sum()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_pytree(x):
    """test_aux_pytree."""
    y = x.clone()
    return y, {"a": y.cos(), "b": [y.tan()]}


@register(inputs=[Input("x", shape=(2, 3))])
def composite_output(x):
    """test_outputs_can_any_pytree."""
    out = x.sum()
    return [(out, {"a": x, "out": [x, out]})]


@register(inputs=[Input("x", shape=()), Input("y", shape=(3, 2))])
def inplace_on_view_base(x, y):
    """TestGradTransform test_inplace_on_view_base, as a Jacobian."""
    w = y.clone()
    w0 = w[0]
    w.sin_()
    return w0 * x


@register(inputs=[Input("x", shape=("n",))])
def manual_seed_inside(x):
    """TestGradTransform test_manual_seed_inside_grad."""
    torch.manual_seed(0)
    return x * torch.randn_like(x)


@register(inputs=[Input("y", shape=("N", "C")), Input("targets", shape=("N",), dtype="int64")])
def cross_entropy(y, targets):
    """TestGradTransform test_composite_two_ops."""
    return torch.nn.functional.cross_entropy(y, targets)


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def kw_product(x, y):
    """TestGradTransform test_fn_with_kwargs."""
    return (x * y).sum()


_Y0 = torch.tensor(2.0)


@register(inputs=[Input("w", shape=()), Input("x", shape=())])
def unrelated_outputs(w, x):
    """TestVjp test_unrelated_vjp_multiple_inputs_outputs: a captured float32 0-d twice."""
    return _Y0, _Y0, x


@register(inputs=[Input("x", shape=())])
def twice_nested(x):
    """test_vjp_pytree_output / test_vjp_pytree_error: (x, (x, x))."""
    return x, (x, x)


@register(inputs=[Input("x", shape=())])
def view_inplace_simple(x):
    """TestGradTransform test_view_inplace_simple."""
    x = x.clone()
    x.view([]).sin_()
    return x


_W = torch.linspace(-1, 1, 15).reshape(5, 3)


@register(inputs=[Input("x", shape=(3,))])
def linear_w(x):
    """TestVjp test_unrelated_hessian: W @ x (float32 W)."""
    return _W @ x


@register(inputs=[Input("inps", tree={"a": Array(("n",)), "b": Array(("n",))})])
def zero_grad(inps):
    """TestGradTransform test_zero_grad: one leaf unused."""
    return (inps["a"] ** 2.0).sum()


@register(inputs=[Input("a", tree=(Array(()), Array(()))), Input("b", tree={"foo": Array(())})])
def grad_pytree_inputs(a, b):
    """TestGradTransform test_grad_pytree_inputs."""
    x, y = a
    return 1 * x + 2 * y + 3 * b["foo"]
