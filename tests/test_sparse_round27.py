"""Sparse request batches cost no more calls of the user's function than their requests alone.

A batch of sparse Jacobians (equal function, shapes and options, stacked by the
scheduler) shares one pattern and colouring and runs its products as one vmap over the
points. What a user saw before (in-process app, a 0.15 s function): a request alone made
3 calls (0.47 s), one a forward pass made only to size the output; a batch of two made 5
calls the first time and 3 after, and with a JVP colouring (mode=fwd, or auto where JVPs
are fewer) 9 calls, 1.37 s, where the two alone made 8 (0.62 s each): the batch's
forward pass was thrown away and each member ran alone. Now: 2 calls alone (0.31 s), and
2 for the whole batch (one vmapped forward pass, one vmapped VJP) once the products are
known to vmap over its points.

The real engine in-process (no server); answers are compared with torch.func.jacrev of
each member alone, aux per member; one member raising fails only that member.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from jacobian_service.engine.core import Engine
from jacobian_service.errors import FunctionError, ResultTooLarge
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.scheduler import Job, Worker
from jacobian_service.types import Call

from . import sparse27_functions as f

N = 24
RNG = np.random.default_rng(27)
COUNTED = FunctionSpec("counted27", f.counted27, (Input("x", shape=("n",), dtype="float64"),), has_aux=True)
PICKY = FunctionSpec("picky27", f.picky27, (Input("x", shape=("n",), dtype="float64"),))
PICKED = FunctionSpec("picked27", f.picked27, (Input("x", shape=("n",), dtype="float64"),
                                                Input("idx", shape=("n",), dtype="int64")))
DEEP = FunctionSpec("deep27", f.deep27, (Input("x", shape=("n",)),))


def _call(spec: FunctionSpec, x: np.ndarray, mode: str) -> Call:
    return Call(spec, [x], ["float64"], mode=mode, sparsity="auto", deadline=time.monotonic() + 60)


def _calls_of(run: Any) -> tuple[Any, int]:
    f.CALLS.clear()
    out = run()
    return out, len(f.CALLS)


def _jacrev(spec: FunctionSpec, x: np.ndarray) -> np.ndarray:
    fn = (lambda t: spec.fn(t)[0]) if spec.has_aux else spec.fn  # (jacrev takes no str aux)
    return torch.func.jacrev(fn)(torch.from_numpy(x)).numpy()


def _check(result: Any, spec: FunctionSpec, x: np.ndarray) -> None:
    np.testing.assert_array_equal(result.value.toarray(), _jacrev(spec, x))  # exactly jacrev's
    if spec.has_aux:
        assert float(result.aux["total"]) == pytest.approx(float(x.sum()), rel=1e-15) and result.aux["label"] == "lz"


@pytest.mark.parametrize("mode", ["auto", "fwd"])
def test_a_sparse_batch_costs_fewer_calls_than_its_requests_alone(mode: str) -> None:
    engine = Engine(torch.device("cpu"), 1 << 30)
    xs = [RNG.standard_normal(N) for _ in range(8)]
    first, _ = _calls_of(lambda: engine.jacobian(_call(COUNTED, xs[0], mode)))  # detects and caches the pattern
    _check(first, COUNTED, xs[0])
    result, alone = _calls_of(lambda: engine.jacobian(_call(COUNTED, xs[1], mode)))
    _check(result, COUNTED, xs[1])
    # One forward pass, one vmap of every VJP; for JVPs, one vmap of them and the VJP that
    # checks them (before: one forward pass more, made only to size the output)
    assert alone == (2 if mode == "auto" else 3), (mode, alone)
    for batch in (xs[2:5], xs[5:8]):  # the first time vmap over the points is checked at each
        results, calls = _calls_of(lambda batch=batch: engine.run_batch("jacobian", [_call(COUNTED, x, mode) for x in batch]))
        assert calls <= 2 + len(batch) <= alone * len(batch), (mode, calls, alone)  # before: 6 and 13 for 3 points
        for r, x in zip(results, batch):
            _check(r, COUNTED, x)
            assert r.sparse_meta["source"] == "detected" and r.sparse_meta["cached"] == "memory"
    assert calls == 2, (mode, calls)  # one vmapped forward pass, one vmapped VJP (before: 3, and 9 for fwd)


def test_a_batch_whose_pattern_follows_the_values_costs_no_more_than_its_requests_alone() -> None:
    """x[idx] with idx an input: each point detects its own pattern, so each member runs
    alone after the batch's vmapped forward pass, from that pass's output and aux. Before:
    7 calls for two new points where one alone made 3 (each member's forward pass again,
    after the batch's); now 5: the batch's forward pass, then each point's trace and VJPs."""
    engine = Engine(torch.device("cpu"), 1 << 30)

    def call(x: np.ndarray, idx: np.ndarray) -> Call:
        return Call(PICKED, [x, idx], ["float64", "int64"], sparsity="auto", mode="auto",
                    deadline=time.monotonic() + 60)

    points = [(RNG.standard_normal(N), RNG.permutation(N)) for _ in range(3)]
    result, alone = _calls_of(lambda: engine.jacobian(call(*points[0])))  # a new point: a forward pass, its trace, the VJPs
    assert result.sparse_meta["value_dependent"] is True
    results, calls = _calls_of(lambda: engine.run_batch("jacobian", [call(*p) for p in points[1:]]))
    assert calls <= alone * 2, (calls, alone)
    for r, (x, idx) in zip(results, points[1:]):
        want = torch.func.jacrev(f.picked27)(torch.from_numpy(x), torch.from_numpy(idx)).numpy()
        np.testing.assert_array_equal(r.value.toarray(), want)
        assert r.sparse_meta["value_dependent"] is True


def test_one_member_raising_fails_only_that_member() -> None:
    """Through the scheduler: the batch fails (vmap cannot branch on one point's value),
    each member runs alone, the raiser gets its 500, the others jacrev's answer."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    worker = Worker(engine, max_queue=10, max_batch=8)
    answers: dict[str, Any] = {}
    xs = {"a": RNG.uniform(0.5, 1.5, N), "bad": -RNG.uniform(0.5, 1.5, N), "b": RNG.uniform(0.5, 1.5, N)}

    def submit(client: str) -> None:
        call = _call(PICKY, xs[client], "auto")
        worker.submit(Job("jacobian", call, lambda result, error, info: answers.__setitem__(client, (result, error)),
                          deadline=call.deadline))

    submit("a")
    worker.run(worker.take(lambda s: None))  # alone: its key seen, the next are batched
    answers.clear()
    for client in xs:
        submit(client)
    group = worker.take(lambda s: None)
    assert len(group) == 3
    worker.run(group)
    assert isinstance(answers["bad"][1], FunctionError) and answers["bad"][1].status == 500
    assert "negative first element" in str(answers["bad"][1])
    for client in ("a", "b"):
        result, error = answers[client]
        assert error is None, error
        _check(result, PICKY, xs[client])


def test_a_detection_refused_at_its_limit_is_refused_again_at_once() -> None:
    """GET lorenz96/sparsity?shapes=1000000 was a 413 (detection too costly) after 1.5-6 s
    of the engine at every try (in-process app), another client's 2-element Jacobian
    waiting behind each: the same request (function, shapes, values, limits) is now refused
    at once, with the same detail, its function not traced again. A small engine (1 MiB
    budget: 524,288 entries of detection work) stands in for the million elements."""
    engine = Engine(torch.device("cpu"), 1 << 20)
    x = RNG.uniform(0.5, 1.5, 10_000).astype(np.float32)

    def describe() -> tuple[str, int, float]:
        call = Call(DEEP, [x], ["float32"], sparsity="auto", mode="auto", deadline=time.monotonic() + 60)
        f.CALLS.clear()
        t = time.perf_counter()
        with pytest.raises(ResultTooLarge) as refused:
            engine.sparsity_jacobian(call)
        assert refused.value.status == 413
        return str(refused.value), len(f.CALLS), time.perf_counter() - t

    detail, calls, _ = describe()
    assert "detecting the sparsity pattern costs too much" in detail and calls == 2  # a forward pass, the trace
    again, calls, _ = describe()  # (its time not asserted: the count says no trace ran)
    assert again == detail and calls == 1, (calls, again)  # the forward pass only (before: traced again)

