"""Functions for tests/test_hostile_round30_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register

SPREAD = 6  # outputs of ``spread``: more than the test's MAX_NPZ_MEMBERS of 4
LEAVES = ("a", "b", "c", "d", "e", "f")  # leaves of ``tree_sum``'s parameter: more than 4 too


@register(inputs=[Input("x", shape=("n",))], description="(x, 2 sin x, 3 x**2, ...): a tuple of six outputs.")
def spread(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple((i + 1) * (x if i % 3 == 0 else torch.sin(x) if i % 3 == 1 else x**2) for i in range(SPREAD))


@register(inputs=[Input("p", tree={k: Array(("n",)) for k in LEAVES})],
          description="sum over the leaves of p of (i+1) * sin(leaf): a parameter of six arrays.")
def tree_sum(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((i + 1) * torch.sin(p[k]) for i, k in enumerate(LEAVES))


@register(inputs=[Input("x", shape=("n",))], description="(x, sin x, x**2): a tuple of three outputs.")
def triple(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x, torch.sin(x), x**2
