"""Review round 9: engine/kept_state.py's watch of what a function keeps across calls
(parity round 36) ran the user's code and walked whole containers.

1. The walk read objects through their own hooks: ``getattr(v, "__dict__")`` (a
   ``__dict__`` property, a forwarding ``__getattr__`` whose target was never set: a
   RecursionError), ``getattr(type(v), "forward")`` (a metaclass's ``__getattr__``), a
   dict subclass's ``values()``, a tensor subclass's ``__torch_function__`` (numel,
   detach, clone, _version). A function that works in-process, naming such a global, had
   every request answered 422 ``function_error`` with the hook's exception; a counting
   tensor subclass counted 14 calls the function never made.
2. A container's items were walked and compared all of them, past the node bound: a
   function naming a global list of a million floats paid ~0.34 s to take and ~0.13 s to
   compare a request (in-process, timeit); now a container past the item bound is not
   watched.

3-6 below: one Replay for the process (an engine per device, each in its thread), a
random cache redrawn by later calls, weights copied at every batch, a reordered dict.

In-process engine, no server.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_service.engine import kept_state
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call


class Forwarding:
    """A wrapper forwarding what it lacks to ``inner``, never set: any missing name
    recurses (RecursionError, not AttributeError)."""

    __slots__ = ("inner",)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class NoDict:
    @property
    def __dict__(self) -> Any:  # type: ignore[override]
        raise RuntimeError("__dict__ read")


class Meta(type):
    def __getattr__(cls, name: str) -> Any:
        raise KeyError(name)


class WithMeta(metaclass=Meta):
    pass


class Table(dict):
    def values(self) -> Any:
        raise RuntimeError("values read")


class Counting(torch.Tensor):
    calls = 0

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        Counting.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


FORWARDING = Forwarding()
NO_DICT = NoDict()
WITH_META = WithMeta()
TABLE = Table(scale=2.0)
COUNTING = torch.ones(3, dtype=torch.float64).as_subclass(Counting)
BIG = [0.5] * 100_000  # (past the bound, 16,384 items)


def forwarding(x):
    return x * 2 if FORWARDING is not None else x


def no_dict(x):
    return x * 3 if NO_DICT is not None else x


def with_meta(x):
    return x * 4 if WITH_META is not None else x


def table(x):
    return x * TABLE["scale"]


def counting(x):
    return x * 5 if COUNTING is not None else x


def big(x):
    return x * BIG[0]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    yield Engine(torch.device("cpu"), 1 << 30)


def call(fn: Any, x: np.ndarray) -> Call:
    sp = FunctionSpec(fn.__name__, fn, (Input("x", shape=("n",), dtype="float64"),))
    return Call(sp, [x], ["float64"], deadline=time.monotonic() + 60)


X = np.array([1.0, -2.0, 0.5])


@pytest.mark.parametrize("fn", [forwarding, no_dict, with_meta, table, counting])
def test_a_global_with_its_own_hooks_is_watched_without_running_them(engine, fn):
    tx = torch.from_numpy(X)
    start = Counting.calls
    value = engine.evaluate(call(fn, X)).value  # before: 422 function_error (the hook's exception)
    jacobian = engine.jacobian(call(fn, X)).value
    np.testing.assert_allclose(value, fn(tx).numpy(), rtol=1e-15)
    np.testing.assert_allclose(jacobian, torch.func.jacrev(fn)(tx).numpy(), rtol=1e-15)
    assert Counting.calls == start  # before: 14 and more of its own calls, the function made none


def test_a_container_past_the_item_bound_is_not_walked():
    kept = kept_state.KeptState(big)  # before: every item walked, the list copied and compared
    assert not any(lst is BIG for lst, _ in kept._lists)
    assert not kept.changed()


# 3. The request whose calls are replayed (kept_state.active) was one for the process: an
#    in-process server with several devices runs an engine per device, each in a thread
#    of its own. While one engine's request was in its function, the other's saw a
#    Replay active and took none of its own: a counted function's Hessian there stepped
#    its count 7 times, as before round 36 (or its calls ran through the other's Replay).

STARTED = threading.Event()
RELEASE = threading.Event()
COUNT = [0]


def waiting(x):
    STARTED.set()
    RELEASE.wait(30)
    return x * 2


def counted(x):
    COUNT[0] += 1
    return (x**3).sum() * COUNT[0]


def test_an_engine_in_another_thread_replays_its_own_request():
    first, second = (Engine(torch.device("cpu"), 1 << 30) for _ in range(2))
    answers: list[Any] = []
    other = threading.Thread(target=lambda: answers.append(first.evaluate(call(waiting, X)).value))
    other.start()
    try:
        assert STARTED.wait(30)  # the first engine's request is in its function, its Replay set
        before = COUNT[0]
        got = second.hessian(call(counted, X)).value
        stepped = COUNT[0] - before
    finally:
        RELEASE.set()
        other.join(30)
    want = torch.func.hessian(lambda z: (z**3).sum() * (before + 1))(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)  # before: 7 steps on
    assert stepped == 1
    np.testing.assert_allclose(answers[0], X * 2)


# 4. A cache filled on first use with random weights: each later call of the first
#    request began from the empty cache again (the Replay) and drew weights of its own;
#    the Hessian answered was of weights other than those the request left cached.

CACHE: dict[str, torch.Tensor] = {}


def cached_random(x):
    if "w" not in CACHE:
        CACHE["w"] = torch.randn(3, 3, dtype=torch.float64)
    return torch.tanh(CACHE["w"] @ x).sum()


def test_a_random_cache_filled_on_first_use_answers_the_weights_it_keeps(engine):
    CACHE.clear()
    got = engine.hessian(call(cached_random, X)).value
    want = torch.func.hessian(cached_random)(torch.from_numpy(X)).numpy()  # the weights left cached
    np.testing.assert_allclose(got, want, rtol=1e-12)  # before: another draw's Hessian


NAMESPACE = types.SimpleNamespace(n=0)


def namespace_counted(x):
    NAMESPACE.n += 1
    return (x**3).sum() * NAMESPACE.n


def test_a_counter_in_a_simple_namespace_is_still_watched(engine):
    """(its __dict__ a C member, not a getset: read as the interpreter's own too)"""
    before = NAMESPACE.n
    got = engine.hessian(call(namespace_counted, X)).value
    assert NAMESPACE.n == before + 1
    want = torch.func.hessian(lambda z: (z**3).sum() * (before + 1))(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


# 5. Tensors copied at each snapshot (to be put back), up to 16 MiB: a model's weights
#    too, at every stacked batch and every per-example request, for good (~10 ms for a
#    16 MiB weight, beside a 4 ms forward of 8 examples). A weight (a leaf requiring
#    grad) is watched by its version only; a buffer is still copied and put back.

LAYER = torch.nn.Linear(64, 64, dtype=torch.float64)
LAYER.register_buffer("calls", torch.zeros((), dtype=torch.float64))


def layer(x):
    LAYER.calls += 1
    return LAYER(x) * LAYER.calls


def test_a_models_weights_are_watched_not_copied():
    kept = kept_state.KeptState(layer)
    copied = {id(t) for t, _, copy in kept._tensors if copy is not None}
    watched = {id(t) for t, _, _ in kept._tensors}
    assert id(LAYER.weight) in watched and id(LAYER.weight) not in copied  # before: copied
    assert id(LAYER.calls) in copied
    before = LAYER.calls.clone()
    layer(torch.zeros(64, dtype=torch.float64))
    assert kept.changed() and kept.restore()
    assert torch.equal(LAYER.calls, before)


# 6. (This round's walk, compared in order:) an LRU's move_to_end, which changes no item,
#    is no change, as main's per-key compare had it.

RECENT: dict[Any, float] = {"a": 1.0, "b": 2.0}


def recent(x):
    key = "a" if list(RECENT)[0] == "a" else "b"
    RECENT[key] = RECENT.pop(key)  # (moved to the end)
    return x * RECENT["a"]


def test_a_dict_reordered_is_no_change():
    kept = kept_state.KeptState(recent)
    recent(torch.zeros(3))
    assert not kept.changed()
    RECENT["a"] = 3.0
    assert kept.changed()
    RECENT["a"] = 1.0
