"""PyTorch's own torch.func test cases, round 36: state a function keeps across its calls,
on request batching (several clients' equal requests stacked into one vmapped call) and
on a per-example request whose vmap fails, compared with each request alone, in order.

1. A stacked batch is one call of the function for every member. A function keeping
   state across calls (``global N; N += 1``, ``BUF.add_(1)`` on a module-level buffer,
   an ``nn.Module``'s ``self.calls += 1``, a counter in a list or a closure cell) changed
   it once for all of them: four clients' ``x * N`` were all answered ``2x``, where one
   after another alone they are ``2x, 3x, 4x, 5x``. The engine now takes what the
   function reaches (engine/kept_state.py) before a stacked call; a call that changed it
   has it put back, its members run alone (each changing it once, as alone), and the
   function's requests are not stacked again.
2. A stacked call that failed (vmap cannot run the function) had changed the state
   before its members ran again alone: one step too many for every later request. Put
   back now. Likewise a ``batched: true`` request whose vmap fails and whose examples run
   one by one: the failed try's step was made twice (``[2x, 3x, 4x]`` for ``[x, 2x, 3x]``'s
   loop ``[1x, 2x, 3x]``).
3. One request alone: the engine may call the function several times (a Hessian's
   strategies and checks, forward mode's check against reverse, a jvp's output and its
   products) where torch.func calls it once, and each call stepped the state: a counted
   ``(x**3).sum() * n`` answered its Hessian 7 steps on (``18 x`` where torch's is
   ``6 x``), ``mode=fwd`` Jacobians and jvp / hvp products 4 and 2 steps on, and every
   later request saw those steps. Every call of one request now begins from the state the
   first began in, and the request leaves it as that call did (kept_state.Replay).
4. Guards: a pure function stays stacked.

The real engine and its scheduler in-process (no server), one engine for the module, as
round 34; and one app serving the module, its engine in a process of its own, for 3.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.scheduler import Job, Worker
from jacobian_service.types import Call

from . import parity36_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, post, wire_tree

XS = [np.array([1.0, -2.0, 0.5]) * (i + 1) for i in range(4)]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    yield Engine(torch.device("cpu"), 1 << 30)


def spec(fn: Any, name: str) -> FunctionSpec:
    return FunctionSpec(name, fn, (Input("x", shape=("n",), dtype="float64"),))


def call(sp: FunctionSpec, x: np.ndarray, **options: Any) -> Call:
    return Call(sp, [x], ["float64"], deadline=time.monotonic() + 60, **options)


def served(engine: Engine, sp: FunctionSpec, kind: str) -> list[tuple[Any, Any, int]]:
    """Each of ``XS`` as one client's request through the scheduler: one alone first (a
    key seen for the first time runs alone), then all four queued together, which the
    scheduler takes as one group. -> (result, error, batch size) per request."""
    worker = Worker(engine, max_queue=16, max_batch=8)
    answers: dict[int, tuple[Any, Any, int]] = {}

    def submit(i: int, x: np.ndarray) -> None:
        c = call(sp, x, client=f"client{i}")
        settle = lambda r, e, info, i=i: answers.__setitem__(i, (r, e, info.batch_size))  # noqa: E731
        worker.submit(Job(kind, c, settle, deadline=c.deadline))

    submit(-1, np.zeros(3))
    worker.run(worker.take(lambda s: None))
    for i, x in enumerate(XS):
        submit(i, x)
    first = worker.take(lambda s: None)
    assert len(first) == len(XS)  # the premise: the four were taken as one group
    worker.run(first)
    while worker.has_work():
        worker.run(worker.take(lambda s: None))
    return [answers[i] for i in range(len(XS))]


def lone(fn: Any, kind: str, x: np.ndarray) -> np.ndarray:
    """What one in-process call answers (torch.func.jacrev's for a Jacobian)."""
    tx = torch.from_numpy(x)
    return (fn(tx) if kind == "evaluate" else torch.func.jacrev(fn)(tx)).detach().numpy()


@pytest.mark.parametrize(
    "fn, kind",
    [
        (F.counter, "evaluate"),
        (F.counter, "jacobian"),
        (F.buffer_add, "evaluate"),
        (F.list_counter, "evaluate"),
        (F.list_counter, "jacobian"),
        (F.closure_counter, "evaluate"),
        (F.module_calls, "evaluate"),
    ],
)
def test_stacked_requests_of_a_function_keeping_state_answer_as_each_alone_in_turn(engine, fn, kind):
    sp = spec(fn, f"{fn.__name__}_{kind}")
    answers = served(engine, sp, kind)
    # after the stacked group, one more lone call in-process: what the next client gets
    tail = lone(fn, kind, XS[0])
    # The same calls again, in-process, from the same state: each request alone in turn.
    # The state the group started from is read back off the answers' own run: replayed
    # here by rewinding the function's state by the calls it made (len(XS) + 1).
    rewind(fn, len(XS) + 1)
    want = [lone(fn, kind, x) for x in XS]
    for (result, error, size), w in zip(answers, want):
        assert error is None, error
        assert size == 1  # each alone (before: one stacked call of 4 answered them all)
        np.testing.assert_allclose(result.value, w, rtol=1e-12)
    np.testing.assert_allclose(lone(fn, kind, XS[0]), tail, rtol=1e-12)  # no step lost, none made twice
    assert not engine.can_batch(sp.name) and engine.profiles[sp.name].vmap_function


def rewind(fn: Any, steps: int) -> None:
    """Put a counting function's state back by ``steps`` calls."""
    if fn is F.counter:
        F.COUNT -= steps
    elif fn is F.buffer_add:
        F.BUF.sub_(steps)
    elif fn is F.list_counter:
        F.STEPS[0] -= steps
    elif fn is F.closure_counter:
        i = fn.__code__.co_freevars.index("n")
        fn.__closure__[i].cell_contents -= steps
    elif fn is F.module_calls:
        F.MODULE.calls.sub_(steps)
        F.MODULE.seen -= steps


def test_a_failed_stacked_call_leaves_no_step_behind(engine):
    """vmap cannot run ``.item()``: the stacked call fails after the counter moved; its
    members run alone, and the counter is where their lone calls leave it."""
    sp = spec(F.counter_item, "counter_item_stacked")
    start = F.ITEM_CALLS
    answers = served(engine, sp, "evaluate")
    for i, ((result, error, size), x) in enumerate(zip(answers, XS)):
        assert error is None and size == 1
        np.testing.assert_allclose(result.value, x * (start + 2 + i), rtol=1e-12)
    assert F.ITEM_CALLS == start + 1 + len(XS)  # before: one more, the failed stacked call's


def test_a_batched_request_whose_vmap_fails_loops_from_the_state_it_started_in(engine):
    sp = spec(F.counter_item, "counter_item_batched")
    xs = np.stack(XS[:3])
    start = F.ITEM_CALLS
    r = engine.evaluate(call(sp, xs, batched=True))
    # in-process: vmap refuses .item(), so a loop over the examples
    F.ITEM_CALLS = start
    want = np.stack([lone(F.counter_item, "evaluate", x) for x in xs])
    np.testing.assert_allclose(r.value, want, rtol=1e-12)  # before: [2x, 3x, 4x]
    assert F.ITEM_CALLS == start + 3


def test_a_pure_function_stays_stacked(engine):
    sp = spec(F.pure, "pure")
    answers = served(engine, sp, "jacobian")
    for (result, error, size), x in zip(answers, XS):
        assert error is None and size == len(XS)
        np.testing.assert_allclose(result.value, lone(F.pure, "jacobian", x), rtol=1e-12)
    assert engine.can_batch("pure")


V = np.array([0.3, 0.1, -1.0])


def alone_routes(fn: Any) -> list[tuple[str, dict[str, Any], Any]]:
    """(route, options, in-process torch.func) for one request alone."""
    routes = [
        ("evaluate", {}, lambda x: fn(x)),
        ("jacobian", {}, lambda x: torch.func.jacrev(fn)(x)),
        ("jacobian", {"mode": "fwd"}, lambda x: torch.func.jacfwd(fn)(x)),
        ("jacobian", {"chunk_size": 1}, lambda x: torch.func.jacrev(fn, chunk_size=1)(x)),
        ("hessian", {}, lambda x: torch.func.hessian(fn)(x)),
        ("jvp", {"vectors": V}, lambda x: torch.func.jvp(fn, (x,), (torch.from_numpy(V),))[1]),
    ]
    if fn is F.cubic_counted:
        routes.append(("hvp", {"vectors": V},
                       lambda x: torch.func.jvp(torch.func.grad(fn), (x,), (torch.from_numpy(V),))[1]))
    else:
        routes.append(("vjp", {"vectors": V}, lambda x: torch.func.vjp(fn, x)[1](torch.from_numpy(V))[0]))
    return routes


def counted(fn: Any) -> int:
    return F.CALLS if fn is F.cubic_counted else F.SCALED.seen


def set_count(fn: Any, n: int) -> None:
    if fn is F.cubic_counted:
        F.CALLS = n
    else:
        F.SCALED.seen = n


@pytest.mark.parametrize("fn", [F.cubic_counted, F.sin_counted])
def test_a_lone_request_of_a_function_keeping_state_calls_it_once_as_torch_does(engine, fn):
    sp = spec(fn, f"{fn.__name__}_alone")
    for route, options, torchs in alone_routes(fn):
        start = counted(fn)
        got = []
        for x in XS[:3]:
            got.append(getattr(engine, route)(call(sp, x, **options)).value)
        stepped = counted(fn) - start
        set_count(fn, start)
        want = [torchs(torch.from_numpy(x)).detach().numpy() for x in XS[:3]]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, err_msg=f"{route} {options}")
        assert stepped == 3, (route, options, stepped)  # one step a request, as torch.func's one call
        set_count(fn, start + 3)
    assert engine.profiles[sp.name].keeps_state


def test_over_http_each_request_steps_the_state_once_and_answers_torchs_one_call():
    """The same through an app and its engine process: the count read before and after
    each request (calls_so_far), the answer torch.func's at the count its one call sees."""
    x = np.array([1.0, -2.0, 0.5])
    f = torch.func
    routes = [("hessian", {}, lambda g, tx: f.hessian(g)(tx)),
              ("jacobian", {"mode": "fwd"}, lambda g, tx: f.jacfwd(g)(tx)),
              ("jvp", {"tangents": wire_tree(V)}, lambda g, tx: f.jvp(g, (tx,), (torch.from_numpy(V),))[1]),
              ("hvp", {"tangents": wire_tree(V)}, lambda g, tx: f.jvp(f.grad(g), (tx,), (torch.from_numpy(V),))[1])]
    with ready_app("tests.parity36_functions") as c:
        def count() -> float:
            return float(answer(post(c, "calls_so_far", "evaluate", [x]), "output")[0])
        for route, options, torchs in routes:
            n = count()
            got, _ = answer(post(c, "cubic_counted", route, [x], **options), route)
            assert count() == n + 1, route  # before: 7 steps (hessian), 4 (mode=fwd), 2 (jvp, hvp)
            want = torchs(lambda z: (z**3).sum() * (n + 1), torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=route)


def test_a_cache_filled_on_first_use_is_watched_only_a_while(engine):
    """A cache a function fills on first use changes its state once: its requests are
    answered as torch's (the first one's later calls refill it), and the watch stops
    after 16 requests (it copied the mlp's weights at every request, for good)."""
    sp = spec(F.cached_weights, "cached_weights")
    F._CACHE.clear()
    for i in range(18):
        x = XS[i % len(XS)]
        got = engine.hessian(call(sp, x)).value if i % 2 else engine.jacobian(call(sp, x)).value
        fn = torch.func.hessian if i % 2 else torch.func.jacrev
        np.testing.assert_allclose(got, fn(F.cached_weights)(torch.from_numpy(x)).numpy(), rtol=1e-12)
    profile = engine.profiles[sp.name]
    assert (profile.state_watched, profile.state_changed, profile.keeps_state) == (16, 1, False)
    assert "w" in F._CACHE


def test_a_function_whose_stacked_batches_change_nothing_is_watched_for_its_first_batches_only(engine, monkeypatch):
    """The kept-state snapshot of a stacked batch (a walk of what the function reaches,
    ~20 us for the built-in mlp, more for a large model's modules) is taken for its first
    _STATE_WATCHED batches that changed nothing, as a lone request's watch stops: every
    batch paid it (the engine's CPU a request under wrk, 0.204 -> 0.227 ms). Its answers
    stay jacrev's."""
    from jacobian_service.engine import core

    taken = []

    class Counted(core.KeptState):
        def __init__(self, fn: Any) -> None:
            taken.append(fn)
            super().__init__(fn)

    monkeypatch.setattr(core, "KeptState", Counted)
    sp = spec(torch.sin, "pure_sin_watch")
    for _ in range(core._STATE_WATCHED + 4):
        results = engine.run_batch("jacobian", [call(sp, x) for x in XS[:2]])
        for result, x in zip(results, XS[:2]):
            np.testing.assert_allclose(result.value, lone(torch.sin, "jacobian", x), rtol=1e-12)
    assert len(taken) == core._STATE_WATCHED
    assert engine.can_batch(sp.name)
