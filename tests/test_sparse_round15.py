"""Sparse Jacobians and Hessians, round 15: malformed declared patterns (float
indices), ``out=`` writes seen by the tracer, ... Each answer against torch.func in this
process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import sparse15_functions as s15

from .conftest import assert_problem, ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse15_functions") as c:
        yield c


def jacrev(f, *xs, argnums=0):
    ts = [torch.from_numpy(np.asarray(x)) for x in xs]
    J = torch.func.jacrev(f, argnums=argnums)(*ts)
    J = J if isinstance(J, tuple) else (J,)
    m = f(*ts).numel()
    return np.concatenate([j.reshape(m, -1).numpy() for j in J], axis=1)


def csr(doc):
    import scipy.sparse as sp

    j = doc["jacobian"]
    return sp.csr_array((j["data"], j["indices"], j["indptr"]), shape=j["shape"]).toarray()


# ------------------------------------------------------------------ declared patterns with float indices


@pytest.mark.parametrize(("name", "shown"), [("half", "0.5, 1.5, 2.5"), ("halfcoo", "0.5, 1.5, 2.5"), ("nan", "nan")])
def test_a_declared_pattern_of_fractional_indices_is_refused_not_truncated(client, name, shown):
    """A declared pattern whose indices are not whole numbers (0.5, 1.5, 2.5 from a
    callable or ``coo``; a NaN) was cast to int64: 0.5 became 0, the pattern another
    than declared (the diagonal: a 200 for sin(x), whose pattern it happens to be; here
    a 422 'the declared pattern ... is proven wrong', blaming the declaration's
    entries, not its indices), and ``coo`` of a NaN failed the module's import. Now
    it is a 422 that names the indices, on the POST and
    on GET .../sparsity; whole floats (``np.arange(n, dtype=float)``) lose nothing and
    are read as the integers they are."""
    x = [0.5, 1.0, 1.5]
    r = client.post("/v1/functions/bidiag_sin/jacobian", json={"inputs": [x], "sparsity": name})
    body = assert_problem(r, 422, "invalid_input")
    assert body["detail"] == f"sparsity {name!r}: pattern rows must be whole numbers (indices); got {shown}"
    r = client.get(f"/v1/functions/bidiag_sin/sparsity?shapes=3&sparsity={name}")
    assert assert_problem(r, 422, "invalid_input")["detail"] == body["detail"]


def test_a_declared_pattern_of_whole_float_indices_is_read_as_integers(client):
    x = np.array([0.5, 1.0, 1.5, 0.25])
    r = client.post("/v1/functions/bidiag_sin/jacobian", json={"inputs": [x.tolist()], "sparsity": "whole"})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["nnz"] == 7
    np.testing.assert_allclose(csr(r.json()), jacrev(s15.bidiag_sin, x), rtol=1e-13, atol=1e-15)
