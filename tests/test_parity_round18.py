"""PyTorch's own torch.func test cases, round 18, replayed over HTTP against
tests/parity18_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. test_ops.py's OpInfo-driven jacrev / hessian checks over complex-to-real functions
   (sgn of a complex tensor), through the sparse routes (``sparsity: "auto"``, whose
   pattern the service detects) as well as the dense ones.
2. TestHessian over custom autograd.Functions that torch.func.hessian cannot run (no
   jvp, no vmap rule): every route answers the Hessian or refuses it alike.
3. test_vmap.py's vmap over jvp(grad(f)) for such a Function: stacked hvp tangents.

One in-process app serves the module (no server start), as rounds 7-17.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, jacrev, jvp

from . import parity18_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity18_functions") as client:
        yield client


def _sparse(c: Any, name: str, kind: str, x: np.ndarray) -> np.ndarray:
    got, _ = answer(post(c, name, kind, [x], sparsity="auto"), kind)
    assert not isinstance(got, np.ndarray)  # a sparse answer, not the dense fallback
    return np.asarray(got.todense())


X = np.array([0.3, -1.2, 0.7, 0.5, 0.4, -0.9])


def test_sgn_of_a_complex_tensor_has_a_derivative_on_the_sparse_routes(c):
    """sgn(z) = z / |z| for a complex z (jacrev's rows nonzero: an OpInfo sweep's
    complex-to-real case). The pattern detector counted sgn among the ops whose
    derivative is zero everywhere (floor, round, sign: so it is for real arguments), so
    the detected pattern was empty ('nnz': 0, 'exact': true) and the sparse Jacobian and
    sparse Hessian came back all zeros with a 200, 2.5 off jacrev's, where the dense
    routes answered torch's. Now sgn of a complex argument is traced as the pointwise op
    it is; of a real one it still has no derivative (an empty pattern's answer, right)."""
    for name in ("complex_sgn", "real_sgn_times"):
        want = jacrev(getattr(F, name))(t(X))
        assert want.abs().sum() > 0
        dense, _ = answer(post(c, name, "jacobian", [X]), "jacobian")
        same(dense, want)
        same(_sparse(c, name, "jacobian", X).reshape(want.shape), want.numpy())  # (outputs, inputs)
    want = hessian(F.complex_sgn_energy)(t(X))
    assert want.abs().sum() > 0
    same(_sparse(c, "complex_sgn_energy", "hessian", X), want.numpy())
    r = c.get("/v1/functions/complex_sgn/sparsity", params={"shapes": "6"})
    assert r.status_code == 200, r.text
    assert r.json()["pattern"]["nnz"] == 12  # each part of sgn(z_i) on z_i's two parts


def test_a_sparse_hessian_that_reverse_over_reverse_gets_wrong_is_torchs_error(c):
    """TestHessian over a custom autograd.Function with neither a jvp nor a vmap rule
    (torch.func.hessian raises) whose backward cuts its graph (3 a.detach()^2 g): reverse
    over reverse misses the 6 a roll(a) diagonal. The dense /hessian checks such an
    answer against central differences of jacrev and refuses it (500, torch's error);
    the sparse one (sparsity=auto), falling back to reverse-over-reverse products as
    forward over reverse failed, answered that Hessian, diagonal 0 (3 to 13 off),
    with a 200. It is now checked the same way and refused the same way; the same
    Function with a backward that keeps its graph is still answered, on both routes,
    the Hessian central differences of jacrev give."""
    x = np.linspace(0.6, 1.6, 5)
    errors = []
    for transform in (lambda: hessian(F.cube_energy_detached)(t(x)),  # the dense route's: torch's
                      lambda: jvp(grad(F.cube_energy_detached), (t(x),), (t(x),))):  # the sparse one's products'
        with pytest.raises((RuntimeError, NotImplementedError)) as caught:
            transform()
        errors.append(f"{type(caught.value).__name__}: {str(caught.value).splitlines()[0]}")
    for options, error in (({}, errors[0]), ({"sparsity": "auto"}, errors[1]),
                           ({"sparsity": "auto", "chunk_size": 1}, errors[1])):
        doc = assert_problem(post(c, "cube_energy_detached", "hessian", [x], **options), 500, "function_error")
        assert doc["detail"].startswith(error), (options, doc)
    g = jacrev(F.cube_energy_no_jvp, chunk_size=1)
    eps = 1e-6
    want = torch.stack([(g(t(x) + eps * e) - g(t(x) - eps * e)) / (2 * eps) for e in torch.eye(5, dtype=torch.float64)])
    assert want.diagonal().abs().min() > 3  # the part the detached backward loses
    dense, _ = answer(post(c, "cube_energy_no_jvp", "hessian", [x]), "hessian")
    same(dense, want, rtol=1e-6)
    same(_sparse(c, "cube_energy_no_jvp", "hessian", x), want.numpy(), rtol=1e-6)


def test_stacked_hvp_tangents_of_a_function_without_a_vmap_rule_are_torchs_one_by_one(c):
    """test_vmap.py's vmap over jvp(grad(f)) for a custom Function without a vmap rule
    whose jvp and backward disagree: torch's vmap over the tangents raises, each tangent
    alone is answered by torch (forward over reverse, through the jvp). The service
    answers the stack with each tangent's torch.func product (README: a stack of vectors
    is answered wherever one vector is), not reverse over reverse's (which differs
    here), while the dense and sparse Hessians, which no torch.func call computes for
    this Function, are refused (round 17)."""
    x = np.linspace(0.6, 1.6, 5)
    ts = np.stack([np.eye(5)[0], np.arange(5.0) - 2, np.ones(5)])
    one = lambda v: jvp(grad(F.wrong_jvp_energy_no_vmap), (t(x),), (v,))[1]  # noqa: E731
    with pytest.raises(RuntimeError, match="vmap over"):
        torch.func.vmap(one)(t(ts))
    want = torch.stack([one(v) for v in t(ts)])
    reverse = torch.stack([jacrev(grad(F.wrong_jvp_energy_no_vmap), chunk_size=1)(t(x)) @ v for v in t(ts)])
    assert not torch.allclose(want, reverse)  # the two Hessians this Function has
    got, _ = answer(post(c, "wrong_jvp_energy_no_vmap", "hvp", [x], tangents=arr(ts), batched_vectors=True), "hvp")
    same(got, want, rtol=1e-12)
