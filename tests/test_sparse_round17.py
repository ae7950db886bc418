"""Sparse Jacobians and Hessians, round 17: functions that branch on a tensor's text
(``str``, ``repr``, an f-string) under the tracer; ``as_strided_scatter`` whose writes
torch's backward reads otherwise than the forward writes; ops that were unknown to the
tracer (``triangular_solve``, ``addbmm``, ``linalg.lstsq``). Each answer against
torch.func (jacrev, hessian) in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse17_functions as s17

from .conftest import ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse17_functions") as c:
        yield c


def csr(doc, key="jacobian"):
    j = doc[key]
    return sp.csr_array((j["data"], j["indices"], j["indptr"]), shape=j["shape"])


def sparse_answer(client, name, inputs, kind="jacobian"):
    r = client.post(f"/v1/functions/{name}/{kind}", json={"inputs": [np.asarray(x).tolist() for x in inputs], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    return csr(r.json(), kind), r.json()["meta"]


def jacrev(fn, x):
    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    return torch.func.jacrev(fn)(t).reshape(-1, t.numel()).numpy()


# ------------------------------------------------------------------ a branch on a tensor's text


@pytest.mark.parametrize("name", ["text_sign", "text_wrapper"])
def test_a_branch_on_a_tensors_text_is_jacrevs_branch(client, name):
    """``'-' in str(u)`` (a sign check by text) and ``'Tensor(' in repr(u)``: the
    tracer's tensors printed a placeholder (``_Traced((5,), torch.float64)``), so the
    trace took the branch that keeps to the diagonal where jacrev's couples every
    element to the first: exact, unchecked, a 200 whose column 0 was missing (1.0 and
    more off jacrev's). Now a traced tensor's text is its values' (the sign check
    goes jacrev's way), and the pattern is checked against the products: jacrev's
    tensors print as ``GradTrackingTensor(...)``, which the trace cannot know."""
    u = np.array([-0.5, 1.5, 0.7, 2.0, 1.1])
    got, meta = sparse_answer(client, name, [u])
    np.testing.assert_allclose(got.toarray(), jacrev(getattr(s17, name), u), rtol=1e-12, atol=1e-12)
    assert any("text" in n for n in meta["notes"]), meta


def test_a_hessian_through_a_text_check_is_torchs(client):
    """The same for a Hessian: an energy that adds a coupling to the first element
    where ``f"{u}"`` names a wrapper (as every tensor torch.func.hessian passes does)."""
    u = np.array([0.3, -0.2, 0.9, 0.4, 1.2, -0.7])
    got, _ = sparse_answer(client, "text_energy", [u], "hessian")
    want = torch.func.hessian(s17.text_energy)(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ as_strided_scatter


@pytest.mark.parametrize("name", ["strided_overlap", "strided_patch"])
def test_as_strided_scatter_keeps_every_entry_torchs_backward_reads(client, name):
    """``as_strided_scatter`` was run on labels, one writer per place: through a view
    that overlaps itself (stride (1, 1)) the src elements that lose a place were left
    out, though torch's backward gives each its place's gradient (jacrev's entries
    (1, 3) and (2, 4)); and torch's backward gives the input itself the gradient of the
    places written, which the labels (the written value only) left out too. Exact and
    unchecked: a 200 1.0 off jacrev's. Now each place reads every src element written
    there and the input's own element: jacrev's nonzeros are all entries."""
    u = np.array([0.5, 1.5, -0.7, 2.0, 1.1, 0.3])
    got, meta = sparse_answer(client, name, [u])
    want = jacrev(getattr(s17, name), u)
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
    assert meta["exact"] is True, meta


# ------------------------------------------------------------------ ops traced as what they amount to


@pytest.mark.parametrize("name, shape, products", [
    ("upwind_step", (8, 2), 8),  # u's two columns apart (each on its whole column: L^-1 is full lower)
    ("varying_triangle", (4, 4), None),
    ("grouped_sum", (2, 3, 2), 1),  # the 4 outputs read disjoint elements through W's nonzeros
    ("cell_fit", (5, 4), 2),  # each cell's 2 parameters on its own 4 observations
])
def test_ops_that_were_unknown_are_traced_as_what_they_compute(client, name, shape, products):
    """``torch.triangular_solve`` (the deprecated form of ``solve_triangular``),
    ``torch.addbmm`` and ``torch.linalg.lstsq`` were unknown ops: every output on every
    input, exact false ('unknown op triangular_solve: assumed dense'), one product per
    output row. Now each is traced as what it computes (``solve_triangular`` of ``A``
    or its transpose; the sum of ``bmm``; ``pinv(A) @ B``, as torch differentiates
    lstsq): the pattern holds jacrev's nonzeros, exact, in fewer products."""
    x = np.random.default_rng(17).uniform(0.5, 1.5, shape)
    got, meta = sparse_answer(client, name, [x])
    want = jacrev(getattr(s17, name), x)
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-10, atol=1e-12)
    assert meta["exact"] is True and not [n for n in meta["notes"] if "unknown op" in n], meta
    if products is not None:
        assert meta["products"] == products, meta
