"""PyTorch's own torch.func test cases, round 37: state a function keeps across its calls
that the engine did not see, its batched requests, and caches drawn from numpy's or
Python's global generator, each request compared with torch.func's one call.

1. The engine may call a function several times for one request (a Hessian's strategies
   and checks, forward mode's check, a jvp's output beside its products) where torch.func
   calls it once; round 36 replays each call from the state the first began in
   (kept_state.Replay), for the state its walk sees. It did not see a module's attribute
   (``S.N += 1``), a class's (``Counted.calls``, ``type(self).n``, ``cls.n`` in a
   classmethod it calls), a function's own (``f.calls += 1``), a slotted object's
   member, a numpy array written in place, a deque, a generator object of the
   function's own (``random.Random``, ``np.random.default_rng``, ``RandomState``) or an
   ``itertools.count``: a Hessian of ``(x**3).sum() * S.N`` was answered 13 steps on
   (``66 x`` where torch's is ``6 x``), and every request stepped the state 13 times.
2. ``batched: true`` requests were not replayed at all: a counter's batched Jacobian
   stepped it 5 times and was answered 5 steps on, its Hessian 13 (torch's
   ``vmap(jacrev(f))`` calls it once). Where vmap cannot run the function its examples
   each are a call of their own (round 36: ``[f(x) for x in xs]``): its Jacobian was
   then checked at another state and computed again, 9 steps, each example 6 on.
3. A cache filled on first use from numpy's or Python's global generator was emptied for
   each later call of the request (the Replay) and filled with other numbers (only
   torch's generators were put back): one Hessian mixed weights, neither torch.func's
   nor those the cache kept.

The real engine in-process (no server), one for the module, as round 36; and one app
serving the module, its engine in a process of its own, for 1 and 2 over HTTP.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import random
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import pytest
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call

from . import parity37_functions as F
from . import parity37_state as S
from .conftest import ready_app
from .test_parity_round7 import answer, post, wire_tree

X = np.array([1.0, -2.0, 0.5])
XS = np.stack([X, 2 * X, -0.5 * X])
V = np.array([0.3, 0.1, -1.0])
f = torch.func


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    yield Engine(torch.device("cpu"), 1 << 30)


def spec(fn: Any, name: str) -> FunctionSpec:
    return FunctionSpec(name, fn, (Input("x", shape=("n",), dtype="float64"),))


def call(sp: FunctionSpec, x: np.ndarray, **options: Any) -> Call:
    return Call(sp, [x], ["float64"], deadline=time.monotonic() + 60, **options)


def _set_count(text: str) -> None:
    F.COUNT = itertools.count(int(text[len("count("):-1]))


# fn -> (read its state: a comparable copy, put a read state back)
STATE: dict[Any, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    F.module_attr: (lambda: S.N, lambda s: setattr(S, "N", s)),
    F.function_attr: (lambda: F.function_attr.calls, lambda s: setattr(F.function_attr, "calls", s)),
    F.class_attr: (lambda: F.Counted.calls, lambda s: setattr(F.Counted, "calls", s)),
    F.type_attr: (lambda: F.Scaled.n, lambda s: setattr(F.Scaled, "n", s)),
    F.classmethod_attr: (lambda: F.Bumped.n, lambda s: setattr(F.Bumped, "n", s)),
    F.slotted: (lambda: F.SLOTTED.n, lambda s: setattr(F.SLOTTED, "n", s)),
    F.np_buffer: (lambda: F.ACC.tolist(), lambda s: F.ACC.__setitem__(slice(None), s)),
    F.deque_steps: (lambda: list(F.HISTORY), lambda s: (F.HISTORY.clear(), F.HISTORY.extend(s))),
    F.count_next: (lambda: repr(F.COUNT), _set_count),  # (reading a count's position must not step it)
    F.py_rng: (lambda: F.PY_RNG.getstate(), F.PY_RNG.setstate),
    F.np_rng: (lambda: copy.deepcopy(F.NP_RNG.bit_generator.state), lambda s: setattr(F.NP_RNG.bit_generator, "state", s)),
    F.random_state: (lambda: F.RANDOM_STATE.get_state(), F.RANDOM_STATE.set_state),
}

ROUTES = [
    ("hessian", {}, lambda g, tx: f.hessian(g)(tx)),
    ("jacobian", {"mode": "fwd"}, lambda g, tx: f.jacfwd(g)(tx)),
    ("jvp", {"vectors": V}, lambda g, tx: f.jvp(g, (tx,), (torch.from_numpy(V),))[1]),
    ("hvp", {"vectors": V}, lambda g, tx: f.jvp(f.grad(g), (tx,), (torch.from_numpy(V),))[1]),
]


def same_state(a: Any, b: Any) -> bool:
    return pickle.dumps(a) == pickle.dumps(b)


@pytest.mark.parametrize("fn", list(STATE), ids=lambda fn: fn.__name__)
def test_a_request_of_a_function_keeping_state_the_walk_missed_answers_torchs_one_call(engine, fn):
    read, write = STATE[fn]
    sp = spec(fn, f"{fn.__name__}_37")
    for route, options, torchs in ROUTES:
        for _ in range(2):  # (the second request from the state the first left)
            before = read()
            got = getattr(engine, route)(call(sp, X, **options)).value
            after = read()
            write(before)
            want = torchs(fn, torch.from_numpy(X)).detach().numpy()  # torch.func's one call
            assert same_state(read(), after), (route, options)  # one step a request (before: up to 13)
            write(after)
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{route} {options}")


@pytest.mark.parametrize("route, torchs", [("jacobian", f.jacrev), ("hessian", f.hessian)])
def test_a_batched_request_calls_the_function_once_as_torchs_vmap(engine, route, torchs):
    for fn, read, write in [(F.counter, lambda: F.STEPS, lambda s: setattr(F, "STEPS", s)),
                            (F.counter_vec, lambda: S.N, lambda s: setattr(S, "N", s))]:
        sp = spec(fn, f"{fn.__name__}_{route}_batched")
        for _ in range(2):
            before = read()
            got = getattr(engine, route)(call(sp, XS, batched=True)).value
            assert read() == before + 1, (fn.__name__, route, read() - before)  # before: 5 (jacobian), 13 to 16 (hessian)
            write(before)
            want = f.vmap(torchs(fn))(torch.from_numpy(XS)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=fn.__name__)


@pytest.mark.parametrize("route, torchs", [("jacobian", f.jacrev), ("hessian", f.hessian)])
def test_a_batched_request_whose_vmap_fails_answers_each_example_as_its_own_call(engine, route, torchs):
    """vmap cannot run ``.item()``: each example alone, in turn, as round 36's evaluate."""
    sp = spec(F.counter_item, f"counter_item_{route}_batched")
    start = F.ITEMS
    got = getattr(engine, route)(call(sp, XS, batched=True)).value
    assert F.ITEMS == start + len(XS)  # before: 9 (jacobian), 15 (hessian)
    F.ITEMS = start
    want = np.stack([torchs(F.counter_item)(torch.from_numpy(x)).numpy() for x in XS])
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("fn, cache, seed", [(F.np_cache, F.NP_CACHE, np.random.seed), (F.py_cache, F.PY_CACHE, random.seed)],
                         ids=["numpy", "python"])
def test_a_cache_filled_from_a_global_generator_is_filled_once_a_request(engine, fn, cache, seed):
    sp = spec(fn, f"{fn.__name__}_37")
    cache.clear()
    seed(37)
    got = engine.hessian(call(sp, X)).value
    kept = cache["w"].clone()
    cache.clear()
    seed(37)
    want = f.hessian(fn)(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)  # before: neither torch's nor the cache's weights
    torch.testing.assert_close(kept, cache["w"], rtol=0, atol=0)  # the cache the engine left is torch's


def test_over_http_a_module_attribute_and_a_batched_request_step_once():
    """Through an app and its engine process: the count read before and after each
    request (module_count), the answer torch.func's at the count its one call sees."""
    with ready_app("tests.parity37_functions") as c:
        def count() -> float:
            return float(answer(post(c, "module_count", "evaluate", [X]), "output")[0])

        tx, txs = torch.from_numpy(X), torch.from_numpy(XS)
        cases = [("module_attr", "hessian", [X], {}, lambda g: f.hessian(g)(tx)),
                 ("module_attr", "jvp", [X], {"tangents": wire_tree(V)},
                  lambda g: f.jvp(g, (tx,), (torch.from_numpy(V),))[1]),
                 ("counter_vec", "jacobian", [XS], {"batched": True}, lambda g: f.vmap(f.jacrev(g))(txs)),
                 ("counter_vec", "hessian", [XS], {"batched": True}, lambda g: f.vmap(f.hessian(g))(txs))]
        for name, route, inputs, options, torchs in cases:
            n = count()
            got, _ = answer(post(c, name, route, inputs, **options), route)
            assert count() == n + 1, (name, route, count() - n)  # before: 13, 2, 5 and 16 steps
            scale = n + 1
            want = torchs((lambda z: (z**3).sum() * scale) if name == "module_attr" else (lambda z: z**2 * scale))
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, err_msg=f"{name} {route}")


def test_stacked_requests_of_a_module_attribute_counter_answer_as_each_alone_in_turn(engine):
    """Request batching (round 36's scheduler run): four clients' requests stacked into
    one call stepped ``S.N`` once for all, unseen, and each was answered the same N."""
    from .test_parity_round36 import XS as FOUR, served

    sp = FunctionSpec("counter_vec_stacked", F.counter_vec, (Input("x", shape=("n",), dtype="float64"),))
    start = S.N
    answers = served(engine, sp, "evaluate")
    assert S.N == start + 1 + len(FOUR)  # one lone request first, then each of the four alone
    for i, ((result, error, size), x) in enumerate(zip(answers, FOUR)):
        assert error is None and size == 1  # before: one stacked call of 4 answered them all
        np.testing.assert_allclose(result.value, x**2 * (start + 2 + i), rtol=1e-12)
    assert not engine.can_batch(sp.name)
