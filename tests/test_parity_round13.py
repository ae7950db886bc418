"""PyTorch's own torch.func test cases, round 13, replayed over HTTP against
tests/parity13_functions.py and compared with in-process torch.func (values, shapes,
dtypes, structure; torch's error where torch raises).

1. test/functorch/test_ops.py's checks over ``op_db`` ops round 12 left out:
   test_vjp, test_jvp, test_vmapvjp, test_jvpvjp, test_vmapjvpall and test_vmapjvpvjp as an outside tester
   runs them over HTTP, argnums over every tensor input.
2. nn.Module per-sample gradients, model ensembles, BatchNorm under vmap, random
   functions under vmap, nested vmap.

One in-process app serves the module (no server start), as rounds 7-12.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import wire
from torch.utils._pytree import (
    tree_flatten,
    tree_leaves,
    tree_structure,
    tree_unflatten,
)

from . import parity13_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t, wire_tree

f = torch.func


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity13_functions") as client:
        yield client


RNG = np.random.default_rng(13)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def sample(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """One input as OpInfo's sample makers make it for the op's domain."""
    x = rand(*shape)
    if kind == "pos":
        return np.abs(x) + 0.5
    if kind == "unit":
        return RNG.uniform(0.1, 0.9, shape)
    if kind == "full":
        return x + 3 * np.eye(shape[-2], shape[-1])
    if kind == "spd":
        return x @ np.swapaxes(x, -1, -2) + np.eye(shape[-1])
    return x


def samples(op: F.Op, batch: int | None = None) -> list[np.ndarray]:
    kinds = (op.make,) * len(op.shapes) if isinstance(op.make, str) else op.make
    if batch is None:
        return [sample(k, s) for k, s in zip(kinds, op.shapes)]
    return [np.stack([sample(k, s) for _ in range(batch)]) for k, s in zip(kinds, op.shapes)]


def like(tree: Any, batch: int | None = None) -> Any:
    """Random arrays shaped like a torch tree (cotangents for its output), as the wire
    nests them (lists)."""
    if isinstance(tree, torch.Tensor):
        return rand(*((batch,) if batch else ()), *tree.shape)
    return [like(v, batch) for v in tree]


def shaped_as(arrays: Any, out: Any) -> Any:
    """Wire-nested arrays as torch tensors nested as ``out`` (a namedtuple such as
    slogdet's), as torch.func.vjp wants its cotangents."""
    return tree_unflatten(t(tree_leaves(arrays)), tree_structure(out))


def plain(tree: Any) -> Any:
    """torch's return types (namedtuples such as max's) as the plain tuples the wire
    answers, and its ZeroTensors (slogdet's sign has no derivative) as zeros, for
    ``same``."""
    if isinstance(tree, tuple):
        return tuple(plain(v) for v in tree)
    if isinstance(tree, torch.Tensor) and tree._is_zerotensor():
        return torch.zeros(tree.shape, dtype=tree.dtype)
    return tree


def as_torch(c, name: str, endpoint: str, inputs: list[Any], torch_call: Callable[[], Any], **options: Any) -> None:
    """The endpoint's answer is torch_call()'s, or, where torch raises, a 500
    function_error naming torch's exception and saying its message (where torch refuses
    an integer output, which has no derivative, the request's 422 quoting it: round 21)."""
    try:
        want = torch_call()
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the service says
        if "All outputs of f must be floating-point" in str(exc):
            body = assert_problem(post(c, name, endpoint, inputs, **options), 422, "invalid_input")
            assert str(exc).splitlines()[0] in body["detail"], (str(exc), body)
            return
        body = assert_problem(post(c, name, endpoint, inputs, **options), 500, "function_error")
        assert body["detail"].startswith(f"{type(exc).__name__}: "), (body, exc)
        assert str(exc).splitlines()[0][:80] in body["detail"], (str(exc), body)
        return
    got, _ = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, plain(want), rtol=1e-8)


def partial(fn: Callable[..., Any], xs: list[torch.Tensor], argnums: tuple[int, ...]) -> Callable[..., Any]:
    """fn of the argnums inputs alone, the others held at xs."""
    def g(*p: torch.Tensor) -> Any:
        full = list(xs)
        for i, v in zip(argnums, p):
            full[i] = v
        return fn(*full)
    return g


# ops torch's vmap refuses: unique's output has a data-dependent shape, batch_norm in
# training mode writes running stats not batched, gaussian_nll_loss checks var < 0 with
# data-dependent control flow. The service runs their examples one at a time (README:
# where vmap cannot run, it loops), as vmap means: each example's answer, stacked.
VMAP_REFUSES = {"unique": "dynamic shape", "batch_norm_train": "running_mean or running_var",
                "gaussian_nll": "data-dependent control flow"}


def per_example(op: F.Op, transform: Callable[..., Any], xb: list[torch.Tensor]) -> Any:
    """vmap(transform)(*xb), or where torch's vmap refuses the op, the stack of each
    example's answer (an error of the first example's raised as it is)."""
    if op.name not in VMAP_REFUSES:
        return f.vmap(transform)(*xb)
    with pytest.raises(RuntimeError, match=VMAP_REFUSES[op.name]):
        f.vmap(transform)(*xb)
    answers = [transform(*(x[i] for x in xb)) for i in range(len(xb[0]))]
    leaves = [tree_flatten(a)[0] for a in answers]
    return tree_unflatten([torch.stack(col) for col in zip(*leaves)], tree_structure(answers[0]))


@pytest.mark.parametrize("op", F.OPS, ids=[o.name for o in F.OPS])
def test_ops_checks_over_http(c, op):
    """test_vjp, test_jvp, test_vmapvjp, test_jvpvjp, test_vmapjvpall, test_vmapjvpvjp of op_db ops."""
    name, fn, an = f"op_{op.name}", op.fn, op.argnums
    xs = samples(op)
    tx = t(xs)
    g = partial(fn, tx, an)
    primals = tuple(tx[i] for i in an)
    out = fn(*tx)
    tans = [rand(*xs[i].shape) for i in an]
    cot = like(out)
    cot_t = shaped_as(cot, out)
    argnums = list(an)
    # test_vjp / jacobian in both modes
    for options in ({}, {"mode": "fwd"}):
        as_torch(c, name, "jacobian", xs, lambda: f.jacrev(g, argnums=tuple(range(len(an))), chunk_size=1)(*primals),
                 argnums=argnums, **options)
    as_torch(c, name, "vjp", xs, lambda: f.vjp(g, *primals)[1](cot_t), argnums=argnums, cotangents=wire_tree(cot))
    # test_jvp
    as_torch(c, name, "jvp", xs, lambda: f.jvp(g, primals, tuple(t(tans)))[1], argnums=argnums,
             tangents=[arr(v) for v in tans])
    # test_vmapvjp: per-example Jacobians, and a stack of cotangents at one input
    xb = samples(op, 2)
    as_torch(c, name, "jacobian", xb,
             lambda: per_example(op, f.jacrev(fn, argnums=an), t(xb)), argnums=argnums, batched=True)
    cots = like(out, 3)
    cots_t = shaped_as(cots, out)
    as_torch(c, name, "vjp", xs, lambda: f.vmap(f.vjp(g, *primals)[1])(cots_t), argnums=argnums,
             cotangents=wire_tree(cots), batched_vectors=True)
    # test_vmapjvpall: a stack of tangents
    tb = [rand(3, *xs[i].shape) for i in an]
    as_torch(c, name, "jvp", xs, lambda: f.vmap(lambda *v: f.jvp(g, primals, v)[1])(*t(tb)), argnums=argnums,
             tangents=[arr(v) for v in tb], batched_vectors=True)
    # test_jvpvjp: c . H t, the jvp of the vjp
    if op.twice:
        as_torch(c, name, "hvp", xs,
                 lambda: f.jvp(lambda *p: f.vjp(g, *p)[1](cot_t), primals, tuple(t(tans)))[1],
                 argnums=argnums, tangents=[arr(v) for v in tans], cotangents=wire_tree(cot))
        # test_vmapjvpvjp: a stack of (cotangent, tangent) pairs
        as_torch(c, name, "hvp", xs,
                 lambda: f.vmap(lambda cc, *v: f.jvp(lambda *p: f.vjp(g, *p)[1](cc), primals, v)[1])(cots_t, *t(tb)),
                 argnums=argnums, tangents=[arr(v) for v in tb], cotangents=wire_tree(cots), batched_vectors=True)


# --------------------------------------------------------------------------- Hessians torch cannot take


@pytest.mark.parametrize("name", ["embedding_bag", "ctc_loss", "zeta"])
def test_a_hessian_no_strategy_can_take_is_torchs_error(c, name):
    """torch.func.hessian (forward over reverse) of an op without a forward-AD rule or a
    double backward raises "Trying to use forward AD with _embedding_bag that does not
    support it". The service tried its faster strategies, then torch's, then reverse over
    reverse, and answered the last one's error ("the derivative for
    '_embedding_bag_backward' is not implemented"), which torch never says. Now the
    500 says what torch.func.hessian says, plain and per example."""
    op = next(o for o in F.OPS if o.name == name)
    xs, xb = samples(op), samples(op, 2)
    with pytest.raises(NotImplementedError, match="Trying to use forward AD") as raised:
        f.hessian(op.fn, argnums=op.argnums)(*t(xs))
    want = f"NotImplementedError: {str(raised.value).splitlines()[0]}"
    for inputs, options in (([*xs], {}), ([*xb], {"batched": True})):
        for _ in range(2):  # the first request measures the strategies, the next knows them
            body = assert_problem(post(c, f"op_{name}", "hessian", inputs, argnums=list(op.argnums), **options),
                                  500, "function_error")
            assert body["detail"].startswith(want), (body, want)


def test_a_sparse_hessian_no_product_can_take_is_torchs_error(c):
    """The sparse Hessian (sparsity auto) of ctc_loss, which has neither a forward-AD rule
    nor a double backward: its forward-over-reverse products failed, reverse over
    reverse's too, and the 500 said the last ("derivative for aten::_ctc_loss_backward
    is not implemented"). Now it says what torch.func.hessian says, as the dense one."""
    op = next(o for o in F.OPS if o.name == "ctc_loss")
    xs = samples(op)
    with pytest.raises(NotImplementedError, match="Trying to use forward AD") as raised:
        f.hessian(op.fn)(*t(xs))
    for fmt in ("csr", "dense"):
        body = assert_problem(post(c, "op_ctc_loss", "hessian", xs, sparsity="auto", sparse_format=fmt),
                              500, "function_error")
        assert body["detail"].startswith(f"NotImplementedError: {str(raised.value).splitlines()[0]}"), body


def test_a_hessian_torch_has_no_forward_rule_for_is_reverse_over_reverse(c):
    """grid_sample has no forward-AD rule, so torch.func.hessian raises; its double
    backward exists, and the service answers reverse over reverse (README: checked
    against differences of jacrev), jacrev(jacrev)'s blocks, row by row."""
    op = next(o for o in F.OPS if o.name == "grid_sample")
    xs = samples(op)
    with pytest.raises(NotImplementedError, match="forward AD with grid_sampler_2d"):
        f.hessian(op.fn, argnums=(0, 1))(*t(xs))
    want = f.jacrev(f.jacrev(op.fn, argnums=(0, 1), chunk_size=1), argnums=(0, 1), chunk_size=1)(*t(xs))
    got, doc = answer(post(c, "op_grid_sample", "hessian", xs, argnums=[0, 1]), "hessian")
    same(got, want, rtol=1e-9)
    assert doc["meta"]["mode"] in ("jacrev_jacrev", "jacrev_rows")  # reverse over reverse, whole or by rows


def test_per_example_hessian_of_a_solve_is_each_examples(c):
    """vmap(torch.func.hessian(linalg.solve)) is silently wrong in torch (forward mode
    under a vmap over examples: README) for the second example's d2/dA2 blocks; the
    service answers each example's torch.func.hessian, as reverse over reverse does."""
    op = next(o for o in F.OPS if o.name == "solve")
    xb = samples(op, 2)
    loop = [f.hessian(torch.linalg.solve, argnums=(0, 1))(*t([x[i] for x in xb])) for i in range(2)]
    want = tree_unflatten([torch.stack(col) for col in zip(*(tree_leaves(h) for h in loop))], tree_structure(loop[0]))
    got, _ = answer(post(c, "op_solve", "hessian", xb, argnums=[0, 1], batched=True), "hessian")
    same(got, want, rtol=1e-9)
    vmapped = f.vmap(f.hessian(torch.linalg.solve, argnums=(0, 1)))(*t(xb))
    assert not torch.allclose(vmapped[0][0], want[0][0])  # torch's own vmap is the wrong one


def test_a_complex_output_is_the_wires_refusal(c):
    """linalg.eigvals of a real matrix is complex: torch's jacrev / jacfwd / hessian refuse
    it: the derivative routes (since round 21) are the request's 422 in jacrev's words;
    evaluate and jvp, which torch answers, answer it in complex (since round 27); a
    complex input (to take abs or angle of) is a 422 naming its dtype. Complex numbers
    made inside from real inputs are served: complex_abs / complex_angle in the sweep."""
    x = sample("full", (2, 2))
    with pytest.raises(RuntimeError, match="Expected all outputs to be real"):
        f.jacrev(F.eigvals)(t(x))
    # and a complex input (abs or angle of it) is no dtype the wire reads: 422 naming it
    body = assert_problem(c.post("/v1/functions/two_in/jacobian", json={"inputs": [
        {"dtype": "complex128", "shape": [3], "data": [1, 2, 3]}, [1, 2, 3]]}), 422, "invalid_input")
    assert body["detail"].startswith("input 'x': unsupported dtype complex128 here: inputs and tangents are real"), body
    for endpoint, options in (("evaluate", {}), ("jacobian", {}), ("jacobian", {"mode": "fwd"}), ("hessian", {}),
                              ("jvp", {"tangents": arr(rand(2, 2))}), ("vjp", {"cotangents": arr(rand(2))}),
                              ("jacobian", {"batched": True})):
        inputs = [np.stack([x, x.T])] if options.get("batched") else [x]
        if endpoint in ("evaluate", "jvp"):
            r = post(c, "eigvals", endpoint, inputs, **options)
            assert r.status_code == 200, r.text
            got = wire.decode_tree(r.json()["output" if endpoint == "evaluate" else "jvp"],
                                   limits=wire.Limits(complex=True))
            want = F.eigvals(t(x)) if endpoint == "evaluate" else f.jvp(F.eigvals, (t(x),), (t(wire.decode_json_array(options["tangents"])[0]),))[1]
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
        elif endpoint == "vjp":  # torch's pullback takes complex cotangents only (round 28)
            body = assert_problem(post(c, "eigvals", endpoint, inputs, **options), 422, "invalid_input")
            assert body["detail"].startswith("cotangents: expected complex cotangents for the complex128 output, got "
                                             "float64 (torch.func.vjp: For complex Tensors, both grad_output and "
                                             "output are required to have the same dtype."), body
        else:
            body = assert_problem(post(c, "eigvals", endpoint, inputs, **options), 422, "invalid_input")
            assert body["detail"] == ("the output is complex128, which has no real derivative (torch.func.jacrev: "
                                      "Expected all outputs to be real but received complex tensor at flattened "
                                      "input idx: 0)"), body


# --------------------------------------------------------------------------- 2. modules, ensembles, vmap


def model_params() -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in F.MODEL.named_parameters()}


def test_per_sample_gradients_of_a_module(c):
    """torch's per-sample-gradients tutorial: vmap(grad(loss), in_dims=(None, 0, 0)) of a
    functional_call loss, the parameters shared, examples and integer targets batched;
    per parameter tree and per input, and per-example Hessians in x."""
    params, xs, ys = model_params(), rand(5, 4), np.array([0, 2, 1, 1, 0])
    tp, tx, ty = t(params), t(xs), t(ys)
    got, _ = answer(post(c, "sample_loss", "jacobian", [params, xs, ys], batched=True, in_dims=[None, 0, 0]), "jacobian")
    same(got, f.vmap(f.grad(F.sample_loss), in_dims=(None, 0, 0))(tp, tx, ty), rtol=1e-9)
    got, _ = answer(post(c, "sample_loss", "jacobian", [params, xs, ys], batched=True, in_dims={"params": None},
                         argnums=["params", "x"]), "jacobian")
    same(got, f.vmap(f.grad(F.sample_loss, argnums=(0, 1)), in_dims=(None, 0, 0))(tp, tx, ty), rtol=1e-9)
    got, _ = answer(post(c, "sample_loss", "hessian", [params, xs, ys], batched=True, in_dims=[None, 0, 0], argnums=1),
                    "hessian")
    same(got, f.vmap(f.hessian(F.sample_loss, argnums=1), in_dims=(None, 0, 0))(tp, tx, ty), rtol=1e-9)
    # the target is an integer: not differentiable (jacrev: only floating inputs)
    body = assert_problem(post(c, "sample_loss", "jacobian", [params, xs, ys], batched=True, in_dims=[None, 0, 0],
                               argnums=2), 422, "invalid_input")
    assert "'target' is int64" in body["detail"], body


def test_model_ensembles_from_stack_module_state(c):
    """torch's model-ensembling tutorial: stack_module_state's parameters vmapped over
    (in_dims=(0, None): one minibatch for every model; (0, 0): one each), their outputs
    and per-model Jacobians; some parameters shared (in_dims nested, None), out_dims
    nested as the result."""
    models = [F.MODEL]
    for seed in (1, 2):
        m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        torch.manual_seed(seed)
        for p in m.parameters():
            p.data.normal_()
        models.append(m)
    stacked, _ = f.stack_module_state(models)
    sp = {k: v.detach().numpy() for k, v in stacked.items()}
    mb, mbs = rand(2, 4), rand(3, 2, 4)
    got, _ = answer(post(c, "model_call", "evaluate", [sp, mb], batched=True, in_dims=[0, None]), "output")
    same(got, f.vmap(F.model_call, in_dims=(0, None))(t(sp), t(mb)))
    got, _ = answer(post(c, "model_call", "evaluate", [sp, mbs], batched=True), "output")
    same(got, f.vmap(F.model_call)(t(sp), t(mbs)))
    got, _ = answer(post(c, "model_call", "jacobian", [sp, mb], batched=True, in_dims=[0, None]), "jacobian")
    same(got, f.vmap(f.jacrev(F.model_call), in_dims=(0, None))(t(sp), t(mb)))
    mixed = {k: sp[k] if "weight" in k else model_params()[k] for k in sp}
    dims = {k: 0 if "weight" in k else None for k in sp}
    outs = {k: 1 if "weight" in k else 0 for k in sp}
    got, _ = answer(post(c, "model_call", "jacobian", [mixed, mb], batched=True, in_dims=[dims, None], out_dims=outs),
                    "jacobian")
    same(got, f.vmap(f.jacrev(F.model_call), in_dims=(dims, None), out_dims=outs)(t(mixed), t(mb)))


def test_batch_norm_under_vmap(c):
    """BatchNorm1d under vmap: in eval mode, and with running stats off
    (replace_all_batch_norm_modules_), vmap runs it and per-example Jacobians are
    torch's. In training mode with running stats torch's vmap refuses it ("Batch norm
    got a batched tensor as input while the running_mean ... were not batched"): a
    per-example evaluate answers each example's (normalized by its own batch, as the
    loop the README says runs where vmap cannot); its derivatives are torch's error
    (the module writes num_batches_tracked, a captured tensor), plain and per example.
    Its buffers given as an input through functional_call, one set per example, torch's
    vmap runs it, and the service's per-example Jacobians are torch's."""
    xb = rand(2, 4, 3)
    for name in ("bn_eval", "bn_no_stats"):
        fn = getattr(F, name)
        got, _ = answer(post(c, name, "jacobian", [xb], batched=True), "jacobian")
        same(got, f.vmap(f.jacrev(fn))(t(xb)))
        got, _ = answer(post(c, name, "evaluate", [xb], batched=True), "output")
        same(got, f.vmap(fn)(t(xb)))
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        f.vmap(F.bn_train)(t(xb))
    got, _ = answer(post(c, "bn_train", "evaluate", [xb], batched=True), "output")
    with torch.no_grad():
        same(got, torch.stack([F.bn_train(v) for v in t(xb)]))
    with pytest.raises(RuntimeError, match="mutate a captured Tensor") as raised:
        f.jacrev(F.bn_train)(t(xb[0]))
    for inputs, options in (([xb[0]], {}), ([xb], {"batched": True})):
        body = assert_problem(post(c, "bn_train", "jacobian", inputs, **options), 500, "function_error")
        assert body["detail"] == f"RuntimeError: {str(raised.value).splitlines()[0]}", body
    # the buffers as an input (functional_call), one set per example: torch's vmap runs it
    params = {"weight": rand(3), "bias": rand(3)}
    one = {"running_mean": rand(3), "running_var": np.abs(rand(3)) + 0.5, "num_batches_tracked": np.array(0)}
    buffers = {k: np.stack([v, v]) for k, v in one.items()}
    want = f.vmap(f.jacrev(F.bn_functional, argnums=(0, 2)), in_dims=(None, 0, 0))(t(params), t(buffers), t(xb))
    got, _ = answer(post(c, "bn_functional", "jacobian", [params, buffers, xb], batched=True, in_dims=[None, 0, 0],
                         argnums=[0, 2]), "jacobian")
    same(got, want)


def test_random_functions_under_vmap(c):
    """vmap's randomness: torch's default "error" refuses dropout; "different" gives each
    example its own mask. A per-example request loops where vmap cannot run (README),
    so each example draws its own, and each example's Jacobian is of its own draw (the
    output answered beside it). vmap(randomness="different") inside the function: its
    Jacobian is of the one call whose output is answered, in every mode."""
    x = np.abs(rand(32)) + 0.5
    xs = np.stack([x] * 4)
    with pytest.raises(RuntimeError, match="randomness"):
        f.vmap(F.dropout)(t(xs))
    got, _ = answer(post(c, "dropout", "evaluate", [xs], batched=True), "output")
    assert set(np.unique(np.round(got / x, 9))) <= {0.0, 2.0}
    assert len({row.tobytes() for row in got}) == 4  # "different": a mask each (two alike: 2^-32)
    for options in ({}, {"chunk_size": 1}):
        jac, doc = answer(post(c, "dropout", "jacobian", [xs], batched=True, return_output=True, **options), "jacobian")
        out = wire.decode_tree(doc["output"])
        for j, o in zip(jac, out):
            same(j, np.diag(o / x), rtol=1e-12)
        assert len({row.tobytes() for row in out}) == 4
    xr = np.abs(rand(3, 4)) + 0.5
    f.jacrev(F.vmap_different_inside)(t(xr))  # torch runs it
    for options in ({}, {"mode": "fwd"}, {"chunk_size": 1}):
        jac, doc = answer(post(c, "vmap_different_inside", "jacobian", [xr], return_output=True, **options), "jacobian")
        out = wire.decode_tree(doc["output"])
        same(jac, np.diag((out / xr).ravel()).reshape(3, 4, 3, 4), rtol=1e-12)


def test_chunk_size_past_the_batch_and_in_dims_all_none(c):
    """vmap(f, chunk_size=100) over 2 examples is vmap(f); jacrev's chunk_size past its
    rows too. in_dims None for every input: torch's vmap says "Expected at least one
    Tensor to vmap over", the service's 422 says so on every per-example endpoint."""
    xb, yb = rand(2, 3), rand(2, 3)
    want = f.vmap(f.jacrev(F.two_in, argnums=(0, 1), chunk_size=100), chunk_size=100)(t(xb), t(yb))
    for chunk in (2, 3, 100):
        got, doc = answer(post(c, "two_in", "jacobian", [xb, yb], batched=True, chunk_size=chunk, argnums=[0, 1]),
                          "jacobian")
        same(got, want)
        assert doc["meta"]["chunk_size"] == min(chunk, 3)
    got, _ = answer(post(c, "two_in", "evaluate", [xb, yb], batched=True, chunk_size=100), "output")
    same(got, f.vmap(F.two_in, chunk_size=100)(t(xb), t(yb)))
    with pytest.raises(ValueError, match="at least one Tensor to vmap over"):
        f.vmap(F.two_in, in_dims=(None, None))(t(xb[0]), t(yb[0]))
    for endpoint in ("jacobian", "hessian", "evaluate"):
        for in_dims in ([None, None], None):
            body = assert_problem(post(c, "two_in", endpoint, [xb[0], yb[0]], batched=True, in_dims=in_dims),
                                  422, "invalid_input")
            assert "Expected at least one Tensor to vmap over" in body["detail"], body


def test_nested_vmap_inside_the_function(c):
    """f maps a grad and a vmap of a vmap over its rows: jacrev, jacfwd, hessian and the
    per-example transforms over it (vmap of vmap of vmap) are torch's."""
    x, xb = rand(3, 2), rand(2, 3, 2)
    for endpoint, options, want in (("jacobian", {}, f.jacrev(F.nested_vmap)(t(x))),
                                    ("jacobian", {"mode": "fwd"}, f.jacfwd(F.nested_vmap)(t(x))),
                                    ("hessian", {}, f.hessian(F.nested_vmap)(t(x))),
                                    ("jacobian", {"batched": True}, f.vmap(f.jacrev(F.nested_vmap))(t(xb))),
                                    ("hessian", {"batched": True}, f.vmap(f.hessian(F.nested_vmap))(t(xb)))):
        got, _ = answer(post(c, "nested_vmap", endpoint, [xb if options.get("batched") else x], **options), endpoint)
        same(got, want)


def test_hessians_stacked_from_several_requests_keep_request_batching(c):
    """Requests for the Hessian of a function arriving together are stacked into one
    per-example call. eigh's must be torch.func.hessian's own, example by example
    (reverse over reverse reads another triangle of the input), and the stacked call
    refused that loop as if vmap could not run the function: the scheduler ran each
    request alone, logged "vmap cannot batch op_eigh", and never stacked that
    function's requests again (its Jacobians and evaluations included). Now the loop
    runs for the stack, as for each request alone: one batch, torch's answers."""
    op = next(o for o in F.OPS if o.name == "eigh")
    xs = [samples(op) for _ in range(4)]
    with ThreadPoolExecutor(5) as pool:
        busy = pool.submit(post, c, "hold", "evaluate", [np.float64(0.8)])
        time.sleep(0.2)  # the engine holds: the Hessians queue behind it and leave as one batch
        sent = [pool.submit(post, c, "op_eigh", "hessian", x) for x in xs]
        assert busy.result().status_code == 200
        responses = [s.result() for s in sent]
    for x, response in zip(xs, responses):
        got, _ = answer(response, "hessian")
        same(got, f.hessian(op.fn)(*t(x)), rtol=1e-9)
    assert max(r.json()["meta"]["batch_size"] for r in responses) > 1
    assert c.app.service_state.engines.workers[0].worker.engine.profiles["op_eigh"].vmap_function


def test_what_vmap_refuses_once_loops_alone(c):
    """torch's vmap refuses BatchNorm's running stats shared by every example (in_dims
    null for the buffers) but runs them given per example, and refuses grid_sample's
    double backward but runs its Jacobian. The service loops over the examples it
    refuses (each example's torch answer), and that marked the whole function as one
    vmap cannot batch: every later per-example request of it, of any kind and in_dims,
    looped over its examples one call each, and its requests were never stacked again.
    Now only what was refused loops; the rest still runs one vmap."""
    engine = c.app.service_state.engines.workers[0].worker.engine
    params = {"weight": rand(3), "bias": rand(3)}
    one = {"running_mean": rand(3), "running_var": np.abs(rand(3)) + 0.5, "num_batches_tracked": np.array(0)}
    xb = rand(2, 4, 3)
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        f.vmap(F.bn_functional, in_dims=(None, None, 0))(t(params), t(one), t(xb))
    want = torch.stack([f.jacrev(F.bn_functional, argnums=2)(t(params), t(one), x) for x in t(xb)])
    got, _ = answer(post(c, "bn_functional", "jacobian", [params, one, xb], batched=True, in_dims=[None, None, 0],
                         argnums=2), "jacobian")
    same(got, want)
    op = next(o for o in F.OPS if o.name == "grid_sample")
    xs = samples(op, 2)
    rev_rev = f.jacrev(f.jacrev(op.fn, argnums=(0, 1)), argnums=(0, 1))
    with pytest.raises(RuntimeError):
        f.vmap(rev_rev)(*t(xs))
    got, _ = answer(post(c, "op_grid_sample", "hessian", xs, batched=True, argnums=[0, 1]), "hessian")
    loop = [rev_rev(*t([x[i] for x in xs])) for i in range(2)]
    same(got, tree_unflatten([torch.stack(col) for col in zip(*(tree_leaves(h) for h in loop))],
                             tree_structure(loop[0])), rtol=1e-9)
    for name in ("bn_functional", "op_grid_sample"):
        assert engine.profiles[name].vmap_function, name  # the function, and its other requests, still vmap
