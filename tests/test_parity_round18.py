"""PyTorch's own torch.func test cases, round 18, replayed over HTTP against
tests/parity18_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

test_ops.py's OpInfo-driven jacrev / hessian checks over complex-to-real functions
(sgn of a complex tensor), through the sparse routes (``sparsity: "auto"``, whose
pattern the service detects) as well as the dense ones.

One in-process app serves the module (no server start), as rounds 7-17.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
from torch.func import hessian, jacrev

from . import parity18_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, post, same, t


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
