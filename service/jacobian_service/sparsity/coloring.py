"""Colourings that let a few products recover every nonzero of a sparse derivative.

- Column colouring (forward mode, one JVP per colour): columns that share no row may
  share a colour; ``J[i, j] = (J S)[i, colour(j)]``. A distance-1 colouring of the
  column-intersection graph, coloured greedily by networkx.
- Row colouring (reverse mode, one VJP per colour): the same on the transpose.
- Star colouring (symmetric Hessians, one HVP per colour): a distance-1 colouring of
  the adjacency graph in which every path on four vertices uses at least three
  colours; each ``H[i, j]`` is then read directly from ``H S`` at ``(i, colour(j))`` or
  ``(j, colour(i))`` (Gebremedhin, Manne, Pothen, "What color is your Jacobian? Graph
  coloring for computing derivatives", SIAM Review 47(4), 2005, Algorithm 4.1).

Rows or columns with no entry get colour -1 and cost no product. Colouring a large
pattern takes a while (networkx is pure Python): every function takes the caller's
``check_alive`` (a request's deadline check) and calls it between strategies and
every few thousand vertices of the star colouring's loop. Every colouring
carries its decompression map (``gather``), checked when it is built: a colouring that
cannot recover an entry directly raises instead of returning a wrong matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .patterns import Pattern, check_entries

__all__ = ["Coloring", "choose_coloring", "column_coloring", "row_coloring", "star_coloring"]

# networkx strategies tried, keeping the fewest colours. "smallest_last" is the usual
# winner on meshes; natural order is optimal on plain bands, where the others can lose
# a colour or two; "largest_first" is the classic Welsh-Powell order.
_STRATEGIES = ("smallest_last", "natural", "largest_first")
# Above this many graph edges only the cheapest strategies are tried: networkx is pure
# Python, about a microsecond or two per edge per strategy.
_ALL_STRATEGIES_EDGE_LIMIT = 2_000_000
# The star colouring's Python loop calls check_alive once per this many vertices.
_CHECK_EVERY_VERTICES = 4096

Check = Callable[[], None] | None


def _check(check_alive: Check) -> None:
    if check_alive is not None:
        check_alive()


@dataclass(frozen=True, eq=False)
class Coloring:
    """How a derivative is compressed: ``mode`` is ``fwd`` (columns coloured; products
    are JVPs), ``rev`` (rows; VJPs) or ``star`` (symmetric; HVPs).

    ``gather[k]`` is the flat index, into the compressed matrix, of pattern entry ``k``
    (``(m, p)`` for fwd and star, ``(p, n)`` for rev, row-major).
    """

    mode: str
    colors: np.ndarray
    n_colors: int
    gather: np.ndarray
    lower_bound: int
    strategy: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "colors": self.n_colors,
            "products": self.n_colors,
            "lower_bound": self.lower_bound,
            "strategy": self.strategy,
        }


def _column_graph_edges(p: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of columns that share a row (each pair once, i < j)."""
    import scipy.sparse as sp

    per_row = np.bincount(p.rows, minlength=p.shape[0]).astype(np.int64)
    n = p.shape[1]  # a.T @ a has at most sum(row counts ** 2) entries, and at most n * n
    check_entries(min(int((per_row * per_row).sum()), n * n), "the colouring's column graph", graph=True)
    a = sp.csr_array((np.ones(p.nnz, np.float32), (p.rows, p.cols)), shape=p.shape)
    g = sp.triu(a.T @ a, k=1).tocoo()
    return g.row.astype(np.int64), g.col.astype(np.int64)


def _greedy(
    n: int, u: np.ndarray, v: np.ndarray, active: np.ndarray, strategies: tuple[str, ...], check_alive: Check = None,
) -> tuple[np.ndarray, str]:
    import networkx as nx

    _check(check_alive)
    graph = nx.Graph()
    graph.add_nodes_from(np.flatnonzero(active).tolist())
    graph.add_edges_from(zip(u.tolist(), v.tolist()))
    if u.size > _ALL_STRATEGIES_EDGE_LIMIT:
        strategies = strategies[:2]
    best: tuple[np.ndarray, str] | None = None
    for name in strategies:
        _check(check_alive)
        strategy: Any = (lambda g, _c: sorted(g)) if name == "natural" else name
        found = nx.greedy_color(graph, strategy=strategy)
        colors = np.full(n, -1, np.int64)
        if found:
            nodes = np.fromiter(found.keys(), np.int64, len(found))
            colors[nodes] = np.fromiter(found.values(), np.int64, len(found))
        if best is None or colors.max(initial=-1) < best[0].max(initial=-1):
            best = (colors, name)
    assert best is not None
    return best


def _modulo(p: Pattern, lower: int, active: np.ndarray, check_alive: Check = None) -> np.ndarray | None:
    """``colour(j) = j mod k`` for the smallest valid k up to 2 x the lower bound.

    Greedy orders lose colours on regular structures that a modulus gets right: a
    periodic band (greedy pays up to a whole band at the wrap-around) and the 5-point
    stencil on a w-wide grid (offsets 0, +-1, +-w are distinct mod 5 unless w = 0 mod 5).
    """
    n = p.shape[1]
    for k in range(max(lower, 1), min(2 * lower, n) + 1):
        _check(check_alive)  # each try sorts every entry
        slots = p.rows * k + p.cols % k
        if np.unique(slots).size == slots.size:
            return np.where(active, np.arange(n) % k, -1)
    return None


def column_coloring(p: Pattern, strategies: tuple[str, ...] = _STRATEGIES, *, check_alive: Check = None) -> Coloring:
    """Forward mode: ``B = J S`` with one seed column per colour."""
    m, n = p.shape
    u, v = _column_graph_edges(p)
    active = np.bincount(p.cols, minlength=n) > 0
    colors, strategy = _greedy(n, u, v, active, strategies, check_alive)
    lower = int(np.bincount(p.rows, minlength=m).max(initial=0))
    by_modulus = _modulo(p, lower, active, check_alive)
    if by_modulus is not None and by_modulus.max(initial=-1) < colors.max(initial=-1):
        colors, strategy = by_modulus, "modulo"
    k = int(colors.max(initial=-1)) + 1
    gather = p.rows * k + colors[p.cols]
    _check_unique(gather, "column")
    return Coloring("fwd", colors, k, gather, lower, strategy)


def row_coloring(p: Pattern, strategies: tuple[str, ...] = _STRATEGIES, *, check_alive: Check = None) -> Coloring:
    """Reverse mode: ``B = S^T J`` with one seed row per colour."""
    m, n = p.shape
    t = column_coloring(p.transpose(), strategies, check_alive=check_alive)
    gather = t.colors[p.rows] * n + p.cols
    _check_unique(gather, "row")
    return Coloring("rev", t.colors, t.n_colors, gather, t.lower_bound, t.strategy)


def _check_unique(gather: np.ndarray, what: str) -> None:
    # Two entries landing on one compressed slot would be summed: the colouring is wrong.
    if np.unique(gather).size != gather.size:
        raise AssertionError(f"{what} colouring puts two entries in one compressed slot")


def choose_coloring(p: Pattern, mode: str = "auto", *, check_alive: Check = None) -> Coloring:
    """The side with fewer colours (``mode`` ``fwd`` / ``rev`` forces one). On a tie
    reverse mode wins: VJPs are what ``jacrev`` computes (forward-mode AD does not
    honour ``torch.no_grad`` inside the function)."""
    if mode == "fwd":
        return column_coloring(p, check_alive=check_alive)
    if mode == "rev":
        return row_coloring(p, check_alive=check_alive)
    if mode != "auto":
        raise ValueError(f"mode must be auto, fwd or rev, got {mode!r}")
    fwd, rev = column_coloring(p, check_alive=check_alive), row_coloring(p, check_alive=check_alive)
    return fwd if fwd.n_colors < rev.n_colors else rev


# --------------------------------------------------------------------------- star


def _adjacency(p: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, neighbours) of the symmetric pattern's graph, without self loops."""
    n = p.shape[0]
    off = p.rows != p.cols
    r = np.concatenate([p.rows[off], p.cols[off]])
    c = np.concatenate([p.cols[off], p.rows[off]])
    key = np.unique(r * n + c)
    r, c = key // max(n, 1), key % max(n, 1)
    return np.searchsorted(r, np.arange(n + 1)), c


def star_coloring(p: Pattern, *, check_alive: Check = None) -> Coloring:
    """Star colouring of a symmetric pattern with the fewest colours found: the greedy
    star colouring (GMP 2005, Algorithm 4.1) in largest-first and natural order, and
    the distance-2 (column) colouring, which is itself a star colouring and sometimes
    beats greedy star colouring on meshes."""
    if p.shape[0] != p.shape[1] or not p.is_symmetric():
        raise ValueError("star colouring needs a square symmetric pattern")
    indptr, nbr = _adjacency(p)
    degree = np.diff(indptr)
    d2 = column_coloring(p, check_alive=check_alive)
    candidates = [
        (_greedy_star(p, indptr, nbr, np.argsort(-degree, kind="stable"), check_alive), "star_largest_first"),
        (_greedy_star(p, indptr, nbr, np.arange(p.shape[0]), check_alive), "star_natural"),
        (d2.colors, "distance2_" + d2.strategy),
    ]
    colors, strategy = min(candidates, key=lambda c: int(c[0].max(initial=-1)))
    k = int(colors.max(initial=-1)) + 1
    return Coloring("star", colors, k, _star_gather(p, colors, k), _star_lower_bound(p), strategy)


def _greedy_star(p: Pattern, indptr: np.ndarray, nbr: np.ndarray, seq: np.ndarray, check_alive: Check = None) -> np.ndarray:
    """GMP 2005, Algorithm 4.1. For each vertex v in ``seq``, forbid: the colours of its
    neighbours w; for an uncoloured neighbour w, the colours of w's neighbours x (v and
    x would be same-coloured ends of a path through w whose middle is still open); for
    a coloured w, the colour of each neighbour x of w that has another neighbour y of
    w's colour (v-w-x-y would be a two-coloured path on four vertices)."""
    n = p.shape[0]
    active = np.zeros(n, bool)
    active[p.rows] = True
    color = [-1] * n
    adj = [nbr[indptr[i] : indptr[i + 1]].tolist() for i in range(n)]
    forbidden: list[int] = [-1]
    for done, v in enumerate(seq.tolist()):
        if check_alive is not None and done % _CHECK_EVERY_VERTICES == 0:
            check_alive()
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
                if cw < 0:
                    forbidden[cx] = v
                else:
                    for y in adj[x]:
                        if y != w and color[y] == cw:
                            forbidden[cx] = v
                            break
        c = 0
        while forbidden[c] == v:
            c += 1
            if c == len(forbidden):
                forbidden.append(-1)
        color[v] = c
        if c + 1 == len(forbidden):
            forbidden.append(-1)
    return np.asarray(color, np.int64)


def _star_lower_bound(p: Pattern) -> int:
    # Any edge needs two colours; beyond that no cheap bound holds in general (a star
    # around one vertex of any degree is 2-colourable), so none is claimed.
    return 2 if bool((p.rows != p.cols).any()) else int(p.nnz > 0)


def _star_gather(p: Pattern, colors: np.ndarray, k: int) -> np.ndarray:
    """Where each entry is read in ``B = H S`` (``(n, k)``): at ``(i, colour j)`` when
    ``j`` is the only column of its colour in row ``i``, else at ``(j, colour i)``."""
    slot = p.rows * k + colors[p.cols]
    uniq, counts = np.unique(slot, return_counts=True)

    def alone(s: np.ndarray) -> np.ndarray:  # the slot holds exactly one entry
        pos = np.minimum(np.searchsorted(uniq, s), max(uniq.size - 1, 0))
        return (uniq[pos] == s) & (counts[pos] == 1) if uniq.size else np.zeros(s.shape, bool)

    direct = alone(slot)
    mirrored = p.cols * k + colors[p.rows]
    ok = direct | alone(mirrored)
    if not ok.all():
        raise AssertionError("star colouring cannot recover an entry directly")
    return np.where(direct, slot, mirrored)
