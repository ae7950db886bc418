"""Functions for tests/test_parity_round39.py.

1. State a function keeps across calls where the engine's kept-state walk
   (engine/kept_state.py) did not look before round 39: an ``array.array``, a
   ``bytearray``, a numpy array past 64 KiB, each written in place, and a Python
   generator's paused frame (a count in a local, a loop over ``range``). Each scalar is
   ``(x**3).sum()`` times what its state says, so its Hessian and forward-mode Jacobian
   follow the state that torch.func's one call sees; ``state_of`` reads the state
   without stepping it.
2. test_eager_transforms.py's cases replayed this round (see the test module).
"""

from __future__ import annotations

import array

import numpy as np
import torch
from jacobian_service import Input, register

ARR = array.array("d", [0.0])
BYTES = bytearray(1)
BIG = np.zeros((256, 256))  # (512 KiB: past the walk's old 64 KiB bound)


def _steps():
    n = 0
    while True:
        n += 1
        yield n


def _ranged():
    for i in range(1, 10**6):
        yield i


def _closing(step):
    def counting(start):
        n = start
        while True:
            n += step
            yield n

    return counting(0)


def _delegating():
    yield from _steps()


STEPS = _steps()
RANGED = _ranged()
CLOSED = _closing(1)  # (a generator closing over its maker's variable, not started)
DELEGATING = _delegating()


@register(inputs=[Input("x", shape=("n",))])
def arr_count(x):
    ARR[0] += 1
    return (x**3).sum() * ARR[0]


@register(inputs=[Input("x", shape=("n",))])
def bytes_count(x):
    BYTES[0] = (BYTES[0] + 1) % 256
    return (x**3).sum() * BYTES[0]


@register(inputs=[Input("x", shape=("n",))])
def big_count(x):
    BIG[:] += 1  # (the whole running buffer, in place)
    return (x**3).sum() * float(BIG[0, 0])


@register(inputs=[Input("x", shape=("n",))])
def gen_count(x):
    return (x**3).sum() * next(STEPS)


@register(inputs=[Input("x", shape=("n",))])
def range_count(x):
    return (x**3).sum() * next(RANGED)


@register(inputs=[Input("x", shape=("n",))])
def closed_count(x):
    return (x**3).sum() * next(CLOSED)


@register(inputs=[Input("x", shape=("n",))])
def delegating_count(x):
    return (x**3).sum() * next(DELEGATING)


@register(inputs=[Input("x", shape=("n",))])
def gen_vec(x):
    """A vector output, for batched Jacobians."""
    return x**2 * next(STEPS)


LOADS: list = []  # (one entry a load)
CACHE: dict = {}


@register(inputs=[Input("x", shape=("n",))])
def lazy_cache(x):
    """A model loaded lazily at the first call, kept: what a warm-up is there to fill."""
    w = CACHE.get("w")
    if w is None:
        LOADS.append(1)
        w = CACHE["w"] = torch.linspace(1, 2, 3, dtype=torch.float64)
    return (x**3 * w.to(x.dtype)).sum()


@register(inputs=[Input("x", shape=())])
def state_of(x):
    """Each state above as a number (x only gives the dtype), none stepped."""
    steps = STEPS.gi_frame.f_locals.get("n", 0)
    ranged = RANGED.gi_frame.f_locals.get("i", 0)
    closed = CLOSED.gi_frame.f_locals.get("n", 0)
    inner = DELEGATING.gi_yieldfrom
    delegated = 0 if inner is None else inner.gi_frame.f_locals.get("n", 0)
    return torch.tensor([ARR[0], BYTES[0], BIG[0, 0], BIG[-1, -1], steps, ranged, closed, delegated], dtype=x.dtype)


# --------------------------------------------------------------------------- 2.
# test_eager_transforms.py's cases not replayed before (TestGradTransform,
# TestAutogradFunction, TestVmapOfGrad), each named after its test.

import torch.nn.functional as F_  # noqa: E402

ESCAPED: list = []
NAMES: list = []


@register(inputs=[Input("x", shape=("n",))])
def escaped(x):
    """test_escaped_wrappers_are_marked_as_dead: an intermediate kept in a global list."""
    y = x.sin()
    ESCAPED.append(y)
    return y


class _FooBar(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        return

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


@register(inputs=[Input("x", shape=("n",))])
def grad_fn_name(x):
    """test_grad_fn_name: the grad_fn's name, noted in a global list at each call."""
    y = _FooBar.apply(x)
    NAMES.append(type(y.grad_fn).__name__)
    return y


@register(inputs=[Input("x", shape=())])
def no_grad_nested_simple(x):
    """test_no_grad_nested_simple."""
    with torch.no_grad():
        shift = torch.func.grad(lambda x: 0.25 * x**4)(x)
    return x**3 - shift


def _cubed_less_shift(x):
    with torch.no_grad():
        shift = x**3
    return x**3 - shift


@register(inputs=[Input("x", shape=())])
def no_grad_nested_complicated(x):
    """test_no_grad_nested_complicated."""
    r1 = torch.func.grad(_cubed_less_shift)(x)
    with torch.no_grad():
        shift = torch.func.grad(_cubed_less_shift)(x)
    return r1 - shift


@register(inputs=[Input("x", shape=())])
def no_grad_value(x):
    """test_no_grad_value."""
    with torch.no_grad():
        gvalue, value = torch.func.grad_and_value(lambda x: x**3)(x)
    return x**3 - value


@register(inputs=[Input("x", shape=("n",))])
def inference_mode_inside(x):
    """test_inference_mode_inside_grad."""
    with torch.inference_mode():
        c = x**2
    return x - c


class _MaterializeOff(torch.autograd.Function):
    @staticmethod
    def forward(x, y):
        return x, y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gx, gy):
        return gx, gy


@register(inputs=[Input("y", shape=()), Input("x", shape=())])
def set_materialize_grads(y, x):
    """test_set_materialize_grads."""
    x, y = _MaterializeOff.apply(x, y)
    return x**2


class _NoneGrads(torch.autograd.Function):
    @staticmethod
    def forward(x, y):
        return x * y

    @staticmethod
    def setup_context(ctx, inputs, output):
        return

    @staticmethod
    def backward(ctx, grad_output):
        return None, None


@register(inputs=[Input("x", shape=()), Input("y", shape=())])
def needs_input_grads(x, y):
    """test_needs_input_grads: a backward answering None for both."""
    return _NoneGrads.apply(x, y)


def _returns_input(save_tensors: str, mark_dirty: bool):
    class A(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x

        @staticmethod
        def setup_context(ctx, inputs, output):
            if mark_dirty:
                ctx.mark_dirty(inputs[0])
            if save_tensors == "input":
                ctx.save_for_backward(inputs[0])
            elif save_tensors == "output":
                ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output

        @staticmethod
        def jvp(ctx, x_t):
            return x_t.add_(0) if mark_dirty else x_t.view_as(x_t)

    def fn(x):
        return A.apply(x.clone())

    return fn


returns_input_saved = register(inputs=[Input("x", shape=())], name="returns_input_saved")(_returns_input("input", False))
returns_input_neither = register(inputs=[Input("x", shape=())], name="returns_input_neither")(_returns_input("neither", False))
returns_input_dirty = register(inputs=[Input("x", shape=())], name="returns_input_dirty")(_returns_input("output", True))


@register(inputs=[Input("value", shape=())])
def advanced_indexing(value):
    """test_advanced_indexing's f."""
    log_prob = torch.ones((), device=value.device, dtype=value.dtype)
    val = torch.zeros(()) > 0
    log_prob[val] = 0
    return value


@register(inputs=[Input("value", shape=("n",))])
def advanced_indexing2(value):
    """test_advanced_indexing's f2."""
    value = value.clone()
    value[value > 0] = 0
    return value.sum()


@register(inputs=[Input("x", shape=())])
def tensor_ctor_inside(x):
    """test_tensor_ctor_inside_grad."""
    return x * torch.tensor(2.0, device=x.device, dtype=x.dtype)


@register(inputs=[Input("x", shape=("a", "b", "k")), Input("w", shape=("m", "k")), Input("b", shape=("m",))])
def linear_nd_relu_(x, w, b):
    """test_linear_nd_inplace_activation."""
    return F_.linear(x, w, b).relu_().sum()


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n", "m"))])
def composite_complicated(x, y):
    """test_composite_complicated."""
    return (x @ y).sum()


@register(inputs=[Input("x", shape=())])
def two_outputs(x):
    """test_vjp_two_outputs."""
    return x, x


@register(inputs=[Input("weight", shape=("k", 2)), Input("x", shape=(1, "k")), Input("t", shape=(2,))])
def loss_squeeze_(weight, x, t):
    """test_per_sample_grads_inplace_view."""
    x = x.mm(weight)
    y = x.squeeze_(0)
    return (y - t).sum()


@register(inputs=[Input("y", shape=("C",)), Input("x", shape=())])
def new_zeros_copy(y, x):
    """test_new_zeros_materializes_tensor."""
    result = x.new_zeros((y.shape[0],))
    result.copy_(y)
    return result.sum()


@register(inputs=[Input("y", shape=("C",)), Input("x", shape=())])
def new_empty_copy(y, x):
    """test_new_empty_materializes_tensor."""
    result = x.new_empty((y.shape[0],))
    result.copy_(y)
    return result.sum()


@register(inputs=[Input("x", shape=("n",)), Input("v", shape=("n",))])
def log_softmax_vjp(x, v):
    """test_log_softmax (TestVmapOfGrad): a vjp inside the function."""
    _, vjp_fn = torch.func.vjp(lambda z: torch.log_softmax(z, dim=-1), x)
    return vjp_fn(v)[0]


@register(inputs=[Input("x", shape=(3,)), Input("y", shape=(3,))])
def all_dual_no_view(x, y):
    """TestVmapJvpInplaceView.test_all_dual_no_view (case 1)."""
    x.copy_(y)
    return x


@register(inputs=[Input("x", shape=(2, 6)), Input("y", shape=(2, 3))])
def all_dual_base_view_inplace(x, y):
    """Case 2: a view written, its base returned."""
    view = x[:, ::2]
    view.copy_(y)
    return view, x


@register(inputs=[Input("x", shape=(2, 6)), Input("y", shape=(2, 6))])
def all_dual_base_inplace(x, y):
    """Case 3: the base written, a view of it returned."""
    view = x[0, ::2]
    x.copy_(y)
    return x, view


@register(inputs=[Input("x", shape=(2, 6)), Input("y", shape=(6,))])
def right_dual_view_prop(x, y):
    """Case 4."""
    x = x.clone()
    view = x[0]
    view.copy_(y)
    return view, x


@register(inputs=[Input("x", shape=(2, 6)), Input("y", shape=(2, 6))])
def right_dual_base_prop(x, y):
    """Case 5."""
    x = x.clone()
    view = x[0]
    x.copy_(y)
    return view, x


class _MySin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        t = torch.ones_like(x)
        _, neg_sin_x = torch.func.jvp(torch.cos, (x,), (t,))
        ctx.save_for_backward(x)
        return -neg_sin_x

    @staticmethod
    def backward(ctx, gx):
        (x,) = ctx.saved_tensors
        t = torch.ones_like(x)
        _, cos_x = torch.func.jvp(torch.sin, (x,), (t,))
        return gx * cos_x


@register(inputs=[Input("x", shape=("n",))])
def jvp_inside_autograd_function(x):
    """test_jvp_inside_autograd_function."""
    return _MySin.apply(x)


@register(inputs=[Input("dummy", shape=(1,)), Input("x", shape=(2,)), Input("x_tangent", shape=(2,))])
def zerotensor_jvp(dummy, x, x_tangent):
    """test_zerotensor_vmapjvp_interaction's push_jvp (the tangent an input)."""
    return torch.func.jvp(torch.cov, (x,), (x_tangent,))


@register(inputs=[Input("x", shape=("n",))])
def grad_vmap(x):
    """TestComposability.test_grad_vmap."""
    return torch.vmap(torch.sin)(x).sum()


@register(inputs=[Input("x", shape=("n",))])
def grad_vjp(x):
    """TestComposability.test_grad_vjp."""
    _, vjp_fn = torch.func.vjp(torch.sin, x)
    return vjp_fn(x)[0].sum()


STUFF: list = []


@register(inputs=[Input("x", shape=("n",))])
def debug_unwrap(x):
    """TestHelpers.test_debug_unwrap: the unwrapped input kept in a global list."""
    STUFF.append(torch.func.debug_unwrap(x))
    return x.sin()


# TestFunctionalize: functionalized functions, served as registered.
def _simple_view(x):
    tmp = torch.ones(2, dtype=x.dtype)
    y = x.view(4, 2)
    y.add_(tmp)
    return x


def _inplace_on_sum(x):
    tmp = torch.ones(2, dtype=x.dtype)
    y = x + x
    z = y.view(4, 2)
    y.add_(tmp)
    return (z**2).sum()


def _inplace_view(x):
    tmp = torch.ones(4, dtype=x.dtype)
    y = x + x
    y2 = y.transpose(1, 0)
    z = y2[0]
    z.add_(tmp)
    return y


func_simple_view = register(inputs=[Input("x", shape=(4, 2))], name="func_simple_view")(torch.func.functionalize(_simple_view))
func_inplace_on_sum = register(inputs=[Input("x", shape=(4, 2))], name="func_inplace_on_sum")(torch.func.functionalize(_inplace_on_sum))
func_inplace_view = register(inputs=[Input("x", shape=(4, 2))], name="func_inplace_view")(
    torch.func.functionalize(_inplace_view, remove="mutations_and_views"))
