"""Functions for tests/test_openapi_round1.py: one whose first input is an integer (the
sparsity query's argnums 0 has nothing to differentiate there)."""

from __future__ import annotations

from jacobian_service import Input, register


@register(inputs=[Input("k", shape=("n",), dtype="int64"), Input("x", shape=("n",))])
def int_first(k, x):
    """sin(k x), differentiable in x only."""
    return (k * x).sin()
