"""Functions for tests/test_parity_round12.py, round 12 of PyTorch's own torch.func test
cases replayed over HTTP.

1. An OpInfo sweep as outside testers run it: for a sample of torch's OpInfos that
   support autograd (torch/testing/_internal/common_methods_invocations.py's ``op_db``),
   ``lambda x: op(x, *args)`` with the arguments of one of their sample inputs, each
   registered as ``op_<name>``. Importing ``op_db`` itself takes seconds (and the
   ``expecttest`` package), so the samples are written out here: the op, the input's
   shape and the extra arguments its sample gives, float64 as the sweep ran it.
2. TestJac / TestHessian / test_vmap.py shapes not replayed before: outputs that are
   views of the input, a Hessian per example whose outputs depend on a shared input
   alone (``out_dims`` null), an in-place write into a captured tensor.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as nnf
from jacobian_service import Input, register

_G = torch.Generator().manual_seed(12)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_G, dtype=torch.float64)


_W3 = _rand(2, 1, 3)  # conv1d's weight, as its OpInfo sample captures it
_IDX = torch.tensor([2, 0, 1])
_MASK = torch.tensor([[True, False, True], [False, True, True]])

# (name, op of x, the input's shape, whether the op is twice differentiable in torch
# (OpInfo's supports_gradgrad) and cheap enough to take the Hessian of here)
OPS: list[tuple[str, Callable[[torch.Tensor], Any], tuple[int, ...], bool]] = [
    ("sin", torch.sin, (2, 3), True),
    ("tanh", torch.tanh, (2, 3), True),
    ("sigmoid", torch.sigmoid, (2, 3), False),
    ("pow", lambda x: torch.pow(x, 3), (2, 3), True),
    ("clamp", lambda x: torch.clamp(x, -0.5, 0.5), (2, 3), False),
    ("cumsum", lambda x: torch.cumsum(x, 1), (2, 3), False),
    ("cumprod", lambda x: torch.cumprod(x, 0), (2, 3), True),
    ("softmax", lambda x: torch.softmax(x, 1), (2, 3), True),
    ("logsumexp", lambda x: torch.logsumexp(x, 1), (2, 3), True),
    ("var_mean", lambda x: torch.var_mean(x, 1), (2, 3), False),  # a tuple output
    ("max_dim", lambda x: torch.max(x, 1).values, (2, 3), False),
    ("sort", lambda x: torch.sort(x, 1).values, (2, 3), False),
    ("det", torch.linalg.det, (3, 3), True),
    ("inv", torch.linalg.inv, (3, 3), False),
    ("eigvalsh", lambda x: torch.linalg.eigvalsh(x + x.mT), (3, 3), False),
    ("matrix_exp", torch.linalg.matrix_exp, (2, 2), False),
    ("normalize", lambda x: nnf.normalize(x, dim=1), (2, 3), False),
    ("layer_norm", lambda x: nnf.layer_norm(x, (3,)), (2, 3), False),
    ("gelu", nnf.gelu, (2, 3), False),
    ("conv1d", lambda x: nnf.conv1d(x, _W3), (1, 1, 5), False),
    ("max_pool1d", lambda x: nnf.max_pool1d(x, 2), (1, 2, 4), False),
    ("pad_reflect", lambda x: nnf.pad(x, (1, 1), mode="reflect"), (1, 2, 3), False),
    ("glu", lambda x: nnf.glu(x, 1), (2, 4), False),
    ("index_select", lambda x: torch.index_select(x, 1, _IDX), (2, 3), False),
    ("masked_select", lambda x: torch.masked_select(x, _MASK), (2, 3), False),
    ("unfold", lambda x: x.unfold(1, 2, 1), (2, 3), False),  # a view of the input
    ("cross", lambda x: torch.linalg.cross(x, x.flip(0)), (2, 3), True),
    ("cdist", lambda x: torch.cdist(x, x.flip(0) + 1), (2, 3), False),
]

for _name, _op, _shape, _ in OPS:
    register(lambda x, _op=_op: _op(x), name=f"op_{_name}", inputs=[Input("x", shape=_shape)])


# --- TestJac: outputs that are views of the input (x[::2], x.t(), x.expand) ---


@register(inputs=[Input("x", shape=(2, 3))])
def views_of_input(x):
    """Three outputs, each a view of x: a strided slice, a transpose, an expand."""
    return x.flatten()[::2], x.t(), x[0].expand(2, 3)


# --- test_vmap.py's out_dims=None, per-example Hessians ---


@register(inputs=[Input("x", shape=(3,)), Input("s", shape=())])
def scaled_and_own(x, s):
    """One output of x and s, one of s alone: with s shared (in_dims null), the second
    output's derivatives in s are the same for every example, and torch's
    ``vmap(hessian(f, argnums=1), in_dims=(0, None), out_dims=(0, None))`` answers them
    once."""
    return x * s, s.exp()


# --- errors: in-place on a captured tensor ---

_CAPTURED = torch.zeros(3, dtype=torch.float64)


@register(inputs=[Input("x", shape=(3,))])
def adds_into_captured(x):
    """test_inplace_on_captures: an in-place write of x into a tensor f captures (torch:
    'the function provided attempted to call in-place operation ... that would mutate
    a captured Tensor')."""
    _CAPTURED.add_(x)
    return x * 2


# --- empty inputs (shape (0,)) on every endpoint; 0-d inputs per example ---


@register(inputs=[Input("x", shape=("n",))])
def cube(x):
    return x ** 3


@register(inputs=[Input("x", shape=("n",))])
def sum_cube(x):
    return (x ** 3).sum()


@register(inputs=[Input("x", shape=())])
def sin2(x):
    """A 0-d input and output."""
    return x.sin() * 2


@register(inputs=[Input("x", shape=(3,)), Input("y", shape=(3,))])
def mul_sin(x, y):
    """Called with the same tensor for x and y (inputs that alias each other)."""
    return x * y.sin()


@register(inputs=[Input("x", shape=(3,))])
def sin_and_argmax(x):
    """A tuple output with an integer (non-differentiable) member: jacrev and
    torch.func.hessian refuse it, in vjp's words."""
    return x.sin(), x.argmax()
