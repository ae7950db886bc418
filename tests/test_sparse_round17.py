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
    goes jacrev's way), and the pattern is checked against the products at every
    request: jacrev's tensors print as ``GradTrackingTensor(...)``, which the trace
    cannot know, and the cached pattern meets points whose text branches otherwise
    (no minus sign: the second point)."""
    for u in (np.array([-0.5, 1.5, 0.7, 2.0, 1.1]), np.array([0.5, 1.5, 0.7, 2.0, 1.1])):
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


def test_a_branch_the_tracer_cannot_see_is_caught_by_its_values(client):
    """``type(u) is torch.Tensor``: jacrev's tensors are, the tracer's are a subclass
    (no Python hook changes what ``type`` says), so the trace took the other branch:
    the diagonal and its neighbour where jacrev couples every element to the first;
    exact, unchecked, a 200 with column 0 missing. The traced run's output differs from
    the request's forward pass (a plain call): the pattern is then checked
    against the products, proven wrong, and the answer is jacrev's."""
    u = np.array([0.5, 1.5, -0.7, 2.0, 1.1])
    got, meta = sparse_answer(client, "type_dispatch", [u])
    np.testing.assert_allclose(got.toarray(), jacrev(s17.type_dispatch, u), rtol=1e-12, atol=1e-12)
    assert any("other values" in n for n in meta["notes"]), meta


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
    ("unpooled", (2, 4, 4), None),  # each unpooled value on its pooling window (indices from values)
])
def test_ops_that_were_unknown_are_traced_as_what_they_compute(client, name, shape, products):
    """``torch.triangular_solve`` (the deprecated form of ``solve_triangular``),
    ``torch.addbmm``, ``torch.linalg.lstsq`` and ``max_unpool2d`` were unknown ops: every
    output on every input, exact false ('unknown op triangular_solve: assumed dense'),
    one product per output row. Now each is traced as what it computes
    (``solve_triangular`` of ``A`` or its transpose; the sum of ``bmm``; ``pinv(A) @ B``,
    as torch differentiates lstsq; torch's decomposition of max_unpool, a write at the
    indices): the pattern holds jacrev's nonzeros, exact, in fewer products."""
    x = np.random.default_rng(17).uniform(0.5, 1.5, shape)
    got, meta = sparse_answer(client, name, [x])
    want = jacrev(getattr(s17, name), x)
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-10, atol=1e-12)
    assert meta["exact"] is True and not [n for n in meta["notes"] if "unknown op" in n], meta
    if products is not None:
        assert meta["products"] == products, meta


# ------------------------------------------------------------------ Hessians a scientist registers


def _matrix(doc, fmt):
    h = doc["hessian"]
    if fmt == "dense":
        return np.asarray(h["data"]).reshape(h["shape"])
    if fmt == "coo":
        return sp.coo_array((h["data"], (h["row"], h["col"])), shape=h["shape"]).toarray()
    cls = sp.csr_array if fmt == "csr" else sp.csc_array
    return cls((h["data"], h["indices"], h["indptr"]), shape=h["shape"]).toarray()


@pytest.mark.parametrize("name, shape, colors", [
    # a band of half-width 2 under a random numbering: SparseMatrixColorings' acyclic
    # count for rho = 4 off-diagonal bands, floor(rho / 2) + 1 (its test/theory.jl; its
    # PerfectEliminationOrder on a permuted band: m + 1, m = 2)
    ("bead_energy", (24,), 3),
    ("group_loglik", (5, 3), 3),  # 3 x 3 blocks: a clique each, 3 colours for any colouring
])
def test_a_scientists_sparse_hessian_in_every_format(client, name, shape, colors):
    """An energy with a (permuted) banded Hessian and a log-likelihood of independent
    groups (block-diagonal): the sparse Hessian in JSON (csr, csc, coo, dense), as
    ``.npz`` for scipy's ``load_npz``, and through the SDK (scipy's CSR, CSC, COO
    arrays, a numpy array for dense): each torch.func.hessian's, its nonzeros exactly,
    in as many products as SparseMatrixColorings' colourings take. A guard (no defect
    found here)."""
    import io

    from .conftest import sdk_over

    x = np.random.default_rng(17).uniform(-1, 1, shape)
    want = torch.func.hessian(getattr(s17, name))(torch.from_numpy(x)).reshape(x.size, x.size).numpy()
    for fmt in ("csr", "csc", "coo", "dense"):
        r = client.post(f"/v1/functions/{name}/hessian", json={"inputs": [x.tolist()], "sparsity": "auto", "sparse_format": fmt})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_matrix(r.json(), fmt), want, rtol=1e-12, atol=1e-12)
        meta = r.json()["meta"]
        assert (meta["colors"], meta["products"], meta["nnz"]) == (colors, colors, int((want != 0).sum())), meta
    buf = io.BytesIO()
    np.save(buf, x)
    r = client.post(f"/v1/functions/{name}/hessian?sparsity=auto&sparse_format=csc", content=buf.getvalue(),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
    got = sp.load_npz(io.BytesIO(r.content))
    assert isinstance(got, sp.csc_array)
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
    with sdk_over(client) as sdk:
        for fmt, cls in ((None, sp.csr_array), ("csc", sp.csc_array), ("coo", sp.coo_array), ("dense", np.ndarray)):
            got = sdk.hessian(name, x, sparsity="auto", sparse_format=fmt)
            assert isinstance(got, cls), type(got)
            np.testing.assert_allclose(got if fmt == "dense" else got.toarray(), want, rtol=1e-12, atol=1e-12)
