"""Request batching when one member's deadline is far earlier than its batch-mates'.

The engine's scheduler (``Worker``) and the real stacking of a batch
(``engine.batched.run_batch``) on a stand-in engine whose work is a few timed chunks with
a deadline check between them (as a row loop, a sparse colouring or a Hessian's checks
are), so a test shows in a fraction of a second what a slow function shows on a server.
A batch's answers are compared with torch.func.jacrev of each member alone.

What a user saw before (hostile clients, rounds 33/34): a request with a short
X-Request-Timeout stacked with another client's stopped the batch at its own deadline;
every member then ran again alone, the other client paying 1.17 s for 0.4 s of work (3
runs where 2 were needed).
"""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from jacobian_service.engine import batched
from jacobian_service.engine.profile import Profiles
from jacobian_service.errors import FunctionError, Timeout
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.scheduler import Job, Worker
from jacobian_service.types import Call, Result

CHUNKS, CHUNK_S = 4, 0.05  # one run: 0.2 s, a batch's as one request's (vmap runs the function once for all)


def _fn(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * x.sum()


def _want(x: np.ndarray) -> np.ndarray:
    return torch.func.jacrev(_fn)(torch.from_numpy(x)).numpy()


class _Engine:
    """Computes each Jacobian with torch.func, in ``CHUNKS`` timed steps checking the call's
    deadline and cancel between them; ``runs`` records the inputs of every run (a batch's all)."""

    device = "cpu"
    memory_budget = 1 << 30

    def __init__(self, on_chunk: Any = lambda call, i: None) -> None:
        self.profiles = Profiles()
        self.runs: list[list[float]] = []
        self.unbatchable: list[str] = []
        self.on_chunk = on_chunk

    def can_batch(self, name: str) -> bool:
        return name not in self.unbatchable

    def mark_unbatchable(self, name: str, why: Any = None) -> None:
        self.unbatchable.append(name)

    def _compute(self, call: Call) -> np.ndarray:
        x = torch.from_numpy(call.args[0])
        self.runs.append([float(v) for v in x.reshape(-1, 2)[:, 0]])
        if bool((x < 0).any()):  # a data error of one member's (a cholesky of a matrix not positive definite)
            raise FunctionError("the function raised ValueError: negative input")  # (as the engine maps it: 500)
        for i in range(CHUNKS):
            call.check_alive()
            self.on_chunk(call, i)
            time.sleep(CHUNK_S)
        jac = torch.func.vmap(torch.func.jacrev(_fn)) if call.batched else torch.func.jacrev(_fn)
        return jac(x).numpy()

    def jacobian(self, call: Call) -> Result:
        return Result(self._compute(call))

    def evaluate(self, call: Call, allow_loop: bool = True) -> Result:  # the stacked call (run_batch below)
        return Result(self._compute(call))

    def run_batch(self, kind: str, calls: list[Call]) -> list[Result]:
        # The real stacking and splitting (its deadline and cancel too), this engine's compute.
        return batched.run_batch(self, "evaluate", calls)  # type: ignore[arg-type]


SPEC = FunctionSpec("chunked", _fn, (Input("x", shape=(2,)),))


def _worker(engine: _Engine) -> Worker:
    worker = Worker(engine, max_queue=10, max_batch=8)
    # Its key was seen fast (a warm run, an idle machine): a batch is expected to take 10 ms,
    # so the short request fits the cost model and is stacked; this run takes 0.2 s.
    seen = Job("jacobian", Call(SPEC, [np.zeros(2)], ["float64"]), lambda *a: None, deadline=time.monotonic() + 60)
    worker._batch_key(seen)
    for size in (1, 2):
        worker._remember(seen, SimpleNamespace(nbytes=lambda: 32), size, 0.01)
    return worker


def _job(worker: Worker, client: str, x: np.ndarray, left_s: float, answers: dict) -> Job:
    call = Call(SPEC, [x], ["float64"], deadline=time.monotonic() + left_s, client=client)
    job = Job("jacobian", call, lambda result, error, info: answers.__setitem__(client, (result, error, time.monotonic())),
              deadline=call.deadline)
    worker.submit(job)
    return job


def _runs_of(engine: _Engine, x: np.ndarray) -> int:
    return sum(float(x[0]) in run for run in engine.runs)


def test_a_short_deadline_in_a_batch_stops_no_one_else() -> None:
    """The short member is answered 504 as any request past its deadline; the other client's
    request is answered from the one batch run (before: the batch stopped at the short
    deadline, 0.1 s in, and each member ran again alone)."""
    engine = _Engine()
    worker = _worker(engine)
    answers: dict[str, Any] = {}
    short, long_ = np.array([0.5, 1.0]), np.array([1.5, 0.25])
    _job(worker, "hostile", short, 0.1, answers)
    _job(worker, "honest", long_, 10.0, answers)
    group = worker.take(lambda s: None)
    assert len(group) == 2  # (stacked: the cost model's estimate fits the short deadline)
    worker.run(group)
    result, error, _ = answers["honest"]
    assert error is None, error
    np.testing.assert_allclose(result.value, _want(long_), rtol=1e-12)
    assert _runs_of(engine, long_) == 1  # (before: 2, the batch and again alone)
    assert engine.runs == [[0.5, 1.5]]  # nothing run again (before: each member alone after the batch)
    _, error, _ = answers["hostile"]
    assert isinstance(error, Timeout) and str(error) == "the request ran past its deadline", error
    assert engine.unbatchable == []


def test_the_survivors_of_a_batch_stopped_for_a_member_run_again_as_one_batch() -> None:
    """An engine whose batch still stops at its earliest deadline (an older one): the members
    left are run again as one batch, not one by one."""
    engine = _Engine()
    worker = _worker(engine)
    engine.run_batch = lambda kind, calls: batched.run_batch(  # type: ignore[method-assign]
        SimpleNamespace(evaluate=lambda call, allow_loop: engine.evaluate(
            replace(call, deadline=min(c.deadline for c in calls)))), "evaluate", calls)
    answers: dict[str, Any] = {}
    xs = {"hostile": np.array([0.5, 1.0]), "a": np.array([1.5, 2.0]), "b": np.array([2.5, 3.0])}
    for client, x in xs.items():
        _job(worker, client, x, 0.1 if client == "hostile" else 10.0, answers)
    worker.run(worker.take(lambda s: None))
    assert engine.runs == [[0.5, 1.5, 2.5], [1.5, 2.5]]  # stopped, then the two left as one batch
    for client in ("a", "b"):
        result, error, _ = answers[client]
        assert error is None, error
        np.testing.assert_allclose(result.value, _want(xs[client]), rtol=1e-12)
    assert str(answers["hostile"][1]) == "the request ran past its deadline"


def test_a_batch_stops_once_every_member_is_gone_and_not_before() -> None:
    """Each member's cancel reaches the stacked call: one caller leaving does not stop the
    others' work; all gone, the batch stops at its next check (before: it ran to the end,
    every caller gone, and an engine process read no cancel meanwhile)."""
    jobs: list[Job] = []
    chunks: list[int] = []

    def leave(call: Call, i: int) -> None:
        chunks.append(i)
        if i == 0:
            jobs[0].done = True  # (ThreadedWorker.cancel: the caller went)
        if i == 1:
            jobs[1].done = True

    engine = _Engine(on_chunk=leave)
    worker = _worker(engine)
    answers: dict[str, Any] = {}
    jobs += [_job(worker, "a", np.array([0.5, 1.0]), 10.0, answers), _job(worker, "b", np.array([1.5, 2.0]), 10.0, answers)]
    worker.run(worker.take(lambda s: None))
    assert chunks == [0, 1]  # stopped at the third check (before: all four chunks run)
    assert engine.runs == [[0.5, 1.5]] and answers == {}  # not run again, no one to answer

    engine = _Engine(on_chunk=lambda call, i: i == 0 and setattr(jobs[2], "done", True))
    worker = _worker(engine)
    x = np.array([1.5, 2.0])
    jobs += [_job(worker, "a", np.array([0.5, 1.0]), 10.0, answers), _job(worker, "b", x, 10.0, answers)]
    worker.run(worker.take(lambda s: None))
    assert engine.runs == [[0.5, 1.5]] and list(answers) == ["b"]
    np.testing.assert_allclose(answers["b"][0].value, _want(x), rtol=1e-12)


def test_one_members_error_fails_only_that_member() -> None:
    """The sibling: a function that raises for one member's input only. The batch fails,
    each member runs alone: the raiser gets its 500 ``function_error``, the others their
    Jacobians, and vmap is not blamed (a data error)."""
    engine = _Engine()
    worker = _worker(engine)
    answers: dict[str, Any] = {}
    xs = {"a": np.array([0.5, 1.0]), "bad": np.array([-1.5, 2.0]), "b": np.array([2.5, 3.0])}
    for client, x in xs.items():
        _job(worker, client, x, 10.0, answers)
    worker.run(worker.take(lambda s: None))
    assert isinstance(answers["bad"][1], FunctionError) and answers["bad"][1].status == 500
    for client in ("a", "b"):
        result, error, _ = answers[client]
        assert error is None, error
        np.testing.assert_allclose(result.value, _want(xs[client]), rtol=1e-12)
    assert len(engine.runs) == 4 and engine.unbatchable == []  # the batch, then each alone (a data error)


def test_a_raising_member_past_its_deadline_does_not_mark_the_function_unbatchable() -> None:
    """review7: the batch fails for one member's input (a cholesky of a matrix not positive
    definite, found at the end of its run), and that member is past its deadline by then:
    it is answered 504 and not run alone. The others then all succeed alone, which said
    "vmap is the problem" and marked the function unbatchable for good (every later
    batched request looped, request batching off) for one client's data error."""
    def fail_late(call: Call, i: int) -> None:
        if i == CHUNKS - 1 and bool((np.asarray(call.args[0]) > 50).any()):  # (a matrix that is not positive definite)
            raise FunctionError("the function raised ValueError: not positive definite")

    engine = _Engine(on_chunk=fail_late)
    worker = _worker(engine)
    answers: dict[str, Any] = {}
    good = np.array([1.5, 2.0])
    _job(worker, "hostile", np.array([0.5, 99.0]), 0.1, answers)  # past its deadline when the batch fails
    _job(worker, "honest", good, 10.0, answers)
    group = worker.take(lambda s: None)
    assert len(group) == 2
    worker.run(group)
    result, error, _ = answers["honest"]
    assert error is None, error
    np.testing.assert_allclose(result.value, _want(good), rtol=1e-12)
    assert str(answers["hostile"][1]) == "the request ran past its deadline"
    assert engine.unbatchable == []  # (before: ["chunked"], vmap blamed for a data error)
