"""Functions for tests/test_parity_round21.py, round 21 of PyTorch's own torch.func test
cases replayed over HTTP: integer and boolean outputs (argmax, a cast, a comparison;
alone or beside a float output in a tuple or dict), which no derivative exists for, and
TestJac's / TestHessian's reference cases (test_against_reference_*, test_chunk_jacrev),
with aux of non-tensors and integer tensors, 0-d and empty tensors, float16/bfloat16."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

V = ("n",)


@register(inputs=[Input("x", shape=V)])
def argmax_of(x):
    """An index (int64, 0-d): jacrev, jacfwd's vjp check, hessian and vjp refuse it."""
    return x.argmax()


@register(inputs=[Input("x", shape=V)])
def scaled_long(x):
    """A cast to int64 (x.long()): no derivative."""
    return (x * 10).long()


@register(inputs=[Input("x", shape=V)])
def positive(x):
    """A comparison (bool): no derivative."""
    return x > 0


@register(inputs=[Input("x", shape=V)])
def sin_and_argmax(x):
    """A float output beside an integer one (a tuple): jacrev refuses the whole, as it
    differentiates every output."""
    return x.sin(), x.argmax()


@register(inputs=[Input("x", shape=V)])
def sin_and_sign(x):
    """A dict output with a boolean leaf."""
    return {"s": x.sin(), "k": x > 0}


@register(inputs=[Input("x", shape=V)], has_aux=True)
def index_with_float_aux(x):
    """has_aux whose output is the integer one: refused, whatever the aux."""
    return x.argmax(), x.sin()


@register(inputs=[Input("x", shape=V)])
def sin_and_polar(x):
    """A real output beside a complex one: jacrev refuses ("Expected all outputs to be
    real"); the wire carries no complex, so evaluate and jvp cannot answer either."""
    return x.sin(), torch.polar(x.abs() + 1, x)
