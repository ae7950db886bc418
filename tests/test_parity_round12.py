"""PyTorch's own torch.func test cases, round 12, replayed over HTTP against
tests/parity12_functions.py and compared with in-process torch.func (values, shapes,
dtypes, structure; torch's error where torch raises).

1. The OpInfo sweep: a sample of ``op_db``'s autograd ops, ``lambda x: op(x, *args)``
   at one of their sample inputs, through /jacobian (both modes), /jvp, /vjp, /hvp and,
   where the op is twice differentiable, /hessian.
2. TestJac / TestHessian / test_vmap.py: outputs that are views of the input with
   every chunk size, inputs equal to each other, empty inputs and 0-d inputs per
   example, per-example Hessians with ``out_dims`` null, in-place writes into a
   captured tensor.

One in-process app serves the module (no server start), as rounds 7-11.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch

from . import parity12_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t, wire_tree

f = torch.func


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity12_functions") as client:
        yield client


RNG = np.random.default_rng(12)


def rand(*shape: int, dtype: str = "float64") -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def like(tree: Any) -> Any:
    """Random arrays shaped like a torch tree (cotangents for its output)."""
    if isinstance(tree, torch.Tensor):
        return rand(*tree.shape)
    return type(tree)(like(v) for v in tree)


def as_tuple(tree: Any) -> Any:
    """torch's return types (var_mean's namedtuple-like tuple) as the plain tuple the
    wire answers, for ``same``."""
    return tuple(tree) if isinstance(tree, tuple) else tree


# --------------------------------------------------------------------------- 1. OpInfo sweep


def _spd(shape: tuple[int, ...]) -> np.ndarray:
    """det / inv / matrix_exp samples: well-conditioned, as OpInfo's make_fullrank."""
    return rand(*shape) + 3 * np.eye(shape[-1])


def as_torch(c, name: str, endpoint: str, inputs: list[Any], torch_call: Any, **options: Any) -> None:
    """The endpoint's answer is torch_call()'s, or, where torch raises, a 500
    function_error naming torch's exception and saying its message."""
    try:
        want = torch_call()
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the service says
        body = assert_problem(post(c, name, endpoint, inputs, **options), 500, "function_error")
        assert body["detail"].startswith(f"{type(exc).__name__}: "), body
        assert str(exc).splitlines()[0][:80] in body["detail"], (str(exc), body)
        return
    got, _ = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, as_tuple(want), rtol=1e-9)


@pytest.mark.parametrize(("name", "op", "shape", "twice"), F.OPS, ids=[o[0] for o in F.OPS])
def test_opinfo_sample_as_torch_func(c, name, op, shape, twice):
    """/jacobian (rev and fwd: the result never depends on mode), /jvp, /vjp and, where
    the op is twice differentiable, /hessian and /hvp (c . H t) of op(x) equal
    torch.func's in-process, float64, at an OpInfo-style sample; where torch raises
    (cdist has no forward-mode rule), the service's 500 says what torch says.

    The Jacobian's reference is jacrev row by row (chunk_size=1): torch's vmap of
    cdist's pullback is silently wrong (rows of zeros where each VJP alone, and
    autograd.functional.jacobian, have values); the service checks vmap's rows against
    one VJP and answers the row loop's, so it is right where jacrev is not."""
    fn = f"op_{name}"
    x = _spd(shape) if shape[-2:] in ((3, 3), (2, 2)) else rand(*shape)
    out = op(t(x))
    tan, cot = rand(*shape), like(out)
    cot_t = tuple(t(cot)) if isinstance(out, tuple) else t(cot)
    for options in ({}, {"mode": "fwd"}):
        as_torch(c, fn, "jacobian", [x], lambda: f.jacrev(op, chunk_size=1)(t(x)), **options)
    as_torch(c, fn, "jvp", [x], lambda: f.jvp(op, (t(x),), (t(tan),))[1], tangents=arr(tan))
    as_torch(c, fn, "vjp", [x], lambda: f.vjp(op, t(x))[1](cot_t)[0], cotangents=wire_tree(cot))
    if twice:
        as_torch(c, fn, "hessian", [x], lambda: f.hessian(op)(t(x)))
        as_torch(c, fn, "hvp", [x], lambda: f.jvp(lambda v: f.vjp(op, v)[1](cot_t)[0], (t(x),), (t(tan),))[1],
                 tangents=arr(tan), cotangents=wire_tree(cot))
    if name == "cdist":  # torch's own jacrev, vmapped, is the wrong one
        assert not np.allclose(f.jacrev(op)(t(x)).numpy(), f.jacrev(op, chunk_size=1)(t(x)).numpy())


# --------------------------------------------------------------------------- 2. TestJac, TestHessian, test_vmap.py


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_outputs_that_are_views_of_the_input(c, chunk_size):
    """jacrev of x[::2], x.t() and x.expand: each block as torch's, whatever the
    chunk_size (test_chunk_jacrev), and forward mode's too; a vjp sums the expand's rows."""
    x = rand(2, 3)
    want = f.jacrev(F.views_of_input, chunk_size=chunk_size)(t(x))
    got, _ = answer(post(c, "views_of_input", "jacobian", [x], chunk_size=chunk_size), "jacobian")
    same(got, want)
    got, _ = answer(post(c, "views_of_input", "jacobian", [x], chunk_size=chunk_size, mode="fwd"), "jacobian")
    same(got, want)
    cot = like(F.views_of_input(t(x)))
    got, _ = answer(post(c, "views_of_input", "vjp", [x], cotangents=wire_tree(cot)), "vjp")
    same(got, f.vjp(F.views_of_input, t(x))[1](t(tuple(cot)))[0])


def test_per_example_hessian_of_an_output_of_a_shared_input_alone_takes_out_dims_null(c):
    """vmap(hessian(f, argnums=1), in_dims=(0, None), out_dims=(0, None)): the second
    output, exp(s), depends on the shared s alone, and torch answers its Hessian once.
    The service judged that by its own strategy, reverse over reverse, which batches it
    (its rows are pulled back with the first output's, which depends on x), and answered
    422 "out_dims is null for a result that depends on the batched inputs" where torch
    answers. Now torch's own transform judges it; where torch refuses, so does the service."""
    xs, s = rand(4, 3), np.float64(0.7)
    want = f.vmap(f.hessian(F.scaled_and_own, argnums=1), in_dims=(0, None), out_dims=(0, None))(t(xs), t(s))
    for options in ({}, {"chunk_size": 1}):
        got, _ = answer(post(c, "scaled_and_own", "hessian", [xs, s], argnums=1, batched=True,
                             in_dims=[0, None], out_dims=[0, None], **options), "hessian")
        same(got, want)
        assert got[1].shape == ()  # once, not per example
    # x * s is linear in s: torch leaves both Hessians in s unbatched, and so does the service
    want = f.vmap(f.hessian(F.scaled_and_own, argnums=1), in_dims=(0, None), out_dims=None)(t(xs), t(s))
    got, _ = answer(post(c, "scaled_and_own", "hessian", [xs, s], argnums=1, batched=True,
                         in_dims=[0, None], out_dims=None), "hessian")
    same(got, want)
    # the Jacobian in s: torch's jacrev batches every output's rows (its cotangents follow x)
    with pytest.raises(ValueError, match="out_dim is None"):
        f.vmap(f.jacrev(F.scaled_and_own, argnums=1), in_dims=(0, None), out_dims=(0, None))(t(xs), t(s))
    assert_problem(post(c, "scaled_and_own", "jacobian", [xs, s], argnums=1, batched=True,
                        in_dims=[0, None], out_dims=[0, None]), 422, "invalid_input")


def test_in_place_writes_into_a_captured_tensor_are_torchs_error(c):
    """test_inplace_on_captures: jacrev (and vmap(jacrev)) of f writing x into a tensor f
    captures raise torch's error; the service's 500 function_error says the same."""
    x, xs = rand(3), rand(2, 3)
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        f.jacrev(F.adds_into_captured)(t(x))
    for inputs, options in (([x], {}), ([xs], {"batched": True}), ([x], {"chunk_size": 1})):
        body = assert_problem(post(c, "adds_into_captured", "jacobian", inputs, **options), 500, "function_error")
        assert body["detail"].startswith("RuntimeError: ") and "mutate a captured Tensor" in body["detail"], body
        assert "Traceback" not in body["detail"]


def test_empty_inputs_on_every_endpoint(c):
    """Inputs of shape (0,): every endpoint answers torch.func's (empty) result, with its
    shape and dtype; per-example requests of no examples, and no vectors, too."""
    e, e2, x = np.zeros(0), np.zeros((0, 2)), rand(2)
    for name, fn in (("cube", F.cube), ("sum_cube", F.sum_cube)):
        as_torch(c, name, "jacobian", [e], lambda: f.jacrev(fn)(t(e)))
        as_torch(c, name, "jacobian", [e], lambda: f.jacfwd(fn)(t(e)), mode="fwd")
        as_torch(c, name, "hessian", [e], lambda: f.hessian(fn)(t(e)))
        as_torch(c, name, "jvp", [e], lambda: f.jvp(fn, (t(e),), (t(e),))[1], tangents=arr(e))
        out = fn(t(e))
        as_torch(c, name, "vjp", [e], lambda: f.vjp(fn, t(e))[1](torch.zeros_like(out))[0],
                 cotangents=arr(out.numpy()))
        got, _ = answer(post(c, name, "evaluate", [e]), "output")
        same(got, out)
    as_torch(c, "sum_cube", "hvp", [e], lambda: f.jvp(f.grad(F.sum_cube), (t(e),), (t(e),))[1], tangents=arr(e))
    as_torch(c, "cube", "jacobian", [e2], lambda: f.vmap(f.jacrev(F.cube))(t(e2)), batched=True)
    as_torch(c, "cube", "jacobian", [e2.T], lambda: f.vmap(f.jacrev(F.cube))(t(e2.T)), batched=True)
    as_torch(c, "cube", "hessian", [e2], lambda: f.vmap(f.hessian(F.cube))(t(e2)), batched=True)
    as_torch(c, "cube", "vjp", [x], lambda: f.vmap(f.vjp(F.cube, t(x))[1])(t(e2))[0],
             cotangents=arr(e2), batched_vectors=True)
    as_torch(c, "cube", "jvp", [x], lambda: f.vmap(lambda v: f.jvp(F.cube, (t(x),), (v,))[1])(t(e2)),
             tangents=arr(e2), batched_vectors=True)


def test_zero_dim_inputs_per_example(c):
    """A 0-d input batched (shape (B,)): vmap(jacrev / hessian / f) with in_dims -1 and
    out_dims, chunk_size 1, and stacks of 0-d vectors for vjp / jvp / hvp."""
    zs, z = rand(4), np.float64(0.3)
    for transform, endpoint in ((f.jacrev, "jacobian"), (f.hessian, "hessian"), (lambda g: g, "evaluate")):
        key = "output" if endpoint == "evaluate" else endpoint
        for options in ({}, {"in_dims": -1, "out_dims": -1}, {"chunk_size": 1}):
            dims = {k: v for k, v in options.items() if k != "chunk_size"}
            got, _ = answer(post(c, "sin2", endpoint, [zs], batched=True, **options), key)
            same(got, f.vmap(transform(F.sin2), **dims)(t(zs)))
    got, _ = answer(post(c, "sin2", "vjp", [z], cotangents=arr(zs), batched_vectors=True), "vjp")
    same(got, f.vmap(f.vjp(F.sin2, t(z))[1])(t(zs))[0])
    got, _ = answer(post(c, "sin2", "jvp", [z], tangents=arr(zs), batched_vectors=True), "jvp")
    same(got, f.vmap(lambda v: f.jvp(F.sin2, (t(z),), (v,))[1])(t(zs)))
    got, _ = answer(post(c, "sin2", "hvp", [z], tangents=arr(zs), batched_vectors=True), "hvp")
    same(got, f.vmap(lambda v: f.jvp(f.grad(F.sin2), (t(z),), (v,))[1])(t(zs)))


def test_inputs_that_alias_each_other(c):
    """jacrev(f, argnums=(0, 1))(x, x): one tensor passed for both parameters; over HTTP
    the same array twice, in every mode and per example, is torch's answer."""
    x, xs = rand(3), rand(2, 3)
    want = f.jacrev(F.mul_sin, argnums=(0, 1))(t(x), t(x))
    for options in ({}, {"mode": "fwd"}, {"chunk_size": 1}):
        got, _ = answer(post(c, "mul_sin", "jacobian", [x, x], argnums=[0, 1], **options), "jacobian")
        same(got, want)
    got, _ = answer(post(c, "mul_sin", "hessian", [x, x], argnums=[0, 1]), "hessian")
    same(got, f.hessian(F.mul_sin, argnums=(0, 1))(t(x), t(x)))
    got, _ = answer(post(c, "mul_sin", "jacobian", [xs, xs], argnums=[0, 1], batched=True), "jacobian")
    same(got, f.vmap(f.jacrev(F.mul_sin, argnums=(0, 1)))(t(xs), t(xs)))


@pytest.mark.parametrize("options", [{}, {"mode": "fwd"}, {"mode": "auto"}, {"chunk_size": 1}, {"batched": True},
                                     {"sparsity": "auto"}, {"endpoint": "hessian"}, {"endpoint": "hessian", "batched": True}])
def test_an_integer_output_is_refused_in_jacrevs_words(c, options):
    """jacrev / torch.func.hessian of f returning (sin x, argmax x) raise; the service's 500 said its own words ("the function returned a torch.int64
    output; only floating outputs can be differentiated") wherever it checked the output
    itself (forward mode, Hessians, per-example, sparse), and torch's only where jacrev
    ran. Now every path says what torch says (a complex output is the wire's refusal
    before it: "the output holds a complex128 tensor, which the wire does not carry"),
    as the request's 422 since round 21 (test_parity_round21), naming the leaf."""
    options = dict(options)
    endpoint = options.pop("endpoint", "jacobian")
    name, fn = "sin_and_argmax", F.sin_and_argmax
    x = rand(3)
    inputs = [np.stack([x, -x])] if options.get("batched") else [x]
    with pytest.raises(RuntimeError) as raised:
        (f.hessian if endpoint == "hessian" else f.jacrev)(fn)(t(x))
    assert "All outputs of f must be floating-point" in str(raised.value)
    body = assert_problem(post(c, name, endpoint, inputs, **options), 422, "invalid_input")
    assert body["detail"].startswith("the output[1] is int64, which has no derivative"), body
    assert str(raised.value).splitlines()[0] in body["detail"], body


@pytest.mark.parametrize("chunk_size", [1, 2])
@pytest.mark.parametrize("argnums", [1, [1, 0]])
def test_hessians_with_chunk_size_and_argnums(c, chunk_size, argnums):
    """TestHessian with TestJac's chunk_size: hessian(f, argnums) in any order, plain and
    per example, is torch's whatever the chunk_size (which only splits the work)."""
    x, y, xs, ys = rand(3), rand(3), rand(2, 3), rand(2, 3)
    torch_argnums = tuple(argnums) if isinstance(argnums, list) else argnums
    got, _ = answer(post(c, "mul_sin", "hessian", [x, y], argnums=argnums, chunk_size=chunk_size), "hessian")
    same(got, f.hessian(F.mul_sin, argnums=torch_argnums)(t(x), t(y)))
    got, _ = answer(post(c, "mul_sin", "hessian", [xs, ys], argnums=argnums, chunk_size=chunk_size, batched=True),
                    "hessian")
    same(got, f.vmap(f.hessian(F.mul_sin, argnums=torch_argnums))(t(xs), t(ys)))
