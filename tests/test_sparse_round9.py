"""Sparse Jacobians and Hessians, round 9: ops the tracer did not know, which it took as
dense (every output on every input, ``meta.exact: false``, one product per output or
input) though each has a plain structure. Every answer is compared with torch's
reverse mode in this process (``torch.autograd.functional``: no vmap, which is itself
wrong for some ops), every nonzero stored, and the pattern no wider than the ops allow.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings
from tests import sparse9_functions as s9

RNG = np.random.default_rng(9)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, functions="tests.sparse9_functions"))) as c:
        yield c


def f64(x):
    return {"dtype": "float64", "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def sparse(client, name, x, kind="jacobian", **options):
    r = client.post(f"/v1/functions/{name}/{kind}", json={"inputs": [f64(x)], "sparsity": "auto", **options})
    assert r.status_code == 200, r.text
    doc = r.json()
    return wire.decode_sparse_json(doc[kind]), doc["meta"]


def jac(f, x):
    t = torch.from_numpy(x)
    return torch.autograd.functional.jacobian(lambda a: f(a).reshape(-1), t).reshape(-1, t.numel()).numpy()


def hess(f, x):
    t = torch.from_numpy(x)
    return torch.autograd.functional.hessian(f, t).reshape(t.numel(), t.numel()).numpy()


def entries(J):
    coo = sp.coo_array(J)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_exact(J, meta, want, stored=None):
    """Values equal to torch's, every nonzero stored, the pattern traced exactly
    (``exact``), and stored entries no more than ``stored`` (default: the nonzeros)."""
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    nonzero = set(zip(*np.nonzero(want)))
    assert nonzero <= entries(J)
    assert meta["exact"] is True and meta["source"] == "detected", meta
    assert J.nnz == (len(nonzero) if stored is None else stored), (J.nnz, len(nonzero))


# ------------------------------------------------------------------ ops no longer dense


def test_a_matrix_diagonal_and_traces_read_the_diagonal_only(client):
    """``torch.diag`` of a matrix (aten's ``diagonal_copy``) and ``torch.trace`` were
    unknown ops: the diagonal of a 6 x 6 matrix and two traces took all 36 entries each
    (8 products, exact false). Now each reads the diagonal: 3 products (rev)."""
    Q = RNG.uniform(-1, 1, (6, 6))
    J, meta = sparse(client, "diagonal_invariants", Q)
    assert_exact(J, meta, jac(s9.diagonal_invariants, Q))
    assert meta["products"] == 3


def test_rot90_and_block_diag_move_elements(client):
    """``rot90`` and ``block_diag`` move elements as views and ``cat`` do, but were
    taken as dense: a 5 x 5 field times its rotation took 25 products, a block-diagonal
    operator of 8 cells 8. Now 2 (two entries per row) and 1 (rows apart)."""
    u = RNG.uniform(-1, 1, (5, 5))
    J, meta = sparse(client, "rotated_product", u)
    assert_exact(J, meta, jac(s9.rotated_product, u))
    assert meta["products"] == 2
    x = RNG.uniform(-1, 1, 16)
    J, meta = sparse(client, "block_operator", x)
    assert_exact(J, meta, jac(s9.block_operator, x))
    assert meta["products"] == 1


def test_an_lstm_cell_keeps_its_samples_apart(client):
    """``torch.lstm_cell`` splits its gates with ``unsafe_chunk``, an unknown op: every
    output of a batch of 6 samples depended on every sample (18 products; 24 by VJPs).
    Now each sample's 4 outputs read its own 3 inputs: 4 VJPs (``mode: rev``: forward
    mode's first use costs a second here)."""
    x = RNG.uniform(-1, 1, (6, 3))
    J, meta = sparse(client, "lstm_step", x, mode="rev")
    assert_exact(J, meta, jac(s9.lstm_step, x))
    assert meta["products"] == 4


def test_kthvalue_and_aminmax_read_their_row(client):
    """``kthvalue`` (reducing its dim) and ``aminmax`` were taken as dense: each row's
    statistics on every row. Now each on its own row, as ``max(dim)`` is: a union over
    the choices the values make (``conservative``), so every entry of the row is stored:
    3 products where 15 were."""
    x = RNG.uniform(-1, 1, (5, 4))
    J, meta = sparse(client, "row_order_stats", x)
    assert_exact(J, meta, jac(s9.row_order_stats, x), stored=5 * 3 * 4)
    assert meta["conservative"] is True
    assert meta["products"] == 3


def test_their_hessian_is_sparse_too(client):
    """The Hessian of an energy built from a diagonal, a trace, a rotation and blocks:
    was 36 Hessian-vector products (dense); now 6, and torch's Hessian exactly."""
    Q = RNG.uniform(-1, 1, (6, 6))
    H, meta = sparse(client, "structured_energy", Q, kind="hessian")
    want = hess(s9.structured_energy, Q)
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-12, atol=1e-12)
    assert set(zip(*np.nonzero(want))) <= entries(H)
    assert meta["exact"] is True and meta["products"] <= 8, meta


# ------------------------------------------------------------------ elementwise ops aten does not tag pointwise


def test_elementwise_ops_without_aten_s_pointwise_tag(client):
    """``glu``, ``torch.polar``, ``torch.complex``, ``prelu`` (``_prelu_kernel``),
    ``logsigmoid`` (``log_sigmoid_forward``) and ``hardswish`` work element by element,
    but aten does not tag them pointwise: each was dense (a GLU over 4 rows: 12
    products; the phasor field of 6 points: 12; the activations over 2 x 3 x 4: 24).
    Now 1, 2 and 1."""
    for name, x, products in (("gated", RNG.uniform(-1, 1, (4, 6)), 1),
                              ("phasor", RNG.uniform(0.5, 1.5, (2, 6)), 2),
                              ("activations", RNG.uniform(-1, 1, (2, 3, 4)), 1)):
        J, meta = sparse(client, name, x)
        assert_exact(J, meta, jac(getattr(s9, name), x))
        assert meta["products"] == products, (name, meta["products"])


def test_losses_are_sums_of_their_terms(client):
    """``mse_loss``, ``huber_loss`` and ``binary_cross_entropy`` were unknown ops: a batch
    of per-sample residuals (reduction none) took one product per output, and the
    Hessian of a smoothing energy written with them (reduction mean / sum), tridiagonal,
    one Hessian-vector product per unknown (12). Now their terms are elementwise, and a
    reduced loss the sum of its terms: 3 products where 15 were, and 2 or 3 for the Hessian."""
    x = RNG.uniform(-1, 1, (3, 5))
    J, meta = sparse(client, "loss_terms", x)
    assert_exact(J, meta, jac(s9.loss_terms, x))
    assert meta["products"] == 3
    x = RNG.uniform(-1, 1, 12)
    H, meta = sparse(client, "smoothing_energy", x, kind="hessian")
    want = hess(s9.smoothing_energy, x)
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-12, atol=1e-12)
    assert set(zip(*np.nonzero(want))) <= entries(H) and H.nnz == 3 * 12 - 2
    assert meta["exact"] is True and meta["products"] <= 3, meta


def test_attention_keeps_its_sequences_apart(client):
    """``scaled_dot_product_attention`` runs ``_safe_softmax``, an unknown op: every
    output of a batch of 3 sequences depended on all of them (24 products for 3 x 4 x 2).
    Now each sequence's outputs on its own 8 inputs: 8 products, and every entry of the
    block is a nonzero."""
    x = RNG.uniform(-1, 1, (3, 4, 2))
    J, meta = sparse(client, "attention", x)
    assert_exact(J, meta, jac(s9.attention, x))
    assert meta["products"] == 8


# ------------------------------------------------------------------ in-place ops


def test_in_place_ops_follow_their_out_of_place_rules(client):
    """In place, only pointwise, scatter and copy ops were traced: ``cumsum_`` and
    ``cumprod_`` were dense (a running integral stored its upper triangle of zeros,
    exact false), ``tril_`` / ``triu_`` stopped the tracer (the pattern was probed
    numerically), and ``addmm_`` / ``addmv_`` / ``baddbmm_`` with a tridiagonal weight
    were dense (24 products for 4 samples, 1,188 entries stored for 144 nonzeros). Now
    each follows its out-of-place rule: the lower triangles exactly (72 entries, not
    128), the triangles traced in 1 product, the linear maps in 3."""
    x = RNG.uniform(-1, 1, 8)
    J, meta = sparse(client, "running_in_place", x)
    assert_exact(J, meta, jac(s9.running_in_place, x))
    assert J.nnz == 2 * 8 * 9 // 2
    x = RNG.uniform(-1, 1, (4, 5))
    J, meta = sparse(client, "triangles_in_place", x)
    assert_exact(J, meta, jac(s9.triangles_in_place, x))
    assert meta["products"] == 1
    x = RNG.uniform(-1, 1, (4, 6))
    J, meta = sparse(client, "linear_in_place", x)
    assert_exact(J, meta, jac(s9.linear_in_place, x))
    assert meta["products"] == 3


def test_a_pattern_past_the_limit_is_a_413_that_names_the_limit(client):
    """``x * x.sum()`` at n = 30,000 has 9e8 pattern entries, past the limit: the 413
    said 'mul (every output on every input) would hold ...', the words of an op the
    tracer does not know, for a plain product (its elementwise rule raised the limit's
    error, which was taken for a broadcast failure and the op for an unknown one)."""
    r = client.get("/v1/functions/all_coupled/sparsity?shapes=30000")
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert doc["code"] == "result_too_large"
    assert "900,000,000 entries" in doc["detail"] and "every output on every input" not in doc["detail"], doc


def test_cross_entropy_keeps_its_samples_apart(client):
    """``cross_entropy`` / ``nll_loss`` run ``nll_loss_forward``, an unknown op: every
    sample's loss depended on every sample's logits (16 products for 8 samples, 512
    entries stored for 38), and the mean loss's block-diagonal Hessian took 32 products.
    Now a sample's term reads its own logits (NLL: its target class's element, none for
    an ignored one): 2 products (a sample's two rows); the Hessian's 4 x 4 blocks take 4."""
    z = RNG.uniform(-2, 2, (8, 4))
    J, meta = sparse(client, "classifier_losses", z)
    assert_exact(J, meta, jac(s9.classifier_losses, z))
    assert meta["products"] == 2
    H, meta = sparse(client, "classifier_energy", z, kind="hessian")
    want = hess(s9.classifier_energy, z)
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-12, atol=1e-12)
    assert set(zip(*np.nonzero(want))) <= entries(H) and H.nnz == 8 * 16
    assert meta["exact"] is True and meta["products"] == 4, meta


# ------------------------------------------------------------------ colouring quality


def test_colourings_take_no_more_products_than_scipy_s_grouping():
    """scipy's own column grouping (``optimize._numdiff.group_columns``, what
    ``least_squares(jac_sparsity=...)`` uses) against the service's colourings on the
    same patterns: bands (the optimum is the band's width), a 2-D 5-point stencil (5),
    random sparse patterns and a wide one. The service never takes more products, and
    reaches the lower bound (the most entries in a row or column) where it is known
    to be the optimum."""
    from scipy.optimize._numdiff import group_columns

    from jacobian_service.sparsity import Pattern, choose_coloring

    n = 120
    grid = sp.diags([np.ones(9), np.ones(10), np.ones(9)], [-1, 0, 1])
    cases = [(sp.diags([np.ones(n - abs(k)) for k in range(-b, b + 1)], list(range(-b, b + 1))), 2 * b + 1) for b in (1, 2, 5)]
    cases.append((sp.kron(sp.identity(10), grid) + sp.kron(grid, sp.identity(10)), 5))
    cases.append((sp.random(200, 200, density=0.01, random_state=1) + sp.identity(200), None))
    cases.append((sp.random(60, 240, density=0.03, random_state=2), None))
    for A, optimum in cases:
        A = sp.csr_array(A)
        A.data[:] = 1
        p = Pattern(A.shape, A.tocoo().row, A.tocoo().col)
        ours = choose_coloring(p).n_colors
        scipys = min(int(group_columns(A).max()) + 1, int(group_columns(sp.csr_array(A.T)).max()) + 1)
        assert ours <= scipys, (A.shape, A.nnz, ours, scipys)
        if optimum is not None:
            assert ours == optimum, (ours, optimum)


def test_forces_by_torch_func_grad_inside_are_traced(client):
    """A force computed inside the function as ``-torch.func.grad(E)`` runs the backward
    ops of E's slices, row picks and diagonal (``slice_backward``, ``select_backward``,
    ``diagonal_backward``), which place the gradient into zeros: they were unknown ops,
    so the force Jacobian of 6 beads (the energy's Hessian, 60 nonzeros) stored all
    324 entries and took 18 products. Now the placement is traced as the forward
    slices are: the Hessian's entries exactly, 4 products."""
    x = RNG.uniform(-1, 1, (6, 3))
    J, meta = sparse(client, "bead_forces", x)
    assert_exact(J, meta, jac(s9.bead_forces, x))
    assert meta["products"] == 4


def test_backward_ops_of_activations_losses_and_softmax_are_traced(client):
    """A gradient taken inside the function runs the backward ops of its activations,
    losses and softmax (``softplus_backward``, ``elu_backward``, ``mse_loss_backward``,
    ``_log_softmax_backward_data``, ...), which aten does not tag pointwise: they were
    unknown, so the forces of 6 independent rows (3 x 3 blocks, 54 nonzeros) stored all
    324 entries and took 18 products. Now elementwise ones are pointwise and softmax's
    reads its row of the gradient and the output: 3 products."""
    x = RNG.uniform(-1, 1, (6, 3))
    J, meta = sparse(client, "row_forces", x)
    assert_exact(J, meta, jac(s9.row_forces, x))
    assert meta["products"] == 3
