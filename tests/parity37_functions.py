"""Functions for tests/test_parity_round37.py: state a function keeps across its calls
where the engine's kept-state walk (engine/kept_state.py) did not look before round 37
(a module's, class's or function's attribute, a slotted object, a numpy array, a deque, a generator
object, an itertools.count), and caches filled from numpy's or Python's global
generator. Each scalar is ``(x**3).sum()`` times what its state says, so its Hessian
and forward-mode Jacobian follow the state that torch.func's one call sees."""

from __future__ import annotations

import collections
import itertools
import random

import numpy as np
import torch
from jacobian_service import Input, register

from . import parity37_state as S


@register(inputs=[Input("x", shape=("n",))])
def module_attr(x):
    """A counter behind a module attribute."""
    S.N += 1
    return (x**3).sum() * S.N


@register(inputs=[Input("x", shape=("n",))])
def module_count(x):
    """module_attr's count (x only gives the dtype), read without stepping it."""
    return torch.tensor(float(S.N), dtype=x.dtype)


def function_attr(x):
    """A function's "static" counter, an attribute of its own."""
    function_attr.calls += 1
    return (x**3).sum() * function_attr.calls


function_attr.calls = 0


class Counted:
    calls = 0


def class_attr(x):
    Counted.calls += 1
    return (x**3).sum() * Counted.calls


class Bumped:
    n = 0

    @classmethod
    def bump(cls):
        cls.n += 1  # (the function's own code names neither the class's n nor cls)
        return cls.n


def classmethod_attr(x):
    return (x**3).sum() * Bumped.bump()


class Scaled(torch.nn.Module):
    n = 0

    def forward(self, x):
        type(self).n += 1  # (a class attribute reached through the instance)
        return (x**3).sum() * self.n


SCALED = Scaled()


def type_attr(x):
    return SCALED(x)


class Slotted:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


SLOTTED = Slotted()


def slotted(x):
    SLOTTED.n += 1
    return (x**3).sum() * SLOTTED.n


ACC = np.zeros(2)


def np_buffer(x):
    ACC[:] += 1  # (in place: the name is never rebound)
    return (x**3).sum() * float(ACC[0])


HISTORY = collections.deque([0.0], maxlen=4)


def deque_steps(x):
    HISTORY.append(HISTORY[-1] + 1)
    return (x**3).sum() * HISTORY[-1]


COUNT = itertools.count(1)


def count_next(x):
    return (x**3).sum() * next(COUNT)


PY_RNG = random.Random(37)


def py_rng(x):
    return (x**3).sum() * (1 + PY_RNG.random())


NP_RNG = np.random.default_rng(37)


def np_rng(x):
    return (x**3 * torch.from_numpy(1 + NP_RNG.random(3)).to(x.dtype)).sum()


RANDOM_STATE = np.random.RandomState(37)


def random_state(x):
    return (x**3).sum() * (1 + RANDOM_STATE.rand())


STEPS = 0


def counter(x):
    """A global counter (round 36's), for batched requests."""
    global STEPS
    STEPS += 1
    return (x**3).sum() * STEPS


@register(inputs=[Input("x", shape=("n",))])
def counter_vec(x):
    """x**2 times the module attribute counter: a vector output, for batched Jacobians."""
    S.N += 1
    return x**2 * S.N


ITEMS = 0


def counter_item(x):
    """A counter, then ``.item()``, which vmap cannot run: a batched request's examples
    run one by one, each a call of its own."""
    global ITEMS
    ITEMS += 1
    return (x**3).sum() * ITEMS * (1.0 if x.sum().item() > -1e300 else 0.0)


NP_CACHE: dict[str, torch.Tensor] = {}


def np_cache(x):
    """Weights drawn from numpy's global generator on first use."""
    w = NP_CACHE.get("w")
    if w is None:
        w = NP_CACHE["w"] = torch.from_numpy(np.random.rand(3))
    return (x**3 * w.to(x.dtype)).sum()


PY_CACHE: dict[str, torch.Tensor] = {}


def py_cache(x):
    """Weights drawn from Python's global generator on first use."""
    w = PY_CACHE.get("w")
    if w is None:
        w = PY_CACHE["w"] = torch.tensor([random.random() for _ in range(3)], dtype=torch.float64)
    return (x**3 * w.to(x.dtype)).sum()
