"""Sparse Jacobians and Hessians, round 15: malformed declared patterns (float
indices), ``out=`` writes seen by the tracer, ... Each answer against torch.func in this
process.

One in-process app, under a 1 MiB result limit, serves every case (no new server process).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from jacobian_service.sparsity.patterns import CHOICE_NOTE
from tests import sparse15_functions as s15

from .conftest import assert_problem, decode, npy_bytes, npz_bytes, ready_app_with, sdk_over


#: The app's result limit (the entry limit's test reads it; every other answer is far smaller).
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def client():
    with ready_app_with("tests.sparse15_functions", max_result_bytes=LIMIT) as c:
        yield c


def jacrev(f, *xs, argnums=0):
    ts = [torch.from_numpy(np.asarray(x)) for x in xs]
    J = torch.func.jacrev(f, argnums=argnums)(*ts)
    J = J if isinstance(J, tuple) else (J,)
    m = f(*ts).numel()
    return np.concatenate([j.reshape(m, -1).numpy() for j in J], axis=1)


def csr(doc):
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


# ------------------------------------------------------------------ out= writes


def _pattern(doc):
    """A GET .../sparsity answer's matrix as a dense boolean array."""
    m = doc["matrix"]
    dense = np.zeros(m["shape"], bool)
    for i in range(m["shape"][0]):
        dense[i, m["indices"][m["indptr"][i]:m["indptr"][i + 1]]] = True
    return dense


def test_a_result_written_through_out_is_traced(client):
    """``torch.sum(w * w, dim=1, out=s)``, ``torch.cumsum(x, 0, out=c)`` into buffers the
    function made: the tracer wrapped the out overload's result beside the buffer, which
    kept no dependencies, so GET .../sparsity showed an empty pattern (nnz 0) where
    each sum reads its pair and each running sum its prefix. Now an out= op is traced
    as the op out of place copied into its buffer: the pattern is the out-of-place
    function's (jacrev's nonzeros at a random point). Autograd refuses out= on values
    that need a gradient, so the POSTs answer torch's error, sparse as dense."""
    r = client.get("/v1/functions/out_reductions/sparsity?shapes=6")
    assert r.status_code == 200, r.text
    assert r.json()["pattern"]["exact"] is True and r.json()["pattern"]["value_dependent"] is False

    def same_out_of_place(x):
        w = x.reshape(-1, 2)
        return torch.cat([(w * w).sum(1), x.cumsum(0)])

    x = np.random.default_rng(15).uniform(0.5, 1.5, 6)
    np.testing.assert_array_equal(_pattern(r.json()), jacrev(same_out_of_place, x) != 0)
    r = client.get("/v1/functions/out_write/sparsity?shapes=4")
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_pattern(r.json()), (np.eye(4) + np.roll(np.eye(4), -1, axis=1)) > 0)
    dense = client.post("/v1/functions/out_write/jacobian", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]})
    want = assert_problem(dense, 500, "function_error")["detail"]
    assert want.startswith("RuntimeError: mul(): functions with out=... arguments don't support automatic differentiation")
    r = client.post("/v1/functions/out_write/jacobian", json={"inputs": [[1.0, 2.0, 3.0, 4.0]], "sparsity": "auto"})
    assert assert_problem(r, 500, "function_error")["detail"] == want


def test_a_buffer_written_through_out_from_an_input_is_no_constant(client):
    """``torch.mul(y, y, out=w)`` into a buffer the function made (``y`` not
    differentiated, which autograd allows), then ``x * w``: the buffer stayed a
    constant to the tracer, its zeros at the first point (y = 0, 1, 0, 1) structure, and
    the pattern without (0, 0) and (2, 2) was cached for every point: at y = 1 the
    answer was 0 where jacrev's is 1, a 200. Now the write makes the buffer vary with
    the inputs: its zeros are no structure, and every point gets jacrev's values."""
    x = np.array([1.0, 2.0, 3.0, 4.0])
    for y in (np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.5, 0.0, 2.0, 1.0])):
        r = client.post("/v1/functions/out_weight/jacobian",
                        json={"inputs": [x.tolist(), y.tolist()], "sparsity": "auto", "sparse_format": "dense"})
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["jacobian"]["data"])
        np.testing.assert_array_equal(got, jacrev(s15.out_weight, x, y))


# ------------------------------------------------------------------ sparse_format without sparsity


@pytest.mark.parametrize("fmt", ["csc", "coo", "dense"])
def test_a_sparse_format_without_sparsity_is_refused_naming_sparsity(client, fmt):
    """``sparse_format`` shapes a sparse result; with ``sparsity`` left at ``dense`` it
    was read by nothing: ``sparse_format=csc`` (or ``coo``, or ``dense``, whose 2-D
    matrix is not jacrev's shape) answered jacrev's array with a 200, as if the option
    had been honoured. Now a 422 that says to add ``sparsity``, in the body and in the
    query string (an ``.npy`` body: before it is read), on a Hessian too; its default
    (``csr``) asks for nothing and passes, as any option's default does; with
    ``sparsity=auto`` beside it the answer is that format, jacrev's values."""
    want = (f"sparse_format={fmt} applies to a sparse result: add sparsity=auto (or a declared pattern's name); "
            "with sparsity=dense (the default) the answer is jacrev's array")
    x = np.array([0.5, 1.0, 1.5])
    for kind in ("jacobian", "hessian"):
        r = client.post(f"/v1/functions/ring_sum/{kind}", json={"inputs": [x.tolist()], "sparse_format": fmt})
        assert assert_problem(r, 422, "invalid_input")["detail"] == want
    r = client.post(f"/v1/functions/ring_sum/jacobian?sparse_format={fmt}", content=npy_bytes(x),
                    headers={"content-type": "application/x-npy", "accept": "application/json"})
    assert assert_problem(r, 422, "invalid_input")["detail"] == want
    r = client.post("/v1/functions/ring_sum/jacobian", json={"inputs": [x.tolist()], "sparse_format": "csr"})
    assert r.status_code == 200 and np.asarray(r.json()["jacobian"]["data"]).shape == (3,), r.text
    r = client.post("/v1/functions/ring_sum/jacobian", json={"inputs": [x.tolist()], "sparse_format": fmt, "sparsity": "auto"})
    J, _ = decode(r)
    assert r.json()["meta"]["format"] == fmt
    np.testing.assert_allclose(J.toarray() if hasattr(J, "toarray") else J, jacrev(s15.ring_sum, x), rtol=1e-13, atol=0)


def test_the_cli_refuses_a_sparse_format_without_sparsity(tmp_path, capsys):
    """The CLI sent ``--sparse-format`` only beside ``--sparsity``: alone it was dropped
    and the dense array printed (exit 0). Now exit 2 and a line saying to add
    ``--sparsity``, before any request (the URL serves nothing)."""
    from jacobian_client._cli_call import call_main

    path = tmp_path / "x.npy"
    np.save(path, np.array([0.5, 1.0]))
    assert call_main(["ring_sum", "--input", str(path), "--sparse-format", "csc", "--url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == ("error: --sparse-format applies to a sparse result: add --sparsity auto (or a "
                                       "declared pattern's name)\n")


# ------------------------------------------------------------------ embedding_bag, renorm, dist traced exactly

RNG = np.random.default_rng(1515)


def _point(name):
    """A random point in [0.5, 1.5) for each of a function's inputs (by its declared shapes)."""
    return {
        "bag": [(10, 3)], "bag_mean_pad": [(10, 3)], "bag_weighted": [(10, 3), (8,)], "bag_max": [(10, 3)],
"renormed": [(4, 3)], "renorm_energy": [(4, 3)], "dists": [(4, 3), (4, 3)],
        "dist_chain": [(7,)],
    }[name]


def _sparse(client, name, kind, xs):
    argnums = list(range(len(xs)))
    r = client.post(f"/v1/functions/{name}/{kind}",
                    json={"inputs": [x.tolist() for x in xs], "sparsity": "auto", "argnums": argnums})
    J, doc = decode(r, kind)
    return J.toarray(), doc["meta"]


@pytest.mark.parametrize(("name", "chooses"), [
    ("bag", None), ("bag_mean_pad", None), ("bag_weighted", None), ("bag_max", "embedding_bag"), ("renormed", "renorm"),
    ("dists", "dist"),
])
def test_embedding_bag_renorm_and_dist_are_traced_exactly(client, name, chooses):
    """``embedding_bag`` (sum, mean with padding_idx, per-sample weights, max with
    include_last_offset), ``renorm`` and ``dist`` were unknown ops to the tracer: every
    output on every input element (bag: a 12 x 30 Jacobian of 3 entries a row taken as
    360; renorm 144 for 36), ``exact`` false, a note 'unknown op ...: assumed dense'. Now
    each bag reads its indices' rows column by column (and their weights), each renormed
    element its slice, each distance the elements of both operands: ``exact`` true, the
    pattern jacrev's nonzeros at a random point (a max bag's and renorm's a union over
    the choices the values make, ``conservative`` and noted), the values jacrev's."""
    fn = getattr(s15, name)
    xs = [RNG.uniform(0.5, 1.5, shape) for shape in _point(name)]
    want = jacrev(fn, *xs, argnums=tuple(range(len(xs))))
    got, meta = _sparse(client, name, "jacobian", xs)
    assert meta["exact"] is True and meta["source"] == "detected", meta
    assert meta["conservative"] is (chooses is not None) and not any("unknown op" in n for n in meta["notes"]), meta
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    shapes = ";".join(",".join(map(str, x.shape)) for x in xs)
    r = client.get(f"/v1/functions/{name}/sparsity?shapes={shapes}&argnums={','.join(map(str, range(len(xs))))}")
    pattern = _pattern(r.json())
    if chooses:  # a union over the choices the values make (noted): jacrev's nonzeros, and more
        assert (pattern >= (want != 0)).all() and pattern.sum() > (want != 0).sum()
        assert any(n.startswith(CHOICE_NOTE) and n.endswith(f"({chooses})") for n in meta["notes"]), meta["notes"]
    else:
        np.testing.assert_array_equal(pattern, want != 0)


@pytest.mark.parametrize("name", ["renorm_energy", "dist_chain"])
def test_their_hessians_are_torchs(client, name):
    """Sparse Hessians through ``renorm`` and ``dist`` (torch has none through
    ``embedding_bag``: '_embedding_bag_backward' has no derivative), against torch's."""
    fn = getattr(s15, name)
    xs = [RNG.uniform(0.5, 1.5, shape) for shape in _point(name)]
    ts = [torch.from_numpy(x) for x in xs]
    every = tuple(range(len(xs)))
    H = torch.func.jacrev(torch.func.grad(fn, argnums=every), argnums=every)(*ts)
    sizes = [x.size for x in xs]
    want = np.block([[np.asarray(H[i][j]).reshape(sizes[i], sizes[j]) for j in range(len(xs))] for i in range(len(xs))])
    got, meta = _sparse(client, name, "hessian", xs)
    assert meta["exact"] is True and not any("unknown op" in n for n in meta["notes"]), meta
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert meta["nnz"] < want.size  # sparse, not taken as dense


def test_embedding_bag_indices_given_with_the_request_are_each_their_own(client):
    """Indices sent as an input make the pattern value-dependent (as ``embedding``'s):
    each index set gets its own, each answer jacrev's."""
    w = RNG.uniform(0.5, 1.5, (10, 3))
    for idx in ([0, 2, 4, 5, 9, 1, 0, 7], [3, 3, 8, 1, 1, 6, 2, 2]):
        r = client.post("/v1/functions/bag_at/jacobian", json={"inputs": [w.tolist(), idx], "sparsity": "auto"})
        J, doc = decode(r)
        assert doc["meta"]["value_dependent"] is True and doc["meta"]["exact"] is True, doc["meta"]
        want = torch.func.jacrev(s15.bag_at)(torch.from_numpy(w), torch.tensor(idx)).reshape(12, 30).numpy()
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-13, atol=0)
        assert doc["meta"]["nnz"] == int((want != 0).sum())


# ------------------------------------------------------------------ the entry limit holds from the cache too


def test_a_pattern_detected_for_a_stream_is_held_to_a_json_answers_entry_limit(client):
    """Detection is bounded per matrix by min(budget / 16, result limit / 8) entries,
    but a dense ``.npy`` (streamed, not held to the result limit) by the budget's alone.
    ``(x / x.sum())[:3]`` at n = 400 goes through a 160,000-entry intermediate: over a
    1 MiB limit's 131,072 as JSON (413), within a stream's. The stream's pattern was
    cached, and the same JSON request after it was answered from the cache (200) where
    alone it was a 413: the answer followed what came before. Now the cached pattern
    keeps the most entries its detection held, and a request under a lower limit is
    refused as detecting would have refused it; the stream itself still streams."""
    n = 400
    x = np.random.default_rng(4).uniform(0.5, 1.5, n)
    url = "/v1/functions/head_shares/jacobian"
    r = client.post(url, json={"inputs": [x.tolist()], "sparsity": "auto"})
    fresh = assert_problem(r, 413, "result_too_large")["detail"]
    assert f"would hold 160,000 entries; the limit is {LIMIT // 8:,}" in fresh
    r = client.post(f"{url}?sparsity=auto&sparse_format=dense", content=npy_bytes(x),
               headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), jacrev(s15.head_shares, x), rtol=1e-13, atol=1e-17)
    for body in ({"sparsity": "auto"}, {"sparsity": "auto", "rows": [0, 1]}):
        r = client.post(url, json={"inputs": [x.tolist()], **body})
        assert assert_problem(r, 413, "result_too_large")["detail"] == (
            "the sparsity pattern is too dense for the limits: detecting this pattern would hold 160,000 entries; "
            "the limit is 131,072. Ask for sparsity=dense (streamed as .npy), or a smaller input")


# ------------------------------------------------------------------ several inputs and outputs, every format


def test_several_inputs_and_outputs_in_every_format_are_jacrevs(client, tmp_path):
    """Two outputs of two inputs (``argnums=[0, 1]``): the Jacobian as JSON and ``.npz``
    (``scipy.sparse.load_npz``) in CSR, CSC and COO, dense, by rows across both outputs,
    and through the SDK (scipy.sparse arrays, ``out=``); a Hessian of two inputs, one of
    them alone. Each against torch.func in this process (no defect found here)."""
    n = 6
    u, k = RNG.uniform(0.5, 1.5, n), RNG.uniform(0.5, 1.5, n)
    J = jacrev(s15.flux_source_flat, u, k, argnums=(0, 1))
    H = torch.func.hessian(s15.two_energy, argnums=(0, 1))(torch.from_numpy(u), torch.from_numpy(k))
    Hw = np.block([[H[a][b].numpy() for b in range(2)] for a in range(2)])
    url = "/v1/functions/flux_source/jacobian"
    for fmt in ("csr", "csc", "coo"):
        r = client.post(f"{url}?argnums=0,1&sparsity=auto&sparse_format={fmt}", content=npz_bytes(u=u, k=k),
                        headers={"content-type": "application/x-npz", "accept": "application/x-npz"})
        assert r.status_code == 200, r.text
        M = sp.load_npz(io.BytesIO(r.content))
        assert M.format == fmt
        np.testing.assert_array_equal(M.toarray(), J)
    r = client.post(url, json={"inputs": [u.tolist(), k.tolist()], "argnums": [0, 1], "sparsity": "auto", "rows": [3, 9],
                               "sparse_format": "dense"})
    np.testing.assert_array_equal(decode(r)[0], J[3:9])
    r = client.post("/v1/functions/two_energy/hessian",
                    json={"inputs": [u.tolist(), k.tolist()], "argnums": [0, 1], "sparsity": "auto", "sparse_format": "coo"})
    np.testing.assert_allclose(decode(r, "hessian")[0].toarray(), Hw, rtol=1e-13, atol=1e-14)
    with sdk_over(client) as sdk:
        for fmt, kind in (("csr", sp.csr_array), ("csc", sp.csc_array), ("coo", sp.coo_array)):
            M = sdk.jacobian("flux_source", u, k, argnums=(0, 1), sparsity="auto", sparse_format=fmt)
            assert isinstance(M, kind)
            np.testing.assert_array_equal(M.toarray(), J)
        sdk.jacobian("flux_source", u, k, argnums=(0, 1), sparsity="auto", sparse_format="dense", out=tmp_path / "J.npy")
        np.testing.assert_array_equal(np.load(tmp_path / "J.npy"), J)
        Hk = sdk.hessian("two_energy", u, k, argnums=1, sparsity="auto")
        np.testing.assert_allclose(Hk.toarray(), H[1][1].numpy(), rtol=1e-13, atol=1e-14)
