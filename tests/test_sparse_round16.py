"""Sparse Jacobians and Hessians, round 16: functions that reach a tensor's storage
(``share_memory_``, DLPack) under the tracer; functions of each matrix of a batch
(``det``, ``inv``, ``eigh``, ...: finite elements). Each answer against torch.func (or
its error) in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse16_functions as s16

from .conftest import assert_problem, ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse16_functions") as c:
        yield c


# ------------------------------------------------------------------ a tensor's storage under the tracer


@pytest.mark.parametrize("name", ["shared_buffer", "dlpack_round_trip"])
def test_a_function_that_reaches_a_storage_is_torchs_error_not_a_crash(client, name):
    """``torch.full(...).share_memory_()`` in the function (or a DLPack round trip of
    its input): jacrev refuses it ('Cannot access storage of TensorWrapper'), so the
    dense route answers 500 function_error. The tracer's wrapper handed its storage,
    which has no data, to torch's C++ code: the engine died by SIGSEGV at each
    ``sparsity: auto`` request (500 'the engine process was killed by SIGSEGV'), and the
    third quarantined the function, its ``/evaluate`` refused 503 for 600 s. Now the
    trace fails there as jacrev does, and the sparse answer is the dense one's error;
    the engine lives on, and evaluates."""
    body = {"inputs": [[1.0, 2.0, 3.0]]}
    dense = client.post(f"/v1/functions/{name}/jacobian", json=body)
    want = assert_problem(dense, 500, "function_error")["detail"]
    for _ in range(2):
        r = client.post(f"/v1/functions/{name}/jacobian", json={**body, "sparsity": "auto"})
        assert assert_problem(r, 500, "function_error")["detail"] == want
    r = client.get(f"/v1/functions/{name}/sparsity?shapes=3")
    assert assert_problem(r, 500, "function_error")["detail"] == want
    r = client.post(f"/v1/functions/{name}/evaluate", json=body)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ functions of each matrix of a batch


def csr(doc, key="jacobian"):
    j = doc[key]
    return sp.csr_array((j["data"], j["indices"], j["indptr"]), shape=j["shape"])


@pytest.mark.parametrize("name", sorted(s16.CELL_FUNCTIONS))
def test_a_function_of_each_matrix_of_a_batch_reads_its_own_matrix(client, name):
    """det, logdet, inv, eigvalsh, svdvals, cholesky, qr, matrix_exp, pinv, lu_factor of
    a batch of 3 x 3 matrices (a cell's local system, an element's deformation
    gradient): each was an unknown op to the tracer, every output on every matrix
    ('unknown op _linalg_det: assumed dense', exact false; inv of 4 cells: 36 products
    where 9 do). Now each output element reads its own matrix's 9 elements: exact, one
    block per cell, as many products as a cell has outputs (at most 9), and the values
    jacrev's."""
    cells = 4
    a = np.random.default_rng(16).uniform(-0.5, 0.5, (cells, 3, 3)) + 3 * np.eye(3)
    r = client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [a.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["exact"] is True and not [n for n in meta["notes"] if "unknown op" in n], meta
    want = torch.func.jacrev(s16.CELL_FUNCTIONS[name])(torch.from_numpy(a)).reshape(-1, a.size).numpy()
    got = csr(r.json())
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-10, atol=1e-12)
    per_cell = want.shape[0] // cells
    coo = got.tocoo()
    assert (coo.row // per_cell == coo.col // 9).all()  # no entry outside its own cell's block
    assert meta["products"] == min(per_cell, 9)
    r = client.get(f"/v1/functions/{name}/sparsity?shapes={cells},3,3")
    assert r.status_code == 200, r.text
    assert r.json()["pattern"]["exact"] is True and r.json()["products"] == min(per_cell, 9)


def test_a_finite_element_energys_hessian_couples_the_nodes_of_an_element(client):
    """A neo-Hookean membrane on a triangle mesh: each element's deformation gradient
    ``F`` and ``log det F``. ``det`` was an unknown op, so the sparse Hessian was dense
    (24 products for 12 nodes; a mesh of thousands of nodes, one product per unknown or
    the 413 of a pattern too dense). Now it pairs the nodes of one element: the pattern
    is torch.func.hessian's nonzeros, from 8 products, and the values its values."""
    x = s16.REFERENCE + torch.from_numpy(np.random.default_rng(6).normal(0, 0.05, (12, 2)))
    r = client.post("/v1/functions/neo_hookean/hessian", json={"inputs": [x.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    want = torch.func.hessian(s16.neo_hookean)(x).reshape(24, 24).numpy()
    got = csr(r.json(), "hessian").toarray()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got != 0, want != 0)
    assert meta["exact"] is True and meta["products"] == 8, meta


# ------------------------------------------------------------------ movement ops with numbers among their arguments


def _pattern(doc):
    """A GET .../sparsity answer's matrix as a dense boolean array."""
    return csr(doc, "matrix").toarray() != 0


def test_nearest_interpolation_at_a_fractional_scale_copies_the_elements_torch_copies(client):
    """``F.interpolate(u, scale_factor=1.7, mode="nearest")`` (and ``nearest-exact``):
    the tracer ran the op on element labels with every float argument set to 0 (taken
    for a fill value), so the kernel's ``scales`` became 0 and torch computed the scale
    from the sizes, another mapping than 1.7's: the pattern put output 3 on input 2
    where torch copies input 1, exact and unchecked, and the POST answered 200 with
    entries 1.0 off jacrev's (and GET .../sparsity that pattern). Now only the fill
    value (``constant_pad_nd``'s ``value``, an int 1 too) is 0 on labels: the pattern is
    jacrev's nonzeros exactly, and the values jacrev's."""
    u = np.random.default_rng(16).uniform(0.5, 1.5, (4, 5))
    want = torch.func.jacrev(s16.nearest_prolongation)(torch.from_numpy(u)).reshape(-1, u.size).numpy()
    r = client.post("/v1/functions/nearest_prolongation/jacobian", json={"inputs": [u.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["exact"] is True
    np.testing.assert_array_equal(csr(r.json()).toarray(), want)
    r = client.get("/v1/functions/nearest_prolongation/sparsity?shapes=4,5")
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_pattern(r.json()), want != 0)


def test_a_rank_one_update_is_a_product(client):
    """``torch.addr(M, u, v)`` (``M + u v^T``, a quasi-Newton or Sherman-Morrison
    update) was an unknown op: every element on every input (exact false, 'unknown
    op addr: assumed dense'). Now it is traced as the product it is: element (i, j)
    reads ``M[i, j]``, ``u[i]`` where ``v[j]`` may be nonzero, and ``v[j]``; so a
    constant ``v``'s zeros leave their columns to ``M``. The pattern is jacrev's
    nonzeros exactly."""
    x = np.random.default_rng(1).uniform(0.5, 1.5, 8)
    want = torch.func.jacrev(s16.rank_one_update)(torch.from_numpy(x)).reshape(-1, 8).numpy()
    r = client.post("/v1/functions/rank_one_update/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["exact"] is True and r.json()["meta"]["nnz"] == int((want != 0).sum())
    np.testing.assert_array_equal(csr(r.json()).toarray(), want)


def test_a_mode_filter_reads_its_window(client):
    """``torch.mode`` over windows of 3 (a mode filter on a signal with repeated
    values) was an unknown op: every output on every input (exact false, 'unknown op
    mode: assumed dense'). Now it is a line op as
    ``kthvalue``: each output on its window (a union over which element the values
    pick, noted), 3 products, the values jacrev's."""
    x = [1.0, 2.0, 2.0, 3.0, 1.0, 1.0, 4.0, 4.0, 4.0, 2.0, 5.0, 5.0]
    want = torch.func.jacrev(s16.mode_filter)(torch.tensor(x, dtype=torch.float64)).numpy()
    r = client.post("/v1/functions/mode_filter/jacobian", json={"inputs": [x], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["exact"] is True and meta["conservative"] is True and meta["products"] == 3, meta
    np.testing.assert_array_equal(csr(r.json()).toarray(), want)


def test_pair_distances_read_their_two_points(client):
    """``F.pdist`` (bond lengths, pair potentials' distances) was an unknown op: every
    distance on every coordinate (exact false, 'unknown op _pdist_forward: assumed
    dense'). Now distance ``(i, j)`` reads points ``i`` and ``j``, as ``cdist``'s: the
    pattern is jacrev's nonzeros exactly, from as many VJPs as an edge colouring of the
    pairs takes (5 for 6 points), and the values jacrev's."""
    x = np.random.default_rng(7).uniform(-1, 1, (6, 3))
    want = torch.func.jacrev(s16.pair_distances)(torch.from_numpy(x)).reshape(15, 18).numpy()
    r = client.post("/v1/functions/pair_distances/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["exact"] is True and meta["products"] == 5, meta
    np.testing.assert_allclose(csr(r.json()).toarray(), want, rtol=1e-13, atol=0)
    r = client.get("/v1/functions/pair_distances/sparsity?shapes=6,3")
    np.testing.assert_array_equal(_pattern(r.json()), want != 0)


# ------------------------------------------------------------------ the library's pattern cache key


class _Shift:
    """A callable stencil object whose shift is an attribute."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.roll(self.shift)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.roll(self.shift)


#: A module-level setting a library function reads (a notebook sets it again).
SHIFT = 1


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return x * x.roll(SHIFT)


def _set_shift(k: int) -> None:
    global SHIFT
    SHIFT = k


def test_a_library_functions_key_follows_its_objects_state():
    """Called through the library (``sparse_jacobian(fn, args)``, no registered name),
    a function is keyed by its code and what it carries; objects counted by type and
    identity alone. A callable object (or a bound method) whose attribute changed
    (``op.shift = 2``), a closure over a dict that changed (``cfg["shift"] = 2``), or
    a function reading a global set again (``SHIFT = 2``), kept its first pattern:
    exact, so unchecked, and the answer 1.3 off jacrev's. Now an object's attributes,
    a dict's items and the plain globals a function reads are part of the key."""
    from jacobian_service.sparsity import PatternCache, sparse_jacobian

    x = torch.from_numpy(np.random.default_rng(3).uniform(0.5, 1.5, 6))
    op, cfg = _Shift(1), {"shift": 1}
    for fn, change in [(op, lambda k: setattr(op, "shift", k)), (op.apply, lambda k: setattr(op, "shift", k)),
                       (lambda x: x * x.roll(cfg["shift"]), lambda k: cfg.__setitem__("shift", k)),
                       (_shifted, _set_shift)]:
        cache = PatternCache()
        for k in (1, 2):
            change(k)
            got = sparse_jacobian(fn, [x], cache=cache).matrix.toarray()
            np.testing.assert_array_equal(got, torch.func.jacrev(fn)(x).numpy())
