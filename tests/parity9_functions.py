"""Functions modelled on PyTorch's own torch.func tests (test/functorch/test_eager_transforms.py,
TestJac, TestHessian, TestJvp, TestLinearize, functional_call), round 9: pytrees in and
out, 0-d and unrelated outputs, dtypes on the wire, per-example Jacobians. Each is
compared with in-process torch.func by tests/test_parity_round9.py."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register
from torch import nn
from torch.func import functional_call

V = ("n",)


@register(inputs=[Input("x", shape=V), Input("y", shape=V)])
def mul(x, y):
    """torch.multiply (test_multiple_args, test_argnums_tuple, test_argnums_effect_on_return)."""
    return torch.multiply(x, y)


@register(inputs=[Input("x", shape=None), Input("y", shape=None)])
def two_outputs(x, y):
    """test_multiple_outputs_multiple_argnums / _single_argnums."""
    return 2 * x + 3 * y, 4 * x + 5 * y


@register(inputs=[Input("x", shape=None), Input("y", shape=None)])
def left_right(x, y):
    """test_multiple_outputs_pytree: a dict output."""
    return {"left": 2 * x + 3 * y, "right": 4 * x + 5 * y}


@register(inputs=[Input("a", tree=(Array(()), Array(()))), Input("b", shape=()), Input("c", shape=())])
def pytree_in(a, b, c):
    """test_multiple_inputs_pytree (and TestJvp.test_pytree_inputs): a tuple parameter."""
    a0, a1 = a
    return a0 + a1 * 2 + b * 3 + c * 4


@register(inputs=[Input("a", tree=(Array(()), Array(()))), Input("b", shape=()), Input("c", shape=())])
def pytree_in_out(a, b, c):
    """test_multiple_inputs_outputs_pytree: a tuple in, a tuple holding a dict out."""
    a0, a1 = a
    return a0 + a1 * 2, {"foo": b * 3 + c * 4}


@register(inputs=[Input("dct", tree={"a": Array(V), "b": Array(V)})])
def dict_in_dict_out(dct):
    """test_multiple_inputs_outputs_pytree_multidim."""
    return {"c": dct["a"].sin(), "d": dct["b"].cos()}


@register(inputs=[Input("x", shape=None)])
def composite_output(x):
    """test_outputs_can_any_pytree: a list holding a tuple holding a dict holding a list."""
    out = x.sum()
    return [(out, {"a": x, "out": [x, out]})]


@register(inputs=[Input("x", shape=(2, 4))])
def diff_numel(x):
    """test_diff_numel: Tensor[2, 4] -> Tensor[3, 1]."""
    return x[0, 1:].unsqueeze(-1)


@register(inputs=[Input("x", shape=V)])
def take(x):
    """test_take: integer indices made inside."""
    return torch.take(x, torch.ones(3, dtype=torch.long))


@register(inputs=[Input("x", shape=("m", "k")), Input("y", shape=("k", "n"))])
def multi_input(x, y):
    """test_against_reference_multi_input."""
    return (x.cos() * x) @ y.sin()


@register(inputs=[Input("x", shape=("m", "k")), Input("y", shape=("k", "m"))])
def multi_input_output(x, y):
    """test_against_reference_multi_input_multi_output: outputs of three shapes."""
    return (x * x) @ y, x @ (x.sum(1) * y), y.sum()


@register(inputs=[Input("x", shape=V), Input("y", shape=V)])
def zero_dim_outputs(x, y):
    """test_against_reference_zero_dim: 0-d outputs beside a vector."""
    return x.sum(), y.sum(), x * y


@register(inputs=[Input("x", shape=V), Input("y", shape=V)])
def default_arg(x, y, z=3.0):
    """test_against_reference_default_arg: a Python default the request never gives."""
    return x * y * z


@register(inputs=[Input("t", shape=("n", "n")), Input("k", shape=(), dtype="int64")])
def non_tensor_arg(t, k):
    """test_jac_with_non_tensor_args: an integer added."""
    return t + k


@register(inputs=[Input("x", shape=("m", "k")), Input("y", shape=("k", "n")), Input("z", shape=("n", "n"))])
def hessian_multi(x, y, z):
    """TestHessian.test_hessian_vectorize_correctness_multi_input."""
    return ((x.relu() * x) @ y.sin() @ z).sum()


@register(inputs=[Input("x", shape=V), Input("y", shape=("m",))])
def hessian_unrelated(x, y):
    """test_hessian_vectorize_correctness_unrelated_outputs: y unused."""
    return (x**2).sum()


@register(inputs=[Input("x", shape=V), Input("y", shape=("m",))])
def hessian_constant(x, y):
    """... and a constant 0-d output unrelated to every input."""
    return torch.ones([])


@register(inputs=[Input("A", shape=("d", "d")), Input("x1", shape=("n", "d")), Input("x2", shape=("n", "d"))])
def levels_loss(A, x1, x2):
    """test_jacfwd_different_levels: vmap(hessian(loss)) against vmap(jacrev(jacrev(loss)))."""
    x2_hat = (A @ (x1.T)).T
    return ((x2 - x2_hat) ** 2).sum()


@register(inputs=[Input("x", shape=None)], has_aux=True)
def aux_cos(x):
    """TestJvp.test_aux_tensor: aux a tensor."""
    return x.sin(), x.cos()


@register(inputs=[Input("x", shape=None)], has_aux=True)
def aux_pytree(x):
    """test_aux_pytree: aux a dict holding a list."""
    return x.sin(), {"a": x.cos(), "b": [x.tan()]}


@register(inputs=[Input("x", shape=None)], has_aux=True)
def aux_numbers(x):
    """Aux with ints, floats, None and a string beside a tensor: torch.func refuses them
    ("Expected tensors, got unsupported type"); the service carries them."""
    return x.sin(), {"n": 1, "f": 1.5, "none": None, "s": "abc", "t": [x.cos(), 2]}


@register(inputs=[Input("x", shape=None)])
def new_tensor(x):
    """TestJvp.test_jvp_new_tensor: a constant made with x.new_tensor."""
    return x + x.new_tensor(0.5)


@register(inputs=[Input("arg", tree={"x": Array(("n", 1)), "yz": (Array(("n", 1)), Array(("n", 1)))})])
def nested_io(arg):
    """TestLinearize.test_linearize_nested_input_nested_output: a nested dict in and out."""
    x, (y, z) = arg["x"], arg["yz"]
    return {"a": x.sum(), "b": {"c": y + z, "d": (x * z, y.exp())}}


class _Net(nn.Module):
    """A small network with a buffer, as the functional_call tests build."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, 3, generator=g))
            self.fc.bias.copy_(torch.randn(2, generator=g))
        self.register_buffer("scale", torch.tensor([2.0, 0.5]))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale


NET = _Net()


@register(inputs=[Input("params", tree={"fc.weight": Array((2, 3)), "fc.bias": Array((2,))}), Input("x", shape=(3,))])
def net_call(params, x):
    """torch.func.functional_call(net, params, (x,)): the module's buffers stay its own."""
    return functional_call(NET, params, (x,))


@register(inputs=[Input("params", tree={"fc.weight": Array((2, 3)), "fc.bias": Array((2,))}),
                  Input("buffers", tree={"scale": Array((2,))}), Input("x", shape=(3,))])
def net_call_buffers(params, buffers, x):
    """functional_call(net, (params, buffers), (x,)) (_get_weights_and_functional_call_with_buffers)."""
    return functional_call(NET, (params, buffers), (x,))


@register(inputs=[Input("params", tree={"fc.weight": Array((2, 3)), "fc.bias": Array((2,))}), Input("x", shape=(3,)),
                  Input("target", shape=(2,))])
def net_loss(params, x, target):
    """A per-example loss: vmap(grad(loss), in_dims=(None, 0, 0)), the per-sample-grads tests."""
    return ((functional_call(NET, params, (x,)) - target) ** 2).sum()


@register(inputs=[Input("x", shape=None)])
def sin_sq(x):
    """Any shape and dtype: x.sin() * x (dtypes, layouts)."""
    return x.sin() * x


@register(inputs=[Input("x", shape=V)])
def returns_bfloat16(x):
    """A float32 input, a bfloat16 output: jacrev's blocks take the input's dtype."""
    return (x * 3).to(torch.bfloat16)


@register(inputs=[Input("x", shape=V)])
def requires_grad_inside(x):
    """Calls requires_grad_ on a fresh tensor and takes autograd.grad inside: the
    function's own autograd, under the service's transform."""
    with torch.enable_grad():
        y = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad((y**3).sum(), y)
    return x * g


@register(inputs=[Input("x", shape=V)])
def noncontiguous_out(x):
    """Outputs that are views: a strided slice, a transposed outer product, an expand."""
    outer = x[:, None] * x[None, :]
    return x[::2], outer.t(), x.sum().expand(2, 3)


@register(inputs=[Input("x", shape=V)])
def with_int_output(x):
    """A float output beside an integer one: jacrev refuses (integer outputs)."""
    return x.sin(), (x * 10).long()


@register(inputs=[Input("x", shape=V)])
def slash_keys(x):
    """Dict keys that are paths elsewhere: "a/b" beside a nested {"a": {"b": ...}}."""
    return {"a/b": x.sin(), "a": {"b": x.cos()}}


@register(inputs=[Input("x", shape=V)])
def digit_keys(x):
    """A dict output keyed like positions ("1" before "0"): not a list."""
    return {"1": x.sin(), "0": x.cos()}


@register(inputs=[Input("x", shape=V)])
def scaled_bfloat16(x):
    """A bfloat16 output of a float32 input, for the vmap check alone (its verdicts are
    kept per function)."""
    return (x.sin() * 3).to(torch.bfloat16)


class _DynamicBackward(torch.autograd.Function):
    """The identity whose backward runs an op vmap cannot batch (nonzero), as
    test_chunk_jacrev_chunksize_one's IdentityWithDynamicBackwardOp."""

    @staticmethod
    def forward(x):
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        grad_output.nonzero()
        return grad_output


@register(inputs=[Input("x", shape=V)])
def row_by_row(x):
    """Its Jacobian's rows run one VJP at a time: vmap cannot run the backward."""
    return _DynamicBackward.apply(x) * 2
