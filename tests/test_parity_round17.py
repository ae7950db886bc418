"""PyTorch's own torch.func test cases, round 17, replayed over HTTP against
tests/parity17_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. test_eager_transforms.py's TestAutogradFunction cases with a ``jvp`` staticmethod
   (``hessian`` / ``jacfwd(jacrev)`` of a custom Function), where the Function's jvp and
   backward disagree: torch.func.hessian differentiates the backward in forward mode,
   through the jvp; reverse over reverse the backward alone. Every route (dense, sparse,
   every chunk size, probed or traced) answers torch.func.hessian's, or, where that
   cannot run (no vmap rule), its error.
2. test_vmap.py's out_dims=None over transforms: a derivative of an output of shared
   inputs alone (grad, vjp, jacrev, jacfwd, jvp, hessian in a shared w) through the SDK's
   torch adapter (``remote``) is unbatched under vmap, as torch's is in-process.

One in-process app serves the module (no server start), as rounds 7-16.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from jacobian_client import wire
from jacobian_client.torch import remote
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from . import parity17_functions as F
from .conftest import assert_problem, ready_app, sdk_over, torch_tree
from .test_parity_round7 import same, t


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity17_functions") as client:
        yield client


def f64(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": "float64", "shape": list(a.shape), "data": a.tolist()}


def _hessian(c: Any, name: str, x: np.ndarray, **options: Any) -> Any:
    r = c.post(f"/v1/functions/{name}/hessian", json={"inputs": [f64(x)], **options})
    if r.status_code != 200:
        return r
    h = r.json()["hessian"]
    return wire.decode_sparse_json(h).toarray() if "format" in h else wire.decode_tree(h)


# Every route a Hessian takes: dense (measured strategies, or a row at a time), sparse
# (traced: the products; probed: the dense fallback), each vmapped and one seed a chunk
ROUTES = ({}, {"chunk_size": 1}, {"sparsity": "auto"}, {"sparsity": "auto", "chunk_size": 1})


def test_a_hessian_through_a_function_whose_jvp_and_backward_disagree_is_torchs_or_its_error(c):
    """sum(cube(x) roll(x)), cube a Function whose jvp (2 a t) disagrees with its backward
    (3 a^2 g): torch.func.hessian's cross terms follow the jvp (not symmetric), reverse
    over reverse's the backward, 4.5 apart.

    - With a vmap rule, every route answers torch.func.hessian's (it did before).
    - Without one, torch.func.hessian raises ('You tried to vmap over ...'). The dense
      /hessian answered jacrev(grad)'s with a 200 (reverse over reverse, which agrees
      with differences of jacrev, and not with the HVP it was checked against), the
      traced sparse one the looped forward-over-reverse products' (200, 4.5 from the
      dense), the probed one either, by which pattern the probe found (n = 5: reverse
      over reverse, 200; n = 12: forward over reverse). Each is now torch's error, with
      a word on why (500 function_error, as a @once_differentiable backward's: round 13).
    - The same Function with a right jvp and no vmap rule is still answered, alike on
      every route: the looped forward-over-reverse Hessian, which reverse over reverse
      agrees with."""
    for n in (5, 12):
        x = np.linspace(0.6, 1.6, n)
        want = torch.func.hessian(F.wrong_jvp_energy)(t(x))
        assert not torch.allclose(want, want.T)  # the jvp's cross terms: not reverse over reverse
        for options in ROUTES:
            same(_hessian(c, "wrong_jvp_energy", x, **options), want)
        with pytest.raises(RuntimeError, match="vmap over") as caught:
            torch.func.hessian(F.wrong_jvp_energy_no_vmap)(t(x))
        error = f"RuntimeError: {str(caught.value).splitlines()[0]}"
        for name in ("wrong_jvp_energy_no_vmap", "wrong_jvp_energy_no_vmap_probed"):
            for options in ROUTES:
                r = _hessian(c, name, x, **options)
                assert not isinstance(r, np.ndarray), (name, n, options, "a 200", r)
                doc = assert_problem(r, 500, "function_error")
                assert doc["detail"].startswith(error) and "jvp and backward disagree" in doc["detail"], (name, options, doc)
        g = torch.func.grad(F.cube_energy_no_vmap)
        loop = torch.stack([torch.func.jvp(g, (t(x),), (e,))[1] for e in torch.eye(n, dtype=torch.float64)], -1)
        for options in ROUTES:
            same(_hessian(c, "cube_energy_no_vmap", x, **options), loop)


# --------------------------------------------------------------------------- 2. derivatives under vmap, SDK


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Any]:
    """The SDK over the module's app (no socket)."""
    with sdk_over(c) as client:
        yield client


def _penalty(f: Any) -> Any:
    return lambda x, w: f(x, w)[1]


# test_vmap.py's out_dims=None over transforms (test_out_dims_none, TestVmapOfGrad's
# per-sample gradients with shared weights): each transform of (x, w) -> f, and torch's
# out_dims for its result, mapped over x with w shared
UNBATCHED_DERIVATIVES = {
    "grad in w": (lambda f: grad(_penalty(f), argnums=1), None),
    "grad in x and w": (lambda f: grad(_penalty(f), argnums=(0, 1)), (0, None)),
    "vjp in w": (lambda f: lambda x, w: vjp(lambda w: _penalty(f)(x, w), w)[1](torch.tensor(1.0, dtype=w.dtype))[0], None),
    "jacrev in w": (lambda f: jacrev(_penalty(f), argnums=1), None),
    "jacfwd in w": (lambda f: jacfwd(_penalty(f), argnums=1), None),
    "jvp in w": (lambda f: lambda x, w: jvp(lambda w: f(x, w), (w,), (torch.ones_like(w),))[1], (0, None)),
    "hessian in w": (lambda f: hessian(_penalty(f), argnums=1), None),
}


@pytest.mark.parametrize("case", UNBATCHED_DERIVATIVES)
def test_a_derivative_of_shared_inputs_alone_is_unbatched_under_vmap(sdk, case):
    """Round 16 made the SDK's remote outputs unbatched under vmap where torch's are;
    their derivatives stayed batched: vmap(grad(lambda x, w: f(x, w)[1], argnums=1),
    in_dims=(0, None), out_dims=None) of the penalty sum(w^2) raised torch's "can not
    return a BatchedTensor when out_dim is None" for the remote f where torch answers
    (and so did vjp, jacrev, jacfwd, jvp and hessian in w, and grad in (x, w) with
    out_dims=(0, None)). The remote products' vmap rule now says a result is unbatched
    where it follows from unbatched outputs, shared inputs and vectors this level does
    not map; out_dims=0 and nested vmaps answer as before, as torch does."""
    transform, out_dims = UNBATCHED_DERIVATIVES[case]
    f = remote(sdk, "loss_and_penalty")
    xs, w = t(np.arange(6.0).reshape(3, 2) - 2), t(np.array([0.5, -1.5]))
    for dims in (out_dims, 0):
        want = vmap(transform(F.loss_and_penalty), in_dims=(0, None), out_dims=dims)(xs, w)
        same(torch_tree(vmap(transform(f), in_dims=(0, None), out_dims=dims)(xs, w)), want, rtol=1e-12)
    xss = xs.reshape(1, 3, 2).expand(2, 3, 2)
    nested = lambda g: vmap(vmap(transform(g), in_dims=(0, None), out_dims=out_dims), in_dims=(0, None), out_dims=out_dims)
    same(torch_tree(nested(f)(xss, w)), nested(F.loss_and_penalty)(xss, w), rtol=1e-12)


def test_a_derivative_that_follows_a_batched_output_stays_batched(sdk):
    """Where torch's vmap batches a derivative, the SDK's does too: jacrev in w of both
    outputs (its cotangents' basis spans the batched loss as well), grad in w of the
    loss, out_dims=None raising torch's error for either."""
    f = remote(sdk, "loss_and_penalty")
    xs, w = t(np.arange(6.0).reshape(3, 2) - 2), t(np.array([0.5, -1.5]))
    for transform, dims in ((lambda g: jacrev(g, argnums=1), (None, None)),
                            (lambda g: grad(lambda x, w: g(x, w)[0], argnums=1), None)):
        for g in (F.loss_and_penalty, f):
            with pytest.raises(ValueError, match="can not return a BatchedTensor when out_dim is None"):
                vmap(transform(g), in_dims=(0, None), out_dims=dims)(xs, w)
        same(torch_tree(vmap(transform(f), in_dims=(0, None))(xs, w)),
             vmap(transform(F.loss_and_penalty), in_dims=(0, None))(xs, w), rtol=1e-12)


def test_a_hessian_of_a_remote_function_under_vmap_is_torchs_when_not_symmetric(sdk):
    """TestHessian's vmap(hessian(f)) through the SDK's torch adapter, for sum(cube(x)
    roll(x)) whose cube has a jvp that disagrees with its backward (torch.func.hessian is
    not symmetric there). Without vmap the second derivative comes from the service's hvp
    (H w: the jvp of the gradient) and equals torch's; under vmap from a per-example
    Hessian contracted on the client, which contracted w with H's first index, H^T w,
    so the answer came back transposed, 4.5 off vmap(hessian(f)). Now both contract as the
    hvp does."""
    f = remote(sdk, "wrong_jvp_energy")
    x = t(np.linspace(0.6, 1.6, 5))
    xs = torch.stack([x, x.flip(0) * 0.5])
    want = vmap(hessian(F.wrong_jvp_energy))(xs)
    assert not torch.allclose(want, want.transpose(1, 2))
    same(torch_tree(vmap(hessian(f))(xs)), want, rtol=1e-12)
    same(torch_tree(hessian(f)(x)), hessian(F.wrong_jvp_energy)(x), rtol=1e-12)


# --------------------------------------------------------------------------- 3. tuples of one vector


def test_a_tuple_of_one_vector_in_plain_json_lists_is_taken(c):
    """TestJvp / TestVjp with tuples of one: torch.func.jvp(f, (x,), (t,)) (argnums=[0])
    and vjp of an output (y,) with cotangents (v,). Written as plain JSON lists, [[1, 2,
    3]], the tuple reads as one array of shape (1, 3): the service answered 422 'expected
    shape [3], got [1, 3]' where a tuple of two ([[...], [...]]) was taken, for jvp, hvp
    and vjp alike; now its one row, stacked vectors (batched_vectors) too."""
    x, v, u = np.array([0.1, -0.2, 0.3]), np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -1.0])
    X, V, U = t(x), t(v), t(u)
    cases = [
        ("sin_in_tuple", "jvp", {"argnums": [0], "tangents": [v.tolist()]}, jvp(F.sin_in_tuple, (X,), (V,))[1]),
        ("sin_in_tuple", "jvp", {"argnums": [0], "tangents": [[v.tolist(), u.tolist()]], "batched_vectors": True},
         vmap(lambda d: jvp(F.sin_in_tuple, (X,), (d,))[1])(torch.stack([V, U]))),
        ("sin_in_tuple", "vjp", {"cotangents": [v.tolist()]}, vjp(F.sin_in_tuple, X)[1]((V,))[0]),
        ("sin_in_tuple", "vjp", {"argnums": [0], "cotangents": [[v.tolist(), u.tolist()]], "batched_vectors": True},
         vmap(vjp(F.sin_in_tuple, X)[1])((torch.stack([V, U]),))),
        ("wrong_jvp_energy", "hvp", {"argnums": [0], "tangents": [v.tolist()]},
         jvp(grad(F.wrong_jvp_energy, argnums=(0,)), (X,), (V,))[1]),
    ]
    for name, kind, options, want in cases:
        r = c.post(f"/v1/functions/{name}/{kind}", json={"inputs": [f64(x)], **options})
        assert r.status_code == 200, (name, kind, options, r.text)
        same(wire.decode_tree(r.json()[kind]), want, rtol=1e-12)
    # an array of another shape is still the 422 naming it
    r = c.post("/v1/functions/sin_in_tuple/jvp", json={"inputs": [f64(x)], "argnums": [0], "tangents": [[1.0, 2.0]]})
    assert "tangents: expected shape [3], got [1, 2]" in assert_problem(r, 422, "invalid_input")["detail"]
