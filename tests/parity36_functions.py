"""Functions for tests/test_parity_round36.py: state a function keeps across its calls
(a Python counter, a module-level buffer it adds to, an nn.Module's buffer and attribute),
which a stacked batch of several clients' requests (one vmapped call) changed once for
all its members."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

COUNT = 0
BUF = torch.zeros(3, dtype=torch.float64)
STEPS = [0]


def counter(x):
    """x times how many times it has been called: a Python global counter."""
    global COUNT
    COUNT += 1
    return x * COUNT


def buffer_add(x):
    """x times a module-level buffer that every call adds 1 to, in place."""
    BUF.add_(1)
    return x * BUF


def list_counter(x):
    """A counter kept in a list (a container's item, not a global rebound)."""
    STEPS[0] += 1
    return x * STEPS[0]


class Calls(torch.nn.Module):
    """An nn.Module counting its calls in a buffer (in place) and an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.seen = 0

    def forward(self, x):
        self.calls += 1
        self.seen += 1
        return x * self.calls + self.seen


MODULE = Calls()


def module_calls(x):
    return MODULE(x)


def make_closure():
    n = 0

    def closure_counter(x):
        """A counter in a closure cell (nonlocal)."""
        nonlocal n
        n += 1
        return x * n

    return closure_counter


closure_counter = make_closure()

ITEM_CALLS = 0


def counter_item(x):
    """A counter, then ``.item()``, which torch's vmap cannot run: the counter has moved
    by the time vmap fails and the examples run one by one."""
    global ITEM_CALLS
    ITEM_CALLS += 1
    return x * ITEM_CALLS * (1.0 if x.sum().item() > -1e300 else 0.0)


def pure(x):
    """Keeps nothing: its requests stay stacked."""
    return x.sin() * 2


CALLS = 0


@register(inputs=[Input("x", shape=("n",))])
def cubic_counted(x):
    """A scalar scaled by its call count: its Hessian, gradient products and forward-mode
    Jacobian follow the count of the one call torch.func makes."""
    global CALLS
    CALLS += 1
    return (x**3).sum() * CALLS


class Scaled(torch.nn.Module):
    """sin(x) times how many times it has been called (an attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += 1
        return x.sin() * self.seen


SCALED = Scaled()


def sin_counted(x):
    return SCALED(x)


@register(inputs=[Input("x", shape=("n",))])
def calls_so_far(x):
    """cubic_counted's count (x only gives the dtype), read without stepping it."""
    return torch.tensor(float(CALLS), dtype=x.dtype)


_CACHE: dict[str, torch.Tensor] = {}


def cached_weights(x):
    """A cache filled on first use (as the built-in mlp's weights per device): state
    that changes once, not a counter."""
    w = _CACHE.get("w")
    if w is None:
        w = _CACHE.setdefault("w", torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
    return (x.sin() * w).sum() * x
