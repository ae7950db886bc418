"""Acyclic colouring of a symmetric pattern, and its recovery by substitution.

Star colouring (:func:`.coloring.star_coloring`) reads every Hessian entry directly out
of one product. An *acyclic* colouring asks less of the colours (every cycle uses at
least three; two-coloured paths may be long), so it often needs fewer of them: a path
(a tridiagonal Hessian) takes 2 where a star colouring takes 3, a 13-point periodic
stencil's energy about 12 where star colouring takes 15-19. The price is the recovery:
each pair of colours spans a forest of two-coloured trees, and an entry is solved for by
substitution up its tree (Gebremedhin, Tarafdar, Manne, Pothen, "New acyclic and star
coloring algorithms with application to computing Hessians", SIAM J. Sci. Comput.
29(3), 2007: Algorithm 3.1 for the colouring, and the recovery by substitution; the
colouring ported from SparseMatrixColorings.jl's ``acyclic_coloring``; networkx has no
acyclic colouring, and no maintained Python package for it was found).

Recovery, without a loop over the trees: root each two-coloured tree; a vertex ``u``'s
product value at its parent's colour ``B[u, c(parent)]`` is ``H[u, parent]`` plus
``H[u, child]`` over its children (its only neighbours of that colour), so
``H[u, parent] = B[u, c(parent)] - sum of H[child's edge]``, and unrolled, the sum over
``u``'s subtree of ``(-1)^(depth - depth(u)) B[w, c(parent(w))]``. With the trees laid
out in depth-first preorder (every subtree one run), that is a difference of two prefix
sums: one gather, one cumulative sum, two gathers, on the device, for any number of
trees (:class:`Substitution`). The sums run in float64.

Substitution sums the products' round-off along a subtree, where star colouring reads
one product: an entry summed from ``s`` products carries up to ``s`` times the error.
So an acyclic colouring is taken only where it saves products and no entry sums more
of them than :func:`most_summed` allows for the products' dtype: 64 in float32 (an
entry then carries at most ~8e-6 of relative round-off, of the largest products it
sums), 4,096 in float64 (~1e-12), none in float16 and bfloat16 (star colouring always).
A 1-D chain of thousands of unknowns, one two-coloured path, keeps its star colouring.
A product that is not finite (a NaN would spread over its tree) is recomputed by the
star colouring (see :mod:`.compute`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .patterns import Pattern, sorted_unique, work_limit

__all__ = ["Substitution", "acyclic_bound", "acyclic_colors", "lattice_colors", "most_summed", "orders", "substitution"]


def most_summed(eps: float) -> int:
    """The most products an entry may be solved from, for products whose dtype has
    machine epsilon ``eps``: 4,096 for float64, 64 for float32, 0 (no acyclic
    colouring) for float16 and bfloat16."""
    if eps <= 2.0**-52:
        return 4096
    if eps <= 2.0**-23:
        return 64
    return 0


# One greedy pass costs ~0.3 us a step (a union-find lookup per pair of neighbours): the
# passes are tried only under this many steps, and on at most this many vertices (a few
# seconds at most, once per pattern: the colouring is cached). Past them star colouring
# stands: a long chain's acyclic colouring is one tree that substitution would not use
# anyway, and its passes tripled a 100,000-variable Hessian's first colouring.
_MOST_STEPS = 4_000_000
_MOST_VERTICES = 20_000
_EVERY_ORDER_STEPS = 1_000_000  # below this, three orders; above, natural order alone

Check = Callable[[], None] | None


@dataclass(frozen=True, eq=False)
class Substitution:
    """How to read a Hessian's entries from the products ``B = H S`` (``(n, k)``, row
    major, flat) of an acyclic colouring.

    - ``need``: the flat places of ``B`` the trees read, in preorder; ``sign`` (±1,
      float64) their signs, ``(-1)^depth``;
    - per pattern entry: ``direct`` (a diagonal entry, read at ``gather``), else
      ``sign_of * (Q[hi] - Q[lo])`` with ``Q`` the prefix sums (a leading 0) of
      ``sign * B[need]``;
    - ``most_summed``: the most products any entry sums."""

    need: np.ndarray
    sign: np.ndarray
    direct: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sign_of: np.ndarray
    most_summed: int


def steps(indptr: np.ndarray, nbr: np.ndarray) -> int:
    """A bound on one greedy pass's steps: for each vertex, each neighbour's neighbours
    (twice: the cycle check, then the trees' merge)."""
    deg = np.diff(indptr).astype(np.float64)
    return int(min(2.0 * float((deg * deg).sum()), 2.0**62))


def acyclic_colors(n: int, indptr: np.ndarray, nbr: np.ndarray, active: np.ndarray, seq: np.ndarray,
                   check_alive: Check = None) -> np.ndarray:
    """GTMP 2007, Algorithm 3.1 (as SparseMatrixColorings.jl runs it): vertices in
    ``seq`` take the smallest colour that no neighbour has and that closes no
    two-coloured cycle. The two-coloured trees are kept as a disjoint-set forest over
    the edges; a colour ``c(x)`` is refused for ``v`` when the tree holding edge
    ``w-x`` is reached from ``v`` through two different neighbours ``w`` (giving ``v``
    the colour ``c(x)`` would join that tree twice: a cycle). ``nbr``: CSR neighbours
    without self loops. Inactive vertices (no entry) get -1."""
    from .coloring import Every, no_gc

    with no_gc():
        return _acyclic_pass(n, indptr, nbr, active, seq, Every(check_alive))


def _edge_ids(n: int, indptr: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """Each CSR position's undirected edge number (``u-v`` and ``v-u`` share one)."""
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    key = np.minimum(owner, nbr) * max(n, 1) + np.maximum(owner, nbr)
    return np.unique(key, return_inverse=True)[1].reshape(-1)


def _acyclic_pass(n: int, indptr: np.ndarray, nbr: np.ndarray, active: np.ndarray, seq: np.ndarray, alive) -> np.ndarray:
    alive()
    bounds = indptr.tolist()
    flat, eids = nbr.tolist(), _edge_ids(n, indptr, nbr).tolist()
    ne = max(eids, default=-1) + 1
    adj = [flat[bounds[i] : bounds[i + 1]] for i in range(n)]
    adje = [eids[bounds[i] : bounds[i + 1]] for i in range(n)]
    color = [-1] * n
    forbidden = [-1, -1]
    first_p, first_q, first_e = [-1, -1], [-1, -1], [-1, -1]  # per colour: (v, w, edge v-w) first met
    visit_p, visit_q = [-1] * ne, [-1] * ne  # per tree (its root edge): (v, w) it was first reached by
    parent = list(range(ne))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for v in seq.tolist():
        alive()
        if not active[v]:
            continue
        around = adj[v]
        for w in around:
            cw = color[w]
            if cw >= 0:
                forbidden[cw] = v
        for w in around:
            if color[w] < 0:
                continue
            for x, e in zip(adj[w], adje[w]):
                cx = color[x]
                if cx < 0 or forbidden[cx] == v:
                    continue
                r = find(e)
                if visit_p[r] != v:  # this tree reached from v for the first time
                    visit_p[r], visit_q[r] = v, w
                elif visit_q[r] != w:  # reached again through another neighbour: a cycle
                    forbidden[cx] = v
        c = 0
        while forbidden[c] == v:
            c += 1
        color[v] = c
        if c + 1 >= len(forbidden):
            forbidden.extend([-1] * (c + 2 - len(forbidden)))
            first_p.extend([-1] * (c + 2 - len(first_p)))
            first_q.extend([-1] * (c + 2 - len(first_q)))
            first_e.extend([-1] * (c + 2 - len(first_e)))
        for w, e in zip(around, adje[v]):  # grow the two-coloured stars around v
            cw = color[w]
            if cw < 0:
                continue
            if first_p[cw] != v:
                first_p[cw], first_q[cw], first_e[cw] = v, w, e
            else:
                a, b = find(e), find(first_e[cw])
                if a != b:
                    parent[a] = b
        for w, e in zip(around, adje[v]):  # and merge the trees v now joins
            if color[w] < 0:
                continue
            for x, f in zip(adj[w], adje[w]):
                if x == v or color[x] != c:
                    continue
                a, b = find(e), find(f)
                if a != b:
                    parent[a] = b
    return np.asarray(color, np.int64)


def _forest(u: np.ndarray, v: np.ndarray, colors: np.ndarray, k: int):
    """The two-coloured subgraphs of the proper colouring ``colors`` (edges ``u-v``) as
    one graph: (its nodes, each edge's two ends, each node's tree), or None where it has
    a cycle. A vertex u in the forest of colours {c(u), c'} is the node u * k + c':
    exactly the flat place of B = H S it reads (its row u, the other colour's column)."""
    return _forest_of(u, v, colors[u], colors[v], k)


def _forest_of(u: np.ndarray, v: np.ndarray, cu: np.ndarray, cv: np.ndarray, k: int):
    """:func:`_forest` given the ends' colours ``cu``, ``cv``."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import connected_components

    a, b = u * k + cv, v * k + cu
    nodes = sorted_unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    N, E = nodes.size, a.size
    count, label = connected_components(csr_array((np.ones(E, np.int8), (ia, ib)), shape=(N, N)), directed=False)
    if E != N - count:  # a forest has one edge fewer than nodes, per tree
        return None
    return nodes, ia, ib, label


def substitution(p: Pattern, colors: np.ndarray) -> Substitution:
    """The recovery of ``p``'s entries (a symmetric pattern) from the products of the
    colouring ``colors``; raises :class:`AssertionError` where the colouring is not
    acyclic (two neighbours share a colour, or a two-coloured subgraph has a cycle), so
    a wrong colouring never gives wrong values."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import depth_first_order

    k = int(colors.max(initial=-1)) + 1
    off = p.rows < p.cols
    u, v = p.rows[off], p.cols[off]
    if bool((colors[p.rows] < 0).any()) or bool((colors[u] == colors[v]).any()):
        raise AssertionError("acyclic colouring: two neighbours share a colour")
    forest = _forest(u, v, colors, k)
    if forest is None:
        raise AssertionError("acyclic colouring: a two-coloured subgraph has a cycle")
    nodes, ia, ib, label = forest
    N = nodes.size
    # One depth-first search from a node joined to every tree's first node: one preorder
    # in which every subtree is one run.
    roots = np.unique(label, return_index=True)[1]
    top = N
    rows = np.concatenate([ia, np.full(roots.size, top)])
    cols = np.concatenate([ib, roots])
    order, pred = depth_first_order(csr_array((np.ones(rows.size, np.int8), (rows, cols)), shape=(N + 1, N + 1)),
                                    top, directed=False, return_predecessors=True)
    order = order[1:]  # (the joining node first)
    pos = np.empty(N, np.int64)
    pos[order] = np.arange(N)
    parent = pred[:N].astype(np.int64)
    depth = [0] * (N + 1)
    size = [1] * (N + 1)
    par = parent.tolist()
    seq = order.tolist()
    for x in seq:  # parents come first in preorder
        depth[x] = depth[par[x]] + 1
    for x in reversed(seq):
        size[par[x]] += size[x]
    depth_a, size_a = np.asarray(depth[:N], np.int64), np.asarray(size[:N], np.int64)
    sign = np.where(depth_a[order] % 2 == 0, 1.0, -1.0)
    # Each off-diagonal entry (r, c): the edge between nodes r * k + c(c) and
    # c * k + c(r); its value is solved at the child end, over the child's subtree.
    direct = p.rows == p.cols
    er = np.searchsorted(nodes, p.rows * k + colors[p.cols])
    ec = np.searchsorted(nodes, p.cols * k + colors[p.rows])
    er[direct], ec[direct] = 0, 0
    child = np.where(parent[er] == ec, er, ec)
    if not bool(((parent[er] == ec) | (parent[ec] == er))[~direct].all()):
        raise AssertionError("acyclic colouring: an entry's edge is not in its tree")
    lo, hi = pos[child], pos[child] + size_a[child]
    sign_of = np.where(depth_a[child] % 2 == 0, 1.0, -1.0)
    lo[direct], hi[direct], sign_of[direct] = 0, 0, 0.0
    most = int((hi - lo)[~direct].max(initial=0))
    return Substitution(nodes[order], sign, direct, lo, hi, sign_of, most)


# Lattice colourings are tried up to this many colours (a 3-D 7-point stencil takes 5, the
# 27-point one more than greedy's, which is then kept).
_LATTICE_MOST_COLOURS = 12
# Vertices of the window a lattice candidate is checked on first (at least four lines).
_WINDOW = 2048
# Candidates that pass the window and are checked whole (each a few passes over the
# entries, the substitution's pure-Python walk of its trees where it is a forest): a
# stencil's first is the one; a band's long two-coloured paths (past most_summed) are
# refused a few times before the colours that keep them short.
_MOST_WHOLE_CHECKS = 6


def _lattices(widths: list[int], pairs: list[tuple[int, int]], k: int) -> Iterator[tuple[int, int, int, int]]:
    """The lattice colourings of ``k`` colours, as ``(w1, s1, w2, s2)`` for
    :func:`_lattice_of`: a grid of one width ``w`` (``w2 = 0``) or two (``w1`` a row,
    ``w2`` a plane), every shift."""
    for w in widths:
        for s in range(k):
            yield w, s, 0, 0
    for w1, w2 in pairs:
        for s1 in range(k):
            for s2 in range(k):
                yield w1, s1, w2, s2


def _lattice_of(j: np.ndarray, lattice: tuple[int, int, int, int], k: int) -> np.ndarray:
    """The colours of vertices ``j``: ``(j mod w + s * (j div w)) mod k``, or on two
    widths ``(j mod w1 + s1 ((j div w1) mod (w2 / w1)) + s2 (j div w2)) mod k``."""
    w1, s1, w2, s2 = lattice
    if not w2:
        return (j % w1 + s1 * (j // w1)) % k
    return (j % w1 + s1 * ((j // w1) % (w2 // w1)) + s2 * (j // w2)) % k


def acyclic_bound(p: Pattern, active: np.ndarray) -> int:
    """Fewer colours than this no acyclic colouring of the symmetric pattern ``p`` has (2
    at least; ``active``: the vertices that hold an entry). Each pair of colours spans a
    forest, with fewer edges than its vertices: summed over the pairs, ``edges <= (k - 1)
    vertices - k (k - 1) / 2``, so ``k >= edges / vertices + 1`` and a little more (a
    periodic 3-D 7-point stencil, 3 edges a vertex: 5, not 4; no lattice tried at 4)."""
    edges = int(np.count_nonzero(p.rows < p.cols))
    vertices = max(int(active.sum()), 1)
    k = max(2, -(-edges // vertices) + 1)
    while k < vertices and (k - 1) * vertices - k * (k - 1) // 2 < edges:
        k += 1
    return k


def lattice_colors(p: Pattern, active: np.ndarray, below: int | None, most_summed: int | None,
                   check_alive: Check = None) -> tuple[np.ndarray, Substitution] | None:
    """An acyclic colouring by lattice lines (:func:`.coloring._lattice`'s families) with
    fewer than ``below`` colours, the fewest found, and its substitution; None where none
    is, or where every one found solves an entry from more than ``most_summed`` products.

    Greedy acyclic colouring in any order leaves stencils above their optimum (SMC.jl's
    orders alike: natural, largest-first, smallest-last, incidence-degree, dynamic
    largest-first): the 5-point stencil's Hessian takes 4 colours where ``(column + row)
    mod 3`` is acyclic (every two-coloured subgraph a set of staircase paths), the
    9-point and the 3-D 7-point stencils 6 where a lattice takes 5 and 4, the fewest
    possible. Colours start at the bound every acyclic colouring obeys (each pair of
    colours spans a forest, so ``k - 1`` colours' worth of edges per vertex at most:
    ``k >= edges / vertices + 1``). Each candidate must be a proper colouring and a
    forest on a window of the grid first (a cycle there is a cycle of the whole), then
    on the whole (the substitution's own check)."""
    from .coloring import Every, lattice_widths

    n = p.shape[0]
    top = min(_LATTICE_MOST_COLOURS + 1, n + 1) if below is None else min(below, _LATTICE_MOST_COLOURS + 1)
    off = p.rows < p.cols
    u, v = p.rows[off], p.cols[off]
    first = acyclic_bound(p, active)
    if top <= first or u.size == 0:
        return None
    widths, pairs = lattice_widths(p)
    # the window: a few of the widest lines at the start and in the middle (cycles of the
    # stencil lie within them), and at the end, where a periodic grid wraps around
    span = max(_WINDOW, 4 * max(widths, default=0), 4 * max((w2 for _, w2 in pairs), default=0))
    mid = n // 2
    inside = (u < span) | ((u >= mid) & (v < mid + span)) | (u >= n - span) | (v >= n - span)
    su, sv = u[inside], v[inside]
    alive = Every(check_alive)
    whole = 0
    for k in range(first, top):
        for lattice in _lattices(widths, pairs, k):
            alive()
            cu, cv = _lattice_of(su, lattice, k), _lattice_of(sv, lattice, k)
            if bool((cu == cv).any()) or _forest_of(su, sv, cu, cv, k) is None:
                continue
            if whole == _MOST_WHOLE_CHECKS:  # (a pattern whose window says little: no grid)
                return None
            whole += 1
            colors = _lattice_of(np.arange(n, dtype=np.int64), lattice, k)
            if bool((colors[u] == colors[v]).any()):
                continue
            colors = np.where(active, colors, -1)
            forest = _forest(u, v, colors, k)
            if forest is None:  # a two-coloured cycle outside the window
                continue
            # A lattice's two-coloured trees are paths, whose longest subtree is half the
            # path at least however it is rooted: one too long for most_summed is refused
            # here, before the substitution's pure-Python walk (seconds on a 300 x 300
            # grid in float32, whose paths are 600 long where 64 are allowed)
            if most_summed is not None and int(np.bincount(forest[3]).max(initial=0)) > 2 * most_summed + 1:
                continue
            try:
                solve = substitution(p, colors)
            except AssertionError:  # (never seen: its forest was checked just above)
                continue
            if most_summed is None or solve.most_summed <= most_summed:
                return colors, solve
    return None


def orders(indptr: np.ndarray, nbr: np.ndarray, vertices: int) -> tuple[str, ...]:
    """The greedy orders to try: smallest-last, largest-first and natural where their
    passes are cheap, natural alone up to :data:`_MOST_STEPS` (and the work limit), none
    past it or past :data:`_MOST_VERTICES` active vertices."""
    s = steps(indptr, nbr)
    limit = work_limit()
    if vertices > _MOST_VERTICES or s > _MOST_STEPS or (limit is not None and 3 * s > limit):
        return ()
    return ("smallest_last", "largest_first", "natural") if s <= _EVERY_ORDER_STEPS else ("natural",)
