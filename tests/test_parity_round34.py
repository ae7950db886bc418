"""PyTorch's own torch.func test cases, round 34 (test_vmap.py's randomness and fallback
cases: vmap against a Python loop over examples), replayed on request batching, where the
engine stacks equal requests of several clients into one vmapped call, and compared with
each request alone and with in-process torch.func.

1. A stacked batch is one call of the function for every member. torch's vmap refuses
   draws from its own generators ("vmap: called random operation while in randomness
   error mode"), and the members then run alone, each with its own draw; but numpy's
   global ``np.random`` and Python's ``random`` it does not see: one draw answered every
   member (four clients' ``x + np.random.standard_normal(3)`` less their x: the same
   three numbers each; one client could read another's noise off its own answer), where
   alone each draws its own. The engine now fingerprints those generators around a
   stacked call (~2 us); one that moved fails the batch, every member runs alone, and the
   function's requests are not stacked again (a ``batched: true`` request keeps torch's
   vmap, which shares such draws among examples as in-process).
2. A function computing under no_grad has its Hessians computed by torch's own strategy
   example by example, a stacked batch's too; a plain aux value (``float(x[0])``) was
   listed per example and every client was answered the whole list, its batch-mates'
   values beside its own. Each now gets its own, as alone.
3. Per-example Hessians of such a function over an empty batch: torch's
   ``vmap(hessian(f))`` answers (0, n, n); the service, which runs torch's own strategy
   example by example there, had no example to run and answered 422 "cannot be batched
   with vmap" for a function vmap batches. An empty batch now runs vmap.
4. Guards, no fix needed: torch's own draws (vmap refuses them, each member alone with
   its own draw), and a pure function stays stacked (no generator moves).
5. Examples run one by one (vmap refused) over ``in_dims=1`` were strided slices:
   ``x.view(-1)``, which torch's vmap over that dim refuses, failed the loop too (500),
   where each example alone answers. Each is contiguous now, and that refusal no longer
   turns request batching (over dim 0, where vmap runs) off for the function.
6. A stack of jvp / hvp vectors of a function drawing from numpy or Python's ``random``:
   the output, vmap's products, its check and each looped product were four calls'
   draws; now all are the one answered call's, as torch's vmap of jvp gives them.

The real engine and its scheduler in-process (no server), one engine for the module.
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

from . import parity34_functions as F

f = torch.func
XS = [np.array([1.0, -2.0, 0.5]) * (i + 1) for i in range(4)]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    yield Engine(torch.device("cpu"), 1 << 30)


def spec(fn: Any, name: str, has_aux: bool = False) -> FunctionSpec:
    return FunctionSpec(name, fn, (Input("x", shape=("n",), dtype="float64"),), has_aux=has_aux)


def call(sp: FunctionSpec, x: np.ndarray, **options: Any) -> Call:
    return Call(sp, [x], ["float64"], deadline=time.monotonic() + 60, **options)


def served(engine: Engine, sp: FunctionSpec, kind: str, **options: Any) -> list[tuple[Any, Any, int]]:
    """Each of ``XS`` as one client's request, through the engine's scheduler: one request
    alone first (a key seen for the first time runs alone), then all of them queued
    together, which the scheduler stacks. -> (result, error, batch size) per request."""
    worker = Worker(engine, max_queue=16, max_batch=8)
    answers: dict[int, tuple[Any, Any, int]] = {}

    def submit(i: int, x: np.ndarray) -> None:
        c = call(sp, x, client=f"client{i}", **options)
        settle = lambda r, e, info, i=i: answers.__setitem__(i, (r, e, info.batch_size))  # noqa: E731
        worker.submit(Job(kind, c, settle, deadline=c.deadline))

    submit(-1, np.zeros(3))
    worker.run(worker.take(lambda s: None))
    for i, x in enumerate(XS):
        submit(i, x)
    first = worker.take(lambda s: None)
    assert len(first) == len(XS)  # the premise: the four were stacked into one call
    worker.run(first)
    while worker.has_work():
        worker.run(worker.take(lambda s: None))
    return [answers[i] for i in range(len(XS))]


@pytest.mark.parametrize(
    "fn, kind",
    [
        (F.numpy_noise, "evaluate"),
        (F.numpy_noise, "jacobian"),
        (F.python_noise, "evaluate"),
    ],
)
def test_stacked_requests_never_share_a_global_generators_draws(engine, fn, kind):
    sp = spec(fn, f"{fn.__name__}_{kind}")
    options = {"return_output": True} if kind == "jacobian" else {}
    answers = served(engine, sp, kind, **options)
    outs = []
    for (result, error, size), x in zip(answers, XS):
        assert error is None, error
        assert size == 1  # each alone, as its request would run
        out = result.output if kind == "jacobian" else result.value
        if kind == "jacobian":  # the Jacobian of the call whose output is answered
            want = f.jacrev(fn)(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(result.value, want, rtol=1e-12)
        outs.append(out - x if fn is F.numpy_noise else out / x)
    # each client's own draw: no two alike (before: the same draw for all four)
    for i in range(len(outs)):
        for j in range(i):
            assert not np.allclose(outs[i], outs[j]), (i, j, outs)
    profile = engine.profiles[sp.name]
    assert not engine.can_batch(sp.name) and profile.vmap_function
    # batched: true keeps torch's vmap, one draw shared by the examples as in-process
    r = engine.evaluate(call(sp, np.stack(XS), batched=True))
    want = f.vmap(fn)(torch.from_numpy(np.stack(XS))).numpy()
    got = r.value - np.stack(XS) if fn is F.numpy_noise else r.value / np.stack(XS)
    ref = want - np.stack(XS) if fn is F.numpy_noise else want / np.stack(XS)
    np.testing.assert_allclose(got, got[:1].repeat(len(XS), 0), rtol=1e-12)
    np.testing.assert_allclose(ref, ref[:1].repeat(len(XS), 0), rtol=1e-12)


def test_a_stacked_grad_off_hessian_answers_each_client_its_own_aux(engine):
    sp = spec(F.grad_off_aux, "grad_off_aux", has_aux=True)
    for x in XS[:1]:  # alone first: the function is seen computing with grad off
        engine.hessian(call(sp, x))
    results = engine.run_batch("hessian", [call(sp, x) for x in XS])
    for r, x in zip(results, XS):
        want = f.hessian(lambda x: F.grad_off_aux(x)[0])(torch.from_numpy(x))
        aux = F.grad_off_aux(torch.from_numpy(x))[1]
        np.testing.assert_allclose(r.value, want.numpy(), rtol=1e-12)
        # its own value (before: [1.0, 2.0, 3.0, 4.0], every member's, for each)
        assert r.aux["first"] == aux["first"] == x[0]
        np.testing.assert_allclose(r.aux["sin"], aux["sin"].numpy(), rtol=1e-12)
        alone = engine.hessian(call(sp, x))
        assert alone.aux["first"] == r.aux["first"] and alone.mode == r.mode


def test_torch_draws_and_pure_functions_guard(engine):
    """torch's own draws: vmap refuses them, each member alone with its own; a pure
    function stays stacked, its answers torch.func.jacrev's."""
    sp = spec(F.torch_noise, "torch_noise")
    answers = served(engine, sp, "evaluate")
    noise = [result.value - x for (result, error, size), x in zip(answers, XS)]
    assert all(size == 1 and error is None for _, error, size in answers)
    assert all((0 <= n).all() and (n < 1).all() for n in noise)
    assert len({n.tobytes() for n in noise}) == len(XS)
    sp = spec(torch.sin, "sin")
    answers = served(engine, sp, "jacobian")
    for (result, error, size), x in zip(answers, XS):
        assert error is None and size == len(XS)
        np.testing.assert_allclose(result.value, f.jacrev(torch.sin)(torch.from_numpy(x)).numpy(), rtol=1e-12)
    assert engine.can_batch("sin")


@pytest.mark.parametrize("size", [0, 1, 3])
def test_per_example_hessians_of_a_grad_off_function_in_a_batch_of_any_size(engine, size):
    """torch's ``vmap(hessian(f))`` over 0, 1 and 3 examples. The function computes under
    no_grad, so its Hessians are torch's own strategy, example by example: an empty batch
    was a 422 ("grad_off cannot be batched with vmap, so a batch of no examples has no
    answer") where torch answers (0, 3, 3), and vmap runs the function."""
    sp = spec(F.grad_off, "grad_off")
    engine.hessian(call(sp, XS[0]))  # seen computing with grad off
    assert engine.profiles["grad_off"].grad_off
    xs = np.stack(XS[:size]) if size else np.zeros((0, 3))
    r = engine.hessian(call(sp, xs, batched=True))
    want = f.vmap(f.hessian(F.grad_off))(torch.from_numpy(xs))
    assert r.value.shape == tuple(want.shape) == (size, 3, 3) and r.value.dtype == np.float64
    np.testing.assert_allclose(r.value, want.numpy(), rtol=1e-12)
    loop = [f.hessian(F.grad_off)(torch.from_numpy(x)).numpy() for x in xs]
    np.testing.assert_allclose(r.value, np.stack(loop) if size else r.value, rtol=1e-12)
    assert r.mode == "jacfwd_jacrev"  # torch's own strategy


@pytest.mark.parametrize("kind", ["evaluate", "jacobian", "hessian"])
def test_a_loop_over_examples_batched_over_dim_1_answers_each_as_alone(engine, kind):
    """``x.view(-1)`` over examples batched along dim 1 (in_dims=1): torch's vmap raises
    ("view size is not compatible with input tensor's size and stride"), so the service
    loops over examples, each meant to run as it would alone; but each was a strided
    slice, the same error, a 500 where every example alone answers. Now each example is
    contiguous, as sent alone: the answers are a loop of torch.func over them. And that
    request no longer turns request batching off for the function (vmap over dim 0 runs)."""
    name = f"flat_{kind}"
    sp = spec(F.flat, name)
    xs = np.random.default_rng(34).standard_normal((2, 4, 3))  # 4 examples of (2, 3)
    fn = {"evaluate": F.flat, "jacobian": f.jacrev(F.flat), "hessian": f.hessian(lambda x: F.flat(x).sum())}[kind]
    with pytest.raises(RuntimeError, match="view size is not compatible"):  # the premise: torch's vmap
        f.vmap(fn, in_dims=1)(torch.from_numpy(xs))
    if kind == "hessian":
        sp = FunctionSpec(name, lambda x: F.flat(x).sum(), sp.inputs)
    r = getattr(engine, kind)(call(sp, xs, batched=True, in_dims=(1,)))
    want = np.stack([fn(torch.from_numpy(np.ascontiguousarray(xs[:, b]))).numpy() for b in range(4)])
    assert r.value.shape == want.shape
    np.testing.assert_allclose(r.value, want, rtol=1e-12)
    assert engine.can_batch(name)
    r = getattr(engine, kind)(call(sp, np.moveaxis(xs, 1, 0).copy(), batched=True))  # dim 0: vmap's
    np.testing.assert_allclose(r.value, want, rtol=1e-12)


@pytest.mark.parametrize("kind", ["jvp", "hvp", "hvp_one"])
def test_a_stack_of_products_is_of_the_one_call_whose_output_is_answered(engine, kind):
    """torch.func under vmap over the vectors calls the function once: one numpy (or
    Python ``random``) draw for every product and the output. The service answered the
    output of one call, vmap's products of a second, and, its check (a third call)
    disagreeing, each product of a call of its own: a stack of jvp tangents of
    ``x * (1 + np.random.rand())`` came back scaled 1.88, 1.17, 1.45 beside an output
    scaled 1.81 (one hvp: its output's draw and its product's, two). Now each is of the
    call whose output is answered, as a function drawing from torch's own generator
    already was (products.rng_replay)."""
    x = np.array([1.0, 2.0, 3.0])
    fn = F.numpy_scaled if kind == "jvp" else F.python_scaled_energy
    sp = spec(fn, f"{fn.__name__}_{kind}")
    t = np.eye(3)[1:] if kind != "hvp_one" else np.array([0.0, 1.0, 0.0])
    r = getattr(engine, kind.removesuffix("_one"))(
        call(sp, x, vectors=t, batched_vectors=kind != "hvp_one", return_output=True)
    )
    if kind == "jvp":
        scale = r.output / x  # the one call's draw: 1 + r
        np.testing.assert_allclose(scale, scale[:1].repeat(3), rtol=1e-12)
        want = torch.func.vmap(lambda v: v * torch.from_numpy(scale))(torch.from_numpy(t)).numpy()
    else:
        scale = float(r.output) / float((x * x).sum())
        want = 2 * scale * t  # H = 2 (1 + r) I
    assert 1 <= scale.flat[0] if kind == "jvp" else 1 <= scale
    np.testing.assert_allclose(r.value, want, rtol=1e-12)
