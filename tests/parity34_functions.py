"""Functions for tests/test_parity_round34.py, round 34 of PyTorch's own torch.func test
cases (test_vmap.py's randomness and fallback cases, vmap against a Python loop): what a
stacked batch of several clients' requests (one vmapped call) may answer otherwise than
each request alone."""

from __future__ import annotations

import random

import numpy as np
import torch


def numpy_noise(x):
    """x plus noise from numpy's global generator, which torch's vmap does not see (no
    "randomness error mode" for it): one call under vmap draws once for every example."""
    return x + torch.from_numpy(np.random.standard_normal(tuple(x.shape))).to(x.dtype)


def python_noise(x):
    """x scaled by a draw of Python's ``random``: one draw a call, as numpy's above."""
    return x * random.random()


def torch_noise(x):
    """x plus torch's own noise: vmap refuses it (randomness="error", its default)."""
    return x + torch.rand_like(x)


def grad_off_aux(x):
    """A scalar whose part computed under no_grad makes its Hessian torch's own strategy,
    which a stacked batch runs example by example, and a plain aux value read off x
    (``float``: no vmap could run it, the loop does)."""
    with torch.no_grad():
        shift = (2 * x).sum()
    return (x**3).sum() + shift, {"first": float(x.detach()[0]), "sin": x.sin()}


def grad_off(x):
    """grad_off_aux's scalar alone (no aux): vmap runs it, torch.func.hessian's strategy too."""
    with torch.no_grad():
        shift = (2 * x).sum()
    return (x**3).sum() + shift


def flat(x):
    """x flattened with ``view``: torch's vmap over dim 1 of x refuses it (the slice's
    strides), where each example alone, contiguous as sent, runs."""
    v = x.view(-1)
    return v * v.flip(0)


def numpy_scaled(x):
    """x scaled by one numpy draw a call: every derivative of one call is that scale."""
    return x * (1.0 + float(np.random.rand()))


def python_scaled_energy(x):
    """A scalar, (x . x) scaled by one draw of Python's ``random`` a call."""
    return (x * x).sum() * (1.0 + random.random())
