"""Functions for tests/test_parity_round33.py, round 33 of PyTorch's own torch.func test
cases replayed over HTTP: complex results that torch leaves lazily conjugated
(``z.conj()`` sets the conjugate bit instead of computing; test_eager_transforms.py's
test_conj_bit, TestJvp over R -> C), as outputs, as a leaf of a pytree output and as aux."""

from __future__ import annotations

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def conj_out(x):
    """conj(cos x + 2i sin x): a complex output whose conjugate bit is set."""
    return torch.complex(x.cos(), 2 * x.sin()).conj()


@register(inputs=[Input("x", shape=("n",))])
def conj_pair(x):
    """A tuple output: a real leaf, and a dict holding a lazily conjugated polar."""
    return x.sin(), {"z": torch.polar(x.exp(), x).conj()}


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def conj_aux(x):
    """A real scalar output, its aux a lazily conjugated phase beside a plain tensor."""
    return (x.sin() * x).sum(), {
        "phase": torch.polar(torch.ones_like(x), x).conj(),
        "abs": x.abs(),
    }


@register(inputs=[Input("x", shape=("n",))])
def conj_adjoint(x):
    """The adjoint (.mH) of a complex matrix: a conjugated view that is also transposed."""
    return torch.complex(torch.outer(x, x.cos()), torch.outer(x.sin(), x)).mH
