"""PyTorch's own torch.func test cases, round 22: custom ``autograd.Function``s as
torch's autograd_function_db and test_eager_transforms.py's TestAutogradFunction write
them (tests/parity22_functions.py), replayed over HTTP and compared with in-process
torch.func (values, shapes, dtypes).

1. A ``@once_differentiable`` backward with a jvp, under a function whose cotangent
   depends on x: ``torch.func.jvp(torch.func.grad(f))`` loses the backward's derivative
   where ``torch.func.hessian`` keeps it. The /hvp and the sparse Hessian answered the
   one, the dense Hessian the other; every route is torch.func.hessian's now.
2. A backward not linear in its cotangent (the db's CubeGenVmap): vmap runs it right,
   the engine's linearity check said otherwise, and the function lost vmap for good.
3. The db's Functions (numpy forwards with a hand-written ``vmap`` staticmethod,
   ``generate_vmap_rule``, ``save_for_forward``, ``mark_non_differentiable``,
   ``mark_dirty``, a backward returning a too-large gradient) over every derivative route.

One in-process app serves the module (no server start), as rounds 7-21.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from . import parity22_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, arr, post, same, t


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity22_functions") as client:
        yield client


X = np.array([0.3, -1.2, 0.7], dtype=np.float32)
TANGENTS = np.array([[1.0, 0.5, -0.25], [-0.5, 0.0, 2.0]], dtype=np.float32)


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.todense())


def test_hvp_and_sparse_hessian_through_a_once_differentiable_backward_are_torch_hessians(c):
    """f = sum(F(x) cos x), F a cube whose backward is @once_differentiable, with a jvp.
    torch.func.hessian (jacfwd(jacrev(f))) differentiates the backward in forward mode:
    its Hessian is the math's. torch.func.jvp(torch.func.grad(f)) runs the backward
    inside grad's level, where its cotangent (cos x) requires grad, so
    once_differentiable detaches what it returns and forward mode loses the backward's
    part: -0.106 where the Hessian says 1.534. The dense /hessian answered
    torch.func.hessian's, the /hvp (one tangent or a stack) and the sparse Hessian the
    other, each a 200. Every route is now the product of torch.func.hessian's Hessian."""
    x = t(X)
    want = hessian(F.cube_once_energy)(x)
    h = 1e-3  # the math: central differences of the gradient, in float64
    x64 = x.double()

    def g64(y):
        return (3 * y**2 * y.cos() - y**3 * y.sin())

    fd = torch.stack([(g64(x64 + h * e) - g64(x64 - h * e)) / (2 * h) for e in torch.eye(3, dtype=torch.float64)])
    torch.testing.assert_close(want.double(), fd, rtol=1e-4, atol=1e-4)
    by_grad = jvp(grad(F.cube_once_energy), (x,), (torch.from_numpy(TANGENTS[0]),))[1]
    assert float((by_grad - want @ torch.from_numpy(TANGENTS[0])).abs().max()) > 1.0  # torch's recipe is off here

    dense, doc = answer(post(c, "cube_once_energy", "hessian", [X]), "hessian")
    same(dense, want)
    sparse, doc = answer(post(c, "cube_once_energy", "hessian", [X], sparsity="auto"), "hessian")
    same(_dense(sparse), want.numpy(), rtol=1e-5)
    one, _ = answer(post(c, "cube_once_energy", "hvp", [X], tangents=arr(TANGENTS[0])), "hvp")
    same(one, want @ torch.from_numpy(TANGENTS[0]), rtol=1e-5)
    stack, _ = answer(post(c, "cube_once_energy", "hvp", [X], tangents=arr(TANGENTS), batched_vectors=True), "hvp")
    same(stack, torch.from_numpy(TANGENTS) @ want.T, rtol=1e-5)
    # c . H t with cotangents (a jvp of a vjp) was torch.func.hessian's already: the same
    pair, _ = answer(post(c, "cube_once_energy", "hvp", [X], tangents=arr(TANGENTS[0]),
                          cotangents=arr(np.float32(2.0))), "hvp")
    same(pair, 2 * want @ torch.from_numpy(TANGENTS[0]), rtol=1e-5)


def test_a_backward_not_linear_in_its_cotangent_keeps_vmap(c):
    """torch's CubeGenVmap: (x^3, 3x^2) whose backward is g s + 6 s (s = 3x^2), a term
    that does not scale with the cotangent. jacrev's rows are vmap(vjp_fn) over the
    identity, each row's own VJP. The engine's check of vmap's rows mixes cotangents
    (linearity), which such a backward fails though vmap ran it right: every Jacobian of
    the function then ran one VJP a row from its first request on (meta.chunk_size 1,
    the profile's "no vmap" bit set), per-example ones too, and a stack of vjp
    cotangents one at a time. A failed check is now confirmed one product at a time,
    and vmap's rows stand where they are those (the same values, as before)."""
    x = t(X)
    want = jacrev(F.cube_gen_vmap)(x)
    assert float((want[0] - torch.diag(torch.diagonal(want[0]))).abs().max()) > 1  # the 6 s term: not diagonal
    for _ in range(2):  # the first request and a later one
        got, doc = answer(post(c, "cube_gen_vmap", "jacobian", [X]), "jacobian")
        same(got, want)
        assert doc["meta"]["chunk_size"] == 6, doc["meta"]  # the 6 rows in one vmap, not one VJP a row
    xs = np.stack([X, 0.5 * X])
    got, doc = answer(post(c, "cube_gen_vmap", "jacobian", [xs], batched=True), "jacobian")
    same(got, vmap(jacrev(F.cube_gen_vmap))(t(xs)))
    assert doc["meta"]["chunk_size"] is None, doc["meta"]  # (1: row by row)
    ones = np.ones((2, 3), np.float32)
    cot = [arr(ones), arr(2 * ones)]
    got, _ = answer(post(c, "cube_gen_vmap", "vjp", [X], cotangents=cot, batched_vectors=True), "vjp")
    _, pullback = vjp(F.cube_gen_vmap, x)
    same(got, vmap(pullback)((torch.from_numpy(ones), torch.from_numpy(2 * ones)))[0])


RNG = np.random.default_rng(22)


def _point(*shape: int) -> np.ndarray:
    return (RNG.uniform(0.5, 1.5, shape) * RNG.choice([-1, 1], shape)).astype(np.float32)


# name -> inputs: the db's Functions (see parity22_functions), each over every route
DB = {
    "numpy_cube": [_point(3)],
    "numpy_cube_energy": [_point(3)],
    "numpy_mul": [_point(3), _point(3, 3)],
    "numpy_sort": [_point(3, 4)],
    "scaled_energy": [_point(3)],
    "zero_gradients": [_point(3), _point(3)],
    "numpy_exp": [_point(3)],
    "lazy_sin": [_point(3)],
    "lazy_sin_energy": [_point(3)],
    "scaled_moved": [_point(2, 3)],
}


def _flat(blocks: Any, out: Any) -> np.ndarray:
    """A Jacobian's blocks (output leaf by input) as the sparse routes' 2-D matrix."""
    outs = list(out) if isinstance(out, tuple) else [out]
    rows = list(blocks) if isinstance(out, tuple) else [blocks]
    parts = [[b] if isinstance(b, torch.Tensor) else list(b) for b in rows]
    return torch.cat([torch.cat([b.reshape(o.numel(), -1) for b in row], 1) for o, row in zip(outs, parts)], 0).numpy()


@pytest.mark.parametrize("name", list(DB))
def test_the_dbs_functions_are_torchs_on_every_route(c, name):
    """Numpy forwards with a hand-written vmap staticmethod (NumpyCube, NumpyMul,
    NumpySort with mark_non_differentiable orders, NumpyExp_ with mark_dirty),
    generate_vmap_rule with setup_context and save_for_forward (ScaleGrad, whose
    backward and jvp scale by 3.14: the Function's derivative, not the identity's;
    ZeroGradients, whose backward returns zeros larger than its input; set_materialize_grads
    False, its backward given None for an output not used; a float argument,
    needs_input_grad, a vmap rule that moves the batch last), registered as
    service functions: every Jacobian mode, chunk_size 1, the sparse route (the tracer
    cannot see into numpy: probed), vjp and jvp (one vector, a stack), per-example
    Jacobians, and for a scalar the Hessian (dense, sparse, per example) and hvp, each
    torch.func's; the Jacobian as .npz too."""
    inputs = DB[name]
    fn = getattr(F, name)
    several = len(inputs) > 1
    argnums: Any = tuple(range(len(inputs))) if several else 0
    opts = {"argnums": list(range(len(inputs)))} if several else {}
    out = fn(*t(inputs))
    want = jacrev(fn, argnums=argnums)(*t(inputs))
    for options in ({}, {"mode": "fwd"}, {"mode": "auto"}, {"chunk_size": 1}):
        same(answer(post(c, name, "jacobian", inputs, **opts, **options), "jacobian")[0], want, rtol=1e-5)
    sparse, _ = answer(post(c, name, "jacobian", inputs, **opts, sparsity="auto", sparse_format="dense"), "jacobian")
    same(sparse, _flat(want, out), rtol=1e-5)
    r = c.post(f"/v1/functions/{name}/jacobian", json={"inputs": [arr(a) for a in inputs], **opts},
               headers={"accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    members = np.load(io.BytesIO(r.content))
    got = [members[k] for k in sorted(k for k in members.files if k.startswith("jacobian"))]
    flat = [b for row in (want if isinstance(want, tuple) else (want,))
            for b in ((row,) if isinstance(row, torch.Tensor) else row)]
    assert len(got) == len(flat)
    for g, w in zip(got, flat):
        same(g, w, rtol=1e-5)

    outs = out if isinstance(out, tuple) else (out,)
    cot = [torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape) for o in outs]
    wire_cot = [arr(v.numpy()) for v in cot] if isinstance(out, tuple) else arr(cot[0].numpy())
    _, pullback = vjp(fn, *t(inputs))
    pulled = pullback(tuple(cot) if isinstance(out, tuple) else cot[0])
    same(answer(post(c, name, "vjp", inputs, cotangents=wire_cot, **opts), "vjp")[0], pulled if several else pulled[0])
    stack = [torch.stack([v, -2 * v]) for v in cot]
    wire_stack = [arr(v.numpy()) for v in stack] if isinstance(out, tuple) else arr(stack[0].numpy())
    pulled = vmap(pullback)(tuple(stack) if isinstance(out, tuple) else stack[0])
    same(answer(post(c, name, "vjp", inputs, cotangents=wire_stack, batched_vectors=True, **opts), "vjp")[0],
         pulled if several else pulled[0])
    tangents = [torch.linspace(-1, 1, a.size).reshape(a.shape) for a in inputs]
    wire_t = [arr(v.numpy()) for v in tangents] if several else arr(tangents[0].numpy())
    same(answer(post(c, name, "jvp", inputs, tangents=wire_t, **opts), "jvp")[0],
         jvp(fn, tuple(t(inputs)), tuple(tangents))[1])
    stacked = [torch.stack([v, 3 * v]) for v in tangents]
    wire_t = [arr(v.numpy()) for v in stacked] if several else arr(stacked[0].numpy())
    same(answer(post(c, name, "jvp", inputs, tangents=wire_t, batched_vectors=True, **opts), "jvp")[0],
         vmap(lambda *v: jvp(fn, tuple(t(inputs)), v)[1])(*stacked))
    if several:
        return
    xs = np.stack([inputs[0], 0.5 * inputs[0]])
    same(answer(post(c, name, "jacobian", [xs], batched=True), "jacobian")[0], vmap(jacrev(fn))(t(xs)), rtol=1e-5)
    if not (isinstance(out, torch.Tensor) and out.dim() == 0):
        return
    h = hessian(fn)(t(inputs[0]))
    same(answer(post(c, name, "hessian", inputs), "hessian")[0], h, rtol=1e-5)
    same(_dense(answer(post(c, name, "hessian", inputs, sparsity="auto"), "hessian")[0]), h.numpy(), rtol=1e-5)
    same(answer(post(c, name, "hessian", [xs], batched=True), "hessian")[0], vmap(hessian(fn))(t(xs)), rtol=1e-5)
    same(answer(post(c, name, "hvp", inputs, tangents=arr(tangents[0].numpy())), "hvp")[0], h @ tangents[0], rtol=1e-5)
    same(answer(post(c, name, "hvp", inputs, tangents=arr(stacked[0].numpy()), batched_vectors=True), "hvp")[0],
         stacked[0] @ h.T, rtol=1e-5)
