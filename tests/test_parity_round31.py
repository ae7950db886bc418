"""PyTorch's own torch.func test cases, round 31: test_ops.py's OpInfo samples of ops
whose derivatives are tricky (tests/parity31_functions.py: index_put / index_add with a
duplicate index, scatter_reduce's sum, prod, mean and amax, cumprod and prod through
zeros, eigh and svd through gauge-invariant functions, a norm at zero, ``where`` with a
NaN in the branch not taken, nan_to_num, masked_fill of a 0-d value, grid_sample's
border and reflection padding, embedding with a padding_idx met twice, ctc_loss with 1-d
targets), replayed over HTTP in float64 and float32 and compared with in-process
torch.func.

No mismatch needed a fix this round; what the replay pins (every test compares with
in-process torch.func, or where torch's own transform is wrong, with its row-by-row
answer and finite differences):

1. test_ops.py's six checks over the ops in float64, and jacobian / vjp / jvp in
   float32: torch's values, dtypes, shapes and errors (NaN in the branch ``where`` does not
   take, a norm's 0 at zero, eigh / svd through gauge-invariant functions, a duplicate
   index's sum).
2. TestHessian over a scalar of each op (dense, per example, HVP; float64 and float32):
   torch.func.hessian's, reverse over reverse where torch's lacks forward AD
   (grid_sample, masked_scatter's broken forward gradient), torch's 500 where neither
   runs (cdist, embedding_bag); scatter_reduce(prod)'s Hessian is torch's own, which
   torch's wrong forward AD makes 20 off (pytorch#196702), by the README's rule.
3. ``cdist(x, x)``: torch's vmap of its backward drops off-diagonal rows (jacrev without
   chunk_size=1, vmap(jacrev)); the service's Jacobians (plain, fwd, chunked, sparse,
   per example) and stacked VJPs are each row's.
4. An in-place write into an input (masked_fill_, index_put_): jacrev / vjp are torch's
   500; evaluate and jvp answer, the same on a second request. Strided-view outputs
   (transposed, stride 0, permuted) are torch's in JSON, .npy and .npz.

One in-process app serves the module (no server start), as rounds 7-30.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map, tree_structure, tree_unflatten

from . import parity31_functions as F
from . import test_parity_round13 as R13
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t
from .test_parity_round13 import test_ops_checks_over_http as _ops_checks

# torch's vmap(jacrev) of scatter_reduce's prod calls .item() in its backward and raises;
# the service loops over the examples there (README), so the replay compares each example's
R13.VMAP_REFUSES.setdefault("scatter_reduce_prod", r"\.item\(\)")

f = torch.func


# index_reduce warns that it is in beta, at every call
pytestmark = pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity31_functions") as client:
        yield client


@pytest.mark.parametrize("op", F.OPS, ids=[o.name for o in F.OPS])
def test_ops_checks_over_http(c, op):
    """test_ops.py's test_vjp, test_jvp, test_vmapvjp, test_jvpvjp, test_vmapjvpall and
    test_vmapjvpvjp (round 13's replay) in float64."""
    _ops_checks(c, op)


F32_TOL = 1e-5  # float32: the service's chunks and torch's one call round alike only to this


def f32(xs: list[np.ndarray]) -> list[np.ndarray]:
    return [x.astype(np.float32) for x in xs]


@pytest.mark.parametrize("op", F.OPS, ids=[o.name for o in F.OPS])
def test_ops_in_float32_are_torchs(c, op):
    """The same samples sent as float32: the answers are float32, torch.func's values."""
    name, an = f"op_{op.name}", op.argnums
    xs = f32(R13.samples(op))
    tx = t(xs)
    g = R13.partial(op.fn, tx, an)
    primals = tuple(tx[i] for i in an)
    out = op.fn(*tx)
    cot = [v.astype(np.float32) for v in tree_leaves(R13.like(out))]
    cot_t = tree_unflatten(t(cot), tree_structure(out))
    tans = f32([R13.rand(*xs[i].shape) for i in an])
    jac = f.jacrev(g, argnums=tuple(range(len(an))), chunk_size=1)  # (round 13's: no vmap of the pullback)
    checks = [("jacobian", {}, lambda: jac(*primals)), ("jacobian", {"mode": "fwd"}, lambda: jac(*primals)),
              ("vjp", {"cotangents": arr(cot[0]) if isinstance(out, torch.Tensor) else [arr(v) for v in cot]},
               lambda: f.vjp(g, *primals)[1](cot_t)),
              ("jvp", {"tangents": [arr(v) for v in tans]}, lambda: f.jvp(g, primals, tuple(t(tans)))[1])]
    for endpoint, options, torch_call in checks:
        response = post(c, name, endpoint, xs, argnums=list(an), **options)
        try:
            want = torch_call()
        except Exception as exc:  # noqa: BLE001 - float64's replay checks torch's words
            assert response.status_code in (422, 500), (exc, response.text)
            assert response.headers["content-type"] == "application/problem+json", response.text
            continue
        got, _ = answer(response, endpoint)
        same(got, R13.plain(want), rtol=F32_TOL)


def _hessian_argnums(op: Any) -> Any:
    return op.argnums[0] if len(op.argnums) == 1 else op.argnums


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("op", F.OPS, ids=[o.name for o in F.OPS])
def test_hessians_of_the_ops_energies_are_torchs(c, op, dtype):
    """TestHessian over a scalar of each op's output: the dense Hessian, an HVP and the
    per-example Hessians as torch.func.hessian's (jvp(grad) for the HVP), in float64
    and float32. Where torch.func.hessian raises for want of forward AD (grid_sample)
    or of its masked_scatter's forward gradient, the service answers reverse over
    reverse (README: round 20's rule), checked against torch's jacrev(jacrev); where
    torch's vmap refuses (scatter_reduce's prod), each example's."""
    name, fn, an = f"energy_{op.name}", F.ENERGIES[op.name], _hessian_argnums(op)
    tol = 1e-10 if dtype == np.float64 else F32_TOL
    wire_an = an if isinstance(an, int) else list(an)
    xs = [x.astype(dtype) for x in R13.samples(op)]

    def hess(*p: torch.Tensor) -> Any:
        try:
            return f.hessian(fn, argnums=an)(*p)
        except (NotImplementedError, RuntimeError) as exc:
            assert "forward AD" in str(exc) or "forward gradient" in str(exc), exc
            return f.jacrev(f.jacrev(fn, argnums=an), argnums=an)(*p)

    try:
        f.jacrev(f.jacrev(fn, argnums=an), argnums=an)(*t(xs))
    except (NotImplementedError, RuntimeError):  # no double backward, no forward AD: torch.func.hessian's 500
        with pytest.raises(NotImplementedError, match="forward AD") as raised:
            f.hessian(fn, argnums=an)(*t(xs))
        body = assert_problem(post(c, name, "hessian", xs, argnums=wire_an), 500, "function_error")
        assert body["detail"] == f"NotImplementedError: {str(raised.value).splitlines()[0]}", body
        return
    got, _ = answer(post(c, name, "hessian", xs, argnums=wire_an), "hessian")
    same(got, hess(*t(xs)), rtol=tol)
    xb = [x.astype(dtype) for x in R13.samples(op, 2)]
    got, _ = answer(post(c, name, "hessian", xb, argnums=wire_an, batched=True), "hessian")
    each = [hess(*[t(x[k]) for x in xb]) for k in range(2)]
    same(got, tree_map(lambda *a: torch.stack(a), *each), rtol=tol)
    v = [R13.rand(*xs[i].shape).astype(dtype) for i in op.argnums]
    g = R13.partial(fn, t(xs), op.argnums)
    try:
        want = f.jvp(f.grad(g, argnums=0 if len(v) == 1 else tuple(range(len(v)))),
                     tuple(t(xs)[i] for i in op.argnums), tuple(t(v)))[1]
    except (NotImplementedError, RuntimeError) as exc:  # torch's jvp(grad) raises: so does /hvp
        body = assert_problem(post(c, name, "hvp", xs, argnums=wire_an, tangents=[arr(u) for u in v]), 500,
                              "function_error")
        assert body["detail"] == f"{type(exc).__name__}: {str(exc).splitlines()[0]}", (body, exc)
        # for want of forward mode (masked_scatter's broken forward gradient too): said in its
        # member, which the SDK's hessp reads to go on to the Hessian answered above
        assert body.get("unsupported") == "forward_mode", body
        return
    got, _ = answer(post(c, name, "hvp", xs, argnums=wire_an, tangents=[arr(u) for u in v]), "hvp")
    same(got, want, rtol=tol)


def test_scatter_reduce_prods_hessian_is_torchs_own_even_where_torch_is_wrong(c):
    """torch's forward AD of scatter_reduce(reduce="prod") is silently wrong (pytorch
    issue 196702: a zero JVP), so torch.func.hessian (forward over reverse) is 20 off
    the finite differences of the gradient here, where jacrev(jacrev) is right. The
    service answers torch.func.hessian's Hessian on every route (README: "where torch's
    strategy runs, its answer is the Hessian"), a parity the replay pins: a change of
    that rule must be a decision, not an accident."""
    op = next(o for o in F.OPS if o.name == "scatter_reduce_prod")
    fn = F.ENERGIES["scatter_reduce_prod"]
    xs = R13.samples(op)
    torch_h = f.hessian(fn, argnums=(0, 1))(*t(xs))
    rev_rev = f.jacrev(f.jacrev(fn, argnums=(0, 1)), argnums=(0, 1))(*t(xs))
    assert max(float((a - b).abs().max()) for a, b in zip(tree_leaves(torch_h), tree_leaves(rev_rev))) > 1.0
    got, _ = answer(post(c, "energy_scatter_reduce_prod", "hessian", xs, argnums=[0, 1]), "hessian")
    same(got, torch_h, rtol=1e-10)
    # first order alike: torch.func.jvp is 3.6 off J t here and /jvp answers it; a
    # Jacobian (mode=fwd, sparse, per example) is jacrev's, forward mode being checked
    xt, tans = t(xs), [R13.rand(*s) for s in op.shapes]
    jac = f.jacrev(op.fn, argnums=(0, 1))(*xt)
    torch_jvp = f.jvp(op.fn, tuple(xt), tuple(t(tans)))[1]
    assert float((torch_jvp - sum(torch.einsum("abij,ij->ab", j, v) for j, v in zip(jac, t(tans)))).abs().max()) > 1
    got, _ = answer(post(c, "op_scatter_reduce_prod", "jvp", xs, argnums=[0, 1], tangents=[arr(v) for v in tans]),
                    "jvp")
    same(got, torch_jvp, rtol=1e-12)
    for options in ({"mode": "fwd"}, {"mode": "fwd", "sparsity": "auto", "sparse_format": "dense"}):
        got, _ = answer(post(c, "op_scatter_reduce_prod", "jacobian", xs, argnums=[0, 1], **options), "jacobian")
        same(np.asarray(got).reshape(6, 12) if "sparsity" in options else got,
             torch.cat([j.reshape(6, 6) for j in jac], 1) if "sparsity" in options else jac, rtol=1e-12)


def test_an_in_place_write_into_an_input_is_torchs_error_or_answer(c):
    """test_ops.py's inplace variants applied to the input itself (``masked_fill_``,
    ``index_put_(accumulate=True)``): torch.func.jacrev and vjp raise "a leaf Variable
    that requires grad is being used in an in-place operation", jvp answers (and the
    service's every pass sees the input as sent: a second request is the same); the
    forward-mode Jacobian is jacrev's error, by design (products.agrees_with_reverse)."""
    for name, shapes in (("masked_fill_inplace", [(2, 3)]), ("index_put_inplace", [(3, 2), (2, 2)])):
        fn = getattr(F, name)
        xs = [R13.rand(*s) for s in shapes]
        tans = [R13.rand(*s) for s in shapes]
        an = list(range(len(xs)))
        with pytest.raises(RuntimeError, match="leaf Variable") as raised:
            f.jacrev(fn, argnums=tuple(an))(*t(xs))
        for _ in range(2):
            for options in ({}, {"mode": "fwd"}):
                body = assert_problem(post(c, name, "jacobian", xs, argnums=an, **options), 500, "function_error")
                assert body["detail"] == f"RuntimeError: {raised.value}", body
            out = fn(*t(xs))
            body = assert_problem(post(c, name, "vjp", xs, argnums=an, cotangents=arr(R13.like(out))), 500,
                                  "function_error")
            assert "leaf Variable" in body["detail"], body
            got, _ = answer(post(c, name, "evaluate", xs), "output")
            same(got, fn(*t(xs)))
            got, _ = answer(post(c, name, "jvp", xs, argnums=an, tangents=[arr(v) for v in tans]), "jvp")
            same(got, f.jvp(fn, tuple(t(xs)), tuple(t(tans)))[1])


@pytest.mark.parametrize("name", ["transposed_out", "expanded_out", "permuted_out"])
def test_outputs_that_are_strided_views_are_torchs_in_every_format(c, name):
    """An output that is a transposed, expanded (stride 0) or permuted and sliced view
    of the input: JSON, .npy and .npz answers hold torch's values and shapes."""
    fn = getattr(F, name)
    x = R13.rand(*(2, 3, 4) if name == "permuted_out" else (2, 3))
    for endpoint, key, want in (("evaluate", "output", fn(t(x))), ("jacobian", "jacobian", f.jacrev(fn)(t(x)))):
        got, _ = answer(post(c, name, endpoint, [x]), key)
        same(got, want)
        r = c.post(f"/v1/functions/{name}/{endpoint}", json={"inputs": [arr(x)]}, headers={"accept": "application/x-npz"})
        assert r.status_code == 200, r.text
        z = np.load(io.BytesIO(r.content))
        leaves = [z[k] for k in z.files if k != "meta.json"]
        same(leaves, list(tree_leaves(want)))
        if isinstance(want, torch.Tensor):
            r = c.post(f"/v1/functions/{name}/{endpoint}", json={"inputs": [arr(x)]},
                       headers={"accept": "application/x-npy"})
            assert r.status_code == 200, r.text
            same(np.load(io.BytesIO(r.content)), want)


def test_jacobians_of_cdist_to_itself_are_each_rows_where_torchs_vmap_drops_them(c):
    """torch's vmap of cdist's backward (torch.func.jacrev without chunk_size=1, and
    vmap(jacrev) per example) is silently wrong for ``cdist(x, x)``: the off-diagonal
    rows come back zero, where one VJP per row and finite differences say 0.97. The
    service's Jacobians, plain and per example, are jacrev(chunk_size=1)'s (its check of
    vmap's products against one product: README), in float64 and float32."""
    fn = F.cdist_self
    for dtype, tol in ((np.float64, 1e-12), (np.float32, F32_TOL)):
        x = R13.rand(3, 2).astype(dtype)
        want = f.jacrev(fn, chunk_size=1)(t(x))
        eps = 1e-6
        fd = torch.stack([(fn(t(x).double() + eps * e.reshape(3, 2)) - fn(t(x).double() - eps * e.reshape(3, 2)))
                          / (2 * eps) for e in torch.eye(6, dtype=torch.float64)], -1).reshape(3, 3, 3, 2)
        off = ~torch.eye(3, dtype=torch.bool)
        assert float((want.double() - fd)[off].abs().max()) < 1e-3
        assert float((f.jacrev(fn)(t(x)) - want).abs().max()) > 0.1  # torch's vmap drops them
        for options in ({}, {"mode": "fwd"}, {"chunk_size": 2}):
            got, _ = answer(post(c, "cdist_self", "jacobian", [x], **options), "jacobian")
            same(got, want, rtol=tol)
        xb = np.stack([R13.rand(3, 2) for _ in range(3)]).astype(dtype)
        got, _ = answer(post(c, "cdist_self", "jacobian", [xb], batched=True), "jacobian")
        same(got, torch.stack([f.jacrev(fn, chunk_size=1)(v) for v in t(xb)]), rtol=tol)
        got, _ = answer(post(c, "cdist_self", "jacobian", [x], sparsity="auto", sparse_format="dense"), "jacobian")
        same(np.asarray(got).reshape(3, 3, 3, 2), want, rtol=tol)
        cots = R13.rand(4, 3, 3).astype(dtype)  # a stack of cotangents: vmap of the same pullback
        pullback = f.vjp(fn, t(x))[1]
        got, _ = answer(post(c, "cdist_self", "vjp", [x], cotangents=arr(cots), batched_vectors=True), "vjp")
        same(got, torch.stack([pullback(v)[0] for v in t(cots)]), rtol=tol)


# A grid coordinate 2e-3 from a cell edge of grid_sample (align_corners: edges at -1, 0, 1),
# within float32's difference step (1e-2 here) and outside float64's (2e-5)
_EDGE_X = [[[[-0.954, -1.073, -1.208], [-0.408, 1.818, -0.307], [-0.735, 0.699, 0.069]]]]
_EDGE_GRID = [[[[0.121, -0.687], [-0.002, 0.435]], [[-1.911, -1.61], [1.085, 0.843]]]]


def test_grid_samples_hessian_by_a_cell_edge_is_reverse_over_reverse_in_any_order(c):
    """grid_sample has no forward AD, so its Hessian is reverse over reverse (round 20's
    rule), checked against central differences of jacrev before it is answered. Across
    the cell edge 2e-3 away the gradient has a kink and the central difference misses a
    right Hessian: float32 answered torch's 500 here (and at ~5 % of round 31's random
    samples, so the replay failed by what had drawn from its RNG before). Every order of
    requests (float32 before and after float64's, dense and per example) is 200 with
    torch.func.jacrev(jacrev)'s Hessian."""
    name, an = "energy_grid_sample_border", (0, 1)
    fn = F.ENERGIES["grid_sample_border"]
    for dtype in (np.float32, np.float64, np.float32):
        xs = [np.asarray(_EDGE_X, dtype), np.asarray(_EDGE_GRID, dtype)]
        want = f.jacrev(f.jacrev(fn, argnums=an), argnums=an)(*t(xs))
        got, _ = answer(post(c, name, "hessian", xs, argnums=list(an)), "hessian")
        same(got, want, rtol=F32_TOL)
        got, _ = answer(post(c, name, "hessian", [x[None] for x in xs], argnums=list(an), batched=True), "hessian")
        same(got, tree_map(lambda a: a[None], want), rtol=F32_TOL)
