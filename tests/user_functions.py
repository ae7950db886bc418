"""A user module (not a built-in), loaded by name through JACOBIAN_SERVICE_FUNCTIONS."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from jacobian_service import Input, register


@register(
    name="scaled_norm",
    inputs=[Input("x", shape=("n", 3)), Input("scale", shape=(), dtype="float64"), Input("power", shape=(), dtype="int64")],
    has_aux=True,
    description="Row norms of x times scale, with mixed aux.",
)
def scaled_norm(x: torch.Tensor, scale: torch.Tensor, power: torch.Tensor):
    norms = (x**2).sum(-1).sqrt() * scale.to(x.dtype) ** power.to(x.dtype)
    return norms, {"total": norms.sum(), "label": "norms", "sizes": [int(x.shape[0]), 3]}


@register(inputs=[Input("x", shape=("n",))], description="Data-dependent control flow: vmap cannot batch it.")
def branchy(x: torch.Tensor) -> torch.Tensor:
    if x.sum().item() > 0:  # .item() defeats vmap of the function itself
        return torch.stack([x[0] * x[1], x[1] ** 3])
    return torch.stack([x[0], -x[1]])


@register(inputs=[Input("x", shape=("n",))], description="Always raises.")
def broken(x: torch.Tensor) -> torch.Tensor:
    raise ValueError("the simulator diverged")


@register(inputs=[Input("x", shape=("n",))], description="Returns a string, not a tensor.")
def wrong_type(x: torch.Tensor):
    return "not a tensor"


@register(inputs=[Input("x", shape=("n",))])
def dict_out(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dict of outputs."""
    return {"a": x.sum(), "b": x * x}


def _identity_with_backward(hook):
    """An identity autograd.Function whose backward first calls ``hook(grad)``."""

    class Identity(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            pass

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            hook(grad)
            return grad

    return Identity


def _fail_in_second_half(grad: torch.Tensor) -> None:
    if grad[grad.shape[-1] // 2 :].abs().sum() > 0:
        raise RuntimeError("backward failed half-way")


_FailLate = _identity_with_backward(_fail_in_second_half)
_SlowBackward = _identity_with_backward(lambda grad: time.sleep(0.05))  # 50 ms per backward call


@register(inputs=[Input("x", shape=("n",))], description="Fails half-way through its Jacobian's rows.")
def fails_midway(x: torch.Tensor) -> torch.Tensor:
    return _FailLate.apply(x)


@register(inputs=[Input("a", shape=("n", "n"))], description="Cholesky factor: fails for a matrix that is not positive definite.")
def cholesky(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(a)


class _Hungry(torch.autograd.Function):
    """Doubles x; its backward "runs out of memory" for more than ``ROWS_THAT_FIT`` rows
    at once under vmap, as a GPU would, and for any row when x[0] < 0."""

    generate_vmap_rule = True
    ROWS_THAT_FIT = 4

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.always = bool(inputs[0].detach()[..., 0].lt(0).any()) if not torch._C._functorch.is_batchedtensor(inputs[0]) else False

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from torch._C._functorch import get_unwrapped, is_batchedtensor

        rows = get_unwrapped(grad).shape[0] if is_batchedtensor(grad) else 1
        if ctx.always or rows > _Hungry.ROWS_THAT_FIT:
            raise torch.OutOfMemoryError(f"simulated: {rows} rows do not fit")
        return grad * 2


@register(inputs=[Input("x", shape=("n",))], description="Runs out of memory above 4 rows per chunk.")
def memory_hungry(x: torch.Tensor) -> torch.Tensor:
    return _Hungry.apply(x)


@register(inputs=[Input("x", shape=("n",))], description="sin(x x^T) summed by rows: n x n temporaries per Jacobian row.")
def outer_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(torch.outer(x, x)).sum(1)


@register(inputs=[Input("x", shape=("n",))], description="50 ms per Jacobian chunk.")
def slow_rows(x: torch.Tensor) -> torch.Tensor:
    return _SlowBackward.apply(x)


@register(inputs=[Input("x", shape=("n",))], description="log(x): NaN below 0, -inf at 0.")
def log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x)


_NoForwardAD = _identity_with_backward(lambda grad: None)  # an autograd.Function without jvp


@register(inputs=[Input("x", shape=("n",))], description="sin through an op with no forward-mode rule.")
def no_forward_ad(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(_NoForwardAD.apply(x)) * x


@register(inputs=[Input("x", shape=("n",))], description="A nested tuple output (x, (x, x)) for nested cotangents.")
def nested_out(x: torch.Tensor):
    return x.sin(), (2 * x, x**3)


@register(inputs=[Input("x", shape=("n",))], description="A dict inside a tuple, keys not in sorted order.")
def nested_dict_out(x: torch.Tensor):
    return x.sin(), {"b": 2 * x, "a": (x**3, x.sum())}


@register(inputs=[Input("x", shape=())], description="A 0-d input and output: x squared.")
def scalar_square(x: torch.Tensor) -> torch.Tensor:
    return x * x


@register(inputs=[Input("x", shape=("n",)), Input("mask", shape=("n",), dtype="bool")], description="x where mask, else 0.")
def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


class _UnprintableError(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("this error's message cannot be made")


@register(inputs=[Input("x", shape=(3,))], description="Raises an error whose __str__ raises.")
def raises_unprintable(x: torch.Tensor) -> torch.Tensor:
    raise _UnprintableError()


class _ExitingError(ValueError):
    def __str__(self) -> str:
        raise SystemExit(3)


@register(inputs=[Input("x", shape=(3,)), Input("kind", shape=(), dtype="int64")],
          description="Raises an error whose message is not UTF-8 (kind 0) or whose __str__ raises SystemExit (1).")
def raises_oddly(x: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    if int(kind) == 0:
        path = os.fsdecode(b"/data/run-\xff.bin")
        raise ValueError(f"cannot read {path}")
    raise _ExitingError()


def _odd_aux(kind: int, x: torch.Tensor):
    if kind == 1:  # a list that holds itself
        cycle: list = []
        cycle.append(cycle)
        return cycle
    if kind == 2:  # the same list twice, nested 40 deep: 2**40 items, walked naively
        shared: list = [x.sum()]
        for _ in range(40):
            shared = [shared, shared]
        return shared
    if kind == 3:
        return {"m": x.detach().diag().to_sparse()}
    if kind == 4:
        return {"z": x.detach() * 1j}
    if kind == 5:
        return "x" * 4096
    if kind == 6:  # what os.fsdecode makes of an undecodable file name: not UTF-8
        return {"path": os.fsdecode(b"/data/run-\xff.bin")}
    if kind == 7:  # numpy's scalars and subclasses of Python's numbers and strings: not JSON to orjson
        return {"loss": np.float64(0.25), "n": np.int64(3), "ok": np.bool_(True), "f": _Float(1.5), "s": _Str("x")}
    if kind == 8:
        return {os.fsdecode(b"\xff"): 1}
    if kind == 9:  # a key whose own __str__ raises: the engine must not call it
        return {_Str("k"): 1}
    if kind == 10:  # non-finite plain numbers: JSON has none
        return {"nan": float("nan"), "inf": float("inf"), "ninf": np.float64("-inf")}
    if kind == 11:  # a tensor subclass that refuses to be copied off
        return {"t": x.detach().cos().as_subclass(_Stubborn)}
    return {"total": x.sum()}


class _Stubborn(torch.Tensor):
    """A tensor subclass whose detach, copies and numpy raise (a library's tracing or
    caching tensor, say)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("detach", "cpu", "numpy", "float", "to", "contiguous", "clone"):
            raise RuntimeError(f"a _Stubborn tensor refuses {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


@register(inputs=[Input("x", shape=("n",))], description="sin, returned as a tensor subclass whose detach and numpy raise.")
def stubborn_sin(x: torch.Tensor) -> torch.Tensor:
    return x.sin().as_subclass(_Stubborn)


class _Float(float):
    pass


class _Str(str):
    def __str__(self) -> str:
        raise RuntimeError("a string whose __str__ raises")


@register(
    inputs=[Input("x", shape=("n",)), Input("kind", shape=(), dtype="int64")],
    has_aux=True,
    description="sin, with an aux that cannot travel, by kind (0: one that can).",
)
def odd_aux(x: torch.Tensor, kind: torch.Tensor):
    return x.sin(), _odd_aux(int(kind), x)


# torch.no_grad stops reverse mode only; forward mode sees through it (calling.GradOffWatch).
@register(inputs=[Input("x", shape=("n",))], description="x - x**2 (the square under no_grad), then x: 2n outputs.")
def no_grad_long(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        c = x**2
    return torch.cat([x - c, x])


@register(inputs=[Input("x", shape=("n",))], description="sum(x * x**2), the square under no_grad.")
def no_grad_scalar(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        c = x**2
    return (x * c).sum()


@register(inputs=[Input("x", shape=("n",))], description="x * x**2, the square computed with grad switched off.")
def grad_off_vector(x: torch.Tensor) -> torch.Tensor:
    torch.set_grad_enabled(False)
    try:
        c = x**2
    finally:
        torch.set_grad_enabled(True)
    return x * c


@register(inputs=[Input("x", shape=("n",), dtype="float64")], description="A float32 output of a float64 input, 3n long.")
def to_float32(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).float().repeat(3)


@register(inputs=[Input("x", shape=("n",)), Input("c", shape=("n",), dtype="float64")],
          description="A scalar of a float32 and a float64 input.")
def mixed_dtypes(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x * c.to(x.dtype)).sum() + (x**2).sum() * c.sum().to(x.dtype)


# Writes into its input under no_grad, which jacrev allows: the derivative is taken at
# the doubled values (12 x**2), once. A service that calls it twice on the same tensors
# (to look at sizes, to time strategies) doubles it twice and answers 48 x**2.
@register(inputs=[Input("x", shape=("n",))], description="(2x)**3, doubling x in place under no_grad.")
def doubles_in_place(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x.mul_(2)
    return x**3


@register(inputs=[Input("x", shape=("n",))], description="sum((2x)**3), doubling x in place under no_grad.")
def doubles_in_place_sum(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x.mul_(2)
    return (x**3).sum()


@register(inputs=[Input("x", shape=("n",))], description="(2x)**2 through an in-place write that forward mode allows.")
def doubles_in_place_fwd(x: torch.Tensor) -> torch.Tensor:
    y = x * 1
    y.mul_(2)
    x.copy_(y)  # into the input, with grad on: jacfwd and jvp take it, jacrev does not
    return x**2 + x


@register(inputs=[Input("x", shape=("n",))], description="|x|**3: smooth, yet NaN at 0 through some Hessian strategies.")
def norm_cubed(x: torch.Tensor) -> torch.Tensor:
    return x.norm() ** 3


@register(inputs=[Input("x", shape=("n",))], description="An integer output, which jacrev refuses.")
def int_output(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).long()


# torch (2.13) gets forward-mode AD under a vmap over examples wrong for LU-based ops:
# vmap(jacfwd(solve)) and vmap(hessian(det)) are far off, each example alone is right.
@register(inputs=[Input("a", shape=("n", "n"), dtype="float64"), Input("b", shape=("n",), dtype="float64")],
          description="linalg.solve(a, b)")
def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(a, b)


@register(inputs=[Input("a", shape=("n", "n"), dtype="float64")], description="[det(a)]: a vector output")
def det(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.det(a).reshape(1)  # not 0-d: Hessian strategies for vectors start with jacfwd(jacrev)


# Draws at every call: an output asked for with the derivative must be the one of the
# call differentiated (the Jacobian's diagonal is 1 + the draw).
@register(inputs=[Input("x", shape=("n",))], description="x * (1 + u), u uniform, drawn at each call")
def noisy(x: torch.Tensor) -> torch.Tensor:
    return x * (1 + torch.rand(x.shape, dtype=x.dtype))


@register(inputs=[Input("x", shape=("n",))], description="sum((1 + u) * x**2) / 2, u drawn at each call")
def noisy_energy(x: torch.Tensor) -> torch.Tensor:
    return ((1 + torch.rand(x.shape, dtype=x.dtype)) * x**2).sum() / 2


@register(inputs=[Input("x", shape=("n",))], description="prelu(x) (slope 0.2) three times: at 0 jacfwd says 1, jacrev 0.2")
def prelu3(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.prelu(x, torch.tensor([0.2], dtype=x.dtype)).repeat(3)


# Results that follow a call count: the service may call a function more than once for
# one request (sizes, forward mode's check, example by example).
_CALLS = [0]


@register(inputs=[Input("x", shape=("n",))], description="sin(x), one element longer at every other call")
def grows_every_other_call(x: torch.Tensor) -> torch.Tensor:
    _CALLS[0] += 1
    return torch.cat([x.sin(), x[:1]]) if _CALLS[0] % 2 else x.sin()


@register(inputs=[Input("x", shape=("n",))], has_aux=True, description="sin(x), with one more aux tensor at every other call")
def aux_every_other_call(x: torch.Tensor):
    _CALLS[0] += 1
    aux = {"a": x.sum()} if _CALLS[0] % 2 else {"a": x.sum(), "b": x.sum(), "label": "two"}
    return x.sin().repeat(3), aux


@register(inputs=[Input("x", shape=("n",))], description="x[x > 0]: an output whose size follows the values")
def keeps_positives(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0] * 3


@register(inputs=[Input("x", shape=(4,))], description="slogdet of x as a 2x2 matrix: (sign, log|det|)")
def slogdet_2x2(x: torch.Tensor):
    # jvp answers the sign's tangent with torch's storage-less zero tensor
    return tuple(torch.linalg.slogdet(x.reshape(2, 2)))


@register(inputs=[Input("x", shape=("n",))], description="|x|.sum(): an L1 norm")
def l1_norm(x: torch.Tensor) -> torch.Tensor:
    # jacrev(jacrev) answers its Hessian with torch's storage-less zero tensor
    return x.abs().sum()


@register(inputs=[Input("x", shape=("n",))], description="a dict output with int keys, not in key order")
def int_keyed(x: torch.Tensor):
    return {1: x * 2, 0: x.sin()}


def _once_differentiable_cube(with_jvp: bool) -> type:
    """x**3 as a custom autograd.Function whose backward is ``@once_differentiable``
    (run under no_grad): reverse over reverse sees a gradient without a graph."""
    from torch.autograd.function import once_differentiable

    class Cube(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            ctx.save_for_backward(inputs[0])
            ctx.x = inputs[0]

        @staticmethod
        @once_differentiable
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    if with_jvp:
        Cube.jvp = staticmethod(lambda ctx, t: 3 * ctx.x**2 * t)
    return Cube


_OnceCube = _once_differentiable_cube(with_jvp=True)
_OnceCubeNoJvp = _once_differentiable_cube(with_jvp=False)


@register(inputs=[Input("x", shape=("n",))], description="sum(x**3) through a Function with a once_differentiable backward")
def once_cube_sum(x: torch.Tensor) -> torch.Tensor:
    return _OnceCube.apply(x).sum()


@register(inputs=[Input("x", shape=("n",))], description="x**3 * x through a Function with a once_differentiable backward")
def once_cube_vector(x: torch.Tensor) -> torch.Tensor:
    return _OnceCube.apply(x) * x


@register(inputs=[Input("x", shape=("n",))], description="sum(x**3), once_differentiable backward, no jvp rule")
def once_cube_sum_no_jvp(x: torch.Tensor) -> torch.Tensor:
    return _OnceCubeNoJvp.apply(x).sum()


def _custom_cube_op() -> Any:
    """x**3 as a torch.library custom op with a backward: functorch refuses it in reverse
    mode, and torch's forward mode silently drops its tangent (zeros)."""
    name = "jacobian_service_tests::cube"
    try:
        return torch.ops.jacobian_service_tests.cube  # registered once per process
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op(name, mutates_args=())
    def cube(x: torch.Tensor) -> torch.Tensor:
        return x**3

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2

    torch.library.register_autograd(name, backward, setup_context=setup_context)
    return cube


_custom_cube = _custom_cube_op()


@register(inputs=[Input("x", shape=("n",))], description="x**3 through a torch.library custom op, plus x")
def custom_op_cube(x: torch.Tensor) -> torch.Tensor:
    return _custom_cube(x) + x


class _DetachedBackwardCube(torch.autograd.Function):
    """x**3 whose backward reads x detached: its gradient is right, its graph cut."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 3 * x.detach() ** 2


@register(inputs=[Input("x", shape=("n",))], description="sum(x**3) + sum(sin x), a backward that detaches x, no jvp")
def detached_backward_sum(x: torch.Tensor) -> torch.Tensor:
    return _DetachedBackwardCube.apply(x).sum() + x.sin().sum()


@register(inputs=[Input("x", shape=("n",))], has_aux=True,
          description="sum(sin(x) * x) through an op with no forward-mode rule; aux: sum(x) as a number")
def no_forward_ad_aux(x: torch.Tensor):
    return (torch.sin(_NoForwardAD.apply(x)) * x).sum(), {"sum": float(x.detach().sum())}


@register(inputs=[Input("theta", shape=("n",))], has_aux=True,
          description="Im(conj(e^(i theta))) = -sin(theta), and the same as aux: torch answers it as a lazily "
                      "negated view (its negative bit set), which .numpy() refuses")
def imag_of_conjugate(theta: torch.Tensor):
    y = torch.polar(torch.ones_like(theta), theta).conj().imag
    return y, {"y": y.detach()}


@register(inputs=[Input("x", shape=("n",))], description="A nested tensor of two rows (no wire carries one)")
def nested_rows(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "prototype stage"
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([x.sin(), x.cos()])


@register(inputs=[Input("x", shape=("m", "n")), Input("b", shape=("n",))],
          description="sum(layer_norm(x, bias=b)**2): torch has no jacrev(grad) of it (an undefined gradient), "
                      "jacrev(jacrev) and torch.func.hessian run")
def layer_norm_bias_loss(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.layer_norm(x, x.shape[-1:], None, b) ** 2).sum()


_MASK_2X3 = torch.tensor([[True, False, True], [False, True, True]])


@register(inputs=[Input("x", shape=(3,))],
          description="x.masked_select(mask) * 2 with a (2, 3) mask broadcast over x: torch's vmap of its backward fails")
def masked_select_broadcast(x: torch.Tensor) -> torch.Tensor:
    return x.masked_select(_MASK_2X3) * 2


class _CubeNoVmap(torch.autograd.Function):
    """x**3 with backward and jvp rules and no vmap rule, as a user writes one for single use."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return tangent * 3 * x**2


@register(inputs=[Input("x", shape=("n",))], description="sum(x**3 + sin x), the cube a Function without a vmap rule")
def cube_no_vmap_sum(x: torch.Tensor) -> torch.Tensor:
    return (_CubeNoVmap.apply(x) + x.sin()).sum()


_MASK_3X3 = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])


@register(inputs=[Input("x", shape=(3,))],
          description="sum(x.masked_select(mask)**3), a (3, 3) mask broadcast over x: jacrev(grad) of it is wrong in torch")
def masked_select_cube(x: torch.Tensor) -> torch.Tensor:
    return (x.masked_select(_MASK_3X3) ** 3).sum()


_LN_WEIGHTS = torch.tensor([[0.3, -1.2, 0.7], [1.1, 0.4, -0.5]])


@register(inputs=[Input("x", shape=(2, 3)), Input("w", shape=(3,)), Input("b", shape=(3,))],
          description="A weighted sum of layer_norm(x, w, b): torch.func.hessian of it is wrong (vmap in its double backward)")
def layer_norm_affine_sum(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.layer_norm(x, (3,), w, b) * _LN_WEIGHTS.to(x.dtype)).sum()


@register(inputs=[Input("a", shape=(3, 3))], description="A weighted sum of cholesky(a): it reads a's lower triangle only")
def cholesky_weighted(a: torch.Tensor) -> torch.Tensor:
    return (torch.linalg.cholesky(a) * torch.arange(1.0, 10.0, dtype=a.dtype).reshape(3, 3)).sum()
