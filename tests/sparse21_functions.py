"""Functions for tests/test_sparse_round21.py. Loaded by module name."""

from __future__ import annotations

import operator
import os

import torch

from jacobian_service import Input, register
from tests.sparse19_functions import register_coupled  # (u[0] coupled where a check says plain, detached elsewhere)

# ------------------------------------------------------------------ type reads no watch can see
# Round 20's residual: each arm computes the same values; only the plain-tensor arm
# (jacrev's) couples every element to the first. Each check tells the tracer's tensors
# from jacrev's where reading the function's bytecode cannot: a name built at run time, a
# dotted name inside a C helper's string, code compiled under torch's own file name.

_PART = "__cl"
_fake: dict = {"torch": torch}
exec(compile("def _by_torch_file(u):\n    return type(u) is torch.Tensor\n",
             os.path.join(os.path.dirname(torch.__file__), "_sparse21_fake.py"), "exec"), _fake)

CHECKS = {
    "built_name": lambda u: getattr(u, _PART + "ass__") is torch.Tensor,
    "attrgetter": lambda u: operator.attrgetter("__class__.__name__")(u) == "Tensor",
    "torch_file": _fake["_by_torch_file"],
}

COUPLED = register_coupled(CHECKS, "coupled21", "where no reading of the code sees it", __name__)


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain energy coupled to its first element where a type check built at run time "
                      "says plain torch.Tensor (its Hessian through that check).")
def energy21_built_name(u: torch.Tensor) -> torch.Tensor:
    first = u[0] if getattr(u, _PART + "ass__") is torch.Tensor else u[0].detach()
    return ((u[1:] - u[:-1]) ** 4).sum() + (u**2 * first**2).sum()


# ------------------------------------------------------------------ structure, not values


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="relu of a chain's differences and a where on the input's sign: the pattern is "
                      "the structure (both branches, relu's dead side), never this point's zeros.")
def gated21(u: torch.Tensor) -> torch.Tensor:
    return torch.relu(u.roll(1) - u) + torch.where(u > 0, u * u.roll(-1), 0.5 * u**2)


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain whose gradient a hook normalises (y.register_hook(g / |g|)): the tracer "
                      "sees the forward ops, not the hook, and a colour's product normalises the sum of "
                      "its rows' cotangents where jacrev normalises each row's.")
def hooked21(u: torch.Tensor) -> torch.Tensor:
    y = u * 2.0
    if y.requires_grad:
        y.register_hook(lambda g: g / g.norm())
    return y * y.roll(1)
