"""PyTorch's own torch.func test cases, round 11.

1. The SDK's remote adapters under ``vmap`` with an input every example shares
   (test_vmap.py's ``in_dims=(0, None)``, test_eager_transforms.py's per-sample
   gradients with shared weights): ``torch.func.vmap`` / ``jax.vmap`` over a remote
   function send the shared input once, the request's ``in_dims`` saying so, and every
   transform around them (jacrev, jacfwd, grad, jvp, vjp, hessian, backward, nested vmaps)
   equals the same transform of the function run in-process. These run against the
   session's ``jacobian-service serve`` (tests/_remote_support.py): torch's forward-mode
   levels are one list per process, which an in-process engine's thread would share.
2. More of test_eager_transforms.py (TestLinearize, TestJvp, TestHessian, grad and
   grad_and_value, functional_call, ops without a derivative, unrelated and integer
   outputs, in-place ops, data-dependent control flow under vmap) replayed over HTTP
   against tests/parity11_functions.py, served by one in-process app for the module.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import httpx
import jacobian_client as jc
import numpy as np
import pytest
import torch
from jacobian_client import wire
from jacobian_client.torch import remote

from . import parity11_functions as F
from . import user_functions as uf
from ._client_functions import cubic_pair
from ._remote_support import jx  # noqa: F401 (fixture)
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t, wire_tree

f = torch.func


# --------------------------------------------------------------------------- 1. remote vmap, shared inputs


class Recorded:
    """A client whose requests are recorded: endpoint, ``in_dims`` and the shape of each
    input sent (the members of the binary body)."""

    def __init__(self, url: str) -> None:
        self.requests: list[tuple[str, Any, dict[str, tuple[int, ...]]]] = []
        self.client = jc.Client(url)
        self.client._http.event_hooks["request"] = [self._record]

    def _record(self, request: httpx.Request) -> None:
        endpoint = request.url.path.rsplit("/", 1)[-1]
        dims = request.url.params.get("in_dims")
        shapes: dict[str, tuple[int, ...]] = {}
        if request.content[:2] == b"PK":  # an .npz: one member per input (and vectors)
            with np.load(io.BytesIO(request.content)) as z:
                shapes = {k: z[k].shape for k in z.files}
        elif request.content[:6] == b"\x93NUMPY":
            shapes = {"0": np.load(io.BytesIO(request.content)).shape}
        self.requests.append((endpoint, None if dims is None else json.loads(dims), shapes))

    def take(self) -> list[tuple[str, Any, dict[str, tuple[int, ...]]]]:
        out, self.requests = self.requests, []
        return out


@pytest.fixture(scope="module")
def recorded(remote_server: str) -> Iterator[Recorded]:
    r = Recorded(remote_server)
    try:
        yield r
    finally:
        r.client.close()


@pytest.fixture
def rc(recorded: Recorded) -> Recorded:
    recorded.take()  # a test's own requests only
    return recorded


def close(got: Any, want: Any, tol: float = 1e-10) -> None:
    if isinstance(want, (tuple, list)):
        assert isinstance(got, type(want)) and len(got) == len(want), (type(got), type(want))
        for g, w in zip(got, want):
            close(g, w, tol)
        return
    assert isinstance(got, torch.Tensor), type(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _sent_once(requests, shared: str, shape: tuple[int, ...], in_dims: list[Any]) -> None:
    """Every request of the call sent input ``shared`` once, with these ``in_dims``."""
    assert requests, "no request"
    for endpoint, dims, shapes in requests:
        assert dims == in_dims, (endpoint, dims)
        assert shapes[shared] == shape, (endpoint, shapes)


torch.manual_seed(11)
A = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
BS = torch.randn(4, 3, dtype=torch.float64)  # four right-hand sides, one matrix every example shares
TA, TBS = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)


def test_torch_vmap_sends_a_shared_input_once(rc):
    """vmap(f, in_dims=(None, 0)): torch's vmap does not copy A per example; the request
    did (4 x 3 x 3 for a 3 x 3 matrix). Now A goes once and the request's in_dims say so,
    for the value and every per-example derivative."""
    solve = remote(rc.client, "solve")
    close(f.vmap(solve, in_dims=(None, 0))(A, BS), f.vmap(uf.solve, in_dims=(None, 0))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # torch's own vmap(jacfwd(linalg.solve)) is far off (README: forward mode under a vmap
    # over examples); each example's jacfwd is right, and the service answers that
    want = tuple(torch.stack(blocks) for blocks in zip(*[f.jacfwd(uf.solve, argnums=(0, 1))(A, b) for b in BS]))
    for transform in (f.jacrev, f.jacfwd):
        close(f.vmap(transform(solve, argnums=(0, 1)), in_dims=(None, 0))(A, BS), want)
        _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # the shared input second, and a batch dim other than 0: in_dims as torch's
    got = f.vmap(lambda b, a: solve(a, b), in_dims=(1, None))(BS.T, A)
    close(got, f.vmap(lambda b, a: uf.solve(a, b), in_dims=(1, None))(BS.T, A))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])


def test_torch_gradients_of_a_shared_input_sum_over_the_examples(rc):
    """The shared input's gradient is the examples' sum (torch's vmap expands it, and the
    expand's backward sums): through .backward(), grad and vjp of the vmapped function;
    per example under vmap(grad)."""
    solve = remote(rc.client, "solve")
    a_remote, a_local = A.clone().requires_grad_(), A.clone().requires_grad_()
    (f.vmap(solve, in_dims=(None, 0))(a_remote, BS) ** 2).sum().backward()
    (f.vmap(uf.solve, in_dims=(None, 0))(a_local, BS) ** 2).sum().backward()
    close(a_remote.grad, a_local.grad)
    _sent_once(rc.take(), "0", (3, 3), [None, 0])

    def loss(g):
        return lambda a, b: (g(a, b) ** 2).sum()

    def batch_loss(g):
        return lambda a, bs: (f.vmap(g, in_dims=(None, 0))(a, bs) ** 2).sum()

    close(f.grad(batch_loss(solve), argnums=(0, 1))(A, BS), f.grad(batch_loss(uf.solve), argnums=(0, 1))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    close(f.vmap(f.grad(loss(solve), argnums=(0, 1)), in_dims=(None, 0))(A, BS),
          f.vmap(f.grad(loss(uf.solve), argnums=(0, 1)), in_dims=(None, 0))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    cot = torch.randn(4, 3, dtype=torch.float64)
    close(f.vjp(f.vmap(solve, in_dims=(None, 0)), A, BS)[1](cot),
          f.vjp(f.vmap(uf.solve, in_dims=(None, 0)), A, BS)[1](cot))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # test_per_sample_grads' shape: per-example gradients of shared weights
    xs = torch.randn(5, 2, 3, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ln = remote(rc.client, "layer_norm_affine_sum")
    close(f.vmap(f.grad(ln, argnums=(1, 2)), in_dims=(0, None, None))(xs, w, b),
          f.vmap(f.grad(uf.layer_norm_affine_sum, argnums=(1, 2)), in_dims=(0, None, None))(xs, w, b))
    requests = rc.take()
    _sent_once(requests, "1", (3,), [0, None, None])
    assert [shapes["0"] for _, _, shapes in requests] == [(5, 2, 3)] * len(requests)


def test_torch_forward_mode_and_hessians_with_a_shared_input(rc):
    """A shared input's tangent is shaped like it (jvp of the vmapped function), and it is
    spread over the examples for the request; per-example Hessians (second-order
    requests with the shared input once)."""
    solve = remote(rc.client, "solve")
    close(f.jvp(f.vmap(solve, in_dims=(None, 0)), (A, BS), (TA, TBS)),
          f.jvp(f.vmap(uf.solve, in_dims=(None, 0)), (A, BS), (TA, TBS)))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    close(f.jacfwd(f.vmap(solve, in_dims=(None, 0)))(A, BS), f.jacfwd(f.vmap(uf.solve, in_dims=(None, 0)))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    xs, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pair = remote(rc.client, "cubic_pair")

    def value(g):
        return lambda x, w: g(x, w)[0]

    close(f.vmap(f.hessian(value(pair), argnums=(0, 1)), in_dims=(0, None))(xs, w),
          f.vmap(f.hessian(value(cubic_pair), argnums=(0, 1)), in_dims=(0, None))(xs, w))
    _sent_once(rc.take(), "1", (3,), [0, None])


def test_torch_nested_vmaps_merge_their_batches_and_keep_a_shared_input_shared(rc):
    """Nested vmaps are one request (their batches merged): an input no level maps is
    still sent once; one mapped by some levels only is spread over the others (the
    service takes one batch dim per input), and the answers are torch's either way."""
    solve = remote(rc.client, "solve")
    bss = torch.randn(2, 4, 3, dtype=torch.float64)
    inner = (None, 0)
    close(f.vmap(f.vmap(solve, in_dims=inner), in_dims=inner)(A, bss),
          f.vmap(f.vmap(uf.solve, in_dims=inner), in_dims=inner)(A, bss))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    close(f.vmap(f.vmap(f.jacrev(solve), in_dims=inner), in_dims=inner)(A, bss),
          f.vmap(f.vmap(f.jacrev(uf.solve), in_dims=inner), in_dims=inner)(A, bss))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # A mapped by the outer level only, b by the inner only: both spread to 2 x 4
    As = A + 0.1 * torch.randn(2, 3, 3, dtype=torch.float64)
    close(f.vmap(f.vmap(solve, in_dims=inner), in_dims=(0, None))(As, BS),
          f.vmap(f.vmap(uf.solve, in_dims=inner), in_dims=(0, None))(As, BS))
    [(endpoint, dims, shapes)] = rc.take()
    assert (endpoint, dims, shapes["0"], shapes["1"]) == ("evaluate", None, (8, 3, 3), (8, 3))
    # A shared by the inner level and mapped by the outer: spread over the inner batch
    grads = f.vmap(f.vmap(f.grad(lambda a, b: solve(a, b).sum()), in_dims=inner), in_dims=(0, None))(As, BS)
    close(grads, f.vmap(f.vmap(f.grad(lambda a, b: uf.solve(a, b).sum()), in_dims=inner), in_dims=(0, None))(As, BS))


def jclose(jax: Any, got: Any, want: Any, tol: float = 1e-10) -> None:
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def test_jax_vmap_sends_a_shared_input_once(rc, jx):
    """jax.vmap(f, in_axes=(None, 0)) broadcast A to every example for the request; now
    it goes once, and grad through the vmap (jvp, then transposed: the shared input's
    tangent spread over the examples, its cotangent summed) is the same function's in
    torch (jnp.linalg.solve's would cost seconds of tracing for the same numbers)."""
    jax = jx
    import jax.numpy as jnp
    from jacobian_client.jax import remote as jax_remote

    solve = jax_remote(rc.client, "solve")
    a, bs = jnp.asarray(A.numpy()), jnp.asarray(BS.numpy())
    solve(a, bs[0])  # the shapes, learned once at real values
    rc.take()
    jclose(jax, jax.vmap(solve, in_axes=(None, 0))(a, bs), jnp.asarray(f.vmap(uf.solve, in_dims=(None, 0))(A, BS).numpy()))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])

    def batch_loss(g, vmap, dims):
        return lambda a, bs: (vmap(g, dims)(a, bs) ** 2).sum()

    want = f.grad(batch_loss(uf.solve, f.vmap, (None, 0)), argnums=(0, 1))(A, BS)
    jclose(jax, jax.grad(batch_loss(solve, jax.vmap, (None, 0)), argnums=(0, 1))(a, bs),
           tuple(jnp.asarray(w.numpy()) for w in want))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])


# --------------------------------------------------------------------------- 2. test_eager_transforms.py, more


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity11_functions") as client:
        yield client


RNG = np.random.default_rng(11)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


def test_linearize_is_a_jvp_with_the_output(c):
    """TestLinearize: linearize(f, x) is (f(x), jvp_fn), whose answers those tests hold
    equal to jvp's (the reference here: linearize traces with make_fx, seconds); over
    HTTP one jvp with return_output, a stack of tangents for vmap(jvp_fn)
    (test_linearize_composition), and a dict-and-tuple input with a nested dict output
    (..._nested_input_nested_output)."""
    x, tx, txs = rand(3, 1), rand(3, 1), rand(3, 3, 1)

    def jvp_fn(v):
        return f.jvp(F.cos_and_sum, (t(x),), (v,))[1]

    output = F.cos_and_sum(t(x))
    got, doc = answer(post(c, "cos_and_sum", "jvp", [x], tangents=arr(tx), return_output=True), "jvp")
    same(got, jvp_fn(t(tx)))
    same(wire.decode_tree(doc["output"]), output)
    got, _ = answer(post(c, "cos_and_sum", "jvp", [x], tangents=arr(txs), batched_vectors=True), "jvp")
    same(got, f.vmap(jvp_fn)(t(txs)))
    arg = {"x": rand(3, 1), "yz": (rand(3, 1), rand(3, 1))}
    tan = {"x": rand(3, 1), "yz": (rand(3, 1), rand(3, 1))}
    output, tangent = f.jvp(F.nested_io, (t(arg),), (t(tan),))
    got, doc = answer(post(c, "nested_io", "jvp", [arg], tangents=wire_tree(tan), return_output=True), "jvp")
    same(got, tangent)
    same(wire.decode_tree(doc["output"]), output)


def test_jvp_of_pytrees_aux_and_unrelated_inputs_and_outputs(c):
    """TestJvp: test_pytree_inputs (tuple tangents, 0-d leaves), test_unrelated_input /
    _output (the input itself; a captured tensor: zeros), test_aux_pytree, an integer
    output's tangent (int64 zeros), and test_disable_fwd_grad_inside: the jvp is torch's
    2x t, where jacrev (and so the service's Jacobian, in every mode) says 0."""
    one = np.array(1.0, dtype="float32")
    primals, tangents = ((one, one), one, one), ((one, 2 * one), one, one)
    want = f.jvp(F.pytree_affine, t(primals), t(tangents))
    got, doc = answer(post(c, "pytree_affine", "jvp", list(primals), tangents=wire_tree(tangents), argnums=[0, 1, 2],
                           return_output=True), "jvp")
    same((wire.decode_tree(doc["output"]), got), want)
    x, y, tx, ty = rand(2, 3), rand(2, 3), rand(2, 3), rand(2, 3)
    got, _ = answer(post(c, "first_only", "jvp", [x, y], tangents=wire_tree([tx, ty]), argnums=[0, 1]), "jvp")
    same(got, f.jvp(F.first_only, (t(x), t(y)), (t(tx), t(ty)))[1])
    got, _ = answer(post(c, "unrelated_output", "jvp", [x], tangents=arr(tx)), "jvp")
    same(got, f.jvp(F.unrelated_output, (t(x),), (t(tx),))[1])
    v, tv = rand(3), rand(3)
    _, tangent, aux = f.jvp(F.sin_aux_tree, (t(v),), (t(tv),), has_aux=True)
    got, doc = answer(post(c, "sin_aux_tree", "jvp", [v], tangents=arr(tv)), "jvp")
    same((got, wire.decode_tree(doc["aux"], sequence=list)), (tangent, aux))
    got, _ = answer(post(c, "sin_and_argmax", "jvp", [v], tangents=arr(tv)), "jvp")
    same(got, f.jvp(F.sin_and_argmax, (t(v),), (t(tv),))[1])
    got, _ = answer(post(c, "forward_grad_off", "jvp", [v], tangents=arr(tv)), "jvp")
    same(got, f.jvp(F.forward_grad_off, (t(v),), (t(tv),))[1])
    np.testing.assert_allclose(got, 2 * v * tv, rtol=1e-6)
    for mode in ("rev", "fwd"):
        got, doc = answer(post(c, "forward_grad_off", "jacobian", [v], mode=mode), "jacobian")
        same(got, f.jacrev(F.forward_grad_off)(t(v)))
        assert doc["meta"]["mode"] == "rev" and not got.any()


def test_hessians_of_several_inputs(c):
    """TestHessian: several inputs with argnums tuples in any order, outputs unrelated to
    some input or to all (zeros), and vmap(hessian(loss)) == vmap(jacrev(jacrev(loss)))
    per example (test_jacfwd_different_levels)."""
    xyz = [rand(2, 3), rand(3, 5), rand(5, 5)]
    got, _ = answer(post(c, "relu_chain", "hessian", xyz, argnums=[2, 0]), "hessian")
    same(got, f.hessian(F.relu_chain, argnums=(2, 0))(*t(xyz)), rtol=1e-5)
    for name in ("ignores_y", "ones_scalar"):
        xy = [rand(2), rand(3)]
        got, _ = answer(post(c, name, "hessian", xy, argnums=[0, 1]), "hessian")
        same(got, f.hessian(getattr(F, name), argnums=(0, 1))(*t(xy)))
    batch = [rand(3, 2, 2), rand(3, 5, 2), rand(3, 5, 2)]
    got, _ = answer(post(c, "fit_loss", "hessian", batch, batched=True), "hessian")
    same(got, f.vmap(f.jacrev(f.jacrev(F.fit_loss)))(*t(batch)), rtol=1e-5)


def test_a_scalar_outputs_jacobian_is_grad_and_value(c):
    """grad / grad_and_value: the Jacobian of a 0-d output is shaped like each input (the
    gradient), return_output is the value, the aux as has_aux returns it (plain numbers
    too: torch.func.grad would refuse those, jacrev-style aux keeps them)."""
    x, y = rand(2, 3), rand(3)
    (grads, value) = f.grad_and_value(lambda a, b: F.loss_with_aux(a, b)[0], argnums=(0, 1))(t(x), t(y))
    got, doc = answer(post(c, "loss_with_aux", "jacobian", [x, y], argnums=[0, 1], return_output=True), "jacobian")
    same(got, grads)
    same(wire.decode_tree(doc["output"]), value)
    assert doc["aux"]["count"] == 3
    same(wire.decode_tree(doc["aux"]["norm"]), t(y).norm())


def test_functional_call_over_a_module_with_buffers(c):
    """functional_call(module, (params, buffers), x): Jacobians in the parameters (a dict
    keyed by dotted names) and the input, per example with the bias shared, and the
    module's own buffers untouched."""
    params, x = {"lin.weight": rand(2, 3), "lin.bias": rand(2)}, rand(3)
    scale = F._MODULE.scale.clone()
    got, _ = answer(post(c, "module_call", "jacobian", [params, x], argnums=[0, 1]), "jacobian")
    same(got, f.jacrev(F.module_call, argnums=(0, 1))(t(params), t(x)))
    batch = {"lin.weight": rand(4, 2, 3), "lin.bias": rand(2)}
    xs, dims = rand(4, 3), [{"lin.weight": 0, "lin.bias": None}, 0]
    got, _ = answer(post(c, "module_call", "jacobian", [batch, xs], argnums=0, batched=True, in_dims=dims), "jacobian")
    same(got, f.vmap(f.jacrev(F.module_call), in_dims=({"lin.weight": 0, "lin.bias": None}, 0))(t(batch), t(xs)))
    assert torch.equal(F._MODULE.scale, scale)


def test_an_op_without_a_derivative_is_torchs_error(c):
    """igamma has no derivative in its first input (NotImplementedError, reverse and
    forward mode): every derivative request is a 500 function_error with torch's message
    and no traceback, as SPEC's table has it; its value is answered."""
    a = np.abs(rand(3)) + 0.5
    with pytest.raises(NotImplementedError):
        f.jacrev(F.gammainc_in_a)(t(a))
    with pytest.raises(NotImplementedError):
        f.jvp(F.gammainc_in_a, (t(a),), (t(a),))
    for endpoint, options, says in [
        ("jacobian", {}, "the derivative for 'igamma: input' is not implemented"),
        ("jacobian", {"mode": "fwd"}, "the derivative for 'igamma: input' is not implemented"),
        ("vjp", {"cotangents": arr(a)}, "the derivative for 'igamma: input' is not implemented"),
        ("jvp", {"tangents": arr(a)}, "Trying to use forward AD with igamma"),
        ("hessian", {}, "igamma"),
    ]:
        body = assert_problem(post(c, "gammainc_in_a", endpoint, [a], **options), 500, "function_error")
        assert body["detail"].startswith("NotImplementedError: ") and says in body["detail"], (endpoint, body)
    got, _ = answer(post(c, "gammainc_in_a", "evaluate", [a]), "output")
    same(got, F.gammainc_in_a(t(a)))


def test_in_place_writes_and_data_dependent_control_flow(c):
    """In-place on an input: forward mode runs it (jvp as torch's), reverse mode raises
    torch's leaf-variable error (500), a batched evaluate runs. Control flow on a value
    (.item()): torch's vmap refuses it; per-example requests answer each example's
    torch.func result, with chunks of one row or not."""
    x, tx = rand(3), rand(3)
    got, _ = answer(post(c, "doubles_input", "jvp", [x], tangents=arr(tx)), "jvp")
    same(got, f.jvp(F.doubles_input, (t(x),), (t(tx),))[1])
    body = assert_problem(post(c, "doubles_input", "jacobian", [x]), 500, "function_error")
    assert "leaf Variable that requires grad is being used in an in-place operation" in body["detail"]
    with pytest.raises(RuntimeError, match="in-place operation"):
        f.jacrev(F.doubles_input)(t(x))
    xs = np.array([[1, 2, 3], [-1, -2, -3]], dtype="float32")
    got, _ = answer(post(c, "doubles_input", "evaluate", [xs], batched=True), "output")
    same(got, f.vmap(F.doubles_input)(t(xs)))
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        f.vmap(f.jacrev(F.branchy))(t(xs))
    want = torch.stack([f.jacrev(F.branchy)(v) for v in t(xs)])
    for options in ({}, {"chunk_size": 1}):
        got, _ = answer(post(c, "branchy", "jacobian", [xs], batched=True, **options), "jacobian")
        same(got, want)
    got, _ = answer(post(c, "branchy", "hessian", [xs], batched=True), "hessian")
    same(got, torch.stack([f.hessian(F.branchy)(v) for v in t(xs)]))


def test_a_stack_of_products_of_a_random_function_is_of_one_draw(c):
    """jacfwd / vmap(jvp)'s randomness=: torch's vmap refuses a random op (randomness=
    "error"), so the service runs the tangents one at a time, and each drew its own
    dropout mask; return_output's output was yet another draw, so J t_k matched neither
    the output nor each other (a 200). Now every product replays the draws of the call
    whose output is answered, as randomness="same" gives them, and as the Jacobian (one
    call, its VJPs) is."""
    x = np.abs(rand(16)) + 0.5
    with pytest.raises(RuntimeError, match="randomness"):
        f.jacfwd(F.dropout_train)(t(x))
    f.jacfwd(F.dropout_train, randomness="same")(t(x))  # runs: one mask for every tangent
    got, doc = answer(post(c, "dropout_train", "jvp", [x], tangents=arr(np.eye(16, dtype="float32")),
                           batched_vectors=True, return_output=True), "jvp")
    output = wire.decode_tree(doc["output"])
    same(np.diag(got), output / x, rtol=1e-6)  # J e_k at k: mask_k / (1 - p), the output's own mask
    assert not (got - np.diag(np.diag(got))).any()
    ts = rand(3, 16)
    got, doc = answer(post(c, "noisy_energy", "hvp", [x], tangents=arr(ts), batched_vectors=True,
                           return_output=True), "hvp")
    r = wire.decode_tree(doc["output"]) / (x.astype("float64") ** 2).sum()
    np.testing.assert_allclose(got, 2 * r * ts, rtol=1e-5)
    got, doc = answer(post(c, "noisy_energy", "hvp", [x], tangents=arr(ts[0]), return_output=True), "hvp")
    r = wire.decode_tree(doc["output"]) / (x.astype("float64") ** 2).sum()
    np.testing.assert_allclose(got, 2 * r * ts[0], rtol=1e-5)
