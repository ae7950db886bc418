"""Functions modelled on PyTorch's own torch.func tests (test/functorch/test_eager_transforms.py
and test_vmap.py), round 11: TestLinearize, TestJvp's pytrees, aux and unrelated
inputs and outputs, TestHessian's several inputs, grad / grad_and_value, functional_call
over a module with buffers, ops without a derivative, integer outputs, forward grad
switched off inside f, data-dependent control flow under vmap. Each is compared with
in-process torch.func by tests/test_parity_round11.py."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from jacobian_service import Array, Input, register

COL = (3, 1)


# --- TestLinearize (linearize(f, x) is (f(x), jvp_fn): a jvp with return_output) ---


@register(inputs=[Input("x", shape=COL)])
def cos_and_sum(x):
    """test_linearize_return / _composition: a tuple output, one of them 0-d."""
    return x.cos(), x.sum()


@register(inputs=[Input("arg", tree={"x": Array(COL), "yz": (Array(COL), Array(COL))})])
def nested_io(arg):
    """test_linearize_nested_input_nested_output: a dict-and-tuple input, a nested dict output."""
    x, (y, z) = arg["x"], arg["yz"]
    return {"a": x.sum(), "b": {"c": y + z, "d": (x * z, y.exp())}}


# --- TestJvp ---


@register(inputs=[Input("x", tree=(Array(()), Array(()))), Input("y", shape=()), Input("z", shape=())])
def pytree_affine(x, y, z):
    """test_pytree_inputs: a tuple parameter of 0-d leaves beside 0-d inputs."""
    a, b = x
    return a + 2 * b + 3 * y + 4 * z


@register(inputs=[Input("x", shape=(2, 3)), Input("y", shape=(2, 3))])
def first_only(x, y):
    """test_unrelated_input: the output is the first input itself; y is unused."""
    return x


_CONSTANT = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7


@register(inputs=[Input("x", shape=(2, 3))])
def unrelated_output(x):
    """test_unrelated_output: the output does not depend on x (a captured tensor)."""
    return _CONSTANT.clone()


@register(inputs=[Input("x", shape=(3,))], has_aux=True)
def sin_aux_tree(x):
    """test_aux_pytree: a dict aux holding a list."""
    return x.sin(), {"a": x.cos(), "b": [x.tan()]}


@register(inputs=[Input("x", shape=(3,))])
def forward_grad_off(x):
    """test_disable_fwd_grad_inside: the shift is a constant to forward mode only, so
    torch.func.jvp says 2x t where jacrev says 0."""
    with fwAD._set_fwd_grad_enabled(False):
        shift = x ** 2
    return x ** 2 - shift


@register(inputs=[Input("x", shape=(3,))])
def sin_and_argmax(x):
    """An integer output beside a float one: jvp gives it an integer zero tangent,
    jacrev refuses it."""
    return x.sin(), x.argmax()


# --- TestHessian ---


@register(inputs=[Input("x", shape=(2, 3)), Input("y", shape=(3, 5)), Input("z", shape=(5, 5))])
def relu_chain(x, y, z):
    """test_hessian_vectorize_correctness_multi_input."""
    return ((x.relu() * x) @ y.sin() @ z).sum()


@register(inputs=[Input("x", shape=(2,)), Input("y", shape=(3,))])
def ignores_y(x, y):
    """test_hessian_vectorize_correctness_unrelated_outputs: unrelated to y."""
    return (x ** 2).sum()


@register(inputs=[Input("x", shape=(2,)), Input("y", shape=(3,))])
def ones_scalar(x, y):
    """... and unrelated to every input."""
    return torch.ones([])


@register(inputs=[Input("A", shape=(2, 2)), Input("x1", shape=(5, 2)), Input("x2", shape=(5, 2))])
def fit_loss(A, x1, x2):
    """test_jacfwd_different_levels: vmap(hessian(loss)) equals vmap(jacrev(jacrev(loss)))."""
    res = x2 - (A @ x1.T).T
    return (res ** 2).sum()


# --- grad / grad_and_value ---


@register(inputs=[Input("x", shape=(2, 3)), Input("y", shape=(3,))], has_aux=True)
def loss_with_aux(x, y):
    """A 0-d output: its Jacobian is grad's answer, shaped like the input; the aux as
    grad_and_value(has_aux=True) gives it."""
    out = (x.sin() @ y).pow(2).sum()
    return out, {"norm": y.norm(), "count": 3}


# --- functional_call over a module with buffers ---


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([2.0, -0.5]))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


_MODULE = _Scaled()


@register(inputs=[Input("params", tree={"lin.weight": Array((2, 3)), "lin.bias": Array((2,))}),
                  Input("x", shape=(3,))])
def module_call(params, x):
    """functional_call(module, (params, buffers), x): the buffers are the module's own,
    the parameters the request's."""
    buffers = dict(_MODULE.named_buffers())
    return torch.func.functional_call(_MODULE, (params, buffers), (x,))


# --- derivatives torch does not implement ---


@register(inputs=[Input("a", shape=(3,))])
def gammainc_in_a(a):
    """gammainc(a, 1): torch has no derivative in a ('the derivative for 'igamma: input'
    is not implemented', a NotImplementedError), in either mode."""
    return torch.special.gammainc(a, torch.ones_like(a))


# --- data-dependent control flow ---


@register(inputs=[Input("x", shape=(3,))])
def branchy(x):
    """Python control flow on a value: vmap refuses it (torch's .item() error), each
    example alone is fine."""
    return x.sin() if x.sum() > 0 else x.cos() * x.max().item()


# --- in-place ops on the inputs ---


@register(inputs=[Input("x", shape=(3,))])
def doubles_input(x):
    """x.mul_(2) on the input, then sin: torch.func differentiates through the write."""
    x.mul_(2)
    return x.sin()


_BN = torch.nn.BatchNorm1d(3)


@register(inputs=[Input("params", tree={"weight": Array((3,)), "bias": Array((3,))}), Input("x", shape=(4, 3))])
def batch_norm_train(params, x):
    """functional_call of a BatchNorm1d in training mode: its running stats (buffers) are
    written in place at every call."""
    buffers = {k: v.clone() for k, v in _BN.named_buffers()}
    return torch.func.functional_call(_BN, (params, buffers), (x,))


# --- random draws (jacfwd's randomness=) ---


@register(inputs=[Input("x", shape=("n",))])
def dropout_train(x):
    """Dropout in training mode: a fresh mask at every call. torch.func.jvp under vmap
    over tangents refuses it (randomness="error"); randomness="same" gives every tangent
    the one mask."""
    return torch.nn.functional.dropout(x, p=0.5, training=True)


@register(inputs=[Input("x", shape=("n",))])
def noisy_energy(x):
    """A scalar times a fresh random number: its Hessian-vector products are 2 r t."""
    return (x ** 2).sum() * torch.rand(())
