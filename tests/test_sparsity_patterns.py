"""Declared patterns, the pattern cache, colourings against known optima, pictures and
the sparse wire formats (torch-free parts)."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest

sp = pytest.importorskip("scipy.sparse")
pytest.importorskip("networkx")

from jacobian_client import wire  # noqa: E402
from jacobian_client.sparse import SparseCOO, braille, pattern_string  # noqa: E402
from jacobian_service.sparsity import Pattern, PatternCache, banded, block_diagonal, coo, from_callable  # noqa: E402
from jacobian_service.sparsity.coloring import choose_coloring, column_coloring, row_coloring, star_coloring  # noqa: E402


FIVE_POINT = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
NINE_POINT = tuple((a, b) for a in (-1, 0, 1) for b in (-1, 0, 1))
TRIANGLES = FIVE_POINT + ((1, 1), (-1, -1))  # a mesh of squares cut along one diagonal


def grid_stencil(h: int, w: int, offsets: tuple[tuple[int, int], ...] = FIVE_POINT) -> Pattern:
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = [], []
    for di, dj in offsets:
        ii, jj = i + di, j + dj
        ok = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        rows.append((i * w + j)[ok])
        cols.append((ii * w + jj)[ok])
    return Pattern((h * w, h * w), np.concatenate(rows), np.concatenate(cols))


def test_banded_matches_its_definition_plain_and_periodic():
    n = 11
    plain = banded(2, 1).build([(n,)], n).to_dense()
    i, j = np.indices((n, n))
    assert np.array_equal(plain, (j - i >= -2) & (j - i <= 1))
    wrap = banded(2, 1, periodic=True).build([(n,)], n).to_dense()
    assert np.array_equal(wrap, np.isin((j - i) % n, [0, 1, n - 1, n - 2]))
    with pytest.raises(ValueError):
        banded(1, 1).build([(4,)], 5)  # not square


def test_block_diagonal_coo_and_callable():
    p = block_diagonal((2, 3)).build([(4, 3)], 8)
    dense = np.kron(np.eye(4, dtype=bool), np.ones((2, 3), bool))
    assert np.array_equal(p.to_dense(), dense)
    q = coo([0, 2, 2], [1, 0, 1], shape=(3, 2)).build([(2,)], 3)
    assert q.nnz == 3 and q.to_dense()[2].all() and q.source == "declared"
    with pytest.raises(ValueError):
        coo([0], [0], shape=(3, 2)).build([(5,)], 3)
    r = from_callable(lambda shapes, m: np.eye(m, dtype=bool)).build([(6,)], 6, name="diag")
    assert r == Pattern((6, 6), np.arange(6), np.arange(6)) and r.name == "diag"


def test_pattern_cache_survives_a_restart(tmp_path):
    p = banded(1, 1).build([(9,)], 9).replace(source="traced", notes=("x",))
    key = PatternCache.key("f", (9,))
    PatternCache(tmp_path).put(key, {"pattern": p, "colors": np.arange(9) % 3, "mode": "fwd"})
    fresh = PatternCache(tmp_path)  # a new process: nothing in memory
    hit = fresh.get(key)
    assert hit is not None and hit["pattern"] == p and hit["pattern"].source == "traced"
    assert hit["mode"] == "fwd" and np.array_equal(hit["colors"], np.arange(9) % 3)
    assert fresh.get(PatternCache.key("g", (9,))) is None
    (tmp_path / f"{key}.npz").write_bytes(b"torn")
    assert PatternCache(tmp_path).get(key) is None  # unreadable: a miss, not a crash


def check_direct_recovery(p: Pattern, c) -> None:
    """Decompress a random matrix with this pattern from its compressed products."""
    rng = np.random.default_rng(0)
    vals = rng.standard_normal(p.nnz)
    if c.mode == "star":  # symmetric values
        dense = np.zeros(p.shape)
        dense[p.rows, p.cols] = vals
        dense = np.triu(dense) + np.triu(dense, 1).T
        vals = dense[p.rows, p.cols]
    J = sp.csr_array((vals, (p.rows, p.cols)), shape=p.shape)
    seeds = np.zeros((len(c.colors), c.n_colors))
    active = c.colors >= 0
    seeds[np.flatnonzero(active), c.colors[active]] = 1
    compressed = (seeds.T @ J).ravel() if c.mode == "rev" else (J @ seeds).ravel()
    assert np.allclose(compressed[c.gather], vals)


def test_banded_colourings_reach_the_bandwidth_optimum():
    p = banded(3, 2).build([(500,)], 500)
    for colour in (column_coloring, row_coloring):
        c = colour(p)
        assert c.n_colors == 3 + 2 + 1 == c.lower_bound
        check_direct_recovery(p, c)


def test_periodic_band_is_near_optimal():
    # n = 8192 and 13 entries a row: a cyclic band needs ceil(n / floor(n / 13)) = 14.
    p = banded(8, 4, periodic=True).build([(8192,)], 8192)
    c = choose_coloring(p)
    assert 14 <= c.n_colors <= 15
    check_direct_recovery(p, c)


@pytest.mark.parametrize("offsets,optimum", [(FIVE_POINT, 5), (NINE_POINT, 9), (TRIANGLES, 7)], ids=["5-point", "9-point", "triangles"])
@pytest.mark.parametrize("w", [40, 50, 51, 64])
def test_stencil_colourings_reach_the_optimum_on_any_grid(offsets, optimum, w):
    """Greedy orders and the flat modulus j mod k lose colours on grids whose width is
    0 or +-1 mod k (the 5-point stencil on a 50- or 51-wide grid: 6 colours, and
    a 6-colour Hessian; triangles on a 316-wide grid: 9 for 7). Lattice colourings
    (c + s r) mod k reach the optimum (the most entries in a row)."""
    p = grid_stencil(30, w, offsets)
    c = choose_coloring(p)
    assert c.n_colors == c.lower_bound == optimum
    check_direct_recovery(p, c)
    star = star_coloring(p)
    assert star.n_colors == optimum
    check_direct_recovery(p, star)


def test_mode_is_forced_and_auto_picks_the_cheaper_side():
    # Rows couple everything, columns are few: one dense row makes reverse cheaper.
    rows = np.r_[np.zeros(30, int), np.arange(1, 30)]
    cols = np.r_[np.arange(30), np.arange(1, 30)]
    p = Pattern((30, 30), rows, cols)
    assert column_coloring(p).n_colors == 30 and row_coloring(p).n_colors == 2
    assert choose_coloring(p).mode == "rev" and choose_coloring(p, "fwd").mode == "fwd"


def test_auto_colours_a_symmetric_pattern_once(monkeypatch):
    """A symmetric pattern (a stencil, a ring) has the same row and column graphs, so the
    column colouring could only tie the row colouring, and ties go to rev: it was
    coloured a second time anyway (4.5 of 10 s of a 1e5-unknown tridiagonal's first call)."""
    from jacobian_service.sparsity import coloring

    p = banded(1, 1, periodic=True).build([(7,)], 7)  # a ring of 7: 4 colours, 3 a row
    want = row_coloring(p)
    calls = []
    colour = coloring.column_coloring  # row_coloring colours the transpose's columns

    def counted(*a, **k):
        calls.append(1)
        return colour(*a, **k)

    monkeypatch.setattr(coloring, "column_coloring", counted)
    got = choose_coloring(p)
    assert got.mode == "rev" and np.array_equal(got.colors, want.colors) and got.n_colors == 4
    assert len(calls) == 1


def test_star_colouring_recovers_symmetric_matrices():
    for p in (banded(1, 1).build([(300,)], 300), banded(3, 3).build([(200,)], 200), grid_stencil(12, 12)):
        c = star_coloring(p)
        check_direct_recovery(p, c)
        assert c.n_colors <= column_coloring(p).n_colors
    assert star_coloring(banded(1, 1).build([(300,)], 300)).n_colors == 3  # a path needs 3


def test_braille_draws_a_diagonal():
    art = braille(np.arange(8), np.arange(8), (8, 8))
    assert len(art.splitlines()) == 2 and all(len(line) == 4 for line in art.splitlines())
    # Cell (0, 0) holds dots (0, 0) and (1, 1); cell (0, 1) holds (2, 2) and (3, 3).
    first = [ord(ch) - 0x2800 for ch in art.splitlines()[0]]
    assert first == [0x01 | 0x10, 0x04 | 0x80, 0, 0]
    big = braille(np.arange(10_000), np.arange(10_000), (10_000, 10_000), max_width=30)
    assert max(len(line) for line in big.splitlines()) <= 30
    assert "5 x 5" in pattern_string(np.eye(5))


def test_plot_pattern_draws_every_entry_where_it_is():
    """The SDK's matplotlib picture (the plot extra): one marker per stored entry, at
    (column, row), rows growing downwards as in a printed matrix."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from jacobian_client.sparse import plot_pattern

    m = sp.random_array((30, 20), density=0.2, format="csr", dtype=np.float64, rng=3)
    for matrix in (m, m.tocoo(), SparseCOO(m.tocoo().row, m.tocoo().col, m.tocoo().data, m.shape), m.toarray()):
        ax = plot_pattern(matrix)
        (line,) = ax.get_lines()
        got = sorted(zip(line.get_ydata().astype(int).tolist(), line.get_xdata().astype(int).tolist()))
        assert got == sorted(zip(*m.nonzero()))
        assert ax.get_ylim() == (29.5, -0.5) and ax.get_title() == f"30 x 20, {m.nnz} nonzeros"
        matplotlib.pyplot.close(ax.figure)


# --------------------------------------------------------------------------- wire


def sample(fmt: str = "csr"):
    m = sp.random_array((30, 20), density=0.2, format=fmt, dtype=np.float64, rng=1)
    return m


def test_npz_body_is_what_save_npz_writes_and_load_npz_reads():
    m = sample()
    body = wire.write_sparse_npz(m, {"function": "f", "nnz": int(m.nnz)})
    ref = io.BytesIO()
    sp.save_npz(ref, m, compressed=False)
    ours = set(zipfile.ZipFile(io.BytesIO(body)).namelist())
    assert ours - {"meta.json"} == set(zipfile.ZipFile(ref).namelist())
    back = sp.load_npz(io.BytesIO(body))  # meta.json beside the members is tolerated
    assert isinstance(back, sp.csr_array) and np.array_equal(back.toarray(), m.toarray())
    got, meta = wire.read_sparse_npz(ref.getvalue())
    assert np.array_equal(got.toarray(), m.toarray()) and meta == {}
    got, meta = wire.read_sparse_npz(body, as_scipy=False)
    assert isinstance(got, SparseCOO) and np.array_equal(got.toarray(), m.toarray()) and meta["function"] == "f"


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_json_sparse_object_round_trips(fmt):
    m = sample(fmt)
    m.data[0] = np.inf
    doc = wire.loads(wire.dumps(wire.encode_tree({"jacobian": m})))
    assert doc["jacobian"]["format"] == fmt and doc["jacobian"]["dtype"] == "float64"
    back = wire.decode_tree(doc)["jacobian"]
    assert np.array_equal(back.toarray(), m.toarray())
    plain = wire.decode_sparse_json(doc["jacobian"], as_scipy=False)
    assert isinstance(plain, SparseCOO) and np.array_equal(plain.toarray(), m.toarray())


def test_hostile_sparse_bodies_are_refused():
    good = wire.encode_sparse_json(sample())
    for bad in (
        {**good, "indices": [10**6] * len(good["indices"])},  # column out of range
        {**good, "indptr": good["indptr"][::-1].copy()},  # not rising
        {**good, "shape": [30, 20, 1]},
        {**good, "extra": 1},
    ):
        with pytest.raises(wire.WireError):
            wire.decode_sparse_json(wire.loads(wire.dumps(bad)))
    with pytest.raises(wire.WireError):
        wire.read_sparse_npz(wire.write_npz({"jacobian": np.zeros(3)}, {}))  # dense body: no format


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_a_sparse_matrix_past_the_dense_element_limit_reads_back(fmt):
    """A 10^5-unknown sparse Jacobian (3 x 10^5 entries) is 10^10 elements dense: the
    readers refused its shape by the dense element limit ('over the limit of 268435456
    elements'), though scipy's load_npz reads the same body. Its entries are bounded."""
    n = 100_000
    m = sp.diags_array([np.ones(n - 1), np.arange(n, dtype=np.float64), np.ones(n - 1)], offsets=[-1, 0, 1], format=fmt)
    for got in (wire.read_sparse_npz(wire.write_sparse_npz(m))[0], wire.read_sparse_result_npz(wire.write_sparse_npz(m))[0],
                wire.decode_sparse_json(wire.loads(wire.dumps(wire.encode_sparse_json(m))))):
        assert got.shape == (n, n) and got.nnz == m.nnz and (got != m).nnz == 0
    small = wire.Limits(max_elements=1000)  # the entries still count
    with pytest.raises(wire.WireError, match="more than 1000 elements"):
        wire.decode_sparse_json(wire.encode_sparse_json(sp.diags_array(np.ones(2000), format=fmt)), small)


def test_wire_module_does_not_import_scipy():
    import subprocess
    import sys

    code = "import sys, jacobian_client, jacobian_client.sparse; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ costly colourings (the deadline)


class Stop(Exception):
    """What a request's check raises past its deadline (the engine's is a 504 Timeout)."""


def deadline_in(seconds):
    """A check_alive that raises once ``seconds`` have passed."""
    end = time.monotonic() + seconds

    def check():
        if time.monotonic() > end:
            raise Stop(f"past the {seconds} s deadline")

    return check


def refuse(*a, **k):
    raise AssertionError("built the colouring graph of a pattern whose colouring is known without it")


def test_dense_patterns_are_coloured_without_their_graph(monkeypatch):
    """A dense n x n pattern needs n colours, which every greedy order gives: known with
    no n**3 graph product and no greedy pass over n**2 / 2 edges (softmax at n = 2000
    took a minute, past its deadline, and its engine was killed as hung)."""
    from jacobian_service.sparsity import coloring

    monkeypatch.setattr(coloring, "_column_graph_edges", refuse)
    monkeypatch.setattr(coloring, "_greedy", refuse)
    n = 2000
    dense = Pattern.from_dense(np.ones((n, n), bool))
    t0 = time.monotonic()
    for mode in ("auto", "fwd", "rev"):
        c = choose_coloring(dense, mode)
        assert c.n_colors == c.lower_bound == n and sorted(c.colors) == list(range(n))
    assert time.monotonic() - t0 < 10  # ~0.5 s here; a minute and more before
    # Any row holding every column makes the graph complete: a triangle, a dense row
    # over empty columns (they stay uncoloured and cost nothing).
    tri = Pattern.from_dense(np.tril(np.ones((300, 300), bool)))
    assert column_coloring(tri).n_colors == 300
    mask = np.zeros((40, 50), bool)
    mask[7, ::2] = True
    mask[::3, ::4] = True
    c = column_coloring(Pattern.from_dense(mask))
    assert c.n_colors == 25 and (c.colors[1::2] == -1).all()
    # A dense Hessian: one colour per vertex, as the greedy star colouring gives it.
    s = star_coloring(Pattern.from_dense(np.ones((500, 500), bool)))
    assert s.n_colors == 500 and s.strategy == "star_largest_first" and np.array_equal(s.colors, np.arange(500))
    monkeypatch.undo()
    # The same counts (and, for the star, colours) as the full search gives on small ones.
    for n in (1, 2, 9, 40):
        p = Pattern.from_dense(np.ones((n, n), bool))
        assert choose_coloring(p).n_colors == n
        assert np.array_equal(star_coloring(p).colors, np.arange(n))
    # Without a diagonal the distance-2 colouring may beat one colour per vertex: no shortcut.
    anti = Pattern((2, 2), [0, 1], [1, 0])
    assert star_coloring(anti).n_colors == 1


def test_colouring_work_past_the_limit_is_refused_before_it_starts(monkeypatch):
    """Not complete, but dense: its graph product alone takes n**3 steps. Past the work
    limit (1024 per entry of the graph limit) it is refused (the service's 413) at
    once, not worked on until the deadline."""
    from jacobian_service.sparsity import PatternTooLarge, coloring, entry_limit

    monkeypatch.setattr(coloring, "_column_graph_edges", refuse)
    n = 2000
    no_diagonal = Pattern.from_dense(~np.eye(n, dtype=bool))
    t0 = time.monotonic()
    with entry_limit((256 << 20) // 16, (256 << 20) // 64):  # the engine's, at its CPU budget
        with pytest.raises(PatternTooLarge, match=r"would take 7,992,002,000 steps .* the limit is 4,294,967,296"):
            choose_coloring(no_diagonal)
    assert time.monotonic() - t0 < 5


def test_long_colourings_stop_soon_after_the_deadline():
    """Every long loop checks: the graph product (blocks of result columns), the greedy
    passes and their orders, the star colouring's loop. A colouring that would
    take seconds stops within a fraction of a second of its deadline."""
    # a product of 2e9 steps (columns shuffled: j mod 1000 would colour it at once)
    blocks = Pattern.from_dense(np.kron(np.eye(2, dtype=bool), np.ones((1000, 1000), bool))[:, np.random.default_rng(0).permutation(2000)])
    n = 90_000  # 4 entries a row, anywhere: no modulus or lattice reaches the bound, greedy runs
    scattered = Pattern((n, n), np.repeat(np.arange(n), 4), np.random.default_rng(0).integers(0, n, 4 * n))
    # ~50 neighbours a vertex, anywhere: a greedy star pass of ~3.6 s (an arrowhead's hub
    # was one, until the pass kept the colours around each vertex: milliseconds now)
    from jacobian_service.sparsity import coloring

    m, rng = 16_000, np.random.default_rng(0)
    r, c = rng.integers(0, m, 50 * m), rng.integers(0, m, 50 * m)
    random = Pattern((m, m), np.r_[r, c, np.arange(m)], np.r_[c, r, np.arange(m)])
    indptr, nbr = coloring._adjacency(random)
    cases = [
        ("graph product", lambda check: column_coloring(blocks, check_alive=check)),
        ("greedy passes", lambda check: column_coloring(scattered, check_alive=check)),
        ("star colouring", lambda check: coloring._greedy_star(random, indptr, nbr, np.arange(m), check)),
    ]
    # Bounded in this thread's CPU time (never more than the wall time the bound was
    # before), not wall time: beside busy loops a star colouring that stopped at its
    # deadline took 0.95 s of wall time for 0.06 s of CPU (a loaded machine's waits).
    # Run whole, without a deadline, they take 5.5, 1.6 and 4.6 CPU-s here.
    for what, colour in cases:
        t0 = time.thread_time()
        with pytest.raises(Stop):
            colour(deadline_in(0.3))
        assert time.thread_time() - t0 < 1.3, what


def test_the_greedy_colourings_are_networkx_colourings():
    """The greedy passes run on plain lists (networkx's graph took ~80 % of a colouring's
    time: 2 s of a 100 x 100 mesh's 2.5 s). Each strategy gives exactly the colours
    networkx's greedy_color gives in its order (smallest-last's ties included), on the
    edges the interruptible graph product gives in the order of the whole product."""
    import networkx as nx

    from jacobian_service.sparsity import coloring

    rng = np.random.default_rng(5)
    patterns = [Pattern.from_dense(rng.random((150, 120)) < density) for density in (0.02, 0.1, 0.4)]
    patterns += [grid_stencil(12, 17, TRIANGLES), grid_stencil(9, 10, NINE_POINT)]
    for p in patterns:
        n = p.shape[1]
        a = sp.csr_array((np.ones(p.nnz, np.float32), (p.rows, p.cols)), shape=p.shape)
        whole = sp.triu(a.T @ a, k=1).tocoo()
        u, v = coloring._column_graph_edges(p, lambda: None)
        assert np.array_equal(u, whole.row) and np.array_equal(v, whole.col)
        active = np.bincount(p.cols, minlength=n) > 0
        graph = nx.Graph()
        graph.add_nodes_from(np.flatnonzero(active).tolist())
        graph.add_edges_from(zip(u.tolist(), v.tolist()))
        # ("natural" is no networkx name: the nodes in their own order)
        for strategy, theirs in (("smallest_last", "smallest_last"), ("natural", lambda g, _c: sorted(g)),
                                 ("largest_first", "largest_first")):
            ours, _ = coloring._greedy(n, u, v, active, (strategy,))
            found = nx.greedy_color(graph, strategy=theirs)
            want = np.full(n, -1)
            want[list(found)] = list(found.values())
            assert np.array_equal(ours, want), strategy


def test_the_fingerprint_follows_the_helpers_a_function_calls(tmp_path, monkeypatch):
    """An edited helper (in the function's own module, or in a module it imports)
    changes what the function computes: the on-disk pattern of the old one must not be
    reused. Only the function's own lines were hashed."""
    import importlib
    import sys

    from jacobian_service.sparsity.patterns import function_fingerprint

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fp_helpers.py").write_text("import torch\n\ndef coupling(x):\n    return torch.roll(x, 1)\n")
    (tmp_path / "fp_user.py").write_text(
        "import torch\nimport fp_helpers\n\ndef _local(x):\n    return x * 2\n\n"
        "def f(x):\n    return _local(x) + fp_helpers.coupling(x)\n"
    )
    for name in ("fp_user", "fp_helpers"):
        sys.modules.pop(name, None)
    user = importlib.import_module("fp_user")
    prints = [function_fingerprint(user.f)]
    for path, old, new in (("fp_helpers.py", "roll(x, 1)", "roll(x, -1)"), ("fp_user.py", "x * 2", "x * 3")):
        p = tmp_path / path
        p.write_text(p.read_text().replace(old, new))
        importlib.reload(sys.modules["fp_helpers"])
        user = importlib.reload(user)  # a restarted server: new code objects
        prints.append(function_fingerprint(user.f))
    assert len(set(prints)) == 3, prints
    # library code (torch, numpy, the standard library) is versioned, not hashed
    from jacobian_service.sparsity.patterns import _user_files

    assert [f for f in _user_files(user.f)] == sorted(str((tmp_path / n).resolve()) for n in ("fp_helpers.py", "fp_user.py"))


def test_pattern_string_refuses_a_zero_width_and_draws_vectors_and_scalars():
    """max_width=0 divided by zero; a 1-D array or a scalar raised numpy's bare
    "not enough values to unpack"."""
    import scipy.sparse as sp

    from jacobian_client.sparse import pattern_string

    for width in (0, -3):
        with pytest.raises(ValueError, match="at least 1 character"):
            pattern_string(sp.eye_array(4), max_width=width)
    assert pattern_string(np.array([1.0, 0, 2])) == "1 x 3, 2 stored entries\n" + chr(0x2800 + 0x01) + chr(0x2800 + 0x01)
    assert pattern_string(np.float64(3)) == "1 x 1, 1 stored entries\n" + chr(0x2800 + 0x01)
    with pytest.raises(ValueError, match="2-D matrix; got an array of shape"):
        pattern_string(np.ones((2, 2, 2)))
    assert pattern_string(sp.eye_array(4), max_width=1).startswith("4 x 4, 4 stored entries\n")


def _greedy_star_by_walking(indptr, nbr, seq, active):
    """GMP 2005 Algorithm 4.1 as first written here: whether x has another neighbour of
    w's colour found by walking x's neighbours (deg^3 steps a vertex)."""
    adj = [nbr[indptr[i] : indptr[i + 1]].tolist() for i in range(len(indptr) - 1)]
    color, forbidden = [-1] * len(adj), [-1]
    for v in seq:
        if not active[v]:
            continue
        for w in adj[v]:
            cw = color[w]
            if cw >= 0:
                forbidden[cw] = v
            for x in adj[w]:
                cx = color[x]
                if cx < 0 or x == v:
                    continue
                if cw < 0 or any(y != w and color[y] == cw for y in adj[x]):
                    forbidden[cx] = v
        c = 0
        while forbidden[c] == v:
            c += 1
        color[v] = c
        forbidden += [-1] * (c + 2 - len(forbidden))
    return np.asarray(color)


def test_the_greedy_star_colouring_counts_rather_than_walks():
    """Whether a neighbour x of w has another neighbour of w's colour is read from counts
    kept as vertices are coloured (the walk over x's neighbours made a 9-point stencil's
    Hessian colouring ~8x slower): the same colours, in both orders."""
    from jacobian_service.sparsity import coloring

    rng = np.random.default_rng(3)
    patterns = [grid_stencil(9, 11, NINE_POINT), grid_stencil(12, 7, TRIANGLES), grid_stencil(10, 10)]
    for n, k in ((40, 2), (200, 4), (300, 8)):
        r, c = rng.integers(0, n, n * k), rng.integers(0, n, n * k)
        patterns.append(Pattern((n, n), np.r_[r, c, np.arange(n)], np.r_[c, r, np.arange(n)]))
    for p in patterns:
        indptr, nbr = coloring._adjacency(p)
        active = np.bincount(p.rows, minlength=p.shape[0]) > 0
        for seq in (np.argsort(-np.diff(indptr), kind="stable"), np.arange(p.shape[0])):
            want = _greedy_star_by_walking(indptr, nbr, seq.tolist(), active)
            assert np.array_equal(coloring._greedy_star(p, indptr, nbr, seq), want)


def test_a_stencil_past_the_graph_limit_is_coloured_without_a_graph():
    """A 600 x 600 stencil's column graph would hold 8,978,408 entries, past the engine's
    graph limit (budget / 64): it was a 413 before anything was tried, though a lattice
    colours it optimally with no graph at all."""
    from jacobian_service.sparsity import entry_limit

    with entry_limit((256 << 20) // 16, (256 << 20) // 64):  # the engine's, at its default budget
        c = row_coloring(grid_stencil(600, 600))
    assert c.n_colors == 5 and c.strategy == "lattice"
