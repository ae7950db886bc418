"""A function that rebinds a name of the service's own modules (tests/test_names_in_process.py)."""

import torch

from jacobian_service import Input, register
from jacobian_service.sparsity import acyclic


@register(inputs=[Input("x", shape=("n",))], description="rebinds a name of the service's own modules")
def rebinds_substitution(x: torch.Tensor) -> torch.Tensor:
    acyclic.substitution = lambda *args: None
    return torch.sin(x)
