"""Functions modelled on PyTorch's own torch.func tests (test/functorch/test_eager_transforms.py):
the option surface, odd shapes and dtypes, aliasing and in-place writes, and what torch
raises. Each is compared with in-process torch.func by tests/test_parity_round7.py."""

from __future__ import annotations

import torch

from jacobian_service import Array, Input, register


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",)), Input("z", shape=())])
def three(x, y, z):
    """argnums tuples, negatives, repeats (test_argnums_tuple, test_negative_argnums)."""
    return x * y.sin() + z * x**2


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("m",))])
def unrelated_input(x, y):
    """The output ignores y (test_unrelated_input): its block is zeros."""
    return x.sin()


@register(inputs=[Input("x", shape=("n",))])
def constant(x):
    """An output that does not depend on the input (test_zero_grad / jacrev of a constant)."""
    return torch.ones(3, dtype=x.dtype)


@register(inputs=[Input("x", shape=None)])
def identity(x):
    """Returns its input itself, no copy (the identity's Jacobian, an aliased output)."""
    return x


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def identity_aux(x):
    """Returns the input as output and as aux, both aliases of it."""
    return x, {"x": x, "list": [x, x * 2], "n": x.shape[0]}


@register(inputs=[Input("x", shape=())])
def scalar_in(x):
    """0-d in, 0-d out."""
    return x.sin() * x


@register(inputs=[Input("x", shape=())])
def scalar_to_vector(x):
    """0-d in, a vector out."""
    return torch.stack([x, x**2, x.exp()])


@register(inputs=[Input("x", shape=("n",))])
def vector_to_scalar(x):
    """A vector in, a 0-d out (a gradient)."""
    return (x**3).sum()


@register(inputs=[Input("x", shape=None)])
def sin_any(x):
    """Any shape, empty (size-0) ones included."""
    return x.sin()


@register(inputs=[Input("x", shape=("n",))])
def empty_output(x):
    """A size-0 output of a non-empty input."""
    return x[:0] * 2


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def nested_aux(x):
    """Aux of many kinds (test_aux_pytree): nested dicts and lists, numbers, strings,
    integer and boolean tensors, a 0-d tensor."""
    y = x.sin()
    aux = {
        "a": y,
        "b": [x, {"c": x.cos(), "d": 3, "e": "text"}],
        "f": (x > 0),
        "g": torch.arange(3),
        "h": y.sum(),
        "i": 2.5,
        "j": True,
    }
    return y, aux


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_tensor(x):
    """Aux a bare tensor (test_aux_tensor)."""
    return x.sin(), x.cos()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_not_tuple(x):
    """Declared has_aux but returns a bare tensor: torch.func raises."""
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_none(x):
    """None inside aux: a leaf torch's pytrees carry (JSON has null)."""
    return x.sin(), {"none": None, "y": x}


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def dict_out(x, y):
    """A dict output, keys not in sorted order, one a tuple (test_outputs_can_any_pytree)."""
    return {"z": x * y, "a": (x.sin(), y.cos().sum())}


@register(inputs=[Input("x", shape=("n",))])
def list_out(x):
    """A list output."""
    return [x.sin(), x.cos()]


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def promote(x, y):
    """Two floating inputs, each in the dtype sent: the output promotes to the wider."""
    return x * y


@register(inputs=[Input("x", shape=("n",)), Input("k", shape=(), dtype="int64")])
def int_arg(x, k):
    """An integer input beside a float one: differentiating k is torch's error."""
    return x * k


@register(inputs=[Input("x", shape=("n",))])
def int_output(x):
    """An integer output: jacrev refuses it."""
    return (x * 10).long()


@register(inputs=[Input("x", shape=("n",))])
def complex_inside(x):
    """Complex intermediates, a real output."""
    return torch.fft.fft(x).abs()


@register(inputs=[Input("x", shape=("n",))])
def complex_output(x):
    """A complex output: jacrev refuses it."""
    return torch.fft.fft(x)


@register(inputs=[Input("x", shape=(6,))])
def transposed(x):
    """A non-contiguous (transposed) output."""
    return (x * 2).reshape(2, 3).t()


@register(inputs=[Input("x", shape=(3,))])
def expanded(x):
    """An expanded (stride-0) output, and a strided slice."""
    return x.expand(2, 3), x[::2]


@register(inputs=[Input("x", shape=("n",))])
def inplace_input(x):
    """Writes into its input (test_inplace_on_view and friends): torch.func differentiates it."""
    x.mul_(2)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))])
def inplace_view(x):
    """Writes into a view of a copy of its input."""
    y = x.clone()
    y[1:].mul_(x[:-1])
    return y


@register(inputs=[Input("x", shape=("n",))])
def raises(x):
    """Raises from inside: every endpoint answers the function's error."""
    raise ValueError("parity7 says no")


@register(inputs=[Input("x", shape=("n",))])
def returns_none(x):
    """Returns None: torch.func refuses a non-tensor output."""
    return None


@register(inputs=[Input("x", shape=("n",))])
def returns_float(x):
    """Returns a Python float: torch.func refuses it."""
    return 1.0


@register(inputs=[Input("params", tree={"w": Array(("m", "n")), "b": Array(("m",))}), Input("x", shape=("n",))])
def tree_layer(params, x):
    """A pytree parameter and a tuple output holding a dict."""
    y = params["w"] @ x + params["b"]
    return y.tanh(), {"sq": (y**2).sum()}


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def scalar_two(x, y):
    """A scalar of two inputs: Hessians with argnums, hvp."""
    return (x.sin() * y**2).sum() + (x**3).sum()


@register(inputs=[Input("x", shape=("n",))])
def float64_inside(x):
    """Computes in float64 whatever it is sent, returns float64."""
    return x.double().exp()


@register(inputs=[Input("pair", tree=(Array(("n",)), Array(()))), Input("x", shape=("n",))])
def tuple_param(pair, x):
    """A tuple parameter of a vector and a 0-d leaf, written [[...], s] in JSON."""
    v, s = pair
    return v * x.sin() * s


@register(inputs=[Input("x", shape=None)])
def inplace_nograd(x):
    """Writes into its input under no_grad (torch allows it), then returns it."""
    with torch.no_grad():
        x.add_(1)
    return x * 2


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def writes_other(x, y):
    """Writes into an input it is not differentiated by (argnums=0): torch allows it."""
    y.add_(1)
    return x * y


@register(inputs=[Input("x", shape=("n",))])
def aliased_outputs(x):
    """One tensor twice in a tuple and once in a dict: aliased outputs."""
    y = x.sin()
    return y, {"again": y, "input": x}


@register(inputs=[Input("x", shape=("n",))])
def mixed_dtypes(x):
    """Outputs of two float dtypes from one input."""
    return x.sin(), x.double().cos() * 3


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def copy_into_other(x, y):
    """torch's test_inplace: y.copy_(x), then y itself; d/dx is the identity."""
    y.copy_(x)
    return y


@register(inputs=[Input("x", shape=(3,)), Input("y", shape=(2,)), Input("z", shape=(2,))])
def slice_assign(x, y, z):
    """torch's test_inplace, the tuple-argnums case: x[:2] = y into an input not differentiated."""
    x[:2] = y
    return torch.vstack([(x**2).sum(), (z**3).sum()])


@register(inputs=[Input("x", shape=(10, 2)), Input("y", shape=(1, 2))])
def chunk_tree(x, y):
    """torch's test_chunk_jacrev: nested tuple outputs, one 0-d."""
    return (x.sin(), x + y), (x + 2, x.sum())


class _DynamicBackward(torch.autograd.Function):
    """The identity, whose backward runs an op of dynamic shape (nonzero): vmap cannot."""

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


@register(inputs=[Input("x", shape=(3, 3))])
def dynamic_backward(x):
    """torch's test_chunk_jacrev_chunksize_one: jacrev runs with chunk_size=1 only."""
    return _DynamicBackward.apply(x)


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("m",))])
def returns_inputs(x, y):
    """torch's test_against_reference_unrelated_outputs: the inputs themselves, twice."""
    return x, y, x, y


@register(inputs=[Input("x", shape=()), Input("y", shape=(1,))])
def zero_dim_mixed(x, y):
    """torch's test_against_reference_zero_dim, mixed: a 0-d input, a 0-d output."""
    return y.sum(), x * y


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("m",))])
def ones_scalar(x, y):
    """torch's Hessian of an output unrelated to all inputs: a constant 0-d."""
    return torch.ones([], dtype=x.dtype)


@register(inputs=[Input("x", shape=("n",))])
def upcast(x):
    """Computes and returns float32 whatever float dtype it is sent (float16 in: an
    output wider than its input)."""
    return x.float().exp()


_LAYER = torch.nn.Linear(3, 2)  # parameters that require grad, as a model's do


@register(inputs=[Input("x", shape=(3,))], has_aux=True)
def with_parameters(x):
    """A model's layer: output and aux hold tensors that require grad (through the
    layer's parameters), the weight itself in aux; torch.func.jacrev answers them."""
    y = _LAYER(x).tanh()
    return y, {"pre": _LAYER(x), "weight": _LAYER.weight, "bias_sum": _LAYER.bias.sum()}


class _ScaleGradInPlace(torch.autograd.Function):
    """3 x, whose backward scales its grad_output in place (allowed: autograd hands it over)."""

    @staticmethod
    def forward(x):
        return x * 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.mul_(3)

    @staticmethod
    def jvp(ctx, t):
        return t * 3


@register(inputs=[Input("x", shape=("n",))])
def backward_writes_grad(x):
    """A backward that writes into the cotangent it is given."""
    return _ScaleGradInPlace.apply(x).sin()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_triple(x):
    """has_aux, but three entries: torch.func wants exactly (output, aux)."""
    return x.sin(), x.cos(), x.tan()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_list(x):
    """has_aux, returned as a list [output, aux] rather than a tuple."""
    return [x.sin(), x.cos()]


@register(inputs=[Input("x", shape=("m", "n"))], has_aux=True)
def views(x):
    """Outputs and aux that are views of one tensor: transposed, expanded (stride 0),
    strided, a diagonal; large enough to cross the engine's shared memory."""
    y = x * 2
    return {"t": y.t(), "e": y[0].expand(64, y.shape[1]), "s": y[:, ::2]}, {"d": y.diagonal(), "t": x.t()}


_Pair = __import__("collections").namedtuple("_Pair", ["first", "second"])


@register(inputs=[Input("x", shape=("n",))])
def namedtuple_out(x):
    """A namedtuple output: torch's pytrees nest it as a tuple."""
    return _Pair(x.sin(), x.cos().sum())


@register(inputs=[Input("x", shape=("n",))])
def ordered_dict_out(x):
    """An OrderedDict output, keys not sorted."""
    return __import__("collections").OrderedDict([("b", x.sin()), ("a", x * 2)])


@register(inputs=[Input("x", shape=("n",)), Input("k", shape=(), dtype="int32")])
def int32_arg(x, k):
    """An int32 input: a wider integer sent must fit it."""
    return x * k


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_python_number(x):
    """Aux holds a Python number read from the values (.item(): no vmap) and a string
    that depends on them."""
    s = float(x.sum())
    return x.sin(), {"sum": s, "sign": "pos" if s > 0 else "neg"}



@register(inputs=[Input("x", shape=("n",))])
def all_no_grad(x):
    """The whole output under no_grad: reverse mode sees a constant, forward mode does not."""
    with torch.no_grad():
        return x * 2


@register(inputs=[])
def no_inputs():
    """Takes nothing (a constant, a model's state): evaluate answers it, and there is no
    Jacobian to take, nor to warm up."""
    return torch.arange(3.0)


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=())], has_aux=True)
def scalar_aux(x, y):
    """A scalar with aux: hvp and Hessians ignore aux and return it."""
    return (x**3).sum() * y, {"norm": x.norm(), "tag": "s"}
