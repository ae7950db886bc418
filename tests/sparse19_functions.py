"""Functions for tests/test_sparse_round19.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# ------------------------------------------------------------------ a branch on a tensor's type
# Each arm computes the same values; only the plain-tensor arm (jacrev's: its tensors are
# torch.Tensor to Python) couples every element to the first. The tracer's tensors are a
# subclass: it took the other arm, whose values agree (nothing diverged).


def _is_plain(u: torch.Tensor) -> bool:
    # a helper that runs no op of its own: only the Python calls show it was run
    return type(u) in (torch.Tensor,)


_TYPE_CHECKS = {
    "type_is": lambda u: type(u) is torch.Tensor,
    "class_attr": lambda u: u.__class__ is torch.Tensor,
    "type_name": lambda u: type(u).__name__ == "Tensor",
    "helper": _is_plain,
    "functorch_state": lambda u: torch._C._functorch.is_functorch_wrapped_tensor(u),
    "grad_fn": lambda u: (u * 2).grad_fn is not None,  # jacrev's computed tensors have a node
    "is_leaf": lambda u: not u[1:].is_leaf,  # a view of jacrev's input is no leaf
}


def _coupled(check):
    def fn(u: torch.Tensor) -> torch.Tensor:
        first = u[0] if check(u) else u[0].detach()
        return u * first + u.roll(1)
    return fn


def register_coupled(checks, prefix, why, module):
    """``_coupled(check)`` for each of ``checks``, registered as ``{prefix}_{name}`` under
    ``module`` (register files a function under its module): check's name -> function."""
    made = {}
    for name, check in checks.items():
        fn = _coupled(check)
        fn.__module__ = module
        made[name] = register(inputs=[Input("u", shape=("n",), dtype="float64")], name=f"{prefix}_{name}",
                              description=f"Round 19's coupled residual, its type check ({name}) {why}.")(fn)
    return made


COUPLED = {}  # check's name -> the registered function (for the test's jacrev)
for _name, _check in _TYPE_CHECKS.items():
    COUPLED[_name] = register(inputs=[Input("u", shape=("n",), dtype="float64")], name=f"coupled_{_name}",
             description=f"A residual whose coupling to u[0] is detached unless a type check ({_name}) says "
                         "its tensor is a plain torch.Tensor: the same values either way.")(_coupled(_check))


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain energy whose coupling to the first element is detached where type(u) is not "
                      "torch.Tensor (its Hessian through the type check).")
def type_energy(u: torch.Tensor) -> torch.Tensor:
    first = u[0] if type(u) is torch.Tensor else u[0].detach()
    return ((u[1:] - u[:-1]) ** 4).sum() + (u**2 * first**2).sum()


# ------------------------------------------------------------------ values read as Python lists


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="Each element times the one that follows it in sorted order, the order read as a Python "
                      "list (argsort().tolist()): a pattern of the values' order.")
def sorted_pairs(u: torch.Tensor) -> torch.Tensor:
    order = u.argsort().tolist()
    return torch.stack([u[i] * u[j] for i, j in zip(order, order[1:] + order[:1])])


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain energy scaled by the sum of its input's values read as a Python list (a "
                      "constant to the derivative, as under jacrev).")
def listed_energy(u: torch.Tensor) -> torch.Tensor:
    return ((u[1:] - u[:-1]) ** 4).sum() * sum(u.tolist())
