"""Per-example Hessians, round 33: reverse over reverse one output row at a time.

What a user saw (round 43 found it): one ``batched=true`` Hessian of 32 examples of
``sin`` on 63 inputs held its engine 11 s (``softmax``: 27 s), where
``vmap(torch.func.hessian(sin))`` takes 0.08 s in-process and each example alone 0.9 s;
so did 32 clients' single Hessians, stacked by request batching. Per-example Hessians
run reverse mode only (torch gets forward mode under a ``vmap`` over examples wrong for
some ops), as ``vmap(jacrev(jacrev(f)))``, whose outer pullback takes one row per entry
of the inner Jacobian, each carrying all of its (outputs x inputs) entries back through
every output's pullback: (outputs x inputs)^2 per example (63^4 for sin), where the
Hessian has outputs x inputs^2. Now (``hessian.jacrev_rows``) the outer ``jacrev`` runs
per output row, under a ``vmap`` over the output's unit basis: the same reverse-over-
reverse products, 0.19-0.39 s for sin over JSON (0.05-0.07 s of it the engine's, as
``vmap(torch.func.hessian)``'s own; softmax 0.58 s).

Answers are compared with ``vmap(torch.func.hessian(f))`` in-process and, for one, with
central differences of the gradient.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jacobian_service import examples as ex
from jacobian_client import wire
from jacobian_service.engine import batched as batched_mod
from jacobian_service.engine.core import Engine
from jacobian_service.engine.hessian import STRATEGIES, jacrev_rows
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call

from .conftest import ready_app

RNG = np.random.default_rng(33)


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    with ready_app("jacobian_service.examples") as c:
        yield c


def _post(client, name: str, body: dict):
    return client.post(f"/v1/functions/{name}/hessian?batched=true", content=wire.dumps(body),
                       headers={"content-type": wire.JSON})


def _leaves(tree: object) -> list[np.ndarray]:
    """The wire's nested Hessian blocks ({"data": ...} leaves), in order."""
    if isinstance(tree, dict) and "data" in tree:
        return [np.asarray(tree["data"], dtype=np.float64)]
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [leaf for v in tree for leaf in _leaves(v)]


def _torchs(fn, xs, argnums):
    """vmap(torch.func.hessian(fn)) in-process: what a per-example Hessian must equal."""
    return torch.func.vmap(torch.func.hessian(fn, argnums=argnums))(*xs)


CASES = {
    # name: (batched inputs, argnums in the request, the function as torch sees it)
    "sin": (lambda: [RNG.uniform(-2, 2, (6, 9))], None, ex.sin),
    "softmax": (lambda: [RNG.uniform(-2, 2, (5, 7))], None, ex.softmax),
    "sin_aux": (lambda: [RNG.uniform(-2, 2, (4, 6))], None, lambda x: ex.sin_aux(x)[0]),
    "polar": (lambda: [RNG.uniform(0.5, 2, (4, 5)), RNG.uniform(-2, 2, (4, 5))], [0, 1], ex.polar),
    "planar_arm": (lambda: [RNG.uniform(-2, 2, (5, 4))], None, ex.planar_arm),
    "lorenz96": (lambda: [RNG.uniform(-2, 2, (3, 13))], None, ex.lorenz96),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_example_hessians_are_torchs_by_output_rows(client, name):
    """Every built-in with a vector output: torch's answer (vmap of torch.func.hessian,
    float64 so the strategies agree to round-off), by the cheap strategy. Before:
    ``jacrev_jacrev``, (outputs x inputs)^2 products per example."""
    make, argnums, fn = CASES[name]
    xs = make()
    body: dict = {"inputs": [wire.encode_tree(x) for x in xs]}  # (float64, as sent)
    if argnums:
        body["argnums"] = argnums
    r = _post(client, name, body)
    assert r.status_code == 200, r.text[:400]
    doc = r.json()
    assert doc["meta"]["mode"] == "jacrev_rows", doc["meta"]
    want = torch.utils._pytree.tree_leaves(_torchs(fn, [torch.from_numpy(x) for x in xs],
                                                   tuple(argnums) if argnums else 0))
    got = _leaves(doc["hessian"])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.reshape(w.shape), w.numpy(), rtol=1e-10, atol=1e-12)
    if name == "sin_aux":  # the aux of the very call: sin(x), per example
        np.testing.assert_allclose(np.asarray(doc["aux"]["data"]), np.sin(xs[0]), rtol=1e-12)


def test_a_pytree_input_and_return_output(client):
    """dense_layer's dict parameter (blocks nested as jacrev nests them: w-w, w-b, ...)
    with the output returned beside the Hessian, float32 as sent."""
    w, b, x = RNG.uniform(-1, 1, (3, 2, 4)), RNG.uniform(-1, 1, (3, 2)), RNG.uniform(-1, 1, (3, 4))
    body = {"inputs": [{"w": w.tolist(), "b": b.tolist()}, x.tolist()], "return_output": True}
    r = _post(client, "dense_layer", body)
    assert r.status_code == 200, r.text[:400]
    doc = r.json()
    assert doc["meta"]["mode"] == "jacrev_rows", doc["meta"]
    t = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    want = _torchs(ex.dense_layer, [{"w": t(w), "b": t(b)}, t(x)], 0)
    got = _leaves(doc["hessian"])
    for g, wnt in zip(got, torch.utils._pytree.tree_leaves(want)):
        np.testing.assert_allclose(g.reshape(wnt.shape), wnt.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(doc["output"]["data"]),
                               np.tanh(np.einsum("bij,bj->bi", w, x) + b), rtol=1e-5, atol=1e-6)


def test_per_example_hessians_agree_with_central_differences(client):
    """softmax's Hessian by output rows against differences of its (exact) Jacobian."""
    x = RNG.uniform(-1, 1, (2, 5))
    r = _post(client, "softmax", {"inputs": [wire.encode_tree(x)]})
    assert r.status_code == 200, r.text[:400]
    got = np.asarray(r.json()["hessian"]["data"])
    jac = torch.func.jacrev(ex.softmax)
    h = 1e-5
    for b in range(2):
        xb = torch.from_numpy(x[b])
        fd = torch.stack([(jac(xb + h * e) - jac(xb - h * e)) / (2 * h) for e in torch.eye(5, dtype=torch.float64)], -1)
        np.testing.assert_allclose(got[b], fd.numpy(), rtol=1e-6, atol=1e-8)


# (outputs, hidden, inputs): past a few outputs reverse over reverse's (outputs x inputs)^2
# products are what the request costs
W1 = torch.from_numpy(RNG.standard_normal((10, 8)))
W2 = torch.from_numpy(RNG.standard_normal((16, 10)))


def two_layers(x: torch.Tensor) -> torch.Tensor:
    return W2 @ torch.tanh(W1 @ x)


def _spec() -> FunctionSpec:
    return FunctionSpec("two_layers", two_layers, (Input("x", shape=("n",), dtype="float64"),))


def _flops(run) -> tuple[int, object]:
    with FlopCounterMode(display=False) as fc:
        out = run()
    return fc.get_total_flops(), out


def test_the_strategy_chosen_costs_what_torchs_does_not_outputs_squared():
    """The profile's choice for a batched Hessian and stacked single ones is jacrev_rows,
    and its matrix products (counted by torch's FlopCounterMode, in this thread: the
    engine in-process) are within 2x of ``vmap(torch.func.hessian)``'s, where
    ``vmap(jacrev(jacrev))``'s, 16 outputs, are 7x theirs; answers torch's."""
    engine = Engine(torch.device("cpu"), 256 << 20)
    spec = _spec()
    xs = RNG.standard_normal((4, 8))
    torchs_flops, want = _flops(lambda: torch.func.vmap(torch.func.hessian(two_layers))(torch.from_numpy(xs)))
    rev_rev_flops, _ = _flops(lambda: torch.func.vmap(
        lambda e: STRATEGIES["jacrev_jacrev"](lambda t: (two_layers(t), ()), 0)(e)[0])(torch.from_numpy(xs)))
    assert rev_rev_flops > 5 * torchs_flops  # (the premise: 7x here, 16 outputs)
    call = Call(spec, [xs], ["float64"], batched=True, deadline=time.monotonic() + 60)
    batched_mod.batched(engine, call, "hessian")  # first: its checks (HVPs) run once per signature
    flops, result = _flops(lambda: batched_mod.batched(engine, Call(spec, [xs], ["float64"], batched=True,
                                                                    deadline=time.monotonic() + 60), "hessian"))
    assert result.mode == "jacrev_rows"
    assert engine.profiles["two_layers"].hessian.get(("per example", call.signature())) == "jacrev_rows"
    assert flops < 2 * torchs_flops, (flops, torchs_flops, rev_rev_flops)
    np.testing.assert_allclose(result.value, want.numpy(), rtol=1e-10, atol=1e-10)
    # single Hessians stacked across requests (request batching): the same strategy
    singles = [Call(spec, [x], ["float64"], deadline=time.monotonic() + 60) for x in xs]
    results = engine.run_batch("hessian", singles)
    for r, w in zip(results, want):
        assert r.mode == "jacrev_rows"
        np.testing.assert_allclose(r.value, w.numpy(), rtol=1e-10, atol=1e-10)


def test_output_rows_in_chunks_within_the_memory_budget():
    """Round 43's bound kept: a budget that fits 3 output rows of (4 examples x 8^2
    products x 6 copies x 8 bytes) at a time vmaps them 3 at a time (the answer the
    same), and every row at once where they fit."""
    engine = Engine(torch.device("cpu"), 3 * 4 * 64 * 6 * 8)
    assert batched_mod._outer_rows(engine, 4, 64, 8, 16) == 3
    assert batched_mod._outer_rows(engine, 4, 64, 8, 3) is None
    g = lambda t: (two_layers(t), ())  # noqa: E731
    x = torch.from_numpy(RNG.standard_normal((4, 8)))
    whole = torch.func.vmap(lambda e: jacrev_rows(g, 0)(e)[0])(x)
    chunked = torch.func.vmap(lambda e: jacrev_rows(g, 0, chunk_size=3)(e)[0])(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(whole, torch.func.vmap(torch.func.hessian(two_layers))(x), rtol=1e-10, atol=1e-10)
