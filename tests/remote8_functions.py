"""Functions for test_remote_round8: one function as a registry served it before a
restart (``r8_changed``) and as the changed registry serves it after (``r8_changed_v2``,
which the test's client reaches under the first one's name)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("a", shape=("n",)), Input("b", shape=("n",))], description="a * exp(b), elementwise.")
def r8_changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * torch.exp(b)


@register(inputs=[Input("b", shape=("n",)), Input("a", shape=("n",))],
          description="r8_changed after a registry change: its inputs in the other order, two rows out.")
def r8_changed_v2(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.stack([a * torch.exp(b), b])

