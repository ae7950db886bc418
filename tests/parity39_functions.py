"""Functions for tests/test_parity_round39.py.

1. State a function keeps across calls where the engine's kept-state walk
   (engine/kept_state.py) did not look before round 39: an ``array.array``, a
   ``bytearray``, a numpy array past 64 KiB, each written in place, and a Python
   generator's paused frame (a count in a local, a loop over ``range``). Each scalar is
   ``(x**3).sum()`` times what its state says, so its Hessian and forward-mode Jacobian
   follow the state that torch.func's one call sees; ``state_of`` reads the state
   without stepping it.
2. test_eager_transforms.py's cases replayed this round (see the test module).
"""

from __future__ import annotations

import array

import numpy as np
import torch
from jacobian_service import Input, register

ARR = array.array("d", [0.0])
BYTES = bytearray(1)
BIG = np.zeros((256, 256))  # (512 KiB: past the walk's old 64 KiB bound)


def _steps():
    n = 0
    while True:
        n += 1
        yield n


def _ranged():
    for i in range(1, 10**6):
        yield i


STEPS = _steps()
RANGED = _ranged()


@register(inputs=[Input("x", shape=("n",))])
def arr_count(x):
    ARR[0] += 1
    return (x**3).sum() * ARR[0]


@register(inputs=[Input("x", shape=("n",))])
def bytes_count(x):
    BYTES[0] = (BYTES[0] + 1) % 256
    return (x**3).sum() * BYTES[0]


@register(inputs=[Input("x", shape=("n",))])
def big_count(x):
    BIG[:] += 1  # (the whole running buffer, in place)
    return (x**3).sum() * float(BIG[0, 0])


@register(inputs=[Input("x", shape=("n",))])
def gen_count(x):
    return (x**3).sum() * next(STEPS)


@register(inputs=[Input("x", shape=("n",))])
def range_count(x):
    return (x**3).sum() * next(RANGED)


@register(inputs=[Input("x", shape=("n",))])
def gen_vec(x):
    """A vector output, for batched Jacobians."""
    return x**2 * next(STEPS)


@register(inputs=[Input("x", shape=())])
def state_of(x):
    """Each state above as a number (x only gives the dtype), none stepped."""
    steps = STEPS.gi_frame.f_locals.get("n", 0)
    ranged = RANGED.gi_frame.f_locals.get("i", 0)
    return torch.tensor([ARR[0], BYTES[0], BIG[0, 0], BIG[-1, -1], steps, ranged], dtype=x.dtype)
