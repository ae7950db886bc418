"""Functions for tests/test_mend_round9.py: a scalar one, for a sparse Hessian (sin's
elementwise sum: a diagonal Hessian, -sin(x))."""

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def sum_sin(x):
    return torch.sin(x).sum()
