"""PyTorch's own torch.func test cases, round 30, replayed over HTTP against
tests/parity30_functions.py through the service's JSON / .npz / .npy answers and the SDK's
torch and JAX adapters, compared with in-process torch.func / JAX.

1. Second derivatives of a function with a complex output (R -> C; test_eager_transforms.py's
   TestHessian / TestJvp over complex outputs, a real loss of them such as ``|f|^2``):
   ``torch.func.hessian`` of the loss, a double backward, ``jacrev(jacrev(Re(c f)))``,
   ``jvp(jvp(f))``, ``jvp(vjp(f))`` and all of them under ``vmap`` were the service's 422
   ("has no real derivative") through the adapters where torch and JAX answer: the
   adapters asked for the service's Hessian (which refuses a complex output, as
   torch.func.hessian's jacrev does) or its scalar hvp (which refuses a complex scalar,
   as torch.func.grad does). Now they go by the hvp with (complex) cotangents, one
   request, example by example under ``vmap``; ``jacfwd(jvp(f))`` is torch's own
   RuntimeError, not the service's 422.
2. Integer inputs beside floating ones (indices, an exponent) through the adapters and
   every endpoint: as torch answers (a guard: they did already).
3. TestJac / TestHessian over nested pytrees with argnums tuples and chunk sizes, nested
   aux, a tuple output of three floating dtypes, empty dimensions (a guard: as torch); the
   per-example Jacobians of such an output were right but computed twice: vmap's check
   took a float32 leaf's round-off for vmap being wrong (now the coarsest output's).
4. Outputs of several floating dtypes of a half-precision input (TestJac's dtype cases
   in float16 / bfloat16): a float32 output (or aux) of a float16 or bfloat16 input came
   back from the adapters in the input's half precision (rounded: ``exp`` 5e-4 off in
   float16), its forward-mode derivatives too, where torch and JAX keep float32, and a
   bfloat16 output of a float32 input came back float32: the service sends bfloat16 as
   float32 and the adapters guessed. The evaluate's meta says which leaves were bfloat16
   now (``bfloat16`` / ``aux_bfloat16``, whenever half precision took part).

One in-process app serves the module (no server start), as rounds 7-29.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import parity30_functions as F
from ._remote_support import jx  # noqa: F401  (a fixture: jax with float64 on)
from .conftest import ready_app, sdk_over
from .test_parity_round7 import arr, post, t
from .test_parity_round7 import same as same_wire

f = torch.func
tree_map = torch.utils._pytree.tree_map
RNG = np.random.default_rng(30)
X = torch.tensor(RNG.standard_normal(3))
XS = torch.tensor(RNG.standard_normal((2, 3)))
V = torch.tensor(RNG.standard_normal(3))
W = torch.tensor(RNG.standard_normal(3))


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity30_functions") as client:
        yield client


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Any]:
    with sdk_over(c) as client:
        yield client


def same(got: Any, want: Any, tol: float = 1e-10) -> None:
    """Pytree structure, dtypes, shapes and values."""
    g, g_spec = torch.utils._pytree.tree_flatten(got)
    w, w_spec = torch.utils._pytree.tree_flatten(want)
    assert g_spec == w_spec, (g_spec, w_spec)
    for i, (a, b) in enumerate(zip(g, w)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- 1. complex outputs, second order

def loss(g: Any) -> Any:
    """A real scalar of every output leaf: |f|^2 + Re f (a real leaf's square and itself)."""
    return lambda *a: sum((o.abs() ** 2 + o.real).sum() for o in torch.utils._pytree.tree_leaves(g(*a)))


def real_part(g: Any) -> Any:
    """Re((0.3 - i) f) leaf by leaf: real outputs jacrev takes."""
    return lambda x: tree_map(lambda o: (o * (0.3 - 1j)).real if o.is_complex() else o * 0.3, g(x))


def cotangent(out: Any) -> Any:
    return tree_map(lambda o: torch.ones_like(o) * ((0.5 - 2j) if o.is_complex() else 0.7), out)


def double_backward(g: Any, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(loss(g)(x), x, create_graph=True)
    return torch.autograd.grad((gx * W).sum(), x)[0]


def jvp_jvp(g: Any, x: torch.Tensor) -> Any:
    return f.jvp(lambda y: f.jvp(g, (y,), (V,))[1], (x,), (W,))[1]


def jvp_vjp(g: Any, x: torch.Tensor) -> Any:
    return f.jvp(lambda y: f.vjp(g, y)[1](cotangent(g(y)))[0], (x,), (W,))[1]


COMPLEX_CASES = {
    "hessian(|f|^2)": lambda g: f.hessian(loss(g))(X),
    "double backward": lambda g: double_backward(g, X),
    "jacrev(jacrev(Re(c f)))": lambda g: f.jacrev(f.jacrev(real_part(g)))(X),
    "jvp(jvp)": lambda g: jvp_jvp(g, X),
    "jvp(vjp)": lambda g: jvp_vjp(g, X),
    "vmap(hessian(|f|^2))": lambda g: f.vmap(f.hessian(loss(g)))(XS),
    "vmap(jvp(jvp))": lambda g: f.vmap(lambda x: jvp_jvp(g, x))(XS),
    "vmap(jvp(vjp))": lambda g: f.vmap(lambda x: jvp_vjp(g, x))(XS),
}


@pytest.mark.parametrize("name", ["to_complex", "complex_sum", "real_and_complex64"])
@pytest.mark.parametrize("case", list(COMPLEX_CASES))
def test_a_second_derivatives_of_a_complex_output_are_torchs(sdk, name, case):
    from jacobian_client.torch import remote

    run = COMPLEX_CASES[case]
    tol = 1e-5 if name == "real_and_complex64" else 1e-10  # (complex64's round-off)
    same(run(remote(sdk, name)), run(getattr(F, name)), tol)


def test_a_weights_every_example_shares_in_a_complex_output(sdk):
    from jacobian_client.torch import remote

    def run(g: Any) -> Any:
        h = f.vmap(f.hessian(loss(g), argnums=(0, 1)), in_dims=(None, 0))(W, XS)
        jj = f.vmap(lambda x: f.jvp(lambda w: f.jvp(lambda w2: g(w2, x), (w,), (V,))[1], (W,), (V,))[1])(XS)
        return h, jj

    same(run(remote(sdk, "weighted_complex")), run(F.weighted_complex))


def test_a_a_complex_jvp_of_a_jvp_is_one_hvp_request(sdk):
    """H[v, w] of a complex output: the real and imaginary parts' pairs in one request."""
    from jacobian_client.torch import remote

    seen: list[str] = []
    sdk._http.event_hooks["response"] = [lambda r: seen.append(r.request.url.path.rsplit("/", 1)[-1])]
    try:
        g = remote(sdk, "to_complex")
        same(jvp_jvp(g, X), jvp_jvp(F.to_complex, X))
    finally:
        sdk._http.event_hooks["response"] = []
    assert seen.count("hvp") == 1 and "hessian" not in seen, seen


def test_a_jacfwd_of_a_complex_output_raises_torchs_error(sdk):
    from jacobian_client.torch import remote

    run = lambda g: f.jacfwd(lambda x: f.jvp(g, (x,), (V,))[1])(X)
    with pytest.raises(RuntimeError, match="Expected all outputs to be real") as want:
        run(F.to_complex)
    with pytest.raises(RuntimeError) as got:
        run(remote(sdk, "to_complex"))
    assert str(got.value) == str(want.value)


def test_a_jax_second_derivatives_of_a_complex_output_are_jaxs(sdk, jx):
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    local = {"to_complex": lambda x: x * jnp.exp(1j * x), "complex_sum": lambda x: jnp.sum(x * jnp.exp(1j * x))}
    x, xs, v = jnp.asarray(X.numpy()), jnp.asarray(XS.numpy()), jnp.asarray(V.numpy())
    real_loss = lambda g: (lambda y: jnp.sum(jnp.abs(g(y)) ** 2 * jnp.real(g(y)) + jnp.imag(g(y))))
    cases = {
        "hessian": lambda g: jax.hessian(real_loss(g))(x),
        "vmap(hessian)": lambda g: jax.vmap(jax.hessian(real_loss(g)))(xs),
        "jvp(jvp)": lambda g: jax.jvp(lambda y: jax.jvp(g, (y,), (v,))[1], (x,), (v * 2,))[1],
        "jacfwd(jacfwd)": lambda g: jax.jacfwd(jax.jacfwd(g))(x),
        "vmap(jacfwd(jacfwd))": lambda g: jax.vmap(jax.jacfwd(jax.jacfwd(g)))(xs),
    }
    # (each case costs JAX a trace of its own, 1-2 CPU-s for a Hessian: vmap(hessian) of the
    # complex scalar, the jvps and jacfwds of the vector)
    skip = {"to_complex": {"vmap(hessian)"}, "complex_sum": {"jacfwd(jacfwd)", "vmap(jacfwd(jacfwd))"}}
    for name, fn in local.items():
        for label, run in cases.items():
            if label in skip[name]:
                continue
            got, want = run(remote(sdk, name)), run(fn)
            assert got.dtype == want.dtype and got.shape == want.shape, (name, label, got.dtype, want.dtype)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name} {label}")


# --------------------------------------------------------------------------- 2. integer inputs

IDX = torch.tensor([0, 2, 2, 1])
IDXS = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 0]])
INT_CASES = {
    "jacrev": lambda g: f.jacrev(g)(X, IDX),
    "jacfwd": lambda g: f.jacfwd(g)(X, IDX),
    "hessian": lambda g: f.hessian(g)(X, IDX),
    "vmap(jacrev), both batched": lambda g: f.vmap(f.jacrev(g))(XS, IDXS),
    "vmap(hessian), both batched": lambda g: f.vmap(f.hessian(g))(XS, IDXS),
    "vmap(jacfwd), indices shared": lambda g: f.vmap(f.jacfwd(g), in_dims=(0, None))(XS, IDX),
    "vmap over the indices alone": lambda g: f.vmap(lambda i: f.jacrev(g)(X, i))(IDXS),
}


@pytest.mark.parametrize("case", list(INT_CASES))
def test_b_integer_inputs_beside_floating_ones_are_torchs(sdk, case):
    from jacobian_client.torch import remote

    run = INT_CASES[case]
    same(run(remote(sdk, "gather_at")), run(F.gather_at))
    k = torch.tensor(3)
    same(f.hessian(remote(sdk, "power_k"))(X, k), f.hessian(F.power_k)(X, k))


def test_b_integer_inputs_on_every_endpoint_are_torchs(c):
    x, idx = X.numpy(), IDX.numpy()
    answers = {
        "jacobian": f.jacrev(F.gather_at)(X, IDX),
        "hessian": f.hessian(F.gather_at)(X, IDX),
        "vjp": f.vjp(lambda y: F.gather_at(y, IDX), X)[1](torch.ones(4, dtype=torch.float64))[0],
        "jvp": f.jvp(lambda y: F.gather_at(y, IDX), (X,), (V,))[1],
    }
    vectors = {"vjp": {"cotangents": arr(np.ones(4))}, "jvp": {"tangents": arr(V.numpy())}}
    for kind, want in answers.items():
        r = post(c, "gather_at", kind, [x, idx], **vectors.get(kind, {}))
        assert r.status_code == 200, r.text
        same_wire(wire.decode_tree(r.json()[kind]), want)
    buf = io.BytesIO()
    np.savez(buf, x=x, idx=idx)
    r = c.post("/v1/functions/gather_at/jacobian", content=buf.getvalue(),
               headers={"content-type": "application/x-npz", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    same_wire(np.load(io.BytesIO(r.content)), answers["jacobian"])


def test_b_jax_integer_inputs_beside_floating_ones_are_jaxs(sdk, jx):
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    g = remote(sdk, "gather_at")
    local = lambda x, i: x[i] ** 2 * x.sum()
    x, idx, xs, idxs = (jnp.asarray(a.numpy()) for a in (X, IDX, XS, IDXS))
    for label, run in {"jacrev": lambda h: jax.jacrev(h)(x, idx),
                       "vmap(jacrev)": lambda h: jax.vmap(jax.jacrev(h))(xs, idxs),
                       "grad": lambda h: jax.grad(lambda y, i: h(y, i).sum())(x, idx)}.items():
        got, want = run(g), run(local)
        assert got.dtype == want.dtype and got.shape == want.shape, label
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12, err_msg=label)


# --------------------------------------------------------------------------- 3. pytrees, dtypes, empty dims

P = {"a": RNG.standard_normal(3),
     "bc": (RNG.standard_normal(()), [RNG.standard_normal(3), RNG.standard_normal((2, 3))])}
PS = {"a": RNG.standard_normal((2, 3)),
      "bc": (RNG.standard_normal(2), [RNG.standard_normal((2, 3)), RNG.standard_normal((2, 2, 3))])}


@pytest.mark.parametrize("argnums", [1, (0, 1), (1, 0), (-2,)])
@pytest.mark.parametrize("transport", ["json", "binary"])
def test_c_nested_pytrees_with_argnums_tuples_are_torchs(sdk, argnums, transport):
    x = X.numpy()
    for chunk_size in (None, 1, 5):
        got = sdk.jacobian("nested_tree", P, x, argnums=argnums, chunk_size=chunk_size, transport=transport)
        same_wire(got, f.jacrev(F.nested_tree, argnums=argnums, chunk_size=chunk_size)(*t([P, x])))
    # (torch's own hessian / jacfwd of a negative argnum answers zeros, its tangents never
    # reaching the input, round 25: the position it names, as the service takes it)
    positive = argnums % 2 if isinstance(argnums, int) else tuple(a % 2 for a in argnums)
    same_wire(sdk.hessian("nested_tree", P, x, argnums=argnums, transport=transport),
              f.hessian(F.nested_tree, argnums=positive)(*t([P, x])))
    same_wire(sdk.jacobian("nested_tree", PS, XS.numpy(), argnums=argnums, batched=True, transport=transport),
              f.vmap(f.jacrev(F.nested_tree, argnums=argnums))(*t([PS, XS.numpy()])))


@pytest.mark.parametrize("transport", ["json", "binary"])
def test_c_nested_aux_and_mixed_dtype_outputs_are_torchs(sdk, transport):
    x = X.numpy()
    for chunk_size in (None, 1, 2):
        same_wire(sdk.jacobian("nested_aux", x, chunk_size=chunk_size, transport=transport),
                  f.jacrev(F.nested_aux, has_aux=True, chunk_size=chunk_size)(X))
    same_wire(sdk.jacobian("nested_aux", XS.numpy(), batched=True, transport=transport),
              f.vmap(f.jacrev(F.nested_aux, has_aux=True))(XS))
    same_wire(sdk.jacobian("mixed_dtypes", x, transport=transport), f.jacrev(F.mixed_dtypes)(X))
    same_wire(sdk.jacobian("mixed_dtypes", x, mode="fwd", transport=transport), f.jacrev(F.mixed_dtypes)(X))
    same_wire(sdk.hessian("mixed_dtypes", x, transport=transport), f.hessian(F.mixed_dtypes)(X))
    same_wire(sdk.evaluate("mixed_dtypes", x, transport=transport), F.mixed_dtypes(X))


def test_c_per_example_jacobians_of_mixed_dtype_outputs_keep_vmap(c, caplog):
    """vmap's per-example Jacobians are checked against one VJP at the first output's
    round-off (float64 here): the float32 leaf's products round in float32, so the check
    took vmap for wrong ("vmap of mixed_dtypes's per-example Jacobians disagrees with one
    VJP"), and the Jacobians ran again example by example. Now the coarsest output's."""
    rng = np.random.default_rng(3)
    rng.standard_normal(3)
    xs = rng.standard_normal((2, 3))  # (values where float32's round-off shows)
    with caplog.at_level("WARNING", logger="jacobian_service.engine"):
        r = post(c, "mixed_dtypes", "jacobian", [xs], batched=True)
        assert r.status_code == 200, r.text
        same_wire(wire.decode_tree(r.json()["jacobian"]), f.vmap(f.jacrev(F.mixed_dtypes))(t(xs)))
    assert not [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]


@pytest.mark.parametrize(("m", "n"), [(0, 3), (2, 0), (0, 0)])
def test_c_empty_dimensions_are_torchs(c, m, n):
    xe, ye = RNG.standard_normal((m, n)), RNG.standard_normal(n)
    want = f.jacrev(F.empty_rows, argnums=(0, 1))(*t([xe, ye]))
    # chunk_size=1 too: the result never depends on it (torch's own jacrev(chunk_size=1)
    # raises an AssertionError where every output is empty, m = n = 0)
    for chunk_size in (None, 1):
        r = post(c, "empty_rows", "jacobian", [xe, ye], argnums=[0, 1], chunk_size=chunk_size)
        assert r.status_code == 200, r.text
        same_wire(wire.decode_tree(r.json()["jacobian"]), want)
    r = post(c, "empty_rows", "hessian", [xe, ye], argnums=[0, 1])
    assert r.status_code == 200, r.text
    same_wire(wire.decode_tree(r.json()["hessian"]), f.hessian(F.empty_rows, argnums=(0, 1))(*t([xe, ye])))
    r = c.post("/v1/functions/empty_rows/jacobian", json={"inputs": [arr(xe), arr(ye)], "argnums": 0},
               headers={"accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    trees, _ = wire.read_result_npz(r.content)
    same_wire(trees["jacobian"], f.jacrev(F.empty_rows)(*t([xe, ye])))


# --------------------------------------------------------------------------- 4. half precision beside float32

HALF_CASES = {
    "call": lambda g, x: g(x),
    "jacfwd": lambda g, x: f.jacfwd(lambda y: g(y)[0])(x),
    "jvp": lambda g, x: f.jvp(lambda y: g(y)[0], (x,), (torch.ones_like(x),)),
    "vmap": lambda g, x: f.vmap(g)(torch.stack([x, -x])),
    "vmap, no examples": lambda g, x: f.vmap(g)(x[None][:0]),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", list(HALF_CASES))
def test_d_outputs_of_other_floating_dtypes_than_a_half_inputs_are_torchs(sdk, dtype, case):
    from jacobian_client.torch import remote

    run = HALF_CASES[case]
    x = torch.tensor([0.3, -1.7, 2.9], dtype=dtype)
    same(run(remote(sdk, "precisions"), x), run(F.precisions, x), tol=0)  # the same ops in the same dtypes


def test_d_the_evaluates_meta_says_which_leaves_were_bfloat16(c):
    x16 = {"dtype": "float16", "shape": [3], "data": [0.5, 1.0, 2.0]}
    r = c.post("/v1/functions/precisions/evaluate", json={"inputs": [x16]})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["bfloat16"] == [False, False, True] and r.json()["meta"]["aux_bfloat16"] == [False, False]
    r = post(c, "precisions", "evaluate", [X.numpy()])  # float64 in: bfloat16 out all the same
    assert r.json()["meta"]["bfloat16"] == [False, False, True], r.json()["meta"]
    r = post(c, "to_complex", "evaluate", [X.numpy()])  # no half precision: nothing said
    assert "bfloat16" not in r.json()["meta"], r.json()["meta"]
    buf = io.BytesIO()
    np.savez(buf, x=np.array([0.5, 1.0, 2.0], np.float16))
    r = c.post("/v1/functions/precisions/evaluate?batched=false", content=buf.getvalue(),
               headers={"content-type": "application/x-npz", "accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    _, meta = wire.read_result_npz(r.content)
    assert meta["bfloat16"] == [False, False, True] and meta["aux_bfloat16"] == [False, False], meta


def test_d_jax_outputs_of_other_floating_dtypes_than_a_half_inputs_are_jaxs(sdk, jx):
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    def local(x: Any) -> Any:
        return jnp.sin(x), jnp.exp(x.astype(jnp.float32)), jnp.cos(x).astype(jnp.float16)

    g = remote(sdk, "mixed_dtypes")
    for dtype in (jnp.float16, jnp.bfloat16):
        x = jnp.asarray([0.3, -1.7, 2.9], dtype)
        cases = {"call": lambda h, x: h(x), "jit": lambda h, x: jax.jit(h)(x),
                 "jacfwd": lambda h, x: jax.jacfwd(h)(x), "vmap": lambda h, x: jax.vmap(h)(jnp.stack([x, -x]))}
        for label, run in cases.items():
            got, want = run(g, x), run(local, x)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                assert a.dtype == b.dtype and a.shape == b.shape, (dtype, label, a.dtype, b.dtype)
                np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-2 if
                                           a.dtype != np.float32 else 1e-6, err_msg=f"{dtype} {label}")
