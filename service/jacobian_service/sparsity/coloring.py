"""Colourings that let a few products recover every nonzero of a sparse derivative.

- Column colouring (forward mode, one JVP per colour): columns that share no row may
  share a colour; ``J[i, j] = (J S)[i, colour(j)]``. A distance-1 colouring of the
  column-intersection graph, coloured greedily in networkx's orders (the same colours
  as ``networkx.greedy_color``, computed on plain lists: its graph of dicts took most of
  the time, ~2 of 2.5 s on a 100 x 100 mesh).
  Where no colouring is known to reach the lower bound, a bounded tabu search
  (:func:`_tabu_fewer`) then tries to save colours greedy left (periodic stencils).
- Row colouring (reverse mode, one VJP per colour): the same on the transpose.
- Star colouring (symmetric Hessians, one HVP per colour): a distance-1 colouring of
  the adjacency graph in which every path on four vertices uses at least three
  colours; each ``H[i, j]`` is then read directly from ``H S`` at ``(i, colour(j))`` or
  ``(j, colour(i))`` (Gebremedhin, Manne, Pothen, "What color is your Jacobian? Graph
  coloring for computing derivatives", SIAM Review 47(4), 2005, Algorithm 4.1).

Rows or columns with no entry get colour -1 and cost no product. Colouring a large
pattern takes a while (the graph product is cubic in a dense row's length, the greedy
passes and the star colouring are pure Python): every function takes the caller's
``check_alive`` (a request's deadline check) and calls it at most every few
milliseconds of every long loop: between blocks of the graph product, of the vertices
each greedy order and pass takes, and inside the star colouring's loop; so a deadline
stops a colouring within a fraction of a second.

What is known up front is not computed:

- a column graph that is complete (some row holds every non-empty column: a dense
  pattern, a lower-triangular one) needs one colour per column, which every greedy
  order gives: those colours come without the graph (likewise for star colouring when
  every vertex is adjacent to every other);
- a pattern whose graph product would take more than :func:`.patterns.work_limit`
  steps (one per pair of entries sharing a row), or whose graph would hold more than
  the graph limit, is not given a graph: a modulus, runs or lattice colouring a few
  colours above the lower bound colours it where one exists (a periodic band whose
  width does not divide n: lorenz96 at n = 300,000 takes 14 colours by runs, the
  fewest any colouring can use, where its 13 entries a row would have the graph try
  for 13), else it is refused with :class:`~.patterns.PatternTooLarge`;
- the greedy star colouring is skipped (the distance-2 colouring, itself a star
  colouring, is used) when a bound on its steps is past that limit.

Every colouring carries its decompression map (``gather``), checked when it is built: a
colouring that cannot recover an entry directly raises instead of returning a wrong matrix.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..heap import collector_paused
from .patterns import Pattern, PatternTooLarge, check_entries, check_work, sorted_unique, work_limit

log = logging.getLogger("jacobian_service.sparsity")

__all__ = [
    "Coloring",
    "Every",
    "acyclic_coloring",
    "acyclic_from",
    "check_unique",
    "choose_coloring",
    "column_coloring",
    "direct_coloring",
    "hessian_coloring",
    "lattice_widths",
    "no_gc",
    "row_coloring",
    "star_coloring",
    "star_gather",
]

# networkx's greedy strategies tried, keeping the fewest colours. "smallest_last" is the usual
# winner on meshes; natural order is optimal on plain bands, where the others can lose
# a colour or two; "largest_first" is the classic Welsh-Powell order.
_STRATEGIES = ("smallest_last", "natural", "largest_first")
# Above this many graph edges only the cheapest strategies are tried: each pass is pure
# Python, a few tenths of a microsecond per edge (smallest-last's order about a microsecond).
_ALL_STRATEGIES_EDGE_LIMIT = 2_000_000
# A greedy star pass whose bound is past the work limit is still tried for this many steps
# (~1 s of pure Python): its bound counts every neighbour's degree, where it reads the
# colours around them, often far fewer.
_STAR_TRY_STEPS = 2_000_000
# Long loops call check_alive at most this often (a monotonic clock read otherwise).
_CHECK_EVERY_S = 0.005
# The graph product runs in blocks of about this many seconds (sized as it goes: a
# multiply-add costs ~1 ns where rows overlap and ~100 ns where each makes a new entry).
_PRODUCT_BLOCK_S = 0.02

Check = Callable[[], None] | None


def _check(check_alive: Check) -> None:
    if check_alive is not None:
        check_alive()


class Every:
    """``check_alive`` for the inside of long loops: called at most every
    ``_CHECK_EVERY_S`` (the first call always checks)."""

    __slots__ = ("check_alive", "next")

    def __init__(self, check_alive: Check) -> None:
        self.check_alive = check_alive
        self.next = 0.0

    def __call__(self) -> None:
        if self.check_alive is None:
            return
        now = time.monotonic()
        if now >= self.next:
            self.next = now + _CHECK_EVERY_S
            self.check_alive()


def _all_distinct(values: np.ndarray, bound: int) -> bool:
    """Whether the non-negative ints ``values`` (all below ``bound``) are distinct: by
    counting when ``bound`` is small beside the count, else by a sort (never numpy's
    hash-based ``np.unique``, seconds on millions)."""
    if values.size < 2:
        return True
    if bound <= 8 * values.size + (1 << 20):
        return int(np.bincount(values, minlength=0).max()) <= 1
    s = np.sort(values, kind="stable")
    return not bool((s[1:] == s[:-1]).any())


@dataclass(frozen=True, eq=False)
class Coloring:
    """How a derivative is compressed: ``mode`` is ``fwd`` (columns coloured; products
    are JVPs), ``rev`` (rows; VJPs), ``bidirectional`` (both: see :mod:`.bicoloring`),
    ``star`` or ``acyclic`` (symmetric; HVPs).

    ``gather[k]`` is the flat index, into the compressed matrix, of pattern entry ``k``
    (``(m, p)`` for fwd, star and acyclic, ``(p, n)`` for rev, row-major; for
    bidirectional the forward products' ``(m, kf)`` then the reverse ones' ``(kr, n)``,
    whose colourings ``parts`` holds, -1 for a column or row not seeded). An acyclic
    colouring reads only its diagonal entries there: ``solve`` (a
    :class:`.acyclic.Substitution`) solves for the others.
    """

    mode: str
    colors: np.ndarray
    n_colors: int
    gather: np.ndarray
    lower_bound: int
    strategy: str = ""
    solve: Any = None
    parts: Any = None  # bidirectional: (the forward colouring, the reverse one)

    def describe(self) -> dict[str, Any]:
        out = {
            "mode": self.mode,
            "colors": self.n_colors,
            "products": self.n_colors,
            "lower_bound": self.lower_bound,
            "strategy": self.strategy,
        }
        if self.parts is not None:
            out["fwd_products"], out["rev_products"] = self.parts[0].n_colors, self.parts[1].n_colors
        return out


def _graph_work(p: Pattern) -> int:
    """Steps of the column graph's product ``a.T @ a``: one per pair of entries that
    share a row, the sum of the squared row counts (``n**3`` for a dense ``n x n``)."""
    per_row = np.bincount(p.rows, minlength=p.shape[0]).astype(np.int64)
    return int((per_row * per_row).sum())


def _graph_refusal(p: Pattern, work: int) -> PatternTooLarge | None:
    """Why the column graph may not be built (its product's steps past the work limit,
    or its entries past the graph limit), or None where it may."""
    try:
        check_work(work, "the colouring's column graph")
        _check_graph_size(p, work)
    except PatternTooLarge as exc:
        return exc
    return None


def _check_graph_size(p: Pattern, work: int) -> None:
    # a.T @ a has at most sum(row counts ** 2) entries, and at most n * n
    check_entries(min(work, p.shape[1] * p.shape[1]), "the colouring's column graph", graph=True)


def _column_graph_edges(p: Pattern, check_alive: Check = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of columns that share a row (each pair once, i < j), in the order
    ``sp.triu(a.T @ a, k=1).tocoo()`` gives them (the order networkx then sees). The
    product runs a block of result columns at a time, ``check_alive`` between blocks:
    a block's columns of ``a.T @ a`` come out as they do in the whole product."""
    import scipy.sparse as sp

    m, n = p.shape
    alive = Every(check_alive)
    alive()
    a = sp.csr_array((np.ones(p.nnz, np.float32), (p.rows, p.cols)), shape=p.shape)
    at, ac = a.T, a.tocsc()
    # Steps of result column j: over the rows holding column j, those rows' counts.
    per_row = np.bincount(p.rows, minlength=m).astype(np.float64)
    steps = np.cumsum(np.bincount(p.cols, weights=per_row[p.rows], minlength=n))
    us, vs = [], []
    j0, per_block = 0, float(1 << 18)  # steps in the next block, from the rate measured
    while j0 < n:
        alive()
        done = steps[j0 - 1] if j0 else 0.0
        j1 = max(j0 + 1, int(np.searchsorted(steps, done + per_block, side="right")))
        j1 = min(j1, n)
        t0 = time.monotonic()
        block = (at @ ac[:, j0:j1]).tocoo()
        keep = block.row < block.col + j0
        us.append(block.row[keep].astype(np.int64))
        vs.append(block.col[keep].astype(np.int64) + j0)
        rate = (steps[j1 - 1] - done) / max(time.monotonic() - t0, 1e-4)
        per_block = min(max(rate * _PRODUCT_BLOCK_S, float(1 << 14)), float(1 << 30))
        j0 = j1
    if not us:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(us), np.concatenate(vs)


# Long pure-Python loops check the deadline every this many vertices (a clock read each).
_VERTICES_PER_CHECK = 256


def _adjacency_lists(n: int, u: np.ndarray, v: np.ndarray) -> tuple[list[int], list[int]]:
    """CSR ``(indptr, flat)`` of the graph with edges ``(u[k], v[k])``, each vertex's
    neighbours in the order of the edges naming it: the order networkx's ``Graph`` keeps
    them in once ``add_edges_from`` has added those edges in that order."""
    src = np.concatenate([u, v])
    dst = np.concatenate([v, u])
    edge = np.concatenate([np.arange(u.size), np.arange(v.size)])
    order = np.lexsort((edge, src))  # by vertex, then by edge
    indptr = np.searchsorted(src[order], np.arange(n + 1))
    return indptr.tolist(), dst[order].tolist()


def _copy_order(n: int, indptr: list[int], flat: list[int]) -> tuple[list[int], list[int]]:
    """The adjacency (CSR, as :func:`_adjacency_lists`) in the order ``Graph.copy``
    leaves it (networkx's smallest-last strategy walks a copy): the copy adds every
    ``(x, w)`` of the original in vertex order (ascending), so ``x`` first meets its
    neighbours below it (ascending, as each adds the edge), then those above it in its
    own order."""
    ptr = np.asarray(indptr, np.int64)
    nbr = np.asarray(flat, np.int64)
    owner = np.repeat(np.arange(n), np.diff(ptr))
    above = nbr > owner
    # below: by neighbour; above: by position in the original list (after every below)
    key = np.where(above, nbr.size + np.arange(nbr.size), nbr)
    order = np.lexsort((key, owner))
    return indptr, nbr[order].tolist()


def _smallest_last(nodes: list[int], indptr: list[int], flat: list[int], alive: Every) -> list[int]:
    """networkx's ``strategy_smallest_last``, step for step on plain lists: the same
    buckets of vertices by degree (Python sets, added to and removed from in the same
    order, so ``set.pop`` picks the same vertex on ties), without its graph copy and
    degree views (most of its time)."""
    n = len(indptr) - 1
    indptr, flat = _copy_order(n, indptr, flat)
    degree = [indptr[x + 1] - indptr[x] for x in range(n)]
    degrees: defaultdict[int, set[int]] = defaultdict(set)
    lbound: Any = float("inf")
    for node in nodes:
        d = degree[node]
        degrees[d].add(node)
        lbound = min(lbound, d)
    removed = bytearray(n)
    result: deque = deque()
    for step in range(len(nodes)):
        if step % _VERTICES_PER_CHECK == 0:
            alive()
        min_degree = lbound
        while min_degree not in degrees:
            min_degree += 1
        bucket = degrees[min_degree]
        u = bucket.pop()
        if not bucket:
            del degrees[min_degree]
        result.appendleft(u)
        for w in flat[indptr[u] : indptr[u + 1]]:
            if removed[w]:
                continue
            d = degree[w]
            bucket = degrees[d]
            bucket.remove(w)
            if not bucket:
                del degrees[d]
            degrees[d - 1].add(w)
            degree[w] = d - 1
        removed[u] = 1
        lbound = min_degree - 1
    return list(result)


def _order(name: str, nodes: list[int], indptr: list[int], flat: list[int], alive: Every) -> list[int]:
    """The vertex order of networkx's greedy strategy of that name (``nodes``: the
    graph's vertices in the order they were added, ascending)."""
    if name == "natural":
        return nodes
    if name == "largest_first":  # sorted(G, key=G.degree, reverse=True): stable on ties
        return sorted(nodes, key=lambda x: indptr[x] - indptr[x + 1])
    if name == "smallest_last":
        return _smallest_last(nodes, indptr, flat, alive)
    raise ValueError(f"unknown greedy strategy {name!r}")


def _greedy_pass(n: int, order: list[int], indptr: list[int], flat: list[int], alive: Every) -> np.ndarray:
    """Greedy colouring in ``order``: each vertex the smallest colour no coloured
    neighbour has (what ``networkx.greedy_color`` gives for that order)."""
    color = [-1] * n
    seen = [-1] * (max((indptr[x + 1] - indptr[x] for x in order), default=0) + 2)  # seen[c] == v: c is taken
    for step, v in enumerate(order):
        if step % _VERTICES_PER_CHECK == 0:
            alive()
        for w in flat[indptr[v] : indptr[v + 1]]:
            c = color[w]
            if c >= 0:
                seen[c] = v
        c = 0
        while seen[c] == v:
            c += 1
        color[v] = c
    return np.asarray(color, np.int64)


def _greedy(
    n: int, u: np.ndarray, v: np.ndarray, active: np.ndarray, strategies: tuple[str, ...], check_alive: Check = None,
    lower: int = 0,
) -> tuple[np.ndarray, str]:
    """networkx's greedy colouring in each order of ``strategies`` (the same colours,
    computed on plain lists: several times faster), keeping the first with the fewest
    colours; a pass that reaches ``lower`` (a lower bound) ends the search, as no later
    one could win."""
    with no_gc():
        return _greedy_passes(n, u, v, active, strategies, check_alive, lower)


def no_gc() -> contextlib.AbstractContextManager[None]:
    """The cyclic garbage collector off while the passes build and walk lists of
    millions of ints: each full collection scans them all (a few tenths of a second,
    between two checks) and frees nothing (reference counting frees them). A pause the
    engines' settings watch knows for the service's own, whichever thread takes it
    (``heap.collector_paused``): not a function's change."""
    return collector_paused()


def _greedy_passes(
    n: int, u: np.ndarray, v: np.ndarray, active: np.ndarray, strategies: tuple[str, ...], check_alive: Check,
    lower: int,
) -> tuple[np.ndarray, str]:
    alive = Every(check_alive)
    alive()
    indptr, flat = _adjacency_lists(n, u, v)
    nodes = np.flatnonzero(active).tolist()
    if u.size > _ALL_STRATEGIES_EDGE_LIMIT:
        strategies = strategies[:2]
    best: tuple[np.ndarray, str] | None = None
    for name in strategies:
        alive()
        colors = _greedy_pass(n, _order(name, nodes, indptr, flat, alive), indptr, flat, alive)
        if best is None or colors.max(initial=-1) < best[0].max(initial=-1):
            best = (colors, name)
        if int(best[0].max(initial=-1)) + 1 <= lower:
            break
    assert best is not None
    return best


# The local search after greedy (below): graphs up to this many vertices, and at most
# this many moves in all (a move costs tens of microseconds: ~0.1 s in all).
_TABU_VERTEX_LIMIT = 20_000
_TABU_MOVES = 1_500
_NO_MOVE = 1 << 40  # (a move's conflict change where it is no move, or tabu)


def _tabu_fewer(n: int, u: np.ndarray, v: np.ndarray, colors: np.ndarray, lower: int, check_alive: Check = None) -> np.ndarray | None:
    """A colouring with fewer colours than greedy's, by TabuCol (Hertz and de Werra,
    "Using tabu search techniques for graph coloring", Computing 39, 1987; with
    Galinier and Hao's tabu tenure), or None. Greedy in any order leaves periodic
    stencils above their bound (a 2-D torus's 5-point stencil: 8 colours where 6 or 7
    do, whatever the order; networkx's orders, DSATUR and iterated greedy alike): from
    greedy's colouring with its last colour class spread over the others, each move
    recolours one conflicting vertex to the colour that removes the most conflicts, a
    move undone only after a tenure, until no edge conflicts (then one colour fewer is
    tried) or the moves run out. Deterministic (a fixed seed) and bounded: at most
    ``_TABU_MOVES`` moves in all, on graphs of ``_TABU_VERTEX_LIMIT`` vertices
    at most, so the same pattern always gets the same colouring.

    A try gives up once its conflicts outnumber the moves left (each move recolours
    one vertex). The searches that found a colouring cleared 1 to 118 conflicts in 2 to
    565 moves (0.2 to 1.5 a move, the last ones slowest): 2-D tori, 6^3 and 13^3
    periodic 7-point stencils. A large grid's equal colour classes leave thousands
    when one is spread: a 20 x 20 x 20 torus's 10-colour lattice, 2,135 conflicts for
    9 colours, still 1,579 after the whole budget (and none found in 20,000 moves),
    which took 0.57 of the 0.65 CPU-s of its first request's row colouring."""
    active = np.flatnonzero(colors >= 0)
    if active.size > _TABU_VERTEX_LIMIT or u.size == 0:
        return None
    alive = Every(check_alive)
    rng = np.random.default_rng(0)
    order = np.argsort(np.concatenate([u, v]), kind="stable")
    nbr = np.concatenate([v, u])[order]
    indptr = np.searchsorted(np.concatenate([u, v])[order], np.arange(n + 1))
    best: np.ndarray | None = None
    col = colors.copy()
    k = int(col.max()) + 1
    moves, budget = 0, min(_TABU_MOVES, 20 * active.size)  # (a small graph gives up sooner)
    while k - 1 >= max(lower, 1) and moves < budget:
        k -= 1
        last = np.flatnonzero(col == k)
        col[last] = rng.integers(0, k, last.size)
        gamma = np.zeros((n, k), np.int32)  # gamma[x, c]: neighbours of x coloured c
        np.add.at(gamma, (np.concatenate([u, v]), col[np.concatenate([v, u])]), 1)
        conflicts = int(gamma[active, col[active]].sum()) // 2
        tabu = np.zeros((n, k), np.int64)
        fewest = conflicts
        bad = np.zeros(n, bool)  # in a conflict: kept up to date move by move, not rescanned
        bad[active] = gamma[active, col[active]] > 0
        for move in range(budget - moves):
            if conflicts == 0 or conflicts > budget - moves:
                break  # (done; or more conflicts left than moves: see the docstring's end)
            moves += 1
            alive()
            cv = np.flatnonzero(bad)
            delta = gamma[cv].astype(np.int64) - gamma[cv, col[cv]][:, None]
            delta[np.arange(cv.size), col[cv]] = _NO_MOVE
            allowed = (tabu[cv] <= move) | (conflicts + delta < fewest)  # (aspiration: a new best)
            delta = np.where(allowed, delta, _NO_MOVE)
            ties = np.argwhere(delta == delta.min())
            i, c = ties[rng.integers(len(ties))]
            x, old = int(cv[i]), int(col[cv[i]])
            conflicts += int(delta[i, c])
            around = nbr[indptr[x] : indptr[x + 1]]
            gamma[around, old] -= 1
            gamma[around, c] += 1
            col[x] = c
            bad[around] = gamma[around, col[around]] > 0
            bad[x] = gamma[x, c] > 0
            tabu[x, old] = move + int(0.6 * cv.size) + int(rng.integers(10))
            fewest = min(fewest, conflicts)
        if conflicts or bool((col[u] == col[v]).any()):  # (checked whole, not only counted)
            break
        best = col.copy()
    return best


def _cyclic_window_bound(p: Pattern, lower: int, active: np.ndarray) -> int:
    """A lower bound on a column colouring's colours at least ``lower`` (the most
    entries in a row, ``w``): ``ceil(n / floor(n / w))`` where every run of ``w``
    cyclically consecutive columns is the whole of some row (a periodic band: its
    rows, around the circle too), else ``lower``. Each such run is a clique of the
    column graph, so the columns of one colour are ``w`` or more apart around the
    circle: ``floor(n / w)`` of them at most. Without it a periodic band whose ``w``
    does not divide n had greedy's colouring, optimal already, handed to the tabu
    search to look for ``w`` colours that do not exist: its whole budget of moves,
    ~0.3 s of a 2,000-variable periodic tridiagonal Hessian's 0.5 s first colouring
    (its distance-2 colouring), the engine busy for every other client meanwhile.
    Whole-array numpy: a few passes over the entries."""
    m, n = p.shape
    w = lower
    if w < 2 or w >= n or not bool(active.all()):
        return lower
    counts = np.bincount(p.rows, minlength=m)
    full = counts == w
    if int(full.sum()) < n:  # (n runs need n rows)
        return lower
    first = np.cumsum(counts) - counts  # each row's first entry (row-major order)
    cols = p.cols[first[full][:, None] + np.arange(w)]  # (rows of w entries, w), ascending
    gaps = np.concatenate([np.diff(cols, axis=1), (cols[:, 0] + n - cols[:, -1])[:, None]], axis=1)
    run = (gaps == 1).sum(axis=1) == w - 1  # one gap only: a run, wrapping or not
    after = (np.argmax(gaps != 1, axis=1) + 1) % w  # its first column follows that gap
    covered = np.zeros(n, bool)
    covered[cols[np.arange(cols.shape[0]), after][run]] = True
    return -(-n // (n // w)) if bool(covered.all()) else lower


def _complete(active: np.ndarray) -> np.ndarray:
    """One colour per active vertex, in index order: the colouring of a complete graph
    (what greedy colouring in natural order gives it)."""
    return np.where(active, np.cumsum(active) - 1, -1).astype(np.int64)


def _at_the_bound(p: Pattern, lower: int, active: np.ndarray, check_alive: Check = None) -> tuple[np.ndarray, str] | None:
    """A colouring with as many colours as the lower bound by a modulus or a lattice,
    tried before the graph is built: on bands and stencils one is found in a few passes
    over the entries (a 300 x 300 mesh: 0.1 s, where the graph and the greedy passes
    took 5-20 s), and it is optimal. None when neither reaches the bound."""
    by_modulus = _modulo(p, lower, active, check_alive, most=lower)
    if by_modulus is not None:
        return by_modulus, "modulo"
    by_runs = _runs(p, lower, lower + 1, active, check_alive)
    if by_runs is not None:
        return by_runs, "runs"
    on_grid = _lattice(p, lower, lower + 1, active, check_alive)
    return (on_grid, "lattice") if on_grid is not None else None


def _without_graph(p: Pattern, lower: int, active: np.ndarray, check_alive: Check,
                   refusal: PatternTooLarge) -> tuple[np.ndarray, str]:
    """A colouring for a pattern whose column graph is past the limits (its entries, or
    its product's steps): the fewest colours a modulus, runs or a lattice reach below
    twice the lower bound, without the graph. A periodic band w wide needs
    ``ceil(n / floor(n / w))`` colours, one more than its rows' w where w does not divide
    n, which only the graph was tried for: lorenz96 at n = 300,000 (13 entries a row)
    was a 413 after its whole detection, though the runs colour it with 14, the fewest
    possible. Raises ``refusal`` (the graph's, :func:`_graph_refusal`) where none is found,
    or where the tries would take more steps than the limit (each looks at every entry,
    up to three times the lower bound of them)."""
    limit = work_limit()
    if limit is None or 3 * lower * p.nnz <= limit:
        above, worse = lower + 1, 2 * lower  # (the bound itself was tried: _at_the_bound)
        found: tuple[np.ndarray, str] | None = None
        by_modulus = _modulo(p, above, active, check_alive, most=worse - 1)
        if by_modulus is not None:
            found, worse = (by_modulus, "modulo"), int(by_modulus.max(initial=-1)) + 1
        by_runs = _runs(p, above, worse, active, check_alive)
        if by_runs is not None:
            found, worse = (by_runs, "runs"), int(by_runs.max(initial=-1)) + 1
        on_grid = _lattice(p, above, worse, active, check_alive)
        if on_grid is not None:
            found = (on_grid, "lattice")
        if found is not None:
            return found
    raise refusal  # refused as the graph is, with its message


def _modulo(p: Pattern, lower: int, active: np.ndarray, check_alive: Check = None, most: int | None = None) -> np.ndarray | None:
    """``colour(j) = j mod k`` for the smallest valid k up to 2 x the lower bound (or ``most``).

    Greedy orders lose colours on regular structures that a modulus gets right: a
    periodic band (greedy pays up to a whole band at the wrap-around) and the 5-point
    stencil on a w-wide grid (offsets 0, +-1, +-w are distinct mod 5 unless w = 0 mod 5).
    """
    m, n = p.shape
    rows, cols = _lattice_sample(p)
    for k in range(max(lower, 1), min(2 * lower if most is None else most, n) + 1):
        _check(check_alive)  # each try looks at every entry
        if not _all_distinct(rows * k + cols % k, _LATTICE_SAMPLE_ROWS * k):  # (a sample's rows first)
            continue
        slots = p.rows * k + p.cols % k
        if _all_distinct(slots, m * k):
            return np.where(active, np.arange(n) % k, -1)
    return None


def _runs(p: Pattern, lower: int, worse: int, active: np.ndarray, check_alive: Check = None) -> np.ndarray | None:
    """``colour(j) = j - (start of j's run)``, the n columns cut into ``q = ceil(n / k)``
    runs of ``floor(n / q)`` or ``ceil(n / q)`` columns (at most k), for the smallest
    valid k from the lower bound up to ``worse - 1``, or None.

    A periodic band w wide needs ``ceil(n / floor(n / w))`` colours (every w consecutive
    columns distinct, around the circle too), and ``j mod k`` reaches that only where k
    divides n: lorenz96's 13-wide band at n = 8,192 took 15 colours (``j mod 15``:
    none of 13 and 14 divides 8,192), the runs take 14; a periodic tridiagonal on 17
    points took 5 where 4 do. Where k divides n the runs are ``j mod k`` itself."""
    m, n = p.shape
    rows, cols = _lattice_sample(p)
    for k in range(max(lower, 1), min(worse, n + 1)):
        _check(check_alive)  # each try looks at every entry
        q = -(-n // k)
        starts = (np.arange(q + 1, dtype=np.int64) * n) // q
        colors = np.arange(n, dtype=np.int64) - np.repeat(starts[:-1], np.diff(starts))
        if not _all_distinct(rows * k + colors[cols], _LATTICE_SAMPLE_ROWS * k):  # (a sample's rows first)
            continue
        if _all_distinct(p.rows * k + colors[p.cols], m * k):
            return np.where(active, colors, -1)
    return None


# Grid widths tried by the lattice colouring: the most common column offsets of a row.
_LATTICE_WIDTHS = 4
# Rows of the sample a candidate lattice colouring must pass before the full check.
_LATTICE_SAMPLE_ROWS = 256
# Lattices are tried up to this many colours (k shifts each): stencils need a few dozen.
_LATTICE_MOST_COLOURS = 64
# Two-width (3-D) lattices are tried up to this many colours (k^2 shifts each): the
# 27-point stencil needs 27.
_LATTICE_3D_MOST_COLOURS = 27
# Colours past the lower bound tried (each k costs 4 k sample checks): a lattice of
# a stencil reaches the bound itself, and a pattern far from it is no grid.
_LATTICE_EXTRA_COLOURS = 4


def _lattice(p: Pattern, lower: int, worse: int, active: np.ndarray, check_alive: Check = None) -> np.ndarray | None:
    """``colour(j) = (j mod w + s * (j div w)) mod k``: a colouring of a grid of width
    ``w`` by lattice lines, for the smallest valid k from the lower bound up to
    ``worse - 1`` (``worse``: colours already found), or None.

    A stencil on a w-wide grid (columns of one row at offsets ``a * w + b``) has such
    colourings with the fewest colours possible: ``(c + 2 r) mod 5`` for the 5-point
    stencil on any grid, where the flat ``j mod 5`` fails once w is 0 or +-1 mod 5 (a
    300 x 300 grid: 6 colours, then). ``w`` is tried among the most common column
    offsets of a row, and ``s`` over every residue; each candidate is checked exactly
    (no two entries of a row share a colour), first on a sample of rows. On a 3-D grid
    two widths are needed: ``(j mod w1 + s1 ((j div w1) mod (w2 / w1)) + s2 (j div w2)) mod k``
    for ``w2`` a multiple of ``w1`` among those offsets."""
    m, n = p.shape
    if worse <= lower or p.nnz == 0 or lower > _LATTICE_MOST_COLOURS:
        return None
    widths, pairs = lattice_widths(p)
    rows, cols = _lattice_sample(p)
    for k in range(max(lower, 1), min(worse, lower + _LATTICE_EXTRA_COLOURS + 1)):
        for w in widths:
            col, line = cols % w, cols // w
            for shift in range(k):
                _check(check_alive)
                if not _all_distinct(rows * k + (col + shift * line) % k, _LATTICE_SAMPLE_ROWS * k):
                    continue
                every = np.arange(n)
                colors = (every % w + shift * (every // w)) % k
                if _all_distinct(p.rows * k + colors[p.cols], m * k):
                    return np.where(active, colors, -1)
        for w1, w2 in pairs if k <= _LATTICE_3D_MOST_COLOURS else ():
            # (z + s1 y + s2 x) mod k on an (x, y, z) grid: (x + 2 y + 3 z) mod 7 colours the
            # 7-point stencil on any grid (and on a periodic one whose sides are multiples of
            # 7), where one width's lines fail once the side is 0 or +-1 mod 7 (6 x 6 x 6: 8)
            col, line, plane = cols % w1, (cols // w1) % (w2 // w1), cols // w2
            for s1 in range(k):
                _check(check_alive)
                for s2 in _distinct_shifts(rows, (col + s1 * line) % k, plane % k, k):
                    every = np.arange(n)
                    colors = (every % w1 + s1 * ((every // w1) % (w2 // w1)) + s2 * (every // w2)) % k
                    if _all_distinct(p.rows * k + colors[p.cols], m * k):
                        return np.where(active, colors, -1)
    return None


def lattice_widths(p: Pattern) -> tuple[list[int], list[tuple[int, int]]]:
    """The grid widths a lattice colouring tries: the most common column offsets of a
    row, and the pairs of them (a row's w1, a plane's w2, a multiple of w1) that make a
    3-D grid's two widths."""
    offsets = p.cols - p.rows
    values, counts = np.unique(offsets[offsets >= 2], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:_LATTICE_WIDTHS]
    # a grid's offsets are in nearly every row: only those pair up as a 3-D grid's widths
    common = values[order][counts[order] * 2 >= p.shape[0]].tolist()[:3]
    return values[order].tolist(), [(a, b) for a in common for b in common if b > a and b % a == 0]


def _lattice_sample(p: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """The rows a modulus, runs or lattice candidate is first checked on, renumbered below
    ``_LATTICE_SAMPLE_ROWS``: half from the middle of the grid, half its last rows,
    where a periodic grid or band wraps around (a candidate right in the middle and
    wrong there cost a check of every entry: 17 of them, 1.2 s, on a 300,000-column
    periodic band)."""
    m = p.shape[0]
    half = _LATTICE_SAMPLE_ROWS // 2
    mid, end = m // 2, max(m - half, m // 2 + half)
    in_mid = (p.rows >= mid) & (p.rows < mid + half)
    at_end = p.rows >= end
    sample = in_mid | at_end
    rows = np.where(at_end, p.rows - end + half, p.rows - mid)[sample]
    return rows, p.cols[sample]


def _distinct_shifts(rows: np.ndarray, base: np.ndarray, step: np.ndarray, k: int) -> list[int]:
    """The shifts s in ``range(k)`` for which ``(base + s * step) mod k`` gives no two
    entries of a sample row (``rows`` below ``_LATTICE_SAMPLE_ROWS``) one colour: every
    shift in one count (k shifts one at a time cost k numpy passes each)."""
    shifts = np.arange(k, dtype=np.int64)[:, None]
    slots = (shifts * _LATTICE_SAMPLE_ROWS + rows[None, :]) * k + (base[None, :] + shifts * step[None, :]) % k
    counts = np.bincount(slots.reshape(-1), minlength=k * _LATTICE_SAMPLE_ROWS * k).reshape(k, -1)
    return np.flatnonzero(counts.max(axis=1, initial=0) <= 1).tolist()


def column_coloring(p: Pattern, strategies: tuple[str, ...] = _STRATEGIES, *, check_alive: Check = None) -> Coloring:
    """Forward mode: ``B = J S`` with one seed column per colour."""
    m, n = p.shape
    _check(check_alive)
    work = _graph_work(p)
    active = np.bincount(p.cols, minlength=n) > 0
    lower = int(np.bincount(p.rows, minlength=m).max(initial=0))
    if lower == int(active.sum()):
        # Some row holds every column that has an entry (a dense pattern, a triangular
        # one): the graph is complete, every colouring needs a colour per column, and
        # every greedy order gives that many. No graph, no greedy pass.
        colors, strategy = _complete(active), "natural"
    elif (at_bound := _at_the_bound(p, lower, active, check_alive)) is not None:
        colors, strategy = at_bound  # optimal: no greedy order could use fewer
    elif (refusal := _graph_refusal(p, work)) is not None:  # (only a graph that is built is bounded: a 600 x 600 stencil needs none)
        colors, strategy = _without_graph(p, lower, active, check_alive, refusal)
    elif (fewest := _cyclic_window_bound(p, lower, active)) > lower and (
            at_fewest := _at_the_bound(p, fewest, active, check_alive)) is not None:
        colors, strategy = at_fewest  # optimal too, by the stronger bound: no graph, no tabu search
    else:
        u, v = _column_graph_edges(p, check_alive)
        colors, strategy = _greedy(n, u, v, active, strategies, check_alive, fewest)
        # A modulus can only win when greedy stayed above the lower bound: a valid
        # colouring by modulus uses at least ``lower`` colours too.
        if int(colors.max(initial=-1)) + 1 > lower:
            by_modulus = _modulo(p, lower, active, check_alive)
            if by_modulus is not None and by_modulus.max(initial=-1) < colors.max(initial=-1):
                colors, strategy = by_modulus, "modulo"
        if int(colors.max(initial=-1)) + 1 > lower:
            by_runs = _runs(p, lower, int(colors.max(initial=-1)) + 1, active, check_alive)
            if by_runs is not None:
                colors, strategy = by_runs, "runs"
        if int(colors.max(initial=-1)) + 1 > lower:
            on_grid = _lattice(p, lower, int(colors.max(initial=-1)) + 1, active, check_alive)
            if on_grid is not None:
                colors, strategy = on_grid, "lattice"
        if int(colors.max(initial=-1)) + 1 > fewest:  # (below ``fewest`` it could only spend its moves)
            fewer = _tabu_fewer(n, u, v, colors, fewest, check_alive)
            if fewer is not None:
                colors, strategy = fewer, f"{strategy}+tabu"
    _check(check_alive)
    k = int(colors.max(initial=-1)) + 1
    gather = p.rows * k + colors[p.cols]
    check_unique(gather, "column", m * k)
    return Coloring("fwd", colors, k, gather, lower, strategy)


def row_coloring(p: Pattern, strategies: tuple[str, ...] = _STRATEGIES, *, check_alive: Check = None) -> Coloring:
    """Reverse mode: ``B = S^T J`` with one seed row per colour."""
    m, n = p.shape
    _check(check_alive)
    t = column_coloring(p.transpose(), strategies, check_alive=check_alive)
    gather = t.colors[p.rows] * n + p.cols
    check_unique(gather, "row", t.n_colors * n)
    return Coloring("rev", t.colors, t.n_colors, gather, t.lower_bound, t.strategy)


def check_unique(gather: np.ndarray, what: str, bound: int | None = None) -> None:
    # Two entries landing on one compressed slot would be summed: the colouring is wrong.
    bound = int(gather.max(initial=-1)) + 1 if bound is None else bound
    if not _all_distinct(gather, bound):
        raise AssertionError(f"{what} colouring puts two entries in one compressed slot")


def choose_coloring(p: Pattern, mode: str = "auto", *, check_alive: Check = None) -> Coloring:
    """The side with fewer colours (``mode`` ``fwd`` / ``rev`` forces one). On a tie
    reverse mode wins: VJPs are what ``jacrev`` computes (forward-mode AD does not
    honour ``torch.no_grad`` inside the function). ``auto`` also tries a bicolouring
    (JVPs and VJPs together, see :mod:`.bicoloring`) and takes it where it needs fewer
    products: a dense row beside a dense column needs one product per column on
    either side alone, and 3 together."""
    if mode == "fwd":
        return column_coloring(p, check_alive=check_alive)
    if mode == "rev":
        return row_coloring(p, check_alive=check_alive)
    if mode != "auto":
        raise ValueError(f"mode must be auto, fwd or rev, got {mode!r}")
    best = _one_sided(p, check_alive)
    if best.n_colors > 2:  # (two products, one a side, is the least a bicolouring takes)
        from .bicoloring import bicoloring

        both = bicoloring(p, best.n_colors, check_alive=check_alive)
        if both is not None:
            return both
    return best


def _one_sided(p: Pattern, check_alive: Check) -> Coloring:
    # Each side needs at least its lower bound (the most entries in a row for fwd, in a
    # column for rev): one side's colouring can settle the choice without the other's,
    # which may be far costlier (a dense row's clique of columns beside 1-entry columns).
    m, n = p.shape
    fwd_lower = int(np.bincount(p.rows, minlength=m).max(initial=0))
    rev_lower = int(np.bincount(p.cols, minlength=n).max(initial=0))
    if rev_lower <= fwd_lower:
        rev = row_coloring(p, check_alive=check_alive)
        if rev.n_colors <= fwd_lower:  # fwd can't use fewer: rev wins (ties go to rev)
            return rev
        if m == n and p.is_symmetric():  # the column graph is the row graph (stencils):
            return rev  # the same greedy passes would tie, and ties go to rev
        fwd = column_coloring(p, check_alive=check_alive)
    else:
        fwd = column_coloring(p, check_alive=check_alive)
        if fwd.n_colors < rev_lower:  # rev can't use as few
            return fwd
        rev = row_coloring(p, check_alive=check_alive)
    return fwd if fwd.n_colors < rev.n_colors else rev


# --------------------------------------------------------------------------- star


def _adjacency(p: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, neighbours) of the symmetric pattern's graph, without self loops."""
    n = p.shape[0]
    off = p.rows != p.cols
    r = np.concatenate([p.rows[off], p.cols[off]])
    c = np.concatenate([p.cols[off], p.rows[off]])
    key = sorted_unique(r * n + c)
    r, c = key // max(n, 1), key % max(n, 1)
    return np.searchsorted(r, np.arange(n + 1)), c


def star_coloring(p: Pattern, *, check_alive: Check = None, distance2: Coloring | None = None) -> Coloring:
    """Star colouring of a symmetric pattern with the fewest colours found: the greedy
    star colouring (GMP 2005, Algorithm 4.1) in largest-first and natural order, and
    the distance-2 (column) colouring, which is itself a star colouring and sometimes
    beats greedy star colouring on meshes. ``distance2``: that colouring where the
    caller has it already (a symmetric Jacobian's plain colouring, by rows or columns:
    the same graph), not computed again (its tabu search's second run was ~0.5 s of a
    periodic 20 x 20 x 20 stencil's first request, for the same colours)."""
    _check(check_alive)
    if p.shape[0] == p.shape[1] and p.nnz:
        # A dense block (every row that holds an entry holds one in each such column;
        # entries are unique): complete and symmetric, told from the row counts alone,
        # before the symmetry check and the adjacency lists (8.3 s of a 4,096-input dense
        # Hessian's 10.7 s colouring, where a GET .../sparsity?kind=hessian held the
        # engine 56 s in all, the deadline's, serving no one else).
        counts = np.bincount(p.rows, minlength=p.shape[0])
        active = counts > 0
        n_active = int(active.sum())
        if bool((counts[active] == n_active).all()) and bool(active[p.cols].all()):
            return _complete_star(p, active, n_active)
    if p.shape[0] != p.shape[1] or not p.is_symmetric():
        raise ValueError("star colouring needs a square symmetric pattern")
    indptr, nbr = _adjacency(p)
    degree = np.diff(indptr)
    _check(check_alive)
    active = np.zeros(p.shape[0], bool)
    active[p.rows] = True
    n_active = int(active.sum())
    full_row = int(np.bincount(p.rows, minlength=p.shape[0]).max(initial=0)) == n_active
    if n_active and full_row and bool((degree[active] == n_active - 1).all()):
        # Every vertex adjacent to every other, and a row holding every column (a dense
        # Hessian): every candidate needs one colour per vertex, and the first, the
        # greedy star colouring in largest-first order, gives them in index order.
        return _complete_star(p, active, n_active)
    else:
        # The distance-2 colouring: past the graph's limits, by a modulus, runs or a
        # lattice where one exists (a periodic band's Hessian), else refused (raises)
        d2 = distance2 if distance2 is not None and distance2.colors.shape == (p.shape[0],) else (
            column_coloring(p, check_alive=check_alive))
        candidates = [(d2.colors, "distance2_" + d2.strategy)]
        # Two passes, each within half the work limit by its bound; past that, still
        # tried a moment (a vertex next to every other bounds n^2 steps and takes n)
        limit = work_limit()
        budget = None if limit is None else limit // 2 if 2 * _star_steps(degree) <= limit else _STAR_TRY_STEPS
        # A pass stops once it is worse than the one it would have to beat (the fewest
        # colours win, the first of equals): natural order gives an arrowhead's leaves a
        # colour each, an n^2 walk for n colours where largest-first takes 2.
        beat = int(d2.colors.max(initial=-1)) + 2  # (first, it wins a tie with distance-2)
        for seq, name in ((np.argsort(-degree, kind="stable"), "star_largest_first"), (np.arange(p.shape[0]), "star_natural")):
            try:
                found = _greedy_star(p, indptr, nbr, seq, check_alive, budget, beat - 1)
            except _Worse:
                continue
            if found is None:  # past its budget: the other order would be too
                break
            candidates.insert(len(candidates) - 1, (found, name))
            beat = min(beat, int(found.max(initial=-1)) + 1)
        colors, strategy = min(candidates, key=lambda c: int(c[0].max(initial=-1)))
    _check(check_alive)
    k = int(colors.max(initial=-1)) + 1
    return Coloring("star", colors, k, star_gather(p, colors, k), _star_lower_bound(p), strategy)


def _complete_star(p: Pattern, active: np.ndarray, n_active: int) -> Coloring:
    """The star colouring of a complete graph: one colour per vertex, in index order (the
    greedy colouring in largest-first order). Each slot (i, colour j) then holds entry
    (i, j) alone: read where it is, with no search for the slots shared (star_gather's
    sort and two searches of every entry: 4.7 s of a 2,048-input dense Hessian's 10 s
    colouring); and no proper colouring of a complete graph uses fewer colours, so that
    is its lower bound, and hessian_coloring tries no acyclic colouring for fewer (2.9 s
    more, never fewer)."""
    colors = _complete(active)
    return Coloring("star", colors, n_active, p.rows * n_active + colors[p.cols], n_active, "star_largest_first")


def _star_steps(degree: np.ndarray) -> int:
    """A bound on the steps of one greedy star pass (:func:`_greedy_star_pass`): for each
    vertex ``v``, each neighbour ``w``, one step and one per colour around ``w`` (at most
    ``deg(w)``), and two per neighbour as ``v`` is coloured; summed, ``deg(w) * (deg(w) +
    1)`` over ``w`` and twice the degrees. Most patterns take far fewer: the colours
    around a vertex are few where its degree is not."""
    deg = degree.astype(np.float64)
    return int(min(float((deg * (deg + 3)).sum()), 2.0**62))


class _Worse(Exception):
    """A greedy pass stopped: it needs more colours than it had to beat."""


def _greedy_star(p: Pattern, indptr: np.ndarray, nbr: np.ndarray, seq: np.ndarray, check_alive: Check = None,
                 budget: int | None = None, most: int | None = None) -> np.ndarray | None:
    """GMP 2005, Algorithm 4.1. For each vertex v in ``seq``, forbid: the colours of its
    neighbours w; for an uncoloured neighbour w, the colours of w's neighbours x (v and
    x would be same-coloured ends of a path through w whose middle is still open); for
    a coloured w, the colour of each neighbour x of w that has another neighbour y of
    w's colour (v-w-x-y would be a two-coloured path on four vertices).

    Both sets of colours are kept per vertex as vertices are coloured, rather than
    found by walking w's neighbours: the same colours, in steps that follow the
    colours around w, not its degree. Walking them, a vertex next to every other (the
    global variable of an arrowhead Hessian, CUTEst's ARWHEAD) cost every vertex a walk
    over all of them: n^2 pure-Python steps, 12.8 s at n = 5,000 and past the request's
    deadline (504) at 20,000, for the 2 colours largest-first gives. None where the pass
    would take more than ``budget`` steps; :class:`_Worse` where it needs more than
    ``most`` colours."""
    with no_gc():  # a dict per vertex: collections would scan them all, freeing nothing
        return _greedy_star_pass(p, indptr, nbr, seq, check_alive, budget, most)


def _greedy_star_pass(p: Pattern, indptr: np.ndarray, nbr: np.ndarray, seq: np.ndarray, check_alive: Check,
                      budget: int | None = None, most: int | None = None) -> np.ndarray | None:
    n = p.shape[0]
    alive = Every(check_alive)
    alive()
    active = np.zeros(n, bool)
    active[p.rows] = True
    color = [-1] * n
    bounds, flat = indptr.tolist(), nbr.tolist()
    adj = []
    for i in range(n):
        if i % 4096 == 0:
            alive()
        adj.append(flat[bounds[i] : bounds[i + 1]])
    # count[x][c]: x's coloured neighbours of colour c (its keys: the colours around x);
    # first[x][c]: the first of them.
    count: list[dict[int, int]] = [{} for _ in range(n)]
    first: list[dict[int, int]] = [{} for _ in range(n)]
    # twice[w] (w coloured): the colours of w's coloured neighbours x that have another
    # neighbour of w's colour (count[x][color[w]] >= 2).
    twice: list[set[int]] = [set() for _ in range(n)]
    forbidden: list[int] = [-1]
    steps = 0
    for v in seq.tolist():
        alive()
        if not active[v]:
            continue
        for w in adj[v]:
            cw = color[w]
            if cw < 0:
                around: Any = count[w]  # the colours of w's coloured neighbours
            else:
                forbidden[cw] = v
                around = twice[w]
            steps += len(around) + 1
            for cx in around:
                forbidden[cx] = v
        if budget is not None and steps > budget:
            return None
        c = 0
        while forbidden[c] == v:
            c += 1
            if c == len(forbidden):
                forbidden.append(-1)
        if most is not None and c >= most:
            raise _Worse
        color[v] = c
        if c + 1 == len(forbidden):
            forbidden.append(-1)
        mine = twice[v]
        for x in adj[v]:
            around = count[x]
            k = around.get(c, 0) + 1
            around[c] = k
            if k == 1:
                first[x][c] = v
            elif color[x] >= 0:  # x, coloured, now has two or more neighbours of colour c
                mine.add(color[x])
                if k == 2:
                    twice[first[x][c]].add(color[x])
        held = count[v]  # v, now coloured, as the x of its coloured neighbours w
        for w in adj[v]:
            cw = color[w]
            if cw >= 0 and held.get(cw, 0) >= 2:
                twice[w].add(c)
        steps += 2 * len(adj[v])
    return np.asarray(color, np.int64)


def _star_lower_bound(p: Pattern) -> int:
    # Any edge needs two colours; beyond that no cheap bound holds in general (a star
    # around one vertex of any degree is 2-colourable), so none is claimed.
    return 2 if bool((p.rows != p.cols).any()) else int(p.nnz > 0)


def star_gather(p: Pattern, colors: np.ndarray, k: int) -> np.ndarray:
    """Where each entry is read in ``B = H S`` (``(n, k)``): at ``(i, colour j)`` when
    ``j`` is the only column of its colour in row ``i``, else at ``(j, colour i)``."""
    slot = p.rows * k + colors[p.cols]
    ordered = np.sort(slot, kind="stable")
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1]))) if ordered.size else np.zeros(0, np.int64)
    uniq, counts = ordered[starts], np.diff(np.append(starts, ordered.size))

    def alone(s: np.ndarray) -> np.ndarray:  # the slot holds exactly one entry
        pos = np.minimum(np.searchsorted(uniq, s), max(uniq.size - 1, 0))
        return (uniq[pos] == s) & (counts[pos] == 1) if uniq.size else np.zeros(s.shape, bool)

    direct = alone(slot)
    mirrored = p.cols * k + colors[p.rows]
    ok = direct | alone(mirrored)
    if not ok.all():
        raise AssertionError("star colouring cannot recover an entry directly")
    return np.where(direct, slot, mirrored)


def direct_coloring(p: Pattern, *, check_alive: Check = None) -> Coloring:
    """A Hessian's colouring that reads every entry ``(i, j)`` in its own row, at ``(i,
    colour j)``: the distance-2 (column) colouring, as a star colouring (it is one), for
    products that are not finite. Star colouring reads some entries at their mirror
    ``(j, colour i)``, and a NaN of row ``j`` (a gradient entry NaN there: every tangent
    of it is) then stood at ``(i, j)`` where torch.func.hessian's row ``i`` is finite."""
    d2 = column_coloring(p, check_alive=check_alive)
    return Coloring("star", d2.colors, d2.n_colors, p.rows * d2.n_colors + d2.colors[p.cols], d2.lower_bound,
                    "distance2_" + d2.strategy)


# --------------------------------------------------------------------------- acyclic


def hessian_coloring(p: Pattern, *, check_alive: Check = None, most_summed: int = 0,
                     distance2: Coloring | None = None) -> Coloring:
    """The colouring a sparse Hessian's products use: the star colouring, or an acyclic
    one where it needs fewer products and no entry is solved from more than
    ``most_summed`` of them (see :mod:`.acyclic`: 0 keeps star colouring).
    ``distance2``: as for :func:`star_coloring`."""
    star = star_coloring(p, check_alive=check_alive, distance2=distance2)
    if star.n_colors <= star.lower_bound or most_summed < 2:  # (no acyclic colouring uses fewer than 2)
        return star
    acyclic = acyclic_coloring(p, check_alive=check_alive, fewer_than=star.n_colors, most_summed=most_summed)
    return acyclic if acyclic is not None else star


def acyclic_coloring(p: Pattern, *, check_alive: Check = None, fewer_than: int | None = None,
                     most_summed: int | None = None) -> Coloring | None:
    """The greedy acyclic colouring (GTMP 2007, Algorithm 3.1) in the orders
    :func:`.acyclic.orders` allows, the fewest colours kept, with its substitution;
    None where it does not use fewer than ``fewer_than`` colours, where an entry would
    be solved from more than ``most_summed`` products, or where the passes would take
    too long."""
    from .acyclic import acyclic_bound, acyclic_colors, lattice_colors, orders, substitution

    _check(check_alive)
    if p.shape[0] != p.shape[1] or not p.is_symmetric():
        raise ValueError("acyclic colouring needs a square symmetric pattern")
    n = p.shape[0]
    active = np.zeros(n, bool)
    active[p.rows] = True
    # A lattice at the bound every acyclic colouring obeys first: no greedy order can use
    # fewer colours, so its passes are skipped (a 20 x 20 x 20 grid's 7-point stencil:
    # three pure-Python passes, 0.6 s of the 0.7 s colouring on a quiet 2-core VM and
    # seconds under load, for 7, 6 and 6 colours where the lattice's 4 are the optimum;
    # it was then found anyway, after them). Only the bound is tried here: a pattern no
    # lattice colours at it pays one count's candidates on the window, and the passes
    # and the lattice below their count follow as before.
    bound = acyclic_bound(p, active)
    if fewer_than is None or bound < fewer_than:
        at_bound = lattice_colors(p, active, bound + 1, most_summed, check_alive)
        if at_bound is not None:
            colors, solve = at_bound
            k = int(colors.max(initial=-1)) + 1
            return Coloring("acyclic", colors, k, p.rows * k + colors[p.rows], _star_lower_bound(p), "acyclic_lattice",
                            solve)
    indptr, nbr = _adjacency(p)
    names = orders(indptr, nbr, int(active.sum()))
    alive = Every(check_alive)
    nodes = np.flatnonzero(active).tolist()
    ptr, flat = indptr.tolist(), nbr.tolist()
    best: tuple[np.ndarray, str] | None = None
    for name in names:
        order = np.asarray(_order(name, nodes, ptr, flat, alive), np.int64)
        colors = acyclic_colors(n, indptr, nbr, active, order, check_alive)
        if best is None or colors.max(initial=-1) < best[0].max(initial=-1):
            best = (colors, "acyclic_" + name)
    found: tuple[np.ndarray, str, Any] | None = None
    if best is not None and (fewer_than is None or int(best[0].max(initial=-1)) + 1 < fewer_than):
        _check(check_alive)
        try:
            solve = substitution(p, best[0])
            if most_summed is None or solve.most_summed <= most_summed:
                found = (best[0], best[1], solve)
        except AssertionError as exc:  # (never seen: the passes' colourings are acyclic) star colouring stands
            log.warning("acyclic colouring refused by its check (%s): star colouring instead", exc)
    # A stencil's lattice colouring, where it beats greedy's: every greedy order leaves the
    # 5-point stencil's Hessian 4 colours where (column + row) mod 3 is acyclic (and a
    # grid too large for the greedy passes gets one at all)
    below = int(found[0].max(initial=-1)) + 1 if found is not None else fewer_than
    by_lattice = lattice_colors(p, active, below, most_summed, check_alive)
    if by_lattice is not None:
        found = (by_lattice[0], "acyclic_lattice", by_lattice[1])
    if found is None:
        return None
    colors, strategy, solve = found
    k = int(colors.max(initial=-1)) + 1
    return Coloring("acyclic", colors, k, p.rows * k + colors[p.rows], _star_lower_bound(p), strategy, solve)


def acyclic_from(p: Pattern, colors: np.ndarray, strategy: str = "cached") -> Coloring:
    """An acyclic colouring's map rebuilt from its colours (a cached one: re-checked)."""
    from .acyclic import substitution

    k = int(colors.max(initial=-1)) + 1
    return Coloring("acyclic", colors, k, p.rows * k + colors[p.rows], _star_lower_bound(p), strategy,
                    substitution(p, colors))
