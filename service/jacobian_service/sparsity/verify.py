"""Checks that a pattern held for the products just computed, and the dense answer when not.

A compressed product mixes the entries of every row (or column) of one colour. When the
pattern misses an entry, the decompression reads a sum that includes it as the value of
another entry: the values of reported entries are wrong, silently. Two checks catch it:

- :func:`strays` (free): a product nonzero at a place where the pattern puts no entry of
  that colour: some entry is missing.
- :func:`disagrees` (one more product): the product with a random seed against the
  decompressed matrix times that seed. Any missing entry changes one or the other, so
  with a random seed it is seen (almost surely), wherever it sits.

Every pattern gets the random product: reverse products (VJPs, Hessian-vector products)
carry it as one more seed in their own vmap (:func:`random_row`), forward ones get the
random VJP that proves them jacrev's (:func:`differs_from_reverse`). A traced pattern is
a superset of what the trace saw, but the tracer's tensors are not jacrev's and Python
can tell them apart (``type``, a name built at run time...): a branch that took another
arm under the trace kept its pattern. All but exact traced patterns get the free check
too.

Round-off is the function's own: large terms that cancel inside it (``(x * 1e5 + x) -
x * 1e5``) make a random seed's product differ from the colours' mix far past any fixed
tolerance, and a right pattern was "proven wrong" (answered densely, a 504 at 10^5
elements). So before a pattern is called wrong, :func:`round_off` measures that noise
at this point, by how far the products are from additive (``v(r1 + r2) - v(r1) -
v(r2)``, one vmap of 3 seeds, r1 the check's): a difference within a few times that
noise is round-off, not a missing entry. Noise past :func:`_noise_cap` (a quarter of the
digits) is no round-off a check can see past: the products are not linear in their seeds
(a gradient hook), and the pattern stays proven wrong.

An output leaf coarser than the inputs (a float16 or float32 leaf beside float64 ones, or
of a float64 input) rounds its own products: the random seed's share of it is rounded to
that leaf's dtype where it enters the leaf's backward (the colours' 0/1 seeds are exact in
every dtype) and its terms round there. The inputs' tolerance read that as a missing
entry (a right pattern answered densely, a right declared one refused with a 422), and
the round-off it measured was past the inputs' cap. So each output row is held to the
coarser of its leaf's dtype and the inputs' (:func:`leaf_tolerance`: weighed by that
row's share of each place), and the round-off cap is the coarsest dtype's
(:func:`coarsest`). A float64 row of a mixed output keeps float64's tolerance: a missing
entry among the float64 rows is seen as before. (Not :func:`differs_from_reverse`: it
asks whether JVPs' values are jacrev's, and a JVP rounds a coarser leaf's column.)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .coloring import Coloring
from .patterns import Pattern

__all__ = ["coarsest", "coarser_than", "covered", "differs_from_reverse", "disagrees", "disagrees_batch", "leaf_tolerance",
           "noise_seeds", "noise_tolerance", "random_row", "round_off", "strays", "within_noise"]

#: Differences below this many ulps of the largest magnitude are round-off.
_ULPS = 16
_RANDOM_ULPS = 1024  # a random product sums many terms: more round-off
#: ... but never past 1 %: 1024 ulps of float16 are 100 % (of bfloat16, 800 %), and a
#: declared diagonal missing a sub-diagonal as large passed in them (a 200, 0.75 off
#: jacrev, where float32 is a 422). Past it, the function's measured round-off decides.
_RANDOM_CAP = 1e-2
#: A check's difference up to this many times the function's measured round-off is round-off.
_NOISE_TIMES = 8


def _eps(dtype: torch.dtype) -> float:
    # (a complex leaf rounds as its real parts do)
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point or dtype.is_complex else 0.0


def _random_tol(dtype: torch.dtype) -> float:
    return min(_RANDOM_ULPS * _eps(dtype), _RANDOM_CAP)


def coarsest(like: torch.dtype, leaves: Sequence[torch.dtype] = ()) -> torch.dtype:
    """The dtype of largest machine epsilon among the inputs' (``like``) and the output
    leaves' floating ones: the one whose round-off bounds the products'."""
    return max([like, *(d for d in leaves if d.is_floating_point or d.is_complex)], key=_eps)


def coarser_than(eps: float, leaves: Sequence[torch.dtype]) -> bool:
    """Whether some floating output leaf rounds coarser than machine epsilon ``eps``, the
    inputs' (a float16 leaf beside float64 ones, or of a float64 input): its products
    round there."""
    return any(_eps(d) > eps for d in leaves)


def leaf_tolerance(like: torch.dtype, leaves: Sequence[tuple[int, torch.dtype]], always: bool = False) -> np.ndarray | None:
    """The random check's relative tolerance for each row of a Jacobian's flat output
    (``leaves``: each output leaf's element count and dtype, in flat order): the coarser
    of its leaf's dtype and the inputs' (``like``). None where no leaf is coarser than
    the inputs (every row at the inputs' tolerance, as :func:`disagrees` takes it),
    unless ``always``."""
    base = _random_tol(like)
    tols = [max(base, _random_tol(d)) if d.is_floating_point or d.is_complex else base for _, d in leaves]
    if all(t == base for t in tols) and not always:
        return None
    return np.repeat(np.asarray(tols, dtype=np.float64), [int(size) for size, _ in leaves])


def covered(p: Pattern, coloring: Coloring) -> np.ndarray:
    """Flat places of the compressed matrix (as ``_Products.values`` lays it out) where
    some pattern entry lands: ``(k, n)`` for rev, ``(width, k)`` for fwd and star."""
    k = coloring.n_colors
    if coloring.mode == "rev":
        colour = coloring.colors[p.rows]
        places = colour * p.shape[1] + p.cols
    else:
        colour = coloring.colors[p.cols]
        places = p.rows * k + colour  # star: every entry, either of its two places
    # (a bicolouring's side seeds some columns or rows only: the others land nowhere)
    return places if bool((colour >= 0).all()) else places[colour >= 0]


def strays(p: Pattern, coloring: Coloring, block: torch.Tensor, rows: tuple[int, int] | None = None) -> int:
    """How many places of the products (``(k, width)``, as computed) are nonzero where
    the pattern puts no entry of that colour. ``rows``: only those rows were asked for
    (forward products compute the others too: they are not looked at)."""
    flat = (block if coloring.mode == "rev" else block.transpose(-1, -2)).reshape(-1)
    if flat.numel() == 0:
        return 0
    free = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if rows is not None and coloring.mode == "fwd":
        k = coloring.n_colors
        free[: rows[0] * k] = False
        free[rows[1] * k :] = False
    if p.nnz:
        free[torch.as_tensor(covered(p, coloring), device=flat.device)] = False
    mag = flat.detach().abs()
    finite = torch.isfinite(mag)
    top = float(mag[finite].max()) if bool(finite.any()) else 0.0
    # An infinity where no entry of that colour is, is one: a zero seed that meets an
    # infinite derivative gives NaN (0 * inf), never inf, so only an entry seeded 1 gives
    # it. (NaN stays uncounted: that 0 * inf at a right pattern's free places.) Uncounted,
    # a declared band that forgot y[0]'s sqrt(x[-1]) answered a 200 without its entry at
    # x[-1] = 0 (jacrev: inf), where any other x[-1] is a 422.
    return int((((mag > _ULPS * _eps(flat.dtype) * top) & finite) | torch.isinf(mag)).logical_and(free).sum())


def random_row(
    width: int, mode: str, like: torch.Tensor, rows: tuple[int, int] | None, *, seed: int = 1234, low: float = 0.5,
) -> tuple[torch.Tensor, np.ndarray]:
    """One random seed in [``low``, ``low`` + 1) as a ``(1, width)`` row in ``like``'s
    dtype and device (the products' seeds run it beside their own, one vmap for all), and
    the same as float64 numpy. Reverse mode with ``rows``: a cotangent on the rows asked
    for only."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.rand(width, generator=gen, dtype=torch.float64) + low
    if rows is not None and mode == "rev":
        r[: rows[0]] = 0
        r[rows[1] :] = 0
    return r.to(like.device, like.dtype).reshape(1, width), r.numpy().copy()


def noise_seeds(width: int, mode: str, like: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """The ``(3, width)`` seeds :func:`round_off` reads: the check's own (r1), another of
    mixed signs (r2: a product that is not additive, such as a hook's ``abs``, shows it),
    and their sum, in ``like``'s dtype."""
    r1, _ = random_row(width, mode, like, rows)
    r2, _ = random_row(width, mode, like, rows, seed=4321, low=-0.5)
    return torch.cat([r1, r2, r1 + r2])


def round_off(products: torch.Tensor) -> float:
    """The function's own round-off at this point, relative to the products' size: the
    largest ``|v(r1 + r2) - v(r1) - v(r2)| / (|v(r1)| + |v(r2)| + |v(r1 + r2)|)`` over
    the places of the products of :func:`noise_seeds` (``(3, width)``), where finite."""
    v = products.reshape(3, -1).detach().to(torch.float64).cpu().numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        residual = np.abs(v[2] - v[0] - v[1])
        size = np.abs(v).sum(axis=0)
    seen = np.isfinite(residual) & np.isfinite(size) & (size > 0)
    return float((residual[seen] / size[seen]).max()) if seen.any() else 0.0


def _noise_cap(dtype: torch.dtype) -> float:
    # (eps ** 0.25: float32 1.9 %, float64 1.2e-4): products further than that from
    # additive are no round-off any check could see a missing entry past
    return _eps(dtype) ** 0.25


def within_noise(off: float, noise: float, dtype: torch.dtype) -> bool:
    """Whether a check's difference ``off`` (relative, :func:`disagrees`) is the
    function's own round-off ``noise`` (:func:`round_off`): within :data:`_NOISE_TIMES`
    of it, and it no more than :func:`_noise_cap`."""
    return noise <= _noise_cap(dtype) and off <= _NOISE_TIMES * noise


def noise_tolerance(noise: float, dtype: torch.dtype) -> float:
    """The largest relative difference :func:`within_noise` takes for round-off at this
    ``noise`` (0 where it is past :func:`_noise_cap`): for checks that bound a difference
    by a tolerance rather than ask (engine/batched.py's per-example checks)."""
    return _NOISE_TIMES * noise if noise <= _noise_cap(dtype) else 0.0


def _random_seed(
    seed_shapes: list[torch.Size], mode: str, like: torch.Tensor, rows: tuple[int, int] | None
) -> tuple[list[torch.Tensor], np.ndarray]:
    """:func:`random_row` split per seed part (with a leading axis of 1)."""
    row, rv = random_row(sum(int(np.prod(s, dtype=np.int64)) for s in seed_shapes), mode, like, rows)
    parts, offset = [], 0
    for shape in seed_shapes:
        size = int(np.prod(shape, dtype=np.int64))
        parts.append(row[:, offset : offset + size].reshape(1, *shape))
        offset += size
    return parts, rv


def disagrees(matrix: Any, mode: str, got: torch.Tensor, rv: np.ndarray, rows: tuple[int, int] | None,
              dtype: torch.dtype, row_tol: np.ndarray | None = None) -> float:
    """The largest difference, relative to its scale, between ``got``, the product with
    the random seed ``rv`` (:func:`random_row`), and the decompressed ``matrix`` (scipy
    CSR, (m, n)) applied to it; 0 when within round-off (``dtype``'s, or per row of a
    Jacobian ``row_tol``'s: :func:`leaf_tolerance`)."""
    flat = got.reshape(-1).detach().to(torch.float64).cpu().numpy()
    return _off(flat, rv, matrix.astype(np.float64, copy=False), mode, rows, dtype, row_tol)


def disagrees_batch(matrices: list[Any], mode: str, got: torch.Tensor, rv: np.ndarray, rows: tuple[int, int] | None,
                    dtype: torch.dtype, row_tol: np.ndarray | None = None) -> float:
    """:func:`disagrees` at each point of a batch: ``got`` is ``(batch, 1, width)``."""
    flat = got.reshape(len(matrices), -1).detach().to(torch.float64).cpu().numpy()
    return max((_off(flat[i], rv, m.astype(np.float64, copy=False), mode, rows, dtype, row_tol)
                for i, m in enumerate(matrices)), default=0.0)


def _tolerance(m64: Any, rv: np.ndarray, got: np.ndarray, scale: np.ndarray, mode: str, dtype: torch.dtype,
               row_tol: np.ndarray | None) -> np.ndarray:
    """How far ``got`` may be from the matrix's product at each place: ``dtype``'s
    tolerance of ``scale + |got|``, or, with ``row_tol`` (a Jacobian's per output row),
    each row's own tolerance of its share of the scale (reverse: ``|M|^T (t |r|)``, the
    gradient's sum in the inputs' dtype beside it; forward: the row's)."""
    if row_tol is None:
        return _random_tol(dtype) * (scale + np.abs(got))
    if mode == "rev":
        return abs(m64).T @ (row_tol * np.abs(rv)) + _random_tol(dtype) * np.abs(got)
    return row_tol * (scale + np.abs(got))


def _applied(m64: Any, rv: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(M^T rv, |M|^T |rv|)`` for ``rev``, else ``(M rv, |M| |rv|)``: the transpose
    made once (each ``.T`` of a CSR builds and checks a CSC), the same products."""
    side = m64.T if mode == "rev" else m64
    return side @ rv, abs(side) @ abs(rv)


def _off(got: np.ndarray, rv: np.ndarray, m64: Any, mode: str, rows: tuple[int, int] | None, dtype: torch.dtype,
         row_tol: np.ndarray | None = None) -> float:
    want, scale = _applied(m64, rv, mode)
    if rows is not None and mode == "fwd":  # the other rows of J r are not in the matrix
        got, want, scale = got[rows[0] : rows[1]], want[rows[0] : rows[1]], scale[rows[0] : rows[1]]
        row_tol = row_tol[rows[0] : rows[1]] if row_tol is not None else None
    # (inf - inf warns: under warnings as errors, as pytest's in-process app runs, the
    # service's own arithmetic was a 500 function_error that named the user's function)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - want)
        ok = ~np.isfinite(got) | ~np.isfinite(want)  # NaN and inf are compared by the strays check
        tol = _tolerance(m64, rv, got, scale, mode, dtype, row_tol) + np.finfo(np.float64).tiny
        bad = (diff > tol) & ~ok
    return float((diff[bad] / np.maximum(scale[bad] + np.abs(got[bad]), 1e-300)).max()) if bad.any() else 0.0


def differs_from_reverse(
    matrix: Any, m: int, like: torch.Tensor, reverse: Callable[[list[torch.Tensor]], torch.Tensor],
    rows: tuple[int, int] | None = None,
) -> bool:
    """Whether a Jacobian from forward products (JVPs) differs from jacrev's, by one VJP
    (``reverse(seeds)``) with a random cotangent against ``v^T J`` from ``matrix``.

    They differ where the function is not differentiable (``prelu`` at 0, ties of
    ``fmax``, ``where(x > 0, sqrt(x), 0)``): each mode makes its own one-sided choice
    there, and the answer must not depend on the mode. NaN against a number is a
    difference, round-off is not. Where reverse mode cannot run, True: the answer is
    jacrev's failure, not forward mode's Jacobian (torch's forward mode silently drops
    tangents through ``torch.library`` custom ops, which reverse mode refuses).

    At the inputs' round-off, whatever the output leaves' dtypes: a JVP rounds a coarser
    leaf's column to that leaf's dtype where jacrev's VJPs do not (``x.cos().half()`` of
    a float64 ``x``: the float16 rows 3e-4 off jacrev's), so there the VJPs answer, held
    to each leaf's round-off by :func:`disagrees` (which looks for missing entries only,
    their values being jacrev's)."""
    parts, rv = _random_seed([torch.Size([m])], "rev", like, rows)
    try:
        got = reverse(parts).reshape(-1).detach().to(torch.float64).cpu().numpy()
    except Exception as exc:
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            raise
        return True
    m64 = matrix.astype(np.float64, copy=False)  # (read only: no copy of a float64 answer)
    with np.errstate(invalid="ignore", over="ignore"):
        want, scale = _applied(m64, rv, "rev")
        tol = _random_tol(like.dtype) * (scale + np.abs(got)) + np.finfo(np.float64).tiny
        same = np.abs(got - want) <= tol
    same |= np.isnan(got) & np.isnan(want)
    same |= np.isinf(got) & (got == want)
    return not bool(same.all())
