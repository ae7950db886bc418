"""Sparsity detection: structural tracing over aten ops, numerical probing as fallback.

The tracer runs the function once on the real inputs wrapped in a tensor subclass
whose ``__torch_dispatch__`` sees every aten op. Values are computed as usual (so shapes
and control flow are the real ones), and beside each tensor it keeps, for every element,
the set of input elements it depends on: a sparse boolean matrix (elements x inputs).
The sets come from each op's structure, never from derivative values, so a nonzero
that happens to vanish at this point (``x * y`` at ``y = 0``) is still found, as in
SparseConnectivityTracer.jl and asdex:

- pointwise ops (aten's ``pointwise`` tag): an element depends on the broadcast
  elements it is computed from (not through a constant's zero it is multiplied by, nor
  through the branch a constant ``where`` condition does not pick);
- data movement (views, slices, cat, gather, index, roll, pad, ...): the op itself is
  run on tensors of element labels, which says where each element came from, exactly;
- scatter-style writes (``index_add``, ``scatter_add``, ``scatter_reduce``, ``scatter``,
  ``index_copy``, ``index_fill``, ``put``, ``index_put``): each source element lands
  where the index says, beside (or in place of) what the destination held;
- reductions, scans and softmax-like ops: the elements along the reduced dimensions;
- matrix products: the contracted elements, skipping structural zeros of operands that
  do not depend on the input (constant matrices with zeros stay sparse);
- convolutions, transposed ones too: the kernel window of each output element,
  skipping zero taps of a constant kernel (a 5-point Laplacian as ``conv2d`` stays 5
  points);
- pooling (adaptive too), interpolation, ``unfold``/``fold``: each output element's
  window of its own channel (interpolation's found by torch's own kernel, per dim);
- FFTs: the whole line over the transformed dims; ``linalg.cross``: the other two
  components of the same vectors;
- functions of each matrix of a batch (``det``, ``inv``, ``eigh``, ``svd``, ``qr``,
  ``cholesky``, ...): every element of the matrix it belongs to;
- normalization layers (layer, group, instance, batch norm): the element's group;
- elementwise losses (``mse_loss``, ``huber_loss``, ...): their terms pointwise, and
  reduced, the sum of the terms;
- ``cdist``, ``pdist``: the two points of each distance; ``dist``: every element of both;
- ``embedding_bag``: each bag's element on its indices' rows (that column) and weights;
  ``renorm``: an element on its slice along ``dim``;
- ``triangular_solve``, ``addbmm``, ``linalg_lstsq``, ``householder_product``, ``ormqr``
  (one Householder reflector at a time), ``segment_reduce`` (a ``scatter_reduce`` to
  each segment): as the ops they amount to
  (``_REWRITES``), an op torch composes of others met undecomposed as those, and
  ``max_unpool`` through torch's decomposition (``_DECOMPOSED``);
  ``as_strided_scatter``: every writer of a place, and the input's own element;
- any other op: every output element depends on every input element of its arguments
  (dense, conservative); the pattern is then marked ``exact=False`` and the op named.

For Hessians each tensor also carries the set of input pairs that may interact
non-linearly upstream of it (a global set per tensor, as SparseConnectivityTracer's
global Hessian tracer): linear ops pass the union on, a product adds the pairs of its
operands' dependencies, other non-linear ops all pairs of their output's dependencies.
The result is a superset of the true Hessian pattern.

Detection can take long (every op of a long Python loop goes through the tracer, and
probing computes dense derivatives), so both take the caller's ``check_alive`` (a
request's deadline and cancel check): the tracer calls it as ops go by, at most every
few milliseconds, probing between points. What it raises propagates unchanged (never
turned into a :class:`TraceError`, so no probing starts after a deadline), and nothing
is returned, so nothing partial is cached.

Most patterns depend on shapes alone, so one detection serves every point of those
shapes. Some depend on the input values, and the tracer says so
(``Pattern.value_dependent``, with the reason in ``notes``) when the function:

- converts a traced value to Python (``if x.sum() > 0``, ``.item()``, ``bool(...)``, ``.tolist()``),
- indexes, gathers or scatters with indices or masks computed from traced values
  (``x[x > 0]``, ``x[torch.argsort(x)]``) or taken from a non-differentiated input
  (``x[idx]``); a gather of what depends on no input (a table the function holds, at
  indices computed from ``x``: an interpolation) moves no dependency, and reads nothing,
  and an integer index fixes its output's shape whatever its values,
- runs an op whose output's shape depends on values (``nonzero``, ``unique``),
- contracts with an operand that does not depend on the differentiated inputs but
  varies with the inputs (a non-differentiated input ``A @ x``) and has zeros here:
  those zeros are structural here only.

A function that reads a traced tensor's text (``str(x)``: the value's text; jacrev's
tensors print otherwise, ``TEXT_NOTE``), or whose traced run computes other values than
the request's forward pass (a branch on ``type(x)``, ``DIVERGED_NOTE``), or that reads
its tensors' type (``type(x)``, ``x.__class__``, functorch's queries, ``grad_fn``,
``is_leaf``: ``TYPE_NOTE``, see
:mod:`.type_reads`), gets a pattern checked against its products at every request
(:func:`checked`).

Non-differentiated inputs are traced too, with no dependencies, so that reading their
values is seen. Masks and indices computed from traced values are traced as well (with
no dependencies): using one in ``torch.where`` or ``masked_fill`` is structural (both
branches are kept) and reads nothing.

Random ops (every op that draws is tagged ``nondeterministic_seeded``: ``randint``,
``randperm``, ``rand_like``, ``bernoulli``, ``dropout``, ...) are noted: indices or masks
drawn at random make the pattern one draw's, so such a pattern is ``value_dependent``
and says so (``RANDOM_NOTE``); the caller never reuses it (see :mod:`.draws`).

Ops inside a custom ``autograd.Function``'s forward say nothing of its derivative (its
backward defines it, and the forward runs under no_grad): every output of the Function
depends on every element of its inputs (``exact=False``, a note names it).

Values computed under ``torch.no_grad`` carry no dependencies (the service never
differentiates through them); a tensor written in place under ``torch.no_grad`` keeps
the dependencies it had (autograd does not see the write: ``x`` stays the leaf).

Float tensors the function makes from nothing (``torch.zeros(n)``, ``torch.full``) are
traced too, as constants with no dependencies, so that assembling into one in place
(``R.index_add_(0, elements, contributions)``, ``R[1:-1] += v``) is traced; reading a
constant's values (a branch on it, its zeros in a product) reads nothing of the inputs.
One the function keeps past its trace (a cached helper) is a plain tensor from then on.

When tracing cannot run the function (it calls
``.numpy()``, writes traced values into a tensor made elsewhere, ...), :func:`probe` unions the
nonzeros of dense derivatives at random points instead, and says so (``source="probe"``:
it can miss entries that vanish at every probed point).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import exception_text
from .adjoints import ADJOINTS, adjoint
from .type_reads import TypeWatch
from .patterns import CHOICE_NOTE, Pattern, PatternTooLarge, check_entries as _check_entries, check_input_entries, check_product, entry_limit

__all__ = ["CUSTOM_NOTE", "DIVERGED_NOTE", "NO_GRAD_NOTE", "RANDOM_NOTE", "SEEDED_NOTE", "TEXT_NOTE", "TYPE_NOTE", "VALUES_NOTE", "PatternTooLarge", "TraceError", "checked", "entry_limit", "is_random", "probe", "random_note", "trace_hessian", "trace_jacobian"]

aten = torch.ops.aten


class TraceError(RuntimeError):
    """The tracer cannot follow this function (the caller then probes)."""


#: The tracer calls ``check_alive`` at most this often: one ``time.monotonic()`` per op
#: otherwise (tens of nanoseconds against the tens of microseconds an op takes to trace).
_CHECK_EVERY_S = 0.005


def _op(func: Any) -> str:
    return func.overloadpacket.__name__


# Ops that move or copy elements without computing new values: run on label tensors.
_MOVEMENT = frozenset(
    """view _unsafe_view reshape _reshape_alias expand permute transpose t squeeze unsqueeze
    slice select narrow as_strided diagonal unfold split split_with_sizes unbind chunk
    tensor_split flip roll repeat cat stack index_select gather index constant_pad_nd take
    masked_select slice_scatter select_scatter diagonal_scatter as_strided_scatter tril triu
    diag_embed diag movedim tile narrow_copy expand_copy view_copy permute_copy
    unsqueeze_copy squeeze_copy transpose_copy slice_copy select_copy t_copy alias_copy
    reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d pixel_shuffle pixel_unshuffle channel_shuffle embedding
    masked_scatter unfold_copy _unsafe_index repeat_interleave hstack vstack
    upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d im2col
    diagonal_copy rot90 block_diag unsafe_split unsafe_split_with_sizes unsafe_chunk split_copy
    split_with_sizes_copy unbind_copy select_backward slice_backward diagonal_backward""".split()
)
# Ops whose derivative follows a choice the values make (a side of a clamp, the larger of
# two, a max's element, a sort's order): the tracer keeps every choice's entries, so at a
# point some stored entries are zeros (Pattern.conservative says so). ``where`` and
# ``masked_fill`` choose only where their condition is computed (a constant's is structure).
_CHOICES = frozenset(
    """clamp clamp_min clamp_max clip hardtanh relu relu6 threshold maximum minimum fmax fmin max min
    hardsigmoid hardswish amax amin median nanmedian sort topk kthvalue mode cummax cummin
    max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool2d adaptive_max_pool3d aminmax
    _prelu_kernel renorm nan_to_num""".split()
)
# Reductions whose ``reduce`` argument may choose by the values: a scatter's or index's
# amax / amin, a segment's max / min (every candidate is in the pattern, as for amax).
_REDUCE_CHOICES = {"scatter_reduce": ("amax", "amin"), "index_reduce": ("amax", "amin"), "segment_reduce": ("max", "min")}
# Pointwise ops whose derivative is zero everywhere it exists, for real arguments: the
# sgn of a complex z is z / |z|, whose derivative is not (_zero_derivative).
_ZERO_DERIVATIVE = frozenset("floor ceil round trunc sign sgn fix".split())
# Outputs that never depend on the values of their tensor arguments.
_NO_DEPS = frozenset(
    """zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros
    new_ones new_empty new_full new_empty_strided fill zero detach bernoulli
    normal uniform exponential""".split()
)


def _without_derivative() -> frozenset[str]:
    """torch.special's functions that autograd does not differentiate at all (Bessel
    and Airy functions, the orthogonal polynomials: their results require no grad, and
    jacrev's Jacobian through them is zero), found by calling each once: a pattern
    through them held entries jacrev has as zeros (bessel_j0(x) * roll(x, 1): 48 for 24,
    two products for one). Asked of torch, not listed, so that a derivative a later
    torch adds is traced again."""
    found = set()
    with torch.enable_grad(), torch.inference_mode(False):
        x = torch.ones(2, requires_grad=True)
        for name in dir(torch.special):
            fn = getattr(torch.special, name)
            if name.startswith("_") or not callable(fn) or not hasattr(torch.ops.aten, "special_" + name):
                continue
            for args in ((x,), (x, x)):  # (the polynomials take n beside x)
                try:
                    y = fn(*args)
                except Exception:
                    continue
                if isinstance(y, torch.Tensor) and y.is_floating_point() and not y.requires_grad:
                    found.add("special_" + name)
                break
    return frozenset(found)


_WITHOUT_DERIVATIVE = _without_derivative()


def _zero_derivative(name: str, traced: list[Any]) -> bool:
    """An op of _ZERO_DERIVATIVE on real arguments (sgn takes complex ones too: z / |z|,
    pointwise with a derivative, whose Jacobian came back all zeros, exact, with a 200)."""
    return name in _ZERO_DERIVATIVE and not any(a.is_complex() for a in traced)


def _exponent(e: Any) -> float | None:
    """A power's exponent where it is a plain number (a Python scalar; a 0-d tensor
    that is no traced value), else None."""
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        return float(e)
    if isinstance(e, torch.Tensor) and not isinstance(e, _Traced) and e.numel() == 1 and not e.is_complex():
        return float(e)
    return None


# Pointwise ops that are linear in every argument that carries dependencies.
_LINEAR_POINTWISE = frozenset(
    """add sub rsub neg positive where clone _to_copy copy alias lift_fresh contiguous
    masked_fill _conj real complex""".split()
)
# Piecewise-linear elementwise ops of real arguments: their second derivative is zero
# wherever they have one, and torch's double backward through them is zero everywhere
# (their derivatives are masks and signs, constants to autograd). A Hessian gains no
# pairs at them, as at a linear op: an L1 or total-variation term |x[i+1] - x[i]| beside
# x**2 took a tridiagonal Hessian pattern (3 products) where torch's is diagonal (1).
_PIECEWISE_LINEAR = frozenset(
    """abs relu hardtanh clamp clamp_min clamp_max clip threshold maximum minimum fmax fmin max min
    leaky_relu hardshrink softshrink hardsigmoid fmod remainder copysign""".split()
)
# Elementwise ops (over broadcast arguments) that aten does not tag pointwise.
_UNTAGGED_POINTWISE = frozenset(
    """complex polar _prelu_kernel log_sigmoid_forward hardswish elu_backward softplus_backward
    hardtanh_backward hardswish_backward hardsigmoid_backward leaky_relu_backward mish_backward
    log_sigmoid_backward softshrink_backward hardshrink_backward mse_loss_backward huber_loss_backward
    smooth_l1_loss_backward binary_cross_entropy_backward _prelu_kernel_backward""".split()
)
# Softmax's backward: an element on its line along ``dim`` of the gradient and the output.
_LINE_BACKWARD = frozenset("_softmax_backward_data _log_softmax_backward_data".split())
# Elementwise losses with a ``reduction`` (0 none: elementwise; 1 mean, 2 sum: the sum of
# the elementwise terms, linear, so the Hessian keeps each term's pairs only).
_LOSSES = frozenset(
    """mse_loss l1_loss huber_loss smooth_l1_loss soft_margin_loss binary_cross_entropy
    binary_cross_entropy_with_logits""".split()
)
# Reductions over ``dim`` (all dims when absent): linear ones pass Hessian pairs on.
_LINEAR_REDUCE = frozenset("sum mean nansum".split())
_REDUCE = _LINEAR_REDUCE | frozenset(
    """prod amax amin max min logsumexp norm linalg_vector_norm var std var_mean std_mean
    nanmean median nanmedian aminmax""".split()
)
# Same-shape ops where an element depends on its whole line along ``dim``.
_LINE = frozenset("_softmax _log_softmax _safe_softmax sort topk kthvalue mode softmax log_softmax".split())
# Running ops: an element depends on the line up to itself.
_SCAN = frozenset("cumsum cumprod logcumsumexp cummax cummin".split())
_LINEAR_SCAN = frozenset({"cumsum"})
# Pooling ops and their spatial dims (avg_pool1d and max_pool1d run as the 2-D ones).
_POOL = {"avg_pool2d": 2, "avg_pool3d": 3, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3}
# Adaptive pooling and its spatial dims (the 1-D ones run as the 2-D ones).
_ADAPTIVE = {"_adaptive_avg_pool2d": 2, "_adaptive_avg_pool3d": 3, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3}
# Interpolation (linear in its input, separable: the weights along a dim depend on that
# dim's sizes, scale and align_corners alone) and its spatial dims.
# (Antialiased ones, _upsample_bilinear2d_aa: run on a one-hot input with dims of length
# 1 beside, torch's kernel gives other weights than on the real shape, so not here.)
_INTERPOLATE = {"upsample_linear1d": 1, "upsample_bilinear2d": 2, "upsample_bicubic2d": 2, "upsample_trilinear3d": 3,
                "_upsample_bilinear2d_aa": 2, "_upsample_bicubic2d_aa": 2}
# Antialiased modes are separable too, but their kernel's support along one dim changes
# when the other dims are squeezed to 1: their one-hot inputs keep the real sizes.
_ANTIALIASED = frozenset({"_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"})
# FFTs: an element depends on every element of its line over the transformed dims
# (``dim``), none across them; linear.
_FFT = frozenset("_fft_r2c _fft_c2r _fft_c2c".split())
# Normalization layers (see _Tracer.normalize).
_NORMS = frozenset("native_layer_norm native_group_norm native_batch_norm".split())
# Input places per call of an interpolation kernel on one-hot inputs (see interpolate).
_ONE_HOT_BLOCK = 256
# Linear solves with a matrix (or its factors): see _Tracer.solve.
_SOLVES = frozenset("_linalg_solve_ex linalg_solve_triangular linalg_lu_solve cholesky_solve".split())
_MATMUL = frozenset("mm bmm mv dot vdot addmm addmv baddbmm addr _sparse_addmm".split())  # the last: torch.sparse.mm
def _lstsq(named: dict[str, Any], outs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """``linalg.lstsq(A, B)``: torch differentiates its solution as ``pinv(A) @ B`` (its
    backward computes ``pinv(A)``), residuals as ``|A X - B|^2`` per column, singular
    values as ``svdvals(A)``; the rank is an integer."""
    a, b = named["self"], named["b"]
    vector = b.dim() == a.dim() - 1
    x = torch.linalg.pinv(a) @ (b.unsqueeze(-1) if vector else b)
    residuals = ((a @ x - (b.unsqueeze(-1) if vector else b)) ** 2).sum(-2) if outs[1].numel() else None
    return (x.squeeze(-1) if vector else x, residuals, None, torch.linalg.svdvals(a) if outs[3].numel() else None)


# Ops traced through torch's own decomposition (torch._decomp), where it computes what
# the op's backward differentiates: max_unpool places each value where its index says
# (a scatter), as its backward gathers the gradient from there.
_DECOMPOSED = frozenset("max_unpool2d max_unpool3d affine_grid_generator".split())

def _reflect(a: torch.Tensor, tau: torch.Tensor, c: torch.Tensor, left: bool = True, transpose: bool = False) -> torch.Tensor:
    """``Q C`` (``Q^H C``, ``C Q``, ``C Q^H``), ``Q = H_1 ... H_k`` the Householder
    reflectors ``H_i = I - tau_i v_i v_i^H`` that ``a`` holds below its diagonal (``v_i``:
    zeros above ``i``, 1 at ``i``, ``a[i+1:, i]`` below), applied one at a time as
    LAPACK's ``orgqr`` / ``ormqr`` do (each reflector one rank-one update)."""
    k = tau.shape[-1]
    batch = a.shape[:-2]
    steps = range(k) if left == transpose else reversed(range(k))  # the reflector applied first
    for i in steps:
        v = torch.cat([a.new_zeros(*batch, i), a.new_ones(*batch, 1), a[..., i + 1 :, i]], -1)
        t = (tau[..., i].conj() if transpose else tau[..., i])[..., None, None]
        if left:
            c = c - t * v[..., :, None] * (v.conj()[..., None, :] @ c)
        else:
            c = c - t * (c @ v[..., :, None]) * v.conj()[..., None, :]
    return c


def _segment_reduce(named: dict[str, Any], outs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """``segment_reduce(data, reduce, lengths or offsets, axis)``: each output element
    the reduction of its segment's elements along ``axis`` (segments per leading index:
    ``lengths`` has ``data``'s leading dims, then one per segment), as a ``scatter_reduce``
    of each element to its segment. An empty segment reads nothing (its ``initial`` is
    a constant)."""
    data, axis = named["data"], int(named.get("axis", 0)) % max(named["data"].dim(), 1)
    lengths = named.get("lengths")
    if lengths is None:
        offsets = named["offsets"]
        lengths = offsets[..., 1:] - offsets[..., :-1]
    lead, size, rest = data.shape[:axis], data.shape[axis], data.shape[axis + 1 :]
    segments = lengths.shape[-1]
    flat = data.reshape(-1, size, *rest).reshape(-1, *rest)  # (leading x size, rest)
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.reshape(-1).long())
    ids = ids.reshape(-1, *(1,) * len(rest)).expand(flat.shape)
    target = torch.zeros(lengths.numel(), *rest, dtype=data.dtype)
    how = {"max": "amax", "min": "amin"}.get(named["reduce"], named["reduce"])
    out = target.scatter_reduce(0, ids, flat, how, include_self=False)  # (index_reduce warns: beta)
    return (out.reshape(*lead, segments, *rest),)


# Ops traced as the ops they amount to (see _Tracer.rewritten): each was an unknown op,
# every output on every input (a triangular solve of a banded system made it dense).
# Each takes the op's named arguments and its outputs, and gives one result per output.
_REWRITES: dict[str, Callable[[dict[str, Any], Sequence[torch.Tensor]], tuple[Any, ...]]] = {
    # M + sum over the batch of b1[i] @ b2[i] (beta 0: M is not read)
    "addbmm": lambda n, outs: ((n["batch1"] @ n["batch2"]).sum(0) * n.get("alpha", 1)
                               + (n["self"] * n.get("beta", 1) if n.get("beta", 1) != 0 else 0),),
    # the deprecated torch.triangular_solve(b, A): (A^-1 b or A^-T b, a copy of A)
    "triangular_solve": lambda n, outs: (
        torch.linalg.solve_triangular(n["A"].mT if n.get("transpose", False) else n["A"], n["self"],
                                      upper=bool(n.get("upper", True)) != bool(n.get("transpose", False)),
                                      unitriangular=bool(n.get("unitriangular", False))),
        n["A"].clone()),
    "linalg_lstsq": _lstsq,
    # Q's first n columns (orgqr), and Q or Q^H applied to C from either side (ormqr): each
    # a batch's own, and ormqr's column (row) of C its own column (row) of the answer
    "linalg_householder_product": lambda n, outs: (
        _reflect(n["input"], n["tau"], torch.eye(n["input"].shape[-2], n["input"].shape[-1], dtype=outs[0].dtype)
                 .expand(outs[0].shape)),),
    "segment_reduce": _segment_reduce,
    "ormqr": lambda n, outs: (_reflect(n["self"], n["input2"], n["input3"], bool(n.get("left", True)),
                                       bool(n.get("transpose", False))),),
}


# Functions of each matrix of a batch (the last two dims): det, inverse, eigen and
# singular values, factorizations (see _Tracer.matrices). A finite-element energy takes
# det or the inverse of each element's deformation gradient: they were unknown ops, every
# element coupled to every other.
_MATRIX_FUNCTIONS = frozenset(
    """_linalg_det _linalg_slogdet linalg_inv_ex _linalg_eigh _linalg_svd linalg_cholesky_ex linalg_qr
    linalg_matrix_exp linalg_pinv linalg_lu_factor_ex linalg_lu linalg_eig linalg_ldl_factor_ex cholesky_inverse
    geqrf cholesky lu_unpack""".split()
)
# Writes of elements of ``src`` (or a fill value) into ``self`` at places an index
# tensor names along ``dim``: how finite-element residuals and graph operators are
# assembled (element contributions index_add-ed into global nodes).
_SCATTER = frozenset("index_add index_reduce scatter_add scatter_reduce scatter index_copy index_fill put".split())


def _per_dim(v: Any, dims: int) -> list[int]:
    """A pooling argument (an int, or a list of one or ``dims`` ints) per spatial dim."""
    v = [int(v)] if isinstance(v, int) else [int(i) for i in v]
    return v * dims if len(v) == 1 else v


def _is_sparse(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout != torch.strided


def _sparse_ones(t: torch.Tensor) -> Any:
    """The stored nonzeros of a 2-D sparse tensor (any sparse layout) as a scipy CSR of
    ones; None for one that is not a plain matrix (batched, hybrid)."""
    if t.dim() != 2 or t.dense_dim() != 0:
        return None
    with torch.no_grad():
        coo = (t if t.layout == torch.sparse_coo else t.to_sparse_coo()).coalesce()
        idx = coo.indices().cpu().numpy()
        keep = (coo.values() != 0).cpu().numpy()
    return sp.csr_array((np.ones(int(keep.sum()), np.float32), (idx[0][keep], idx[1][keep])), shape=tuple(t.shape))


def _ones(m: Any) -> Any:
    """Structure only: every stored value 1 (sums of counts must not overflow)."""
    if getattr(m, "_structure", False):  # made here already (and never changed in place)
        return m
    m = sp.csr_array(m)
    m.sum_duplicates()
    m.eliminate_zeros()  # stored zeros (sp.kron keeps its blocks' zeros) are no dependency
    m.data = np.ones(m.data.size, np.float32)
    m._structure = True
    return m


def _rows_of(deps: Any, src: np.ndarray) -> Any:
    """Rows ``src`` (all valid) of ``deps``: where ``deps`` is a structure (:func:`_ones`'s),
    so are they (each row copied whole: sorted, no duplicates, ones), and marked so without
    the three passes over their entries that :func:`_ones` makes (~1/5 of a large trace's
    time, where a 10^6-element lorenz96 is refused after its work limit)."""
    rows = deps[src]
    if not getattr(deps, "_structure", False):
        return _ones(rows)
    rows.has_canonical_format = True
    rows._structure = True
    return rows


def _empty(rows: int, cols: int) -> Any:
    return sp.csr_array((rows, cols), dtype=np.float32)


def _product(left: Any, right: Any, what: str) -> Any:
    """``left @ right`` as a structure (:func:`_ones`), its steps counted as detection
    work before it runs (:func:`.patterns.check_product`)."""
    check_product(left, right, what)
    return _ones(left @ right)


def _select(deps: Any, src: np.ndarray) -> Any:
    """Rows ``src`` of ``deps``; ``-1`` gives an empty row. Counted before they are
    gathered: a row repeated (``x / x.sum()`` broadcasts the sum's row to every element)
    could otherwise build far more entries than the limit before any check."""
    valid = src >= 0
    _check_entries(int(np.diff(deps.indptr)[src[valid]].sum()), "a traced tensor")
    if valid.all():
        return _rows_of(deps, src) if src.size else _empty(0, deps.shape[1])
    idx = np.flatnonzero(valid)
    s = sp.csr_array((np.ones(idx.size, np.float32), (idx, src[valid])), shape=(src.size, deps.shape[0]))
    return _product(s, deps, "a traced tensor")


def _union(mats: Sequence[Any], rows: int, cols: int) -> Any:
    # (from the first matrix, not from an empty one: adding that copied every unary op's
    # entries once more, a sparse addition of its whole pattern)
    if not mats:
        return _empty(rows, cols)
    if mats[0].shape != (rows, cols):
        raise ValueError(f"a union of {rows} x {cols} patterns got one of {mats[0].shape}")
    out = mats[0]
    for m in mats[1:]:
        out = out + m
    if len(mats) > 1 and all(getattr(m, "_structure", False) for m in mats):
        # A sum of structures: scipy adds canonical matrices into a canonical one with no
        # stored zeros (its entries are 2 where both hold one), so only the values are reset
        out.has_canonical_format = True
        out.data = np.ones(out.data.size, np.float32)
        out._structure = True
        return out
    return _ones(out)


class _Root:
    """What a tensor and all its views share: per-element deps and Hessian pairs."""

    def __init__(self, value: torch.Tensor, deps: Any, hess: Any = None, const: bool = False) -> None:
        self.value = value
        self.deps = deps
        self.hess = hess
        # Made by the function from nothing traced (``torch.zeros(n)``) and since computed
        # or written from such tensors only: its values are the same at every point, so
        # reading them says nothing about the inputs' values.
        self.const = const
        self._labels: torch.Tensor | None = None

    def labels(self) -> torch.Tensor:
        """A float64 storage shaped like this root's, holding 1 + the C-order index of
        each root element at its place (0 elsewhere): viewing it with any view's sizes,
        strides and offset labels that view's elements."""
        if self._labels is None:
            v = self.value
            slots = v.untyped_storage().nbytes() // max(v.element_size(), 1)
            store = torch.zeros(slots, dtype=torch.float64, device=v.device)
            ids = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device).reshape(v.shape)
            store.as_strided(v.shape, v.stride(), v.storage_offset()).copy_(ids)
            self._labels = store
        return self._labels


class _Traced(torch.Tensor):
    """A tensor that carries the input elements each of its elements depends on."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    value: torch.Tensor
    root: _Root
    tracer: "_Tracer"

    @staticmethod
    def __new__(cls, value: torch.Tensor, root: _Root, tracer: "_Tracer") -> "_Traced":
        r = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, value.shape, strides=value.stride(), storage_offset=value.storage_offset(),
            dtype=value.dtype, device=value.device, requires_grad=False,
        )
        # The wrapper's own storage has no data (a null pointer): code that reads it
        # below dispatch (a DLPack export, ``torch.utils.dlpack.to_dlpack``) handed the
        # null on and crashed the engine (SIGSEGV) where jacrev raises. Now it raises.
        torch._C._set_throw_on_mutable_data_ptr(r)
        r.value, r.root, r.tracer = value, root, tracer
        return r

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        """The value's text (``str``, ``repr``, ``format``, an f-string go through here).
        Text is the values: a function that branches on it (``'nan' in str(x)``) follows
        them, and under jacrev its tensors print otherwise (``GradTrackingTensor(lvl=1,
        value=...)``). A placeholder here took another branch than jacrev's and kept its
        pattern, exact and unchecked (a wrong 200). Now the read is noted: the pattern is
        checked against the products at every request (``TEXT_NOTE``), which catches a
        branch the text takes otherwise at any point; not made this point's only, so a
        function that merely prints its input is not detected anew at every point."""
        if not self._plain():
            self.tracer.text = True
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # never print through dispatch, nor the tracer's mode
            return repr(self.value)

    def _plain(self) -> bool:
        """A constant (made by the function from nothing), or kept past its trace: its
        values are the same at every point, so reading them out is no value read."""
        return self.root.const or self.tracer.done

    def numpy(self, *args: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        # (np.asarray goes through here too; jacrev's tensors have no storage to give)
        return self.value.numpy(*args, **kwargs) if self._plain() else super().numpy(*args, **kwargs)

    def tolist(self) -> Any:  # type: ignore[override]
        """The values, as under jacrev (whose tensors give theirs, constants to its
        derivative, as ``item()`` does): a value read. torch refuses ``tolist`` of a
        subclass, which failed the trace, and every request of a function that loops over
        ``x.argsort().tolist()`` was probed (dense derivatives at random points)."""
        if not self._plain():
            self.tracer.reads("tolist: a traced value converted to Python")
        return self.value.tolist()

    def untyped_storage(self) -> Any:  # type: ignore[override]
        """The storage is the value's, which the trace does not follow: reading or
        writing through it (``share_memory_``, ``set_(t.untyped_storage())``,
        ``storage()``) fails the trace, as ``jacrev`` fails there ('Cannot access
        storage of TensorWrapper'). The wrapper's own, with no data, crashed the engine
        (SIGSEGV: three such requests quarantined the function, its ``/evaluate`` too).
        Kept past its trace, the tensor is a plain constant: its value's storage."""
        if self.tracer.done:
            return self.value.untyped_storage()
        raise TraceError("untyped_storage: a traced tensor's storage (share_memory_, set_, storage()) is not traced")

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        """What the same tensor says under jacrev: True when computed from the
        differentiated inputs (not under no_grad), False for constants and the other
        inputs. A function that branches on it (``x ** 2 if x.requires_grad else ...``)
        must take jacrev's branch while traced, or the pattern is another branch's.
        Python reads only: autograd (C++) still sees a tensor that records nothing."""
        return self.root.deps.nnz > 0

    @property
    def grad_fn(self) -> Any:  # type: ignore[override]
        """None, as the tracer records no graph; under jacrev a computed tensor has its
        node (``MulBackward0``), so a branch on it (``y.grad_fn is not None``) took
        another arm here than there, with the same values: the read is noted and the
        pattern checked (see :mod:`.type_reads`)."""
        if not self._plain():
            self.tracer.watch.autograd("grad_fn", sys._getframe(1).f_code)
        return None

    @property
    def is_leaf(self) -> bool:  # type: ignore[override]
        """jacrev's answer where it can be told (what depends on no differentiated input
        is a leaf, what does is not, but for the inputs themselves), noted as
        ``grad_fn`` is: an input written in place is no leaf there."""
        if not self._plain():
            self.tracer.watch.autograd("is_leaf", sys._getframe(1).f_code)
        return not self.requires_grad or id(self) in self.tracer.inputs

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        traced = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)]
        live = [a for a in traced if not a.tracer.done]
        if len(live) < len(traced):
            # Kept by the function past its trace (a buffer it caches: ``functools.cache``
            # on a helper that builds a matrix from ``torch.zeros``): a plain constant now.
            first = args[0] if args else None
            args, kwargs = pytree.tree_map(lambda a: a.value if isinstance(a, _Traced) and a.tracer.done else a, (args, kwargs))
            if not live:
                out = func(*args, **kwargs)
                return first if isinstance(first, _Traced) and _writes_first(func) else out
        return live[0].tracer.dispatch(func, args, kwargs, live)


#: What a traced tensor has otherwise than jacrev's, read by name (``getattr(x, "value",
#: x)``, ``x.__dict__``, ``x.__torch_dispatch__``): its own attributes and the class's, but
#: those that answer as jacrev's tensors do or note the read themselves.
_OWN_ATTRIBUTES = frozenset(set(vars(_Traced)) | set(_Traced.__annotations__) | {"__dict__", "__module__"}) - {
    "__new__", "__repr__", "__doc__", "numpy", "tolist", "untyped_storage", "requires_grad", "grad_fn", "is_leaf"}


class _Tracer:
    def __init__(self, n_inputs: int, hessian: bool, check_alive: Callable[[], None] | None = None) -> None:
        self.n = n_inputs
        self.hessian = hessian
        self.unknown: set[str] = set()
        self.no_grad = False  # the function computes from traced values under no_grad
        self.custom: set[str] = set()  # custom autograd.Functions met (their backward is not traced)
        # Why the pattern depends on the input values (empty: on shapes alone).
        self.value_reads: list[str] = []
        # The function read a traced tensor's text (str, repr): see _Traced.__repr__.
        self.text = False
        # The traced run's output differs from a plain call's (see _diverged).
        self.diverged = False
        # Where the function read its tensors' type (type(x), x.__class__, functorch's
        # state), which jacrev's tensors answer otherwise (see type_reads).
        self.type_reads: list[str] = []
        self.watch = TypeWatch(_OWN_ATTRIBUTES)
        self.inputs: set[int] = set()  # ids of the differentiated inputs (see _Traced.is_leaf)
        # Random ops met (every op that draws is tagged, whatever the generator): the
        # pattern may follow the draws (indices from randint), which differ per call.
        self.random: set[str] = set()
        # Random ops drawing from a torch.Generator freshly seeded when first used here
        # (``g = torch.Generator().manual_seed(0)`` in the function): the same draws at
        # every call, so the pattern may be reused; it is checked all the same.
        self.seeded: set[str] = set()
        self._fresh_generators: set[tuple[str, int]] = set()
        # Known ops taken as dense all the same (their note says why; exact: false).
        self.densified: set[str] = set()
        # Ops that chose by the values (see _CHOICES): the pattern is their union.
        self.choices: set[str] = set()
        self.check_alive = check_alive
        self._next_check = 0.0
        # What check_alive raised: the trace re-raises it even if the user's function
        # caught it, or failed in another way on its way out.
        self.stopped: BaseException | None = None
        self.done = False  # the trace is over: tensors the function kept are plain constants
        # Floating dtypes of the values ops computed from the inputs: a float64 function
        # computing in float32 inside (see _coarse).
        self.arithmetic: set[torch.dtype] = set()
        self.coarse: torch.dtype | None = None  # (set by _trace: see _coarse)

    def alive(self) -> None:
        """The caller's ``check_alive``, at most every ``_CHECK_EVERY_S``."""
        if self.check_alive is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + _CHECK_EVERY_S
        try:
            self.check_alive()
        except BaseException as exc:
            self.stopped = exc
            raise

    # ------------------------------------------------------------------ helpers
    def seeded_here(self, args: Any, kwargs: dict[str, Any]) -> bool:
        """Whether a random op draws from a ``torch.Generator`` passed to it that was
        freshly seeded (its state is that of ``manual_seed(initial_seed())``) when this
        trace first used it: one the function makes and seeds at every call. (A
        generator kept across calls has moved on by then: the caller's forward pass
        ran the function before the trace.) The default generator: never."""
        gens = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Generator)]
        if not gens:
            return False
        for g in gens:
            # (each dispatch wraps the generator anew: it is known by its device and seed)
            key = (str(g.device), g.initial_seed())
            if key in self._fresh_generators:
                continue
            fresh = torch.Generator(device=g.device).manual_seed(g.initial_seed())
            if not torch.equal(g.get_state(), fresh.get_state()):
                return False
            self._fresh_generators.add(key)
        return True

    def reads(self, why: str) -> None:
        """The pattern depends on the inputs' values: say why (the first few reasons)."""
        if len(self.value_reads) < 4 and why not in self.value_reads:
            self.value_reads.append(why)

    def chose(self, name: str, args: Any, traced: Sequence[_Traced], kwargs: dict[str, Any] | None = None) -> None:
        """Note an op whose derivative follows a choice the values make (``_CHOICES``;
        ``where`` and ``masked_fill`` on a condition that is not a constant; a max or
        min ``_REDUCE_CHOICES``), applied to values that depend on the inputs while grad
        is on."""
        if name in _REDUCE_CHOICES:
            # (its reduce is its one string argument; a sum or prod reads every element)
            reduce = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, str)), None)
            if reduce not in _REDUCE_CHOICES[name]:
                return
        elif name not in _CHOICES and name not in ("where", "masked_fill"):
            return
        if not torch.is_grad_enabled() or not any(_float(t) and t.root.deps.nnz for t in traced):
            return
        if name in ("where", "masked_fill"):
            cond = args[0] if name == "where" else args[1] if len(args) > 1 else None
            if not isinstance(cond, _Traced) or cond.root.const:
                return  # a condition the function holds or made: the same at every point, structure
        self.choices.add(name)

    def chose_by_values(self, name: str, traced: Sequence[_Traced]) -> None:
        """Note ``name`` among the choices (see :meth:`chose`) where its argument's
        values pick (``dist`` with ``p=inf``; a max ``embedding_bag``)."""
        if torch.is_grad_enabled() and any(_float(t) and t.root.deps.nnz for t in traced):
            self.choices.add(name)

    def valued(self, o: torch.Tensor) -> _Traced:
        """A non-float result computed from traced values (a mask, indices, a count):
        traced with no dependencies, so that what later reads its values is seen."""
        return _Traced(o, _Root(o, _empty(o.numel(), self.n)), self)

    def labels(self, t: _Traced) -> torch.Tensor:
        v = t.value
        return t.root.labels().as_strided(v.shape, v.stride(), v.storage_offset())

    def deps(self, t: Any, shape: Sequence[int] | None = None) -> Any:
        """Deps of ``t``'s elements in C order (broadcast to ``shape`` when given)."""
        if not isinstance(t, _Traced):
            numel = math.prod(shape) if shape is not None else (t.numel() if isinstance(t, torch.Tensor) else 1)
            return _empty(numel, self.n)
        if t.root.deps.nnz == 0:
            return _empty(math.prod(shape) if shape is not None else t.numel(), self.n)
        if t.value is t.root.value and (shape is None or tuple(shape) == tuple(t.shape)):
            return t.root.deps
        lab = self.labels(t)
        if shape is not None and tuple(shape) != tuple(lab.shape):
            lab = torch.broadcast_to(lab, tuple(shape))
        return _select(t.root.deps, lab.reshape(-1).cpu().numpy().astype(np.int64) - 1)

    def hess_of(self, ts: Sequence[Any]) -> Any:
        roots = {id(t.root): t.root for t in ts if isinstance(t, _Traced)}
        mats = [r.hess for r in roots.values() if r.hess is not None]
        return _union(mats, self.n, self.n) if mats else None

    def pairs(self, g: Any, h: Any | None = None) -> Any:
        """Input pairs (a, b) with a in g's row and b in h's row for some element."""
        h = g if h is None else h
        g, h = sp.csr_array(g), sp.csr_array(h)
        # g.T @ h has at most sum over rows of (g's count x h's count) entries
        _check_entries(int((np.diff(g.indptr).astype(np.int64) * np.diff(h.indptr)).sum()), "Hessian pairs")
        cross = _ones(g.T @ h)
        return _ones(cross + cross.T)

    def wrap(self, value: torch.Tensor, deps: Any, hess: Any = None, checked: bool = True) -> _Traced:
        if checked:  # (an input's identity is bounded apart: check_input_entries)
            _check_entries(int(deps.nnz), "a traced tensor")
        if hess is not None:
            _check_entries(int(hess.nnz), "the Hessian pattern")
        return _Traced(value, _Root(value, _ones(deps), hess if self.hessian else None), self)

    def input(self, value: torch.Tensor, deps: Any) -> _Traced:
        """A differentiated input: a leaf to jacrev (``_Traced.is_leaf``)."""
        t = self.wrap(value, deps, None, checked=False)
        self.inputs.add(id(t))  # (the tensor itself: a view of it is no leaf)
        return t

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any], traced: Sequence[_Traced]) -> Any:
        """``func`` on ``args``, ``traced`` being the traced tensors among them."""
        self.alive()
        if _out_arguments(func):
            return self.into(func, args, kwargs)
        if _op(func) in _LAYOUT_INPLACE and args and isinstance(args[0], _Traced):
            return self.relayout(func, args, kwargs)
        if all(t.root.const for t in traced):
            return self.constant(func, args, kwargs, traced)
        unwrapped_args, unwrapped_kwargs = _unwrapped(func, args, kwargs)
        out = func(*unwrapped_args, **unwrapped_kwargs)
        name = _op(func)
        if torch.is_grad_enabled() and any(t.root.deps.nnz for t in traced):  # (a cast too: jacrev's VJP rounds its cotangent there)
            self.arithmetic.update(o.dtype for o in pytree.tree_leaves(out) if _float(o))
        mutated = _writes_first(func)
        if mutated and isinstance(args[0], _Traced):  # written from traced values: no longer the same at every point
            args[0].root.const = False
        custom = _custom_function()
        if custom is None and not _reads_nothing(pytree.tree_leaves(out), traced):
            self.chose(name[:-1] if name.endswith("_") else name, args, traced, kwargs)
        if custom is not None:
            result = self.opaque(custom, func, args, kwargs, out, mutated)
        elif mutated:
            return self.inplace(func, name, args, kwargs, out)
        else:
            result = self.rules(func, name, args, kwargs, out)
        if isinstance(result, _Traced):  # the usual case, one float result: nothing more to do
            return result
        # Indices and masks beside float results (sort, max(dim), topk): traced as values.
        leaves, spec = pytree.tree_flatten(result)
        leaves = [self.valued(o) if isinstance(o, torch.Tensor) and not isinstance(o, _Traced) else o for o in leaves]
        return pytree.tree_unflatten(leaves, spec)

    def rules(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Wrap ``out`` (a tensor or a tuple/list of them) with its dependencies."""
        if name == "_linalg_check_errors":
            # linalg.solve's check of info (a singular matrix): it raises or passes, the
            # pattern is the same either way, so no value read (a varying A's info varies)
            return out
        leaves, spec = pytree.tree_flatten(out)
        traced = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)]
        if not any(_float(o) for o in leaves):  # indices, masks, Python scalars: no derivative
            # Traced as values: only what then reads them (an index, a branch) matters,
            # but a Python value or an output shape is read here and now.
            if not all(isinstance(o, torch.Tensor) for o in leaves) or _tagged(func, torch.Tag.data_dependent_output):
                self.reads(f"{name}: a traced value converted to Python")
            elif _tagged(func, torch.Tag.dynamic_output_shape) and _shape_from_values(name, traced):
                self.reads(f"{name}: an output shape that depends on values")
            return pytree.tree_unflatten([self.valued(o) if isinstance(o, torch.Tensor) else o for o in leaves], spec)
        if _tagged(func, torch.Tag.dynamic_output_shape) and _shape_from_values(name, traced):
            self.reads(f"{name}: an output shape that depends on values")
        if not torch.is_grad_enabled():
            self.no_grad = True
        if _reads_nothing(leaves, traced):
            wrapped = [self.wrap(o, _empty(o.numel(), self.n)) if _float(o) else o for o in leaves]
            return pytree.tree_unflatten(wrapped, spec)
        if name == "fill" and _fill_value(args) is not None and torch.is_grad_enabled():
            return self.filled(_fill_value(args), out)
        if name in _NO_DEPS or name in _WITHOUT_DERIVATIVE or _zero_derivative(name, traced) or not torch.is_grad_enabled():
            wrapped = [self.wrap(o, _empty(o.numel(), self.n)) if _float(o) else o for o in leaves]
            return pytree.tree_unflatten(wrapped, spec)
        if name == "as_strided_scatter" and _float(out):
            return self.strided_scatter(func, args, kwargs, out)
        if name in _MOVEMENT:
            return self.movement(func, args, kwargs, out)
        if name in ("index_put", "_unsafe_index_put"):  # (the latter: torch's decompositions write with it)
            return self.index_put(args, kwargs, out)
        if name in _SCATTER:
            return self.scatter(func, name, args, kwargs, out)
        if name in ("max", "min") and func._overloadname == "other":
            return self.pointwise(name, args, kwargs, out)
        if name in _MATMUL:
            return self.matmul(name, args, kwargs, out)
        if name == "convolution" and _float(out):
            return self.convolution(func, args, kwargs, out)
        if name in _POOL:
            return self.pool(func, name, args, kwargs, out)
        if name in _ADAPTIVE:
            return self.adaptive(name, args, out)
        if name in _INTERPOLATE:
            return self.interpolate(func, name, args, kwargs, out)
        if name == "col2im":
            return self.col2im(func, args, kwargs, out)
        if name in ("view_as_real", "view_as_complex"):
            return self.complex_view(name, args[0], out)
        if name == "linalg_cross":
            return self.cross(func, args, kwargs, out)
        if name == "trace" and _float(out) and args[0].dim() == 2:
            return self.diagonal_sum(args[0], out)
        if name == "glu" and _float(out):
            return self.glu(func, args, kwargs, out)
        if name in _LOSSES and _float(out):
            return self.loss(func, name, args, kwargs, out)
        if name in _LINE_BACKWARD and _float(out):
            return self.line_backward(func, name, args, kwargs, out)
        if name in ADJOINTS:
            return self.adjoint(func, name, args, kwargs, out, traced)
        if (name == "nll_loss_forward" and args[0].dim() in (1, 2)) or (name == "nll_loss2d_forward" and args[0].dim() == 4):
            return self.nll_loss(func, args, kwargs, out)
        if name in _NORMS and isinstance(out, (tuple, list)):
            return self.normalize(func, name, args, kwargs, out)
        if name == "_cdist_forward" and _float(out):
            return self.cdist(args, out)
        if name == "_pdist_forward" and _float(out) and args[0].dim() == 2:
            return self.pdist(args, kwargs, out)
        if name == "dist" and _float(out):  # |x - y|_p: one number on every element of both
            if _exponent(args[2] if len(args) > 2 else kwargs.get("p", 2)) in (math.inf, -math.inf):
                self.chose_by_values(name, traced)  # the largest (smallest) difference's elements
            return self.whole(name, traced, out)
        if name == "renorm" and _float(out):
            return self.along(func, name, args, kwargs, out)
        if name in ("_embedding_bag", "_embedding_bag_forward_only"):
            return self.embedding_bag(args, kwargs, out)
        if name in _SOLVES:
            return self.solve(func, name, args, kwargs, out)
        if name in _REWRITES:
            return self.rewritten(func, name, args, kwargs, out)
        if name in ("grid_sampler_2d", "grid_sampler_3d") and _float(out):
            return self.grid_sample(func, args, kwargs, out)
        if name in _REDUCE or name in _LINE or name in _SCAN or name in _FFT:
            return self.along(func, name, args, kwargs, out)
        if name in _MATRIX_FUNCTIONS:
            return self.matrices(name, args, traced, out)
        if torch.Tag.pointwise in func.tags or name in _LINEAR_POINTWISE or name in _UNTAGGED_POINTWISE:
            try:
                return pytree.tree_unflatten(
                    [self.pointwise(name, args, kwargs, o) if _float(o) else o for o in leaves], spec
                )
            except PatternTooLarge:  # (a RuntimeError) the limit's own message: not an unknown op's
                raise
            except RuntimeError:  # shapes that do not broadcast elementwise (complex views)
                return self.dense(name, traced, out)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # An op torch defines by others (matmul, svdvals), met where autograd does not
            # decompose it first (called by a rule of _REWRITES): its own definition, traced.
            return self.rewrap(out, func.decompose(*args, **kwargs))
        if name in _DECOMPOSED:
            from torch._decomp import decomposition_table

            if func in decomposition_table:  # torch's own decomposition, traced op by op
                return self.rewrap(out, decomposition_table[func](*args, **kwargs))
        return self.dense(name, traced, out)

    def constant(self, func: Any, args: Any, kwargs: dict[str, Any], traced: Sequence[_Traced]) -> Any:
        """An op on constants only (a buffer the function made, and what it computed from
        it): no dependencies, and nothing it reads is a value of the inputs. Float
        results stay traced (a buffer written in place later gets dependencies); a view
        shares its base's root, so that a write through it reaches the base."""
        unwrapped_args, unwrapped_kwargs = _unwrapped(func, args, kwargs)
        out = func(*unwrapped_args, **unwrapped_kwargs)
        schema = func._schema
        if _writes_first(func) and isinstance(args[0], _Traced):
            return args[0]  # in place: same tensor, same (no) dependencies
        is_view = bool(schema.returns) and schema.returns[0].alias_info is not None
        roots = {id(t.root): t.root for t in traced}
        shared = next(iter(roots.values())) if is_view and len(roots) == 1 else None
        leaves, spec = pytree.tree_flatten(out)
        wrapped = [(_Traced(o, shared, self) if shared is not None else self.constant_tensor(o)) if _float(o) and _strided(o) else o
                   for o in leaves]
        return pytree.tree_unflatten(wrapped, spec)

    def constant_tensor(self, o: torch.Tensor) -> _Traced:
        return _Traced(o, _Root(o, _empty(o.numel(), self.n), const=True), self)

    # ------------------------------------------------------------------ rules
    def dense(self, name: str, traced: Sequence[_Traced], out: Any) -> Any:
        """Unknown op: every output element may depend on every input element."""
        self.unknown.add(name)
        # Every element on every input whatever indices or masks say: no value is read.
        traced = [t for t in traced if _float(t)]
        every = _union([sp.csr_array(np.asarray(self.deps(t).sum(axis=0)).reshape(1, -1)) for t in traced], 1, self.n)
        hess = None
        if self.hessian:
            hess = _union([m for m in (self.hess_of(traced), self.pairs(every)) if m is not None], self.n, self.n)
        leaves, spec = pytree.tree_flatten(out)
        wrapped = []
        for o in leaves:
            if _float(o):
                _check_entries(o.numel() * int(every.nnz), f"{name} (every output on every input)")
                rows = sp.csr_array(sp.kron(sp.csr_array(np.ones((o.numel(), 1), np.float32)), every))
                wrapped.append(self.wrap(o, rows, hess))
            else:
                wrapped.append(o)
        return pytree.tree_unflatten(wrapped, spec)

    def opaque(self, custom: tuple[str, list[Any]], func: Any, args: Any, kwargs: dict[str, Any], out: Any, mutated: bool) -> Any:
        """An op inside a custom ``autograd.Function``'s forward: the derivative is its
        backward's (a straight-through ``round``, a surrogate gradient, a backward that
        couples elements), which the forward's ops do not show; and the forward runs
        under no_grad, which would drop every dependency. So every output element
        depends on every element of the Function's inputs (and the op's own)."""
        name, inputs = custom
        self.custom.add(name)
        traced = inputs + [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)]
        label = f"autograd.Function {name}"
        target = args[0]
        if mutated and (not isinstance(target, _Traced) or not _float(target)):  # a plain buffer, a mask: as any write
            return self.inplace(func, _op(func), args, kwargs, out)
        result = self.dense(label, traced, target.value if mutated else out)
        self.unknown.discard(label)  # noted as a custom Function instead (and exact: False)
        if not mutated:
            return result
        self.write(target, result)
        return target

    def filled(self, value: "_Traced", o: torch.Tensor) -> _Traced:
        """``x.fill_(v)`` with ``v`` a traced 0-d tensor: every element is ``v`` (linear)."""
        return self.wrap(o, self.deps(value, tuple(o.shape)), self.hess_of([value]))

    def pointwise(self, name: str, args: Any, kwargs: dict[str, Any], o: torch.Tensor) -> _Traced:
        shape = tuple(o.shape)
        operands = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced) and a.root.deps.nnz]
        if name == "where":  # the condition carries no derivative
            operands = [a for a in operands if a.dtype != torch.bool]
        per = [self.deps(a, shape) for a in operands]
        for i, a in enumerate(operands):
            kept = self.kept(name, args, a, shape)
            if kept is not None:
                per[i] = _ones(sp.diags_array(kept.astype(np.float32)) @ per[i])
        deps = _union(per, math.prod(shape), self.n)
        hess = None
        if self.hessian:
            parts = [self.hess_of(operands)]
            first = args[0] if args else None
            linear_div = name == "div" and len(operands) == 1 and operands[0] is first
            linear_mul = name == "mul" and len(operands) == 1
            # x ** 1 is x, x ** 0 a constant: no second derivative
            linear_pow = name == "pow" and len(args) >= 2 and args[0] is first and _exponent(args[1]) in (0, 1)
            piecewise = name in _PIECEWISE_LINEAR and not any(a.is_complex() for a in operands)  # (|z| is not)
            if name in _LINEAR_POINTWISE or linear_div or linear_mul or linear_pow or piecewise:
                pass
            elif name == "mul" and len(per) == 2:
                parts.append(self.pairs(per[0], per[1]))
            else:
                parts.append(self.pairs(deps))
            parts = [p for p in parts if p is not None]
            hess = _union(parts, self.n, self.n) if parts else None
        return self.wrap(o, deps, hess)

    def kept(self, name: str, args: Any, operand: "_Traced", shape: tuple[int, ...]) -> np.ndarray | None:
        """Where ``operand`` can reach the result of ``mul``, ``where`` or ``masked_fill``
        given a constant other argument (one the function made from nothing, or a tensor
        it holds: the same values at every point, as matmul's constant zeros): not where
        it is multiplied by a constant zero, nor where a constant condition picks the
        other branch (a boundary mask: ``torch.where(interior, laplacian, u - g)``,
        ``u.masked_fill(boundary, 0)``). None: everywhere."""
        def constant(a: Any) -> bool:
            return isinstance(a, torch.Tensor) and _strided(a) and (not isinstance(a, _Traced) or a.root.const)

        def values(a: Any) -> np.ndarray:
            v = a.value if isinstance(a, _Traced) else a
            return torch.broadcast_to(v, shape).reshape(-1).cpu().numpy()

        if name == "mul" and len(args) >= 2:
            other = args[1] if args[0] is operand else args[0] if args[1] is operand else None
            if other is not None and constant(other):  # (a float, integer or bool mask)
                return values(other) != 0
        if name == "pow" and len(args) >= 2 and args[0] is operand and _exponent(args[1]) == 0:
            # x ** 0 is 1 wherever x is (torch's own gradient of x ** 1, S ** p at p = 1,
            # multiplies by S ** 0: a force -grad(sin(x[0]) * x.sum() ** 1) was dense)
            return np.zeros(math.prod(shape), bool)
        if name == "where" and len(args) >= 3 and constant(args[0]) and args[0].dtype == torch.bool:
            if args[1] is operand and args[2] is not operand:
                return values(args[0])
            if args[2] is operand and args[1] is not operand:
                return ~values(args[0])
        if name == "masked_fill" and len(args) >= 3 and constant(args[1]) and args[1].dtype == torch.bool:
            # (self where the constant mask is off, the fill value where it is on)
            if args[0] is operand and args[2] is not operand:
                return ~values(args[1])
            if args[2] is operand and args[0] is not operand:
                return values(args[1])
        return None

    def movement(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Run the op on element labels: each output element's label names its source."""
        roots: dict[int, tuple[_Root, int]] = {}
        offset = 0
        indexed_by_values = False

        def label(a: Any) -> Any:
            nonlocal offset, indexed_by_values
            if isinstance(a, _Traced) and not _float(a):  # an index or mask made from values
                indexed_by_values = True
                return a.value
            if isinstance(a, _Traced):
                if id(a.root) not in roots:
                    roots[id(a.root)] = (a.root, offset)
                    offset += a.root.value.numel()
                return self.labels(a) + roots[id(a.root)][1] * (self.labels(a) > 0)
            if _float(a):
                return torch.zeros(a.shape, dtype=torch.float64, device=a.device)  # constants: no source
            return a

        labelled_args, labelled_kwargs = pytree.tree_map(label, _unfilled(func, args, kwargs))
        try:
            labelled = func(*labelled_args, **labelled_kwargs)
        except Exception:  # e.g. an op that needs complex or integer data, not labels
            traced = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)]
            return self.dense(_op(func), traced, out)
        is_view = bool(func._schema.returns) and func._schema.returns[0].alias_info is not None
        sources = list(roots.values())
        stacked = sp.vstack([r.deps for r, _ in sources], format="csr") if sources else _empty(0, self.n)
        hess = self.hess_of([a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)])
        if indexed_by_values and (stacked.nnz or (hess is not None and hess.nnz)):
            # Which elements move follows the values only where what moves depends on the
            # inputs: a table the function holds, looked up at indices computed from x
            # (searchsorted, then fp[idx]: an interpolation), moves no dependency, and
            # its pattern holds at every point (it was detected anew at each one)
            self.reads(f"{_op(func)}: indices or masks computed from values")
        outs, spec = pytree.tree_flatten(out)
        labs = pytree.tree_leaves(labelled)
        wrapped = []
        for o, lab in zip(outs, labs):
            if not _float(o):
                wrapped.append(o)
            elif is_view and len(sources) == 1:
                wrapped.append(_Traced(o, sources[0][0], self))  # shares its root's deps
            else:
                src = lab.reshape(-1).cpu().numpy().astype(np.int64) - 1
                wrapped.append(self.wrap(o, _select(stacked, src), hess))
        return pytree.tree_unflatten(wrapped, spec)

    def rewritten(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """An op the tracer knows as other ops (``_REWRITES``): those run on the traced
        arguments (each through its own rule), and each result's dependencies go to the
        op's own output (its values stay the op's)."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        return self.rewrap(out, _REWRITES[name](named, pytree.tree_leaves(out)))

    def rewrap(self, out: Any, results: Any) -> Any:
        """``out`` with the dependencies of ``results``, traced results of the same
        structure (None for an output with nothing to depend on)."""
        outs, spec = pytree.tree_flatten(out)
        parts = pytree.tree_leaves(results, is_leaf=lambda v: v is None)
        wrapped = []
        for o, r in zip(outs, parts):
            if not _float(o):
                wrapped.append(o)
            elif isinstance(r, _Traced):
                wrapped.append(self.wrap(o, self.deps(r, tuple(o.shape)), self.hess_of([r])))
            else:  # (an empty output: no elements, nothing to depend on)
                wrapped.append(self.wrap(o, _empty(o.numel(), self.n)))
        return pytree.tree_unflatten(wrapped, spec)

    def strided_scatter(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``as_strided_scatter(x, src, size, stride, offset)``: ``x`` with the strided
        view written from ``src``. Run on labels, one writer per place survives, but a
        view that overlaps itself (stride (1, 1)) sends several ``src`` elements to one
        place, and torch's backward gives each of them its place's gradient: the losers
        were missing from an exact pattern (a wrong 200). torch's backward also gives
        ``x`` the gradient of the places written (not of the others: a formula that
        keeps the slice). So each place reads every ``src`` element written there and
        ``x``'s own element, written or not: a superset of both torch's answer and the
        derivative of the values."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x, src = named["self"], named["src"]
        size, stride = [int(v) for v in named["size"]], [int(v) for v in named["stride"]]
        offset = named.get("storage_offset")
        # Which place (C order) each src element is written to: the op's own geometry,
        # read off a tensor of place numbers laid out as its output.
        places = torch.empty_strided(tuple(out.shape), out.stride(), dtype=torch.float64)
        places.copy_(torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape))
        to = places.as_strided(size, stride, int(offset) if offset is not None else places.storage_offset())
        to = to.reshape(-1).numpy().astype(np.int64)
        _check_entries(to.size, "as_strided_scatter")
        write = sp.csr_array((np.ones(to.size, np.float32), (to, np.arange(to.size))), shape=(out.numel(), to.size))
        deps = _ones(write @ self.deps(src, size) + self.deps(x, tuple(out.shape)))
        hess = self.hess_of([x, src]) if self.hessian else None
        return self.wrap(out, deps, hess)

    def along(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Reductions, line ops (softmax, sort) and scans along dimensions."""
        x = args[0]
        shape = tuple(x.shape)
        ndim = len(shape)
        dims = _dims(func, args, kwargs, ndim)
        if name == "renorm":  # each slice along dim is scaled as a whole: its line is every other dim
            dims = tuple(d for d in range(ndim) if d not in dims)
        deps = self.deps(x)
        numel = max(math.prod(shape), 1)
        # Where each input element lands when the dims are reduced (keepdim shape).
        kept = tuple(1 if d in dims else s for d, s in enumerate(shape))
        dest = np.broadcast_to(np.arange(math.prod(kept)).reshape(kept), shape).reshape(-1) if shape else np.zeros(1, np.int64)
        reduce = sp.csr_array((np.ones(dest.size, np.float32), (dest, np.arange(dest.size))), shape=(math.prod(kept), numel))
        line = _ones(reduce @ deps)  # one row per kept position
        outs, spec = pytree.tree_flatten(out)
        wrapped = []
        linear = name in _LINEAR_REDUCE or name in _LINEAR_SCAN or name in _FFT
        hess_in = self.hess_of([x])
        for o in outs:
            if not _float(o):
                wrapped.append(o)
                continue
            if name in _SCAN:
                d = dims[0]
                pre, length, post = math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :])
                _check_entries(pre * post * length * (length + 1) // 2, name)
                scan = sp.kron(sp.kron(sp.identity(pre), sp.csr_array(np.tril(np.ones((length, length), np.float32)))), sp.identity(post))
                rows = _ones(sp.csr_array(scan) @ deps)
            elif name in _REDUCE and tuple(o.shape) != shape:
                rows = line  # reduced: the keepdim layout has the same C order
                if o.numel() != line.shape[0]:
                    rows = self.dense(name, [x], o).root.deps
            else:  # line ops: every element sees its whole line
                oshape = tuple(o.shape)
                okept = tuple(1 if d in dims else s for d, s in enumerate(oshape))
                if okept != kept and o.numel() == line.shape[0] and len(oshape) in (ndim, ndim - len(dims)):
                    rows = line  # a line op that reduces its dim (kthvalue): the reduced layout, C order
                elif okept != kept:
                    rows = self.dense(name, [x], o).root.deps
                else:
                    back = np.broadcast_to(np.arange(math.prod(kept)).reshape(kept), oshape).reshape(-1)
                    _check_entries(int(np.diff(line.indptr)[back].sum()), name)
                    rows = _select(line, back)
            hess = None
            if self.hessian:
                parts = [h for h in (hess_in, None if linear else self.pairs(rows)) if h is not None]
                hess = _union(parts, self.n, self.n) if parts else None
            wrapped.append(self.wrap(o, rows, hess))
        return pytree.tree_unflatten(wrapped, spec)

    def matrices(self, name: str, args: Any, traced: Sequence[_Traced], out: Any) -> Any:
        """A function of each matrix of a batch (``det``, ``inv``, ``eigh``, ``svd``,
        ``cholesky``, ``qr``, ``matrix_exp``, ...: ``_MATRIX_FUNCTIONS``): every output
        element of batch entry ``b`` (its leading dims the input's batch dims) reads
        every element of matrix ``b``, none of another; non-linear, so the Hessian pairs
        the elements of each matrix. An output not laid out by batch, or another traced
        argument that depends on the inputs (``pinv``'s ``atol``), is taken as dense."""
        x = args[0]
        batch = tuple(x.shape[:-2]) if isinstance(x, _Traced) and x.dim() >= 2 else None
        if batch is None or any(_float(t) and t is not x and t.root.deps.nnz for t in traced):
            return self.dense(name, traced, out)
        count = math.prod(batch)
        owner = np.repeat(np.arange(count), x.shape[-2] * x.shape[-1])  # each element's matrix, C order
        gather = sp.csr_array((np.ones(owner.size, np.float32), (owner, np.arange(owner.size))), shape=(count, owner.size))
        per_matrix = _ones(gather @ self.deps(x))
        hess_in = self.hess_of([x])
        leaves, spec = pytree.tree_flatten(out)
        wrapped = []
        for o in leaves:
            if not _float(o):
                wrapped.append(o)
                continue
            if tuple(o.shape[: len(batch)]) != batch:
                wrapped.append(self.dense(name, [x], o))
                continue
            back = np.repeat(np.arange(count), o.numel() // count if count else 0)
            _check_entries(int(np.diff(per_matrix.indptr)[back].sum()), name)
            rows = _select(per_matrix, back)
            hess = None
            if self.hessian:
                hess = _union([h for h in (hess_in, self.pairs(rows)) if h is not None], self.n, self.n)
            wrapped.append(self.wrap(o, rows, hess))
        return pytree.tree_unflatten(wrapped, spec)

    def whole(self, name: str, traced: Sequence[_Traced], out: torch.Tensor) -> Any:
        """An op whose one number reads every element of its operands (``dist``): the
        dense rule, exact here (it was noted as an unknown op, ``exact`` false)."""
        result = self.dense(name, traced, out)
        self.unknown.discard(name)
        return result

    def embedding_bag(self, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """``F.embedding_bag`` (``nn.EmbeddingBag``): ``output[b, d]`` reads
        ``weight[indices[j], d]`` (and ``per_sample_weights[j]``) for each ``j`` of bag
        ``b`` but those at ``padding_idx``; a max bag picks by the values (a choice).
        Indices or offsets computed from values or given as an input make the pattern
        value-dependent, as ``embedding``'s do."""
        names = ("weight", "indices", "offsets", "scale_grad_by_freq", "mode", "sparse", "per_sample_weights",
                 "include_last_offset", "padding_idx")
        named = {**dict(zip(names, args)), **kwargs}
        weight, indices, offsets = named["weight"], named["indices"], named["offsets"]
        mode, psw = int(named.get("mode", 0)), named.get("per_sample_weights")
        padding = named.get("padding_idx", -1)
        padding = -1 if padding is None else int(padding)
        if _valued([t for t in (indices, offsets) if isinstance(t, _Traced)]):
            self.reads("embedding_bag: indices computed from values or given as an input")
        idx = (indices.value if isinstance(indices, _Traced) else indices).reshape(-1).cpu().numpy().astype(np.int64)
        starts = (offsets.value if isinstance(offsets, _Traced) else offsets).reshape(-1).cpu().numpy().astype(np.int64)
        output = out[0]
        bags, width = (int(output.shape[0]), int(output.shape[1])) if output.dim() == 2 else (0, 0)
        # bag of each index position: starts are sorted; past the bags (include_last_offset's end) none
        bag = np.searchsorted(starts, np.arange(idx.size), side="right") - 1
        keep = (bag >= 0) & (bag < bags) & (idx != padding if padding >= 0 else True)
        j = np.flatnonzero(keep)
        d = np.arange(width)
        at = (bag[j][:, None] * width + d).reshape(-1)
        w_rows = sp.csr_array((np.ones(at.size, np.float32), (at, (idx[j][:, None] * width + d).reshape(-1))),
                              shape=(bags * width, weight.numel()))
        parts = [w_rows @ self.deps(weight)]
        if isinstance(psw, _Traced):
            p_rows = sp.csr_array((np.ones(at.size, np.float32), (at, np.repeat(j, width))), shape=(bags * width, psw.numel()))
            parts.append(p_rows @ self.deps(psw))
        rows = _union(parts, bags * width, self.n)
        if mode == 2:
            self.chose_by_values("embedding_bag", [weight])
        hess = None
        if self.hessian:
            linear = mode != 2 and not (isinstance(psw, _Traced) and psw.root.deps.nnz)
            hs = [h for h in (self.hess_of([weight, psw]), None if linear else self.pairs(rows)) if h is not None]
            hess = _union(hs, self.n, self.n) if hs else None
        return (self.wrap(output, rows, hess), *out[1:])

    def matmul(self, name: str, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """Contractions as batched ``(b, m, k) @ (b, k, n)``: an output element depends
        on the contracted elements of each operand where the other operand may be
        nonzero (it depends on the input, or is a constant that is not zero)."""
        bias = None
        if name in ("addmm", "addmv", "baddbmm", "addr", "_sparse_addmm"):
            bias, a, b = args[0], args[1], args[2]
        else:
            a, b = args[0], args[1]
        av = a.value if isinstance(a, _Traced) else a
        bv = b.value if isinstance(b, _Traced) else b
        if _is_sparse(av) or _is_sparse(bv):
            return self.sparse_matmul(name, a, b, bias, out)
        if name in ("mv", "addmv"):
            a3, b3 = av.reshape(1, *av.shape), bv.reshape(1, -1, 1)
        elif name in ("dot", "vdot"):
            a3, b3 = av.reshape(1, 1, -1), bv.reshape(1, -1, 1)
        elif name == "addr":  # M + outer(u, v): a product over a contracted dim of 1
            a3, b3 = av.reshape(1, -1, 1), bv.reshape(1, 1, -1)
        elif name in ("mm", "addmm"):
            a3, b3 = av.unsqueeze(0), bv.unsqueeze(0)
        else:
            a3, b3 = av, bv
        nb, m, k = a3.shape
        n = b3.shape[2]
        da, db = self.deps(a), self.deps(b)
        mask_a = (a3 != 0).cpu().numpy().reshape(-1) | (np.diff(da.indptr) > 0)
        mask_b = (b3 != 0).cpu().numpy().reshape(-1) | (np.diff(db.indptr) > 0)
        # Zeros of an operand that varies with the inputs (a non-differentiated input, a
        # value computed without dependencies) are structural at this point only.
        for operand, mask, other in ((a, mask_a, db), (b, mask_b, da)):
            if isinstance(operand, _Traced) and not operand.root.const and other.nnz and not mask.all():
                self.reads(f"{name}: zeros of an operand that varies with the inputs")
        size = nb * m * n
        parts = []
        if da.nnz:  # out[b,i,j] <- A[b,i,kk] for kk with B[b,kk,j] possibly nonzero
            _check_entries(m * int(mask_b.sum()), name)
            bb, kk, jj = np.unravel_index(np.flatnonzero(mask_b), (nb, k, n))
            ii = np.arange(m)[:, None]
            rows = ((bb * m + ii) * n + jj).reshape(-1)
            cols = ((bb * m + ii) * k + kk).reshape(-1)
            parts.append(_product(sp.csr_array((np.ones(rows.size, np.float32), (rows, cols)), shape=(size, nb * m * k)), da, name))
        if db.nnz:  # out[b,i,j] <- B[b,kk,j] for kk with A[b,i,kk] possibly nonzero
            _check_entries(n * int(mask_a.sum()), name)
            bb, ii, kk = np.unravel_index(np.flatnonzero(mask_a), (nb, m, k))
            jj = np.arange(n)[:, None]
            rows = ((bb * m + ii) * n + jj).reshape(-1)
            cols = ((bb * k + kk) * n + jj).reshape(-1)
            parts.append(_product(sp.csr_array((np.ones(rows.size, np.float32), (rows, cols)), shape=(size, nb * k * n)), db, name))
        if bias is not None and isinstance(bias, _Traced):
            parts.append(self.deps(bias, tuple(out.shape)))
        deps = _union(parts, size, self.n)
        hess = None
        if self.hessian:
            hparts = [self.hess_of([a, b] + ([bias] if bias is not None else []))]
            if da.nnz and db.nnz:  # bilinear: pairs across each contracted index
                ga = sp.csr_array((np.ones(nb * m * k, np.float32), (np.repeat(np.arange(nb), m * k) * k + np.tile(np.arange(k), nb * m), np.arange(nb * m * k))), shape=(nb * k, nb * m * k)) @ da
                gb_rows = (np.arange(nb * k * n) // n)
                gb = sp.csr_array((np.ones(nb * k * n, np.float32), (gb_rows, np.arange(nb * k * n))), shape=(nb * k, nb * k * n)) @ db
                hparts.append(self.pairs(_ones(ga), _ones(gb)))
            hparts = [h for h in hparts if h is not None]
            hess = _union(hparts, self.n, self.n) if hparts else None
        return self.wrap(out, deps, hess)

    def sparse_matmul(self, name: str, a: Any, b: Any, bias: Any, out: torch.Tensor) -> Any:
        """A constant sparse matrix (COO, CSR, CSC: a graph Laplacian, a finite-difference
        operator) times a traced operand, either side: an output element depends on the
        traced elements its row (or column) of the sparse matrix reaches through stored
        nonzeros. Anything else sparse (a sparse matrix built from traced values,
        batched or hybrid ones) is taken as dense."""
        traced = [t for t in (a, b, bias) if isinstance(t, _Traced)]
        left = _is_sparse(a.value if isinstance(a, _Traced) else a)
        matrix, other = (a, b) if left else (b, a)
        pattern = _sparse_ones(matrix) if isinstance(other, _Traced) and not isinstance(matrix, _Traced) else None
        if pattern is None or other.dim() not in (1, 2):
            return self.dense(name, traced, out)
        if left:  # out[i, j] <- other[kk, j] for A[i, kk] stored
            spread = sp.kron(pattern, sp.identity(1 if other.dim() == 1 else int(other.shape[1]), format="csr"))
        else:  # out[i, j] <- other[i, kk] for A[kk, j] stored
            spread = sp.kron(sp.identity(1 if other.dim() == 1 else int(other.shape[0]), format="csr"), pattern.T)
        spread = sp.csr_array(spread)
        _check_entries(int(spread.nnz), name)
        parts = [_product(spread, self.deps(other), name)]
        if bias is not None and isinstance(bias, _Traced):
            parts.append(self.deps(bias, tuple(out.shape)))
        deps = _union(parts, out.numel(), self.n)
        hess = None
        if self.hessian:  # linear in the traced operands
            hess = self.hess_of([t for t in (other, bias) if isinstance(t, _Traced)])
        return self.wrap(out, deps, hess)

    def pool(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Average and max pooling (1-, 2- and 3-D; any kernel, stride, padding,
        dilation, ceil_mode): an output element depends on its window of its own channel.
        Max pooling's derivative picks one element of the window, which one following the
        values: the window holds it whatever the values. Both are linear where they are
        differentiable (no Hessian pairs)."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x, dims = named["self"], _POOL[name]
        values = out[0] if isinstance(out, (tuple, list)) else out
        xv = x.value if isinstance(x, _Traced) else x
        if not isinstance(x, _Traced) or xv.dim() < dims + 1 or not _float(values):
            return self.dense(name, [x] if isinstance(x, _Traced) else [], out)
        kernel = _per_dim(named["kernel_size"], dims)
        stride = _per_dim(named.get("stride") or kernel, dims)  # [] means the kernel's
        padding = _per_dim(named.get("padding", 0), dims)
        dilation = _per_dim(named.get("dilation", 1), dims)
        spatial, places = tuple(xv.shape[-dims:]), tuple(values.shape[-dims:])
        lead, size_in, size_out = xv.numel() // math.prod(spatial), math.prod(spatial), math.prod(places)
        kc = np.unravel_index(np.arange(math.prod(kernel)), kernel)
        pc = np.unravel_index(np.arange(size_out), places)
        valid = np.ones((math.prod(kernel), size_out), bool)
        q = np.zeros((math.prod(kernel), size_out), np.int64)
        for d in range(dims):
            qd = pc[d][None, :] * stride[d] - padding[d] + kc[d][:, None] * dilation[d]
            valid &= (qd >= 0) & (qd < spatial[d])
            q = q * spatial[d] + qd
        tap, at = np.nonzero(valid)
        q = q[tap, at]
        _check_entries(lead * q.size, name)
        channel = np.arange(lead)[:, None]
        rows = (channel * size_out + at[None, :]).reshape(-1)
        cols = (channel * size_in + q[None, :]).reshape(-1)
        m = sp.csr_array((np.ones(rows.size, np.float32), (rows, cols)), shape=(lead * size_out, xv.numel()))
        deps = _ones(m @ self.deps(x))
        hess = self.hess_of([x]) if self.hessian else None
        if isinstance(out, (tuple, list)):  # (values, indices): the indices carry no derivative
            return type(out)([self.wrap(values, deps, hess)] + list(out[1:]))
        return self.wrap(out, deps, hess)

    def windows(self, x: "_Traced", spatial: tuple[int, ...], maps: Sequence[Any]) -> Any:
        """Deps of an op that maps each channel's ``spatial`` block of ``x`` on its own, the
        same way in every channel, separably: ``maps[d]`` (places out x places in, along
        dim ``d``) says which input places along ``d`` each output place reads."""
        inner = sp.csr_array(np.ones((1, 1), np.float32))
        for m in maps:
            inner = sp.csr_array(sp.kron(inner, sp.csr_array(m.astype(np.float32))))
        lead = x.numel() // max(math.prod(spatial), 1)
        _check_entries(lead * int(inner.nnz), "a windowed op")
        return _ones(sp.csr_array(sp.kron(sp.identity(lead, format="csr"), inner)) @ self.deps(x))

    def adaptive(self, name: str, args: Any, out: Any) -> Any:
        """Adaptive average and max pooling: output place ``i`` of ``n`` along a dim of
        length ``L`` reads places ``floor(i L / n)`` up to ``ceil((i + 1) L / n)`` (torch's
        windows) of its own channel; max pooling's window holds the element it picks.
        Linear where differentiable."""
        x, dims = args[0], _ADAPTIVE[name]
        values = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(x, _Traced) or x.dim() < dims + 1 or not _float(values):
            return self.dense(name, [x] if isinstance(x, _Traced) else [], out)
        spatial, places = tuple(x.shape[-dims:]), tuple(values.shape[-dims:])
        maps = []
        for length, n in zip(spatial, places):
            i = np.arange(n)
            start, stop = (i * length) // n, -((-(i + 1) * length) // n)
            cols = np.arange(length)[None, :]
            maps.append((cols >= start[:, None]) & (cols < stop[:, None]))
        deps = self.windows(x, spatial, maps)
        hess = self.hess_of([x]) if self.hessian else None
        if isinstance(out, (tuple, list)):  # (values, indices)
            return type(out)([self.wrap(values, deps, hess)] + list(out[1:]))
        return self.wrap(out, deps, hess)

    def interpolate(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Linear, bilinear, bicubic, trilinear interpolation: separable,
        so each dim's map is torch's own kernel run on a one-hot input along that dim
        alone (the other dims of length 1, read with weight 1): output place ``o`` reads
        input place ``c`` where the result is nonzero. Holes inside a window (clamped
        bicubic taps that cancel) are filled: never a nonzero missed. Linear."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x, dims = named.get("self", named.get("input")), _INTERPOLATE[name]
        if not isinstance(x, _Traced) or x.dim() < dims + 1 or not _float(out):
            return self.dense(name, [x] if isinstance(x, _Traced) else [], out)
        align = bool(named["align_corners"])
        if func._overloadname == "vec":
            factors = named.get("scale_factors")
            scales = [float(f) for f in factors] if factors else [None] * dims
        else:
            scales = [named.get(a.name) for a in func._schema.arguments[3:3 + dims]]
        spatial, places = tuple(x.shape[-dims:]), tuple(out.shape[-dims:])
        op = getattr(aten, name).default
        maps = []
        with torch.no_grad():
            for d, (length, n) in enumerate(zip(spatial, places)):
                real = name in _ANTIALIASED  # (other dims at their real sizes, read with weights summing to 1)
                sizes = [n if j == d or real else 1 for j in range(dims)]
                along = [scales[j] if j == d or real else None for j in range(dims)]
                shape = [length if j == d else (spatial[j] if real else 1) for j in range(dims)]
                m = np.zeros((n, length), bool)
                for c0 in range(0, length, _ONE_HOT_BLOCK):  # (a long dim in blocks: length^2 otherwise)
                    c1 = min(c0 + _ONE_HOT_BLOCK, length)
                    one_hot = torch.zeros(c1 - c0, length, dtype=torch.float64, device=x.device)
                    one_hot[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1
                    view = [1, c1 - c0] + [length if j == d else 1 for j in range(dims)]
                    y = op(one_hot.reshape(view).expand([1, c1 - c0] + shape).contiguous(), sizes, align, *along)
                    first = tuple(slice(None) if j == d else 0 for j in range(dims))  # one place of the other dims
                    m[:, c0:c1] = (y[(0, slice(None)) + first].reshape(c1 - c0, n) != 0).T.cpu().numpy()
                reads = m.any(axis=1)
                first, last = m.argmax(axis=1), length - 1 - m[:, ::-1].argmax(axis=1)
                cols = np.arange(length)[None, :]
                maps.append(reads[:, None] & (cols >= first[:, None]) & (cols <= last[:, None]))
        return self.wrap(out, self.windows(x, spatial, maps), self.hess_of([x]) if self.hessian else None)

    def col2im(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``fold`` sums the patches that overlap at each place: its pattern is the
        transpose of ``unfold``'s (im2col) with the same arguments, found by running
        im2col on the output's element labels. Linear."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x = named["self"]
        labels = torch.arange(1, out.numel() + 1, dtype=torch.float64).reshape(out.shape)
        lab = aten.im2col.default(labels, named["kernel_size"], named["dilation"], named["padding"], named["stride"])
        if lab.numel() != x.numel():
            return self.dense("col2im", [x], out)
        src = lab.reshape(-1).numpy().astype(np.int64) - 1
        keep = np.flatnonzero(src >= 0)
        m = sp.csr_array((np.ones(keep.size, np.float32), (src[keep], keep)), shape=(out.numel(), x.numel()))
        return self.wrap(out, _ones(m @ self.deps(x)), self.hess_of([x]) if self.hessian else None)

    def complex_view(self, name: str, x: Any, out: torch.Tensor) -> Any:
        """``view_as_real`` (each complex element as its two parts) and ``view_as_complex``
        (the two parts as one element). Linear."""
        n = out.numel()
        if name == "view_as_real":
            deps = _select(self.deps(x), np.arange(n) // 2)
        else:
            pairs = sp.csr_array((np.ones(2 * n, np.float32), (np.repeat(np.arange(n), 2), np.arange(2 * n))), shape=(n, 2 * n))
            deps = _ones(pairs @ self.deps(x))
        return self.wrap(out, deps, self.hess_of([x]) if self.hessian else None)

    def diagonal_sum(self, x: "_Traced", out: torch.Tensor) -> Any:
        """``torch.trace``: the sum of the main diagonal, nothing else (linear)."""
        rows, cols = x.shape
        k = min(rows, cols)
        on = sp.csr_array((np.ones(k, np.float32), (np.zeros(k, np.int64), np.arange(k) * (cols + 1))), shape=(1, rows * cols))
        return self.wrap(out, _ones(on @ self.deps(x)), self.hess_of([x]))

    def glu(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``F.glu``: ``a * sigmoid(b)`` of the two halves along ``dim``, element by
        element: each output on its element of either half."""
        x = args[0]
        dim = _dims(func, args, kwargs, x.dim())[0]
        half = x.shape[dim] // 2
        places = torch.arange(x.numel()).reshape(x.shape)
        deps = self.deps(x)
        rows = _union([_select(deps, places.narrow(dim, start, half).reshape(-1).numpy()) for start in (0, half)],
                      out.numel(), self.n)
        hess = None
        if self.hessian:
            hess = _union([h for h in (self.hess_of([x]), self.pairs(rows)) if h is not None], self.n, self.n)
        return self.wrap(out, rows, hess)

    def loss(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """An elementwise loss: its terms as a pointwise op over the broadcast arguments,
        then, reduced (mean or sum), their sum: one element on every term's inputs, and
        only each term's pairs for the Hessian (a sum is linear)."""
        names = [a.name for a in func._schema.arguments]
        at = names.index("reduction")
        reduction = kwargs["reduction"] if "reduction" in kwargs else (
            args[at] if at < len(args) else func._schema.arguments[at].default_value)
        shapes = [tuple(a.shape) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        terms = self.pointwise(name, args, kwargs, out.new_empty(torch.broadcast_shapes(*shapes)))
        if int(reduction) == 0 and tuple(terms.shape) == tuple(out.shape):
            return self.wrap(out, terms.root.deps, terms.root.hess)
        every = _ones(sp.csr_array(np.asarray(terms.root.deps.sum(axis=0)).reshape(1, -1)))
        return self.wrap(out, sp.csr_array(np.ones((out.numel(), 1), np.float32)) @ every, terms.root.hess)

    def line_backward(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``_softmax_backward_data(grad, output, dim)`` (a gradient taken inside the
        function): each element on its line along ``dim`` of both operands."""
        parts = [self.along(func, name, (a,) + tuple(args[1:]), kwargs, out) for a in args[:2]]
        deps = _union([p.root.deps for p in parts], out.numel(), self.n)
        hess = None
        if self.hessian:
            hess = _union([h for h in (self.hess_of(args[:2]), self.pairs(deps)) if h is not None], self.n, self.n)
        return self.wrap(out, deps, hess)

    def adjoint(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any, traced: Sequence[_Traced]) -> Any:
        """A backward op that sums (``convolution_backward``, the pooling, padding,
        upsampling and normalization backwards, ...: see :mod:`.adjoints`): the
        vector-Jacobian product of its forward op ``F``. ``F`` is traced on its own, each
        of its differentiated arguments ``z`` with one dependency per element, which
        gives its links ``L`` (outputs x ``z``) and pairs ``H``; then
        ``grad_z = L^T deps(g)``, and where ``F`` is not linear also
        ``((L^T L) o H) deps(z)``: element ``k`` reads the arguments that meet it in the
        second derivative of an output that reaches it."""
        a, mask = adjoint(func, args, kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        # (a gradient the op was not asked for may still come back, empty or zeros)
        asked = {a.wrt[i] for i, o in enumerate(outs) if i < len(a.wrt) and _float(o) and (mask is None or mask[i])}
        primal = [i for i, v in enumerate(a.args) if isinstance(v, torch.Tensor) and _float(v) and _strided(v)
                  and (i in asked or (isinstance(v, _Traced) and not v.root.const))]
        sizes = [int(a.args[i].numel()) for i in primal]
        sub = _Tracer(sum(sizes), True)
        fargs, offset = list(a.args), 0
        for i, size in zip(primal, sizes):
            v = a.args[i]
            value = (v.value if isinstance(v, _Traced) else v).detach().contiguous().clone()
            eye = sp.csr_array((np.ones(size, np.float32), (np.arange(size), offset + np.arange(size))), shape=(size, sub.n))
            fargs[i] = sub.wrap(value, eye, None)
            offset += size
        for i, v in enumerate(fargs):
            if i in primal or not isinstance(v, _Traced):
                continue
            # a constant's values are structure (a kernel's zero taps); indices computed
            # from the inputs stay traced, so that the forward op's reading them is seen
            fargs[i] = v.value if v.root.const else sub.valued(v.value)
        with torch.enable_grad():
            fout = a.forward(*fargs)
        if a.pick is not None:
            fout = fout[a.pick]
        for why in sub.value_reads:
            self.reads(why)
        self.choices |= sub.choices
        self.densified |= sub.densified
        if sub.unknown or not isinstance(fout, _Traced):
            return self.dense(name, traced, out)
        links = sp.csr_array(sub.deps(fout))  # F's outputs x z
        reach = links.T.tocsr()
        own = [self.deps(a.args[i]) for i in primal]
        extra = _empty(sizes[0] if primal else 0, self.n)
        if primal and primal[0] == 0:  # statistics the forward op computed from its first argument
            extra = _union([_select(self.deps(s), index()) for s, index in a.saved], sizes[0], self.n)
            own[0] = _ones(own[0] + extra)
        grads = reach @ self.deps(a.grad, tuple(fout.shape))
        pairs = fout.root.hess
        if not a.linear and pairs is not None and pairs.nnz and primal:
            per_out = np.diff(links.indptr).astype(np.int64)
            _check_entries(int((per_out * per_out).sum()), f"{name} (arguments meeting in its forward op)")
            meet = _ones(reach @ links).multiply(pairs)
            grads = grads + _ones(meet) @ sp.vstack(own, format="csr")
        grads = _ones(grads)
        starts = dict(zip(primal, np.cumsum([0] + sizes[:-1]).tolist()))
        hess = None
        if self.hessian:
            parts = [self.hess_of(traced)] + ([] if a.linear else [self.pairs(grads)])
            parts = [p for p in parts if p is not None]
            hess = _union(parts, self.n, self.n) if parts else None
        wrapped = []
        for i, o in enumerate(outs):
            at = a.wrt[i] if i < len(a.wrt) else None
            if not _float(o):
                wrapped.append(o)
            elif mask is not None and not mask[i]:
                wrapped.append(self.wrap(o, _empty(o.numel(), self.n)))
            elif at in starts and a.args[at].numel() == o.numel():
                deps = grads[starts[at] : starts[at] + o.numel()]
                if at == 0 and extra.nnz:
                    deps = _ones(deps + extra)
                wrapped.append(self.wrap(o, deps, hess))
            else:  # (no forward argument to read it from)
                wrapped.append(self.dense(name, traced, o))
        return type(out)(wrapped) if isinstance(out, (tuple, list)) else wrapped[0]

    def nll_loss(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """``nll_loss`` (``cross_entropy`` after its ``log_softmax``): sample ``i``'s term
        is ``-w[t_i] x[i, t_i]``, its target class's element alone (none where ``t_i`` is
        ``ignore_index``; ``nll_loss2d``, a segmentation's: each pixel's term its target
        class's element at that pixel); reduced, the terms' sum. Linear in ``x``; torch does not
        differentiate the weights. Targets computed from values or given as an input
        make the pattern value-dependent."""
        names = [a.name for a in func._schema.arguments]

        def arg(name: str) -> Any:
            at = names.index(name)
            return kwargs[name] if name in kwargs else args[at] if at < len(args) else func._schema.arguments[at].default_value

        x, target = arg("self"), arg("target")
        reduction, ignore = int(arg("reduction")), int(arg("ignore_index"))
        if isinstance(target, _Traced):
            self.reads("nll_loss: class indices computed from values or given as an input")
        t = (target.value if isinstance(target, _Traced) else target).reshape(-1).cpu().numpy().astype(np.int64)
        # classes along dim 1 (dim 0 of one sample), then the places (nll_loss2d: H x W)
        classes = x.shape[1] if x.dim() >= 2 else x.shape[0]
        places = math.prod(x.shape[2:])
        keep = (t != ignore) & (t >= 0) & (t < classes)
        at = np.arange(t.size)
        sample, place = at // places, at % places
        terms = _select(self.deps(x), np.where(keep, (sample * classes + t) * places + place, -1))
        if reduction != 0:
            terms = _ones(sp.csr_array(np.asarray(terms.sum(axis=0)).reshape(1, -1)))
        output, total_weight = out
        hess = self.hess_of([x])
        return (self.wrap(output, terms, hess), self.wrap(total_weight, _empty(total_weight.numel(), self.n)))

    def cross(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``linalg.cross`` (and ``torch.cross``): component ``i`` of ``a x b`` is
        ``a_j b_k - a_k b_j`` over the other two components ``j, k`` of the same vector
        (operands broadcast); bilinear."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        a, b, shape = named["self"], named["other"], tuple(out.shape)
        dim = int(named.get("dim", -1)) % len(shape)
        at = np.arange(out.numel()).reshape(shape)
        others = [np.roll(at, -1, axis=dim).reshape(-1), np.roll(at, -2, axis=dim).reshape(-1)]
        da, db = self.deps(a, shape), self.deps(b, shape)
        ga = _union([_select(da, o) for o in others], out.numel(), self.n)
        gb = _union([_select(db, o) for o in others], out.numel(), self.n)
        hess = None
        if self.hessian:
            parts = [h for h in (self.hess_of([a, b]), self.pairs(ga, gb) if ga.nnz and gb.nnz else None) if h is not None]
            hess = _union(parts, self.n, self.n) if parts else None
        return self.wrap(out, _ones(ga + gb), hess)

    def normalize(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Layer, group and batch normalization: an element depends on the elements of its
        group (the trailing ``normalized_shape`` of its own row; its own sample's group of
        channels; its channel over the batch, when training), and on its place's weight
        and bias (a channel's, or the trailing place's for layer norm); the saved means
        and inverse deviations on their group. Batch norm in eval mode is elementwise
        (running statistics, its channel's)."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x = named["input"]
        traced = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)]
        shape, numel = tuple(x.shape), x.numel()
        at = np.arange(numel)
        if name == "native_layer_norm":
            tail = math.prod(named["normalized_shape"])
            group, place = at // max(tail, 1), at % max(tail, 1)
            params = ("weight", "bias")
        else:
            channels = shape[1] if len(shape) > 1 else 1
            inner = numel // max(shape[0] * channels, 1) if shape else 1
            place = (at // max(inner, 1)) % max(channels, 1)
            if name == "native_group_norm":
                per = channels // max(int(named["group"]), 1)
                group = (at // max(inner * channels, 1)) * int(named["group"]) + place // max(per, 1)
                params = ("weight", "bias")
            elif bool(named["training"]):
                group = place
                params = ("weight", "bias")
            else:
                group = at  # eval: each element alone, with its channel's running statistics
                params = ("weight", "bias", "running_mean", "running_var")
        groups = int(group.max(initial=-1)) + 1
        reduce = sp.csr_array((np.ones(numel, np.float32), (group, at)), shape=(max(groups, 0), numel))
        line = _ones(reduce @ self.deps(x))
        parts = [_select(line, group)]
        for p in params:
            t = named.get(p)
            if isinstance(t, _Traced) and t.root.deps.nnz:
                parts.append(_select(self.deps(t), place))
        deps = _union(parts, numel, self.n)
        leaves = list(out)
        hess_in = self.hess_of(traced) if self.hessian else None
        wrapped = []
        for i, o in enumerate(leaves):
            if i == 0:
                rows = deps
            elif o.numel() == 0 or not _float(o):
                wrapped.append(o if not _float(o) else self.wrap(o, _empty(o.numel(), self.n)))
                continue
            elif o.numel() == groups:
                rows = line
            else:
                return self.dense(name, traced, out)
            hess = None
            if self.hessian:
                hparts = [h for h in (hess_in, self.pairs(rows)) if h is not None]
                hess = _union(hparts, self.n, self.n)
            wrapped.append(self.wrap(o, rows, hess))
        return type(out)(wrapped)

    def cdist(self, args: Any, out: torch.Tensor) -> Any:
        """``torch.cdist``: distance ``(i, j)`` depends on point ``i`` of the first set and
        point ``j`` of the second (every coordinate of each), nothing else; nonlinear.
        Sets batched differently from each other (broadcast batches) are taken as dense."""
        x1, x2 = args[0], args[1]
        traced = [t for t in (x1, x2) if isinstance(t, _Traced)]
        if x1.dim() < 2 or tuple(x1.shape[:-2]) != tuple(x2.shape[:-2]) or tuple(out.shape[:-2]) != tuple(x1.shape[:-2]):
            return self.dense("_cdist_forward", traced, out)
        p, r, dims = x1.shape[-2], x2.shape[-2], x1.shape[-1]
        batch = out.numel() // max(p * r, 1)

        def points(t: Any, count: int) -> Any:  # one row per point: its coordinates' deps
            at = np.arange(batch * count * dims)
            gather = sp.csr_array((np.ones(at.size, np.float32), (at // max(dims, 1), at)), shape=(batch * count, at.size))
            return _ones(gather @ self.deps(t))

        b, i, j = np.unravel_index(np.arange(out.numel()), (batch, p, r))
        deps = _ones(_select(points(x1, p), b * p + i) + _select(points(x2, r), b * r + j))
        hess = None
        if self.hessian:
            parts = [h for h in (self.hess_of(traced), self.pairs(deps)) if h is not None]
            hess = _union(parts, self.n, self.n)
        return self.wrap(out, deps, hess)

    def pdist(self, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``F.pdist`` of ``n`` points: distance ``k``, the ``k``-th pair ``(i, j)``,
        ``i < j``, in row order (``triu_indices``), depends on points ``i`` and ``j``
        (every coordinate of each), nothing else; nonlinear. ``p=inf``: the largest
        coordinate difference's (a choice, noted)."""
        x = args[0]
        n, dims = x.shape
        at = np.arange(n * dims)
        gather = sp.csr_array((np.ones(at.size, np.float32), (at // max(dims, 1), at)), shape=(n, at.size))
        points = _ones(gather @ self.deps(x))
        i, j = np.triu_indices(n, 1)
        deps = _ones(_select(points, i) + _select(points, j))
        if _exponent(args[1] if len(args) > 1 else kwargs.get("p", 2.0)) in (math.inf, -math.inf):
            self.chose_by_values("pdist", [x])
        hess = None
        if self.hessian:
            hess = _union([h for h in (self.hess_of([x]), self.pairs(deps)) if h is not None], self.n, self.n)
        return self.wrap(out, deps, hess)

    def grid_sample(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``F.grid_sample`` (2-D and 3-D; bilinear, nearest, bicubic; every padding mode):
        output place ``o`` of channel ``c`` reads the input pixels of its own sample and
        channel around its grid point. Which ones follow the grid only, and a sample's
        taps are a product over the dims (corners, a 4 x 4 bicubic window), so each dim's
        taps are found by torch's own kernel: one-hot inputs along that dim, positive
        fills along the others (two fills: bicubic weights could cancel in one), holes
        between a place's first and last tap filled. Linear in the input for a grid that
        does not depend on the inputs; a grid that does makes every output read its
        whole channel (which pixels follows the values) and its own grid point."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x, grid = named["input"], named["grid"]
        traced = [t for t in (x, grid) if isinstance(t, _Traced)]
        xv = x.value if isinstance(x, _Traced) else x
        gv = grid.value if isinstance(grid, _Traced) else grid
        batch, channels, spatial = xv.shape[0], xv.shape[1], tuple(xv.shape[2:])
        places = math.prod(out.shape[2:])
        moving = self.deps(grid).nnz > 0
        if isinstance(grid, _Traced) and not grid.root.const and not moving:
            self.reads("grid_sample: a grid that varies with the inputs")
        taps = []  # per dim: (batch * places) x spatial[d], the places read along d
        for d, length in enumerate(spatial):
            if moving:
                taps.append(sp.csr_array(np.ones((batch * places, length), bool)))
                continue
            read = np.zeros((batch, places, length), bool)
            gen = torch.Generator(device="cpu").manual_seed(d)
            with torch.no_grad():
                for fill in range(2):
                    # (in the grid's own dtype: its coordinates rounded as the call rounds them)
                    other = torch.rand((batch, 1) + spatial, generator=gen, dtype=torch.float64).add_(0.5).to(xv.device, gv.dtype)
                    for c0 in range(0, length, _ONE_HOT_BLOCK):
                        c1 = min(c0 + _ONE_HOT_BLOCK, length)
                        one_hot = torch.zeros((c1 - c0, length), dtype=gv.dtype, device=xv.device)
                        one_hot[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1
                        hot = one_hot.reshape([1, c1 - c0] + [length if j == d else 1 for j in range(len(spatial))])
                        y = func(hot * other, gv, named["interpolation_mode"], named["padding_mode"], named["align_corners"])
                        read[:, :, c0:c1] |= (y.reshape(batch, c1 - c0, places) != 0).transpose(1, 2).cpu().numpy()
            cols = np.arange(length)[None, None, :]
            first = read.argmax(axis=2)[..., None]
            last = (length - 1 - read[:, :, ::-1].argmax(axis=2))[..., None]
            read = read.any(axis=2, keepdims=True) & (cols >= first) & (cols <= last)
            taps.append(sp.csr_array(read.reshape(batch * places, length)))
        pix = taps[0]
        for t in taps[1:]:
            pix = _row_kron(pix, t)  # (batch * places) x pixels: each place's taps, all dims
        npix = math.prod(spatial)
        _check_entries(channels * int(pix.nnz), "grid_sample")
        counts = np.diff(pix.indptr)
        n, o = np.divmod(np.repeat(np.arange(batch * places), counts), places)
        c = np.arange(channels)[:, None]
        rows = (((n[None, :] * channels + c) * places) + o[None, :]).reshape(-1)
        cols = (((n[None, :] * channels + c) * npix) + pix.indices[None, :]).reshape(-1)
        m = sp.csr_array((np.ones(rows.size, np.float32), (rows, cols)), shape=(out.numel(), xv.numel()))
        parts = [_ones(m @ self.deps(x))]
        if moving:  # each output on its own grid point (every coordinate)
            dims = gv.shape[-1]
            at = np.arange(out.numel())
            point = (at // (channels * places)) * places + at % places
            g = sp.csr_array((np.ones(out.numel() * dims, np.float32), (np.repeat(at, dims), (point[:, None] * dims + np.arange(dims)).reshape(-1))),
                             shape=(out.numel(), gv.numel()))
            parts.append(_ones(g @ self.deps(grid)))
        deps = _union(parts, out.numel(), self.n)
        hess = None
        if self.hessian:
            hparts = [h for h in (self.hess_of(traced), self.pairs(deps) if moving else None) if h is not None]
            hess = _union(hparts, self.n, self.n) if hparts else None
        return self.wrap(out, deps, hess)

    def solve(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """Linear solves ``X = A^-1 B`` (``B A^-1`` with ``left=False``):
        ``torch.linalg.solve``, ``solve_triangular`` (which reads one triangle of ``A``,
        its diagonal too unless ``unitriangular``), ``lu_solve`` (``A = P L U`` from
        ``lu_factor``'s ``LU`` and pivots; ``adjoint`` solves with ``A^H``) and
        ``cholesky_solve`` (``A = L L^H``, or ``U^H U``). ``A^-1`` is a polynomial in
        ``A`` of degree below n (Cayley-Hamilton), and a factor's inverse likewise, so
        ``X[i]`` depends on ``B[l]`` wherever ``l`` is reachable from ``i`` in the graph of
        ``A`` (for factors: the product of their inverses' reaches,
        :func:`_inverse_structure`): block-diagonal and triangular systems keep their
        structure, and batched systems stay apart.

        An ``A`` that depends on the inputs (``solve`` and ``solve_triangular``):
        ``dX = -A^-1 dA X``, so ``X[i, j]`` also depends on every entry of ``A``'s rows
        that ``i`` reaches (``X dA A^-1`` for ``left=False``: the columns that reach ``l``),
        and each system of a batch still on its own matrix only (a batch of per-cell
        systems was taken as dense: every cell on every other). Factors that depend on
        the inputs are taken as dense. The factors and ``info`` of a constant ``A`` are
        constants; of a varying one, values of ``A`` that torch's public functions never
        return (``linalg.solve`` checks ``info`` and raises: see ``rules``)."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        if name == "cholesky_solve":
            a, b, left = named["input2"], named["self"], True
        else:
            a, b, left = (named["A"] if name == "_linalg_solve_ex" else named["LU"] if name == "linalg_lu_solve" else named["self"]), named["B"], bool(named.get("left", True))
        traced = [t for t in (a, b, named.get("pivots")) if isinstance(t, _Traced)]
        varying = self.deps(a).nnz > 0
        if varying and name in ("linalg_lu_solve", "cholesky_solve"):  # a known op: its note says why dense
            label = f"{name} with factors that depend on the inputs"
            result = self.dense(label, traced, out)
            self.unknown.discard(label)
            self.densified.add(label)
            return result
        results = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        result = results[0]
        av = a.value if isinstance(a, _Traced) else a
        bv = b.value if isinstance(b, _Traced) else b
        n = int(av.shape[-1])
        vector = name == "_linalg_solve_ex" and (bv.dim() == 1 or (bv.dim() == av.dim() - 1 and tuple(bv.shape) == tuple(av.shape[:-1])))
        batch = tuple(result.shape[:-1] if vector else result.shape[:-2])
        k = 1 if vector else int(result.shape[-1] if left else result.shape[-2])
        if isinstance(a, _Traced) and not a.root.const and not varying and isinstance(b, _Traced) and self.deps(b).nnz:
            self.reads(f"{name}: zeros of a matrix that varies with the inputs")
        _check_entries(math.prod(av.shape), name)
        nz = (av != 0).cpu().numpy().reshape(-1, n, n)
        if varying:  # an entry that depends on the inputs is structure, whatever its value here
            nz = nz | (np.diff(self.deps(a).indptr) > 0).reshape(nz.shape)
        struct, inverse = _inverse_structure(name, named, av, nz)
        _check_entries(sum(int(m.nnz) for m in inverse), name)
        at_a = np.broadcast_to(np.arange(nz.shape[0]).reshape(tuple(av.shape[:-2])), batch).reshape(-1)
        b_batch = tuple(bv.shape[:-1] if vector else bv.shape[:-2])
        at_b = np.broadcast_to(np.arange(math.prod(b_batch)).reshape(b_batch), batch).reshape(-1)
        _check_entries(k * sum(int(inverse[i].nnz) for i in at_a), name)
        j = np.arange(k)[None, :]
        rows, cols, arows, acols = [], [], [], []
        for ob, (ia, ib) in enumerate(zip(at_a.tolist(), at_b.tolist())):
            coo = inverse[ia].tocoo()
            i, l = coo.row.astype(np.int64), coo.col.astype(np.int64)  # X[i] on B[l]
            if left:  # X[ob, i, j] <- B[ib, l, j]
                rows.append(((ob * n + i)[:, None] * k + j).reshape(-1))
                cols.append(((ib * n + l)[:, None] * k + j).reshape(-1))
            else:  # X[ob, j, l] <- B[ib, j, i] (X = B A^-1: column l of X on columns i of B reaching l)
                rows.append(((ob * k + j) * n + l[:, None]).reshape(-1))
                cols.append(((ib * k + j) * n + i[:, None]).reshape(-1))
            if varying:
                # entries (q, r) of A read: row q reached from i (left), or column r reaching l (right)
                entries = _entries_reached(struct[ia], inverse[ia], left)  # (n, n * n): per row i (column l)
                e = entries.tocoo()
                x, flat = e.row.astype(np.int64), e.col.astype(np.int64) + ia * n * n
                if left:
                    arows.append(((ob * n + x)[:, None] * k + j).reshape(-1))
                else:
                    arows.append(((ob * k + j) * n + x[:, None]).reshape(-1))
                acols.append(np.repeat(flat[:, None], k, axis=1).reshape(-1))  # (entry, j), as the rows
        rows_, cols_ = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in (rows, cols))
        spread = sp.csr_array((np.ones(rows_.size, np.float32), (rows_, cols_)), shape=(result.numel(), bv.numel()))
        check_product(spread, self.deps(b), name)  # (an irreducible A's inverse reads every b)
        deps = spread @ self.deps(b)
        if varying:
            arows_, acols_ = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in (arows, acols))
            _check_entries(arows_.size, name)
            reach = sp.csr_array((np.ones(arows_.size, np.float32), (arows_, acols_)), shape=(result.numel(), av.numel()))
            check_product(reach, self.deps(a), name)
            deps = deps + reach @ self.deps(a)
        deps = _ones(deps)
        hess = None
        if self.hessian:  # linear in B; with a varying A, B and A meet (every pair of an element's)
            parts = [m for m in (self.hess_of([a, b]) if varying else self.hess_of([b]), self.pairs(deps) if varying else None) if m is not None]
            hess = _union(parts, self.n, self.n) if parts else None
        wrapped = [self.wrap(result, deps, hess)]
        const = not isinstance(a, _Traced) or a.root.const
        for o in results[1:]:  # LU, pivots, info (of _linalg_solve_ex): of A alone
            wrapped.append(_Traced(o, _Root(o, _empty(o.numel(), self.n), const=const), self))
        return tuple(wrapped) if isinstance(out, (tuple, list)) else wrapped[0]

    def convolution(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        """``aten.convolution`` (conv1d/2d/3d and conv_transpose1d/2d/3d, any stride,
        padding, dilation, groups, output_padding): an output element depends on the
        input elements its kernel window covers, through the taps whose weight may be
        nonzero (a weight that depends on the input, or a constant one that is not zero:
        a 5-point Laplacian kernel stays 5 points), on every tap of its weights that
        reads an input element that may be nonzero when those depend on the input, and
        on its channel's bias. Which places a tap links is :func:`_kernel_links`'s
        arithmetic, for both directions."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        x, w, bias = named["input"], named["weight"], named.get("bias")
        traced = [t for t in (x, w, bias) if isinstance(t, _Traced)]
        transposed = bool(named["transposed"])
        xv = x.value if isinstance(x, _Traced) else x
        wv = w.value if isinstance(w, _Traced) else w
        stride, padding, dilation = (list(named[k]) for k in ("stride", "padding", "dilation"))
        groups = int(named["groups"])
        batch, channels, spatial = xv.shape[0], xv.shape[1], tuple(xv.shape[2:])
        outs, places = out.shape[1], tuple(out.shape[2:])
        # The weight is (out, in / groups, *kernel), transposed (in, out / groups, *kernel).
        per_group, kernel = wv.shape[1], tuple(wv.shape[2:])
        dx, dw = self.deps(x), self.deps(w)
        taps_per = math.prod(kernel)
        # The taps (weight row, column within the group, k) that may be nonzero.
        wmask = (wv != 0).cpu().numpy().reshape(wv.shape[0], per_group, taps_per) | (np.diff(dw.indptr) > 0).reshape(wv.shape[0], per_group, taps_per)
        if isinstance(w, _Traced) and not w.root.const and dx.nnz and not wmask.all():
            self.reads("convolution: zeros of an operand that varies with the inputs")
        if dx.nnz == 0:
            wmask[:] = True
        # A convolution sweeps its output places and reaches into the input; a transposed
        # one sweeps its input places and reaches into the output: the same arithmetic.
        sweep, reach = (spatial, places) if transposed else (places, spatial)
        a, b, k, at, to = _kernel_links(wmask, kernel, sweep, reach, stride, padding, dilation, batch)
        other = (a // max(wv.shape[0] // groups, 1)) * per_group + b  # the other side's channel
        (out_ch, out_place, in_ch, in_place) = (other, to, a, at) if transposed else (a, at, other, to)
        place_out, place_in = math.prod(places), math.prod(spatial)
        size = int(out.numel())
        for_batch = np.arange(batch)[:, None]
        rows = for_batch * outs * place_out + (out_ch * place_out + out_place)[None, :]  # (batch, links)
        parts = []
        if dx.nnz:
            cols = (for_batch * channels * place_in + (in_ch * place_in + in_place)[None, :]).reshape(-1)
            m = sp.csr_array((np.ones(cols.size, np.float32), (rows.reshape(-1), cols)), shape=(size, xv.numel()))
            parts.append(_ones(m @ dx))
        if dw.nnz:  # every tap that reads an input element that may be nonzero
            # (zeros of a constant input only: those of one that varies, padding included,
            # would make the pattern hold at this point alone, for a few entries)
            constant = not isinstance(x, _Traced) or x.root.const
            xmask = (xv != 0).cpu().numpy().reshape(batch, -1) if constant else np.ones((batch, xv[0].numel()), bool)
            read = xmask[:, in_ch * place_in + in_place]  # (batch, links)
            cols = np.broadcast_to(((a * per_group + b) * taps_per + k)[None, :], (batch, a.size))[read]
            m = sp.csr_array((np.ones(cols.size, np.float32), (rows[read], cols)), shape=(size, wv.numel()))
            parts.append(_ones(m @ dw))
        if isinstance(bias, _Traced) and bias.root.deps.nnz:
            r = np.arange(size)
            m = sp.csr_array((np.ones(size, np.float32), (r, (r // max(place_out, 1)) % outs)), shape=(size, outs))
            parts.append(_ones(m @ self.deps(bias)))
        deps = _union(parts, size, self.n)
        hess = None
        if self.hessian:
            hparts = [self.hess_of(traced)]
            if dx.nnz and dw.nnz:  # bilinear: pairs across input and weight
                hparts.append(self.pairs(deps))
            hparts = [h for h in hparts if h is not None]
            hess = _union(hparts, self.n, self.n) if hparts else None
        return self.wrap(out, deps, hess)

    def inplace(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        """``x.op_(...)``: compute the new deps as the op would out of place, then write
        them into the elements of ``x``'s root that ``x`` views."""
        target = args[0]
        sources = [a for a in pytree.tree_leaves((args[1:], kwargs)) if isinstance(a, _Traced)]
        if not isinstance(target, _Traced):
            if any(_float(a) and a.root.deps.nnz for a in sources) and _float(target):
                raise TraceError(f"{name}: a traced value is written into an untraced tensor")
            if sources:  # values without dependencies: the buffer's values now vary, untraced
                self.reads(f"{name}: traced values written into an untraced tensor")
            return out
        if not _float(target):  # a mask or indices changed in place: still values
            return target
        # (the index rules say so themselves, naming the op)
        if _valued(sources) and not (torch.Tag.pointwise in func.tags or base_name(name) in _LINEAR_POINTWISE | _SCATTER | {"index_put"}):
            self.reads(f"{name}: indices or masks computed from values")
        base = name[:-1] if name.endswith("_") else name
        traced = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _Traced)]
        if not torch.is_grad_enabled():
            # Autograd does not see the write: the tensor keeps the place (and so the
            # dependencies) it had, with new values. x.mul_(2) under no_grad, then x**3:
            # jacrev gives 3 (2x)^2 on the diagonal, not nothing.
            self.no_grad = True
            return target
        if base == "copy":
            fresh = self.pointwise("copy", (args[1],), {}, target.value)
        elif base == "fill" and _fill_value(args) is not None:
            fresh = self.filled(_fill_value(args), target.value)
        elif base in ("fill", "zero") or base in _NO_DEPS:
            fresh = self.wrap(target.value, _empty(target.numel(), self.n))
        elif base == "index_put":
            fresh = self.index_put(args, kwargs, target.value)
        elif base in _SCATTER:
            fresh = self.scatter(func, base, args, kwargs, target.value)
        elif torch.Tag.pointwise in func.tags or base in _LINEAR_POINTWISE:
            fresh = self.pointwise(base, args, kwargs, target.value)
        # In place as out of place: the same rule (addmm_, cumsum_, tril_: dense or probed before)
        elif base in _MATMUL:
            fresh = self.matmul(base, args, kwargs, target.value)
        elif base in _SCAN or base in _LINE or base in _FFT or base == "renorm":
            fresh = self.along(func, base, args, kwargs, target.value)
        elif base in ("tril", "triu"):  # same shape: the out-of-place op on the labels
            fresh = self.movement(getattr(aten, base).default, args, kwargs, target.value)
        elif base in _MOVEMENT:  # other in-place movement (resize_-like): not traced
            raise TraceError(f"{name}: in-place change of layout is not traced")
        else:
            fresh = self.dense(base, traced, target.value)
        self.write(target, fresh)
        return target

    def into(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``torch.mul(a, b, out=y)``: the op out of place (its own rule), then each
        result copied into its ``out=`` tensor, as ``y.copy_(a * b)`` is traced. The
        out overload's result was wrapped beside ``y``, which kept the dependencies it
        had (none, for a buffer the function made): ``GET .../sparsity`` showed an empty
        pattern for what reads two elements a row. (Autograd refuses ``out=`` on values
        that need a gradient: the products then answer torch's error, as ``jacrev``.)"""
        names = _out_arguments(func)
        functional = _functional(func)
        targets = [kwargs.get(n) for n in names]
        if functional is None or not all(isinstance(t, torch.Tensor) for t in targets):
            raise TraceError(f"{_op(func)}: an out= overload with no out-of-place one is not traced")
        rest = {k: v for k, v in kwargs.items() if k not in names}
        results = pytree.tree_leaves(functional(*args, **rest))  # traced through this dispatch again
        for target, result in zip(targets, results):
            if tuple(target.shape) != tuple(result.shape):  # torch would resize the out= tensor
                raise TraceError(f"{_op(func)}: an out= tensor of another shape (resized) is not traced")
            target.copy_(result)
        return targets[0] if len(targets) == 1 else tuple(targets)

    def relayout(self, func: Any, args: Any, kwargs: dict[str, Any]) -> _Traced:
        """``x.squeeze_()``, ``x.t_()``, ...: the same elements (and dependencies) seen
        through new sizes and strides. torch's own ``matmul`` of a vector and a matrix
        squeezes its result in place. The op runs on a fresh view of ``x``'s value (the
        root's value keeps the layout its labels and dependencies are in), which then
        becomes ``x``'s value, and ``x`` itself takes its sizes and strides."""
        t = args[0]
        view = t.value.as_strided(t.value.shape, t.value.stride(), t.value.storage_offset())
        rest = pytree.tree_map(lambda a: a.value if isinstance(a, _Traced) else a, (tuple(args[1:]), kwargs))
        func(view, *rest[0], **rest[1])
        t.value = view
        with torch._C._DisableTorchDispatch():  # the wrapper's own sizes and strides
            torch.Tensor.as_strided_(t, view.shape, view.stride(), view.storage_offset())
        return t

    def index_put(self, args: Any, kwargs: dict[str, Any], result: torch.Tensor) -> _Traced:
        """``x[indices] = values`` (or ``+=`` with accumulate): destinations from labels."""
        target, indices, values = args[0], args[1], args[2]
        if _valued([i for i in indices if isinstance(i, _Traced)]):
            self.reads("index_put: indices or masks computed from values")
            indices = [i.value if isinstance(i, _Traced) else i for i in indices]
        accumulate = bool(args[3]) if len(args) > 3 else bool(kwargs.get("accumulate", False))
        # aten's own indexing: its index list spells a whole dimension ``None`` (``y[:, idx]``
        # is ``[None, idx]``), where Python indexing would read ``None`` as a new axis.
        where = aten.index.Tensor(torch.arange(target.numel(), device=target.device).reshape(target.shape), list(indices))
        dest = where.reshape(-1).cpu().numpy()
        vals = self.deps(values, tuple(where.shape))
        base = self.deps(target)
        keep = np.ones(target.numel(), bool)
        if not accumulate:
            keep[dest] = False
        scatter = sp.csr_array((np.ones(dest.size, np.float32), (dest, np.arange(dest.size))), shape=(target.numel(), dest.size))
        deps = _ones(sp.diags_array(keep.astype(np.float32)) @ base + scatter @ vals)
        return self.wrap(result, deps, self.hess_of([target, values]))

    def scatter(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], result: torch.Tensor) -> _Traced:
        """``index_add``, ``index_reduce``, ``scatter_add``, ``scatter_reduce``, ``scatter``,
        ``index_copy``, ``index_fill``, ``put``: each element of ``src`` (or the fill value) lands where the index
        says; a destination keeps ``self``'s dependencies unless the op replaces it.
        Destinations come from the index's values: computed from traced values or given
        as an input, they make the pattern value-dependent; a constant index does not."""
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        target, dim, index = named["self"], int(named.get("dim", 0)), named["index"]
        src = named.get("src", named.get("source", named.get("value")))
        if isinstance(index, _Traced):
            if _valued([index]):
                self.reads(f"{name}: indices computed from values or given as an input")
            index = index.value
        shape = tuple(target.shape)
        numel = math.prod(shape)
        dim = dim % max(len(shape), 1)
        idx = index.reshape(-1).cpu().numpy().astype(np.int64) if index.numel() else np.zeros(0, np.int64)
        if name == "put":  # indices into self flattened (negative ones count from the end)
            dest = idx % max(numel, 1)
        elif name.startswith("index_"):  # a 1-D index along dim: whole slices move
            # source/self positions in (pre, index position, post) layout
            pre, post = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
            length = shape[dim] if shape else 1
            idx = idx % max(length, 1)
            p, k, q = np.meshgrid(np.arange(pre), np.arange(idx.size), np.arange(post), indexing="ij")
            dest = ((p * length + idx[k]) * post + q).reshape(-1)
        else:  # scatter: element p of index (and of src) goes to p with dim replaced by index[p]
            at = np.indices(tuple(index.shape)).reshape(index.dim(), -1)
            from_src = np.ravel_multi_index(tuple(at), tuple(src.shape)) if index.dim() and isinstance(src, _Traced) and src.dim() else np.zeros(idx.size, np.int64)
            if index.dim():
                at[dim] = idx % max(shape[dim], 1)
            dest = np.ravel_multi_index(tuple(at), shape) if index.dim() else np.zeros(idx.size, np.int64)
        if not isinstance(src, _Traced):  # a fill value, a constant source: no dependencies
            vals = _empty(dest.size, self.n)
        elif src.numel() == 1 and (src.dim() == 0 or name == "index_fill"):  # one value for every destination
            vals = self.deps(src, (dest.size,))
        elif name.startswith("index_") or name == "put":
            vals = self.deps(src)
        else:  # scatter reads only src's leading block of index's shape
            vals = _select(self.deps(src), from_src)
        reduce = named.get("reduce")
        replaces = name in ("scatter", "index_copy", "index_fill") and reduce is None or name == "put" and not named.get("accumulate", False)
        if name in ("scatter_reduce", "index_reduce") and not named.get("include_self", True):
            replaces = True  # destinations lose self's value (those no index names keep it)
        keep = np.ones(numel, bool)
        if replaces:
            keep[dest] = False
        spread = sp.csr_array((np.ones(dest.size, np.float32), (dest, np.arange(dest.size))), shape=(numel, dest.size))
        deps = _ones(sp.diags_array(keep.astype(np.float32)) @ self.deps(target) + spread @ vals)
        hess = None
        if self.hessian:
            parts = [self.hess_of([target, src])]
            if reduce is not None and str(reduce) not in ("sum", "add", "mean"):  # prod, amax, multiply: not linear
                parts.append(self.pairs(deps))
            parts = [h for h in parts if h is not None]
            hess = _union(parts, self.n, self.n) if parts else None
        return self.wrap(result, deps, hess)

    def write(self, target: _Traced, fresh: _Traced) -> None:
        root = target.root
        new = self.deps(fresh)
        if target.value is root.value:
            root.deps = new
        else:
            ids = self.labels(target).reshape(-1).cpu().numpy().astype(np.int64) - 1
            keep = np.ones(root.value.numel(), np.float32)
            keep[ids] = 0
            scatter = sp.csr_array((np.ones(ids.size, np.float32), (ids, np.arange(ids.size))), shape=(root.value.numel(), ids.size))
            root.deps = _ones(sp.diags_array(keep) @ root.deps + scatter @ new)
        if self.hessian and fresh.root.hess is not None:
            root.hess = fresh.root.hess if root.hess is None else _ones(root.hess + fresh.root.hess)


_TAGS: dict[Any, frozenset[Any]] = {}


def _row_kron(a: Any, b: Any) -> Any:
    """Row by row Kronecker product of two boolean CSR matrices with the same rows:
    row ``r`` holds ``i * b.shape[1] + j`` for each ``i`` of ``a``'s row and ``j`` of
    ``b``'s (the taps of a sample in two dims)."""
    ca, cb = np.diff(a.indptr), np.diff(b.indptr)
    per = ca * cb
    total = int(per.sum())
    k = np.arange(total) - np.repeat(np.cumsum(per) - per, per)
    cbr = np.repeat(cb, per)
    ai = a.indices[np.repeat(a.indptr[:-1], per) + k // np.maximum(cbr, 1)]
    bi = b.indices[np.repeat(b.indptr[:-1], per) + k % np.maximum(cbr, 1)]
    indptr = np.concatenate([[0], np.cumsum(per)])
    return sp.csr_array((np.ones(total, bool), ai.astype(np.int64) * b.shape[1] + bi, indptr), shape=(a.shape[0], a.shape[1] * b.shape[1]))


def _reachable(mask: np.ndarray) -> np.ndarray:
    """``R[i, l]``: ``l`` is reachable from ``i`` (``i`` itself included) in the directed
    graph with an edge ``i -> l`` wherever ``mask[i, l]``: the structure of every power of
    a matrix, so of its inverse. Strongly connected components are condensed (an
    irreducible matrix is one component: all of ``R`` at once), then their reach is
    propagated in reverse topological order, a row of booleans per component."""
    graph = sp.csr_array(mask)
    count, label = connected_components(graph, directed=True, connection="strong")
    src, dst = graph.nonzero()
    cond = sp.csr_array((np.ones(src.size, bool), (label[src], label[dst])), shape=(count, count))
    cond.setdiag(False)
    cond.eliminate_zeros()
    indeg = np.bincount(cond.indices, minlength=count)
    order, queue = [], list(np.flatnonzero(indeg == 0))
    indeg = indeg.copy()
    while queue:  # Kahn's topological order of the components
        c = queue.pop()
        order.append(c)
        for d in cond.indices[cond.indptr[c] : cond.indptr[c + 1]]:
            indeg[d] -= 1
            if indeg[d] == 0:
                queue.append(d)
    reach = np.eye(count, dtype=bool)
    for c in reversed(order):
        for d in cond.indices[cond.indptr[c] : cond.indptr[c + 1]]:
            reach[c] |= reach[d]
    return reach[label][:, label]


def _inverse_structure(name: str, named: dict[str, Any], av: torch.Tensor, nz: np.ndarray) -> tuple[list[np.ndarray], list[Any]]:
    """Per matrix of a batch (``nz``: its entries that may be nonzero): the entries of
    ``A`` the solve reads, and the structure of the inverse it applies (scipy CSR of
    booleans, ``inv[i, l]``: ``X[i]`` may depend on ``B[l]``)."""
    n = nz.shape[-1]
    eye = np.eye(n, dtype=bool)
    struct, inverse = [], []
    if name == "linalg_lu_solve":
        # A = P L U: A^-1 = U^-1 L^-1 P^T (adjoint: its transpose). The pivots are the
        # factorisation's own, constants with a constant LU.
        piv = named["pivots"]
        pv = (piv.value if isinstance(piv, _Traced) else piv).reshape(-1, n).cpu().numpy().astype(np.int64) - 1
        for m, p in zip(nz, np.broadcast_to(pv, (nz.shape[0], n)) if pv.shape[0] == 1 else pv):
            perm = np.arange(n)
            for i, t in enumerate(p.tolist()):  # LAPACK's row swaps, in order
                perm[i], perm[t] = perm[t], perm[i]
            pt = sp.csr_array((np.ones(n, bool), (np.arange(n), perm)), shape=(n, n))  # P^T
            inv = sp.csr_array(_reachable(np.triu(m) | eye)) @ sp.csr_array(_reachable(np.tril(m, -1) | eye)) @ pt
            inv = sp.csr_array(inv.T) if bool(named.get("adjoint", False)) else sp.csr_array(inv)
            struct.append(m)
            inverse.append(inv)
        return struct, inverse
    if name == "cholesky_solve":
        upper = bool(named.get("upper", False))
        for m in nz:
            r = sp.csr_array(_reachable((np.triu(m) if upper else np.tril(m)) | eye))
            # A = L L^H: A^-1 = L^-H L^-1; A = U^H U: A^-1 = U^-1 U^-H
            inverse.append(sp.csr_array(r @ r.T) if upper else sp.csr_array(r.T @ r))
            struct.append(m)
        return struct, inverse
    if name == "linalg_solve_triangular":
        upper, unit = bool(named["upper"]), bool(named.get("unitriangular", False))
        for m in nz:
            tri = np.triu(m) if upper else np.tril(m)
            if unit:
                tri = tri & ~eye  # the diagonal is taken as ones, never read
            struct.append(tri)
            inverse.append(sp.csr_array(_reachable(tri | eye)))
        return struct, inverse
    for m in nz:
        struct.append(m)
        inverse.append(sp.csr_array(_reachable(m)))
    return struct, inverse


def _entries_reached(struct: np.ndarray, inverse: Any, left: bool) -> Any:
    """Which entries ``(q, r)`` of a varying ``A`` (flat ``q * n + r``) each row ``i`` of
    ``X = A^-1 B`` depends on: those of the rows ``q`` that ``i`` reaches (``dX = -A^-1
    dA X``); for ``X = B A^-1``, each column ``l``'s: those of the columns ``r`` that
    reach ``l`` (``dX = -X dA A^-1``). A CSR of shape ``(n, n * n)``."""
    n = struct.shape[0]
    q, r = np.nonzero(struct)
    if left:  # S[q, q * n + r]
        pick = sp.csr_array((np.ones(q.size, np.float32), (q, q * n + r)), shape=(n, n * n))
        return _ones(sp.csr_array(inverse, dtype=np.float32) @ pick)
    pick = sp.csr_array((np.ones(r.size, np.float32), (r, q * n + r)), shape=(n, n * n))  # column r's entries
    return _ones(sp.csr_array(inverse.T, dtype=np.float32) @ pick)


def _kernel_links(
    wmask: np.ndarray, kernel: tuple[int, ...], sweep: tuple[int, ...], reach: tuple[int, ...],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], batch: int,
) -> tuple[np.ndarray, ...]:
    """Which places a convolution's taps link: for each tap ``(a, b, k)`` that ``wmask``
    (weight rows x columns x taps) lets through and each place ``at`` of the swept grid,
    the place ``at * stride - padding + k * dilation`` of the reached grid, where it lies
    inside. A convolution sweeps its output and reaches into its input; a transposed one
    sweeps its input and reaches into its output. Returns ``(a, b, k, at, to)``, one
    entry per link (flat places), after bounding the links by the entry limit."""
    a, b, k = np.nonzero(wmask)
    at_all = np.arange(math.prod(sweep))
    _check_entries(batch * at_all.size * a.size, "convolution")
    kc = np.unravel_index(k, kernel) if kernel else ()
    sc = np.unravel_index(at_all, sweep) if sweep else ()
    valid = np.ones((a.size, at_all.size), bool)
    to = np.zeros((a.size, at_all.size), np.int64)
    for d in range(len(sweep)):
        td = sc[d][None, :] * stride[d] - padding[d] + kc[d][:, None] * dilation[d]
        valid &= (td >= 0) & (td < reach[d])
        to = to * reach[d] + td
    tap, at = np.nonzero(valid)
    return a[tap], b[tap], k[tap], at, to[tap, at]


def _tagged(func: Any, tag: Any) -> bool:
    """``tag in func.tags``, remembered per op (``tags`` builds a list on every call)."""
    tags = _TAGS.get(func)
    if tags is None:
        tags = _TAGS[func] = frozenset(func.tags)
    return tag in tags


def _unwrapped(func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``args`` and ``kwargs`` with each traced tensor's value in its place, for ``func``
    to run on. The wrapper carries no conjugate bit where its value does
    (``torch.fft.rfft(x).conj()``), so torch reads ``.imag`` / ``.real`` of it as
    ``view_as_real`` of the wrapper, which the value, conjugate unresolved, refuses
    ('view_as_real doesn't work on unresolved conjugated tensors'): there, the value
    resolved (the same numbers; tracing then failed and the pattern was probed)."""
    resolve = _op(func) == "view_as_real"
    return pytree.tree_map(
        lambda a: (a.value.resolve_conj() if resolve else a.value) if isinstance(a, _Traced) else a, (args, kwargs)
    )


def _writes_first(func: Any) -> bool:
    """The op writes into its first argument (``x.add_(y)``, ``x.index_add_(...)``)."""
    arguments = func._schema.arguments
    return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write


_OUTS: dict[Any, tuple[str, ...]] = {}


def _out_arguments(func: Any) -> tuple[str, ...]:
    """The names of the ``out=`` arguments of an out overload (``mul.out``: ``out``;
    ``max.dim_max``: ``max``, ``max_values``), else (); remembered per op."""
    names = _OUTS.get(func)
    if names is None:
        names = _OUTS[func] = tuple(a.name for a in func._schema.arguments if a.is_out)
    return names


def _functional(func: Any) -> Any:
    """The out-of-place overload an out overload writes the result of: the one of the
    same op with the same arguments but the ``out=`` ones (``mul.Tensor`` for
    ``mul.out``), else None."""
    want = [(a.name, str(a.type)) for a in func._schema.arguments if not a.is_out]
    packet = func.overloadpacket
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        arguments = candidate._schema.arguments
        if not any(a.is_out or (a.alias_info is not None and a.alias_info.is_write) for a in arguments) \
                and [(a.name, str(a.type)) for a in arguments] == want:
            return candidate
    return None


def _unfilled(func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``args`` and ``kwargs`` with the fill value (``constant_pad_nd``'s ``value``) 0:
    on labels, what is filled in names no source, whatever the value (an int 5 named
    element 4). Every other number is kept: ``upsample_nearest``'s ``scales`` say which
    element each output copies, and 0 there (every float was taken for a fill value)
    made torch compute its scale from the sizes: at ``scale_factor=1.7`` the pattern was
    another mapping than the op's (a 200 with values 1.0 off jacrev's)."""
    names = [a.name for a in func._schema.arguments]
    if "value" not in names:
        return args, kwargs
    at = names.index("value")
    if at < len(args):
        return (*args[:at], 0.0, *args[at + 1 :]), kwargs
    return args, ({**kwargs, "value": 0.0} if "value" in kwargs else kwargs)


def base_name(name: str) -> str:
    """``mul`` for ``mul_``."""
    return name[:-1] if name.endswith("_") else name


def _valued(traced: Sequence[_Traced]) -> list[_Traced]:
    """The traced indices and masks among an op's arguments (values read as structure)."""
    return [t for t in traced if not _float(t)]


# In-place changes of layout: traced by :meth:`_Tracer.relayout`.
_LAYOUT_INPLACE = frozenset("squeeze_ unsqueeze_ t_ transpose_ swapdims_ swapaxes_ as_strided_".split())

# Ops tagged dynamic_output_shape whose output's shape is fixed by their index or mask
# arguments: data-dependent only when those are traced.
_STATIC_INDEX = frozenset("index masked_select index_put repeat_interleave".split())


def _shape_from_values(name: str, traced: Sequence[_Traced]) -> bool:
    """Whether an op tagged dynamic_output_shape has an output shape that follows the
    values here: always, but for those of ``_STATIC_INDEX`` with no traced index or
    mask; and ``index`` only by a traced boolean mask (its count of True), an integer
    index fixing the shape whatever its values (what it moves is the movement rule's)."""
    if name not in _STATIC_INDEX:
        return True
    valued = _valued(traced)
    if name == "index":
        return any(t.dtype == torch.bool for t in valued)
    return bool(valued)


def _fill_value(args: Any) -> "_Traced | None":
    """The value of ``fill.Tensor`` (``x.fill_(t)``, ``torch.fill(x, t)``) when it is a
    traced float tensor: its dependencies reach every element (``fill.Scalar``: none)."""
    value = args[1] if len(args) > 1 else None
    return value if isinstance(value, _Traced) and _float(value) else None


def _strided(o: torch.Tensor) -> bool:
    """A dense tensor: the tracer's wrapper holds no other layout (``to_sparse()`` of a
    constant stays a plain tensor), nor a ZeroTensor (the zeros torch makes for a
    tangent under a jvp of a grad: a Hessian or Hessian-vector product computed inside
    the function). torch (2.13) crashes the process, a segmentation fault, at the next
    op on such a wrapper: the engine died at every such request."""
    return o.layout == torch.strided and not o._is_zerotensor()


def _reads_nothing(outs: Sequence[Any], traced: Sequence[Any]) -> bool:
    """Whether an op's float results hold no element, or its traced arguments none: an
    empty result reads nothing, and one computed from empty tensors alone (the sum of
    none, 0; their product, 1) is the same at every point, a choice among none no choice.
    The ops' own rules met the zero size badly: a sum over an empty slice (a 1 x n
    grid's diagonal differences, ``u[1:, 1:] - u[:-1, :-1]``) multiplied a (1, 1)
    reduction by (0, n) deps, ``cdist`` of no points failed alike, the trace failed, and
    the whole request was probed (``exact`` false, a numerical pattern)."""
    floats = [o for o in outs if _float(o)]
    return bool(floats) and all(o.numel() == 0 for o in floats) or bool(traced) and all(t.numel() == 0 for t in traced)


def _float(o: Any) -> bool:
    """Tensors that can carry a derivative (complex ones too: fft, view_as_real, ...)."""
    return isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())


_APPLY = torch.autograd.Function.apply.__func__.__code__  # type: ignore[attr-defined]


def _custom_function() -> tuple[str, list[Any]] | None:
    """When the op being traced runs inside a custom ``autograd.Function``'s forward
    (under ``Function.apply``, in a frame above, up to the trace's own): the outermost
    such Function's name and traced tensor arguments; else None. The frames are read
    because ``apply`` is C++ that runs the forward under no_grad and dispatches nothing
    of its own: a frame walk (a microsecond or so) is the only trace it leaves."""
    found = None
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _TRACE_CODE:
        if frame.f_code is _APPLY:
            local = frame.f_locals
            cls = local.get("cls")
            inputs = [a for a in pytree.tree_leaves((local.get("args"), local.get("kwargs"))) if isinstance(a, _Traced)]
            found = (getattr(cls, "__qualname__", "?"), inputs)
        frame = frame.f_back
    return found


def _dims(func: Any, args: Any, kwargs: dict[str, Any], ndim: int) -> tuple[int, ...]:
    """The ``dim`` argument of a reduction, scan or line op, as non-negative ints."""
    names = [a.name for a in func._schema.arguments]
    value: Any = None
    if "dim" in kwargs:
        value = kwargs["dim"]
    elif "dim" in names and names.index("dim") < len(args):
        value = args[names.index("dim")]
    elif "dim" in names:  # sort, cumsum, ...: the schema's default (usually -1)
        value = func._schema.arguments[names.index("dim")].default_value
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return tuple(range(ndim))
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(sorted(int(v) % max(ndim, 1) for v in values)) if ndim else ()


class _Fresh(TorchDispatchMode):
    """Traces the float tensors the function makes from nothing (``torch.zeros(n)``,
    ``torch.full``, ``torch.empty``) as constants, so that writing traced values into
    them in place (``r.index_add_(0, elements, contributions)``: how residuals are
    assembled) is traced rather than untraceable. Every other op passes through."""

    def __init__(self, tracer: "_Tracer") -> None:
        super().__init__()
        self.tracer = tracer

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable, which imports
        # torch._dynamo at the first op traced (about 2 s: most of a first GET .../sparsity
        # with warm-up off). The guard matters only once dynamo runs (the function uses
        # torch.compile): __torch_dispatch__ then takes it itself.
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and not getattr(_Fresh, "_guarded", None):
            # (torch's own guard, as its wrapper would have given, once dynamo is loaded)
            _Fresh._guarded = dynamo.disable(_Fresh._dispatch, recursive=True)
        guarded = getattr(_Fresh, "_guarded", None)
        return guarded(self, func, types, args, kwargs) if guarded is not None else self._dispatch(func, types, args, kwargs)

    def _dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # (here, under dynamo's guard: dynamo cannot trace sys.setprofile, and warned)
        watch = self.tracer.watch
        watch.pause()  # the tracer's own calls: not the function's type reads
        try:
            return self._traced(func, args, kwargs or {})
        finally:
            watch.resume()

    def _traced(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if _tagged(func, torch.Tag.nondeterministic_seeded):  # rand, randint, randperm, bernoulli, dropout, ...
            (self.tracer.seeded if self.tracer.seeded_here(args, kwargs) else self.tracer.random).add(_op(func))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and _float(out) and _strided(out) and not isinstance(out, _Traced) and not func._schema.returns[0].alias_info \
                and not any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs))):
            return self.tracer.constant_tensor(out)
        return out


_LOCK = threading.Lock()  # one trace at a time: torch dispatch state is per thread, ours per call


def _locked(check_alive: Callable[[], None] | None) -> None:
    """Take ``_LOCK``, checking the caller is still alive while another trace holds it."""
    while not _LOCK.acquire(timeout=0.05):
        if check_alive is not None:
            check_alive()


def _alive(tracer: "_Tracer") -> None:
    """The tracer's check (at most every ``_CHECK_EVERY_S``) between the steps after the
    trace, raising what it stopped on."""
    tracer.alive()
    if tracer.stopped is not None:
        raise tracer.stopped


def _trace(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], hessian: bool,
    check_alive: Callable[[], None] | None = None, record: bool = False,
) -> tuple[list[Any], _Tracer]:
    """``fn`` on traced tensors. ``record``: the differentiated inputs require grad as
    autograd sees them, so that it records a graph over the traced tensors: a function
    that takes ``torch.autograd.grad`` inside itself (a force, ``-dE/dx`` with
    ``create_graph=True``, as molecular dynamics codes write it) needs one, and its
    backward then runs as aten ops the tracer follows. Without it, autograd refused
    ("element 0 of tensors does not require grad") and every such force was probed
    (dense derivatives at random points). Only on that refusal: recording costs a graph,
    and autograd refuses an in-place write into a leaf that requires grad, which jacrev's
    inputs take."""
    sizes = [args[i].numel() for i in argnums]
    check_input_entries(sum(sizes))
    tracer = _Tracer(sum(sizes), hessian, check_alive)
    full: list[Any] = list(args)
    for i, a in enumerate(args):  # the others too, with no dependencies: to see their values read
        if i not in argnums and isinstance(a, torch.Tensor):
            t = a.detach().clone()
            full[i] = _Traced(t, _Root(t, _empty(a.numel(), tracer.n)), tracer)
    offset = 0
    for i, size in zip(argnums, sizes):
        t = args[i].detach().clone()  # the function may write into it: never into the caller's
        eye = sp.csr_array((np.ones(size, np.float32), (np.arange(size), offset + np.arange(size))), shape=(size, tracer.n))
        full[i] = tracer.input(t, eye)
        if record:
            torch.Tensor.requires_grad_(full[i], True)  # (the C++ flag: the Python property is jacrev's answer)
        offset += size
    _locked(check_alive)
    try:
        with torch.enable_grad(), _Fresh(tracer), tracer.watch:
            out = fn(*full)
    except BaseException as exc:
        if tracer.stopped is not None and exc is not tracer.stopped:
            raise tracer.stopped from None  # the function caught it, then failed otherwise
        if isinstance(exc, PatternTooLarge):
            # Refused at a limit before any value was read (no value read, no draw): every
            # point of these shapes runs the same ops up to here, and is refused the same
            # way (the pattern cache shares a pattern so read across points likewise).
            exc.any_point = not (tracer.value_reads or tracer.random or tracer.seeded)
        if exc is tracer.stopped or isinstance(exc, (TraceError, PatternTooLarge)) or not isinstance(exc, Exception):
            raise
        if not record and isinstance(exc, RuntimeError) and _NO_GRAPH in str(exc):
            out = _RECORD
        else:
            raise TraceError(f"{type(exc).__name__}: {exception_text(exc)}") from exc
    finally:
        tracer.done = True
        _LOCK.release()
    if out is _RECORD:
        return _trace(fn, args, argnums, hessian, check_alive, record=True)
    tracer.type_reads = tracer.watch.reads()
    tracer.coarse = _coarse(tracer, args, argnums)
    if tracer.stopped is not None:  # the function caught it and went on: still stop
        raise tracer.stopped
    leaves = pytree.tree_leaves(out)
    if not leaves or not all(isinstance(o, torch.Tensor) for o in leaves):
        raise TraceError("the function did not return tensors")
    return leaves, tracer


#: autograd's refusal of torch.autograd.grad over tensors it recorded nothing for (see _trace)
_NO_GRAPH = "does not require grad and does not have a grad_fn"
_RECORD = object()

_TRACE_CODE = _trace.__code__  # where the frames of the traced function end (see _custom_function)


#: Note on patterns of functions that compute from their inputs under ``torch.no_grad``:
#: forward-mode AD would differentiate through those values, so only VJPs are used.
NO_GRAD_NOTE = "uses torch.no_grad: reverse mode only"

#: Note on patterns of functions that call a custom ``autograd.Function``: its backward
#: (what jacrev uses) and its jvp may disagree, so only VJPs are used, as jacrev's.
CUSTOM_NOTE = "uses a custom autograd.Function: reverse mode only"


#: Note on patterns that depend on the input values (then followed by the reasons).
VALUES_NOTE = "depends on the input values: exact at this point only"

#: Note on patterns of functions that draw random numbers (then followed by the ops, if
#: the tracer saw them): indices or masks drawn at random make the pattern one draw's.
RANDOM_NOTE = "draws random numbers: exact for this request's draws only, never reused"


#: Note on patterns of functions that draw only from a generator they seed themselves.
SEEDED_NOTE = "draws from a generator it seeds itself: the same draws at every call, checked"


#: Note on patterns of functions that read a traced tensor's text (``str(x)``): the text
#: jacrev's tensors give is another (``GradTrackingTensor(...)``), so a branch on it may
#: go another way there than in the trace. The products check the pattern.
TEXT_NOTE = "reads a tensor's text (str, repr, format), which differs under jacrev: checked"

#: Note on patterns whose traced run computed other values than a plain call of the
#: function (a branch on ``type(x)``, which the tracer cannot hook): checked.
DIVERGED_NOTE = "the traced run computed other values than the function (a branch on a tensor's type?): checked"

#: Note on patterns of functions that read their tensors' type (``type(x)``,
#: ``x.__class__``, functorch's queries; then followed by where): the tracer's tensors are
#: a subclass, jacrev's are not, so a branch on it may take another arm there, with the
#: same values but another derivative (see :mod:`.type_reads`). The products check it.
TYPE_NOTE = "reads a tensor's type (type(), __class__, functorch's state) or autograd state (grad_fn, is_leaf), which differs under jacrev: checked"


def checked(p: Pattern) -> bool:
    """Whether a traced ``p`` is checked against its products although exact: the
    function seeds its own generator (``SEEDED_NOTE``), reads its tensors' text
    (``TEXT_NOTE``), its traced run computed other values than a plain call
    (``DIVERGED_NOTE``), or it reads its tensors' type (``TYPE_NOTE``): the trace may
    have taken another way than the products."""
    return any(n.startswith((SEEDED_NOTE, TEXT_NOTE, DIVERGED_NOTE, TYPE_NOTE)) for n in p.notes)


def random_note(ops: Sequence[str] = ()) -> str:
    return f"{RANDOM_NOTE} ({', '.join(sorted(ops))})" if ops else RANDOM_NOTE


def is_random(p: Pattern) -> bool:
    """Whether ``p`` holds for one draw of a function's random numbers only."""
    return any(n.startswith(RANDOM_NOTE) for n in p.notes)


def _notes(tracer: _Tracer) -> tuple[str, ...]:
    notes = tuple(f"unknown op {name}: assumed dense" for name in sorted(tracer.unknown))
    notes += tuple(f"{label}: assumed dense" for label in sorted(tracer.densified))
    if tracer.value_reads:
        notes += (f"{VALUES_NOTE} ({'; '.join(tracer.value_reads)})",)
    notes += tuple(f"custom autograd.Function {name}: its backward defines the derivative, assumed dense over its inputs"
                   for name in sorted(tracer.custom))
    if tracer.random:
        notes += (random_note(tuple(tracer.random)),)
    if tracer.seeded:
        notes += (f"{SEEDED_NOTE} ({', '.join(sorted(tracer.seeded))})",)
    if tracer.text:
        notes += (TEXT_NOTE,)
    if tracer.diverged:
        notes += (DIVERGED_NOTE,)
    if tracer.type_reads:
        notes += (f"{TYPE_NOTE} ({'; '.join(tracer.type_reads)})",)
    if tracer.choices:
        notes += (f"{CHOICE_NOTE} ({', '.join(sorted(tracer.choices))})",)
    return notes + ((NO_GRAD_NOTE,) if tracer.no_grad else ()) + ((CUSTOM_NOTE,) if tracer.custom else ())


def _coarse(tracer: "_Tracer", args: Sequence[Any], argnums: Sequence[int]) -> torch.dtype | None:
    """The coarsest dtype the function computed in from its inputs, where coarser than
    the inputs' (``Pattern.arithmetic``): a float64 function computing in float32 inside
    (``x.float()``, a float32 model of float64 data). A JVP rounds each column's products
    in float32 where jacrev's VJPs round otherwise, so forward products are proven no
    jacrev's at the inputs' round-off (verify.differs_from_reverse) and VJPs answer after
    them: ``mode=auto`` takes reverse mode up front (compute._colored), as for an output
    leaf coarser than the inputs."""
    inputs = [args[i].dtype for i in argnums if isinstance(args[i], torch.Tensor) and _float(args[i])]
    if not inputs or not tracer.arithmetic:
        return None
    eps = lambda d: float(torch.finfo(d).eps)  # noqa: E731
    like = max(inputs, key=eps)
    worst = max(tracer.arithmetic, key=eps)
    return worst if eps(worst) > eps(like) else None


def _diverged(leaves: Sequence[Any], against: torch.Tensor | None) -> bool:
    """Whether the traced run computed other values than a plain call (``against``, its
    output flattened: the request's forward pass): the function then went another way under the tracer than under
    jacrev for something the tracer cannot see. ``type(x) is torch.Tensor`` is False for
    a traced tensor (no Python hook changes ``type``), True for jacrev's: a function that
    branches on it kept another branch's pattern, exact and unchecked (a 200 1.0 off
    jacrev's). The values tell: the pattern is then checked (``DIVERGED_NOTE``)."""
    if against is None:
        return False
    values = [o.value if isinstance(o, _Traced) else o for o in leaves]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return True
    got = torch.cat([v.detach().reshape(-1) for v in values]) if values else torch.zeros(0)
    want = against.detach()
    if got.shape != want.shape or got.dtype != want.dtype:
        return True
    if not (got.is_floating_point() or got.is_complex()):
        return not torch.equal(got, want)
    # the same ops on the same values: equal but for nondeterministic kernels' round-off
    tol = 1024 * torch.finfo(got.real.dtype if got.is_complex() else got.dtype).eps
    scale = float(want.abs().nan_to_num(0.0, 0.0, 0.0).max()) if want.numel() else 0.0
    return not torch.allclose(got, want, rtol=tol, atol=tol * scale, equal_nan=True)


def trace_jacobian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), *,
    check_alive: Callable[[], None] | None = None, against: torch.Tensor | None = None,
) -> Pattern:
    """The Jacobian pattern of ``fn`` at ``args`` w.r.t. ``argnums``, flattened and
    concatenated over outputs (rows) and differentiated inputs (columns).
    ``check_alive`` is called as the trace goes (see the module doc); ``against``: a
    plain call's output, flattened (see :func:`_diverged`)."""
    leaves, tracer = _trace(fn, args, argnums, False, check_alive)
    tracer.diverged = _diverged(leaves, against)
    _alive(tracer)  # the steps below take a while on millions of entries: check between
    blocks = [tracer.deps(o) for o in leaves]
    m = sum(o.numel() for o in leaves)
    _alive(tracer)
    if len(blocks) == 1:  # vstack of one block would copy it through a general path
        mat = sp.csr_array(blocks[0]).tocoo()
    else:
        mat = sp.vstack(blocks, format="coo") if blocks else _empty(0, tracer.n).tocoo()
    _alive(tracer)
    return Pattern((m, tracer.n), mat.row, mat.col, source="traced", exact=not (tracer.unknown or tracer.custom or tracer.densified), notes=_notes(tracer),
                   value_dependent=bool(tracer.value_reads or tracer.random),
                   arithmetic="" if tracer.coarse is None else str(tracer.coarse).removeprefix("torch."))


def trace_hessian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), *,
    check_alive: Callable[[], None] | None = None, against: torch.Tensor | None = None,
) -> Pattern:
    """The Hessian pattern of a scalar ``fn`` (a superset: see the module doc)."""
    leaves, tracer = _trace(fn, args, argnums, True, check_alive)
    tracer.diverged = _diverged(leaves, against)
    if len(leaves) != 1 or leaves[0].numel() != 1:
        raise ValueError("a sparse Hessian needs a function with one scalar output")
    _alive(tracer)
    out = leaves[0]
    hess = out.root.hess if isinstance(out, _Traced) and out.root.hess is not None else _empty(tracer.n, tracer.n)
    coo = _ones(hess).tocoo()
    _alive(tracer)
    return Pattern((tracer.n, tracer.n), coo.row, coo.col, source="traced", exact=not (tracer.unknown or tracer.custom or tracer.densified), notes=_notes(tracer),
                   value_dependent=bool(tracer.value_reads or tracer.random))


def _dense(g: Callable[..., torch.Tensor], diff: Sequence[torch.Tensor], hessian: bool, verdict: dict[str, bool],
           leaves: Sequence[tuple[int, torch.dtype]] = ()) -> Any:
    """Dense derivative by torch.func, checked against one product (at the first point:
    ``verdict`` keeps it for the others) and computed row by row (no vmap) where vmap
    cannot run ``g`` or runs it wrong (see :mod:`.dense`; ``leaves``: the output leaves'
    sizes and dtypes, whose round-off the check allows)."""
    from .dense import dense_hessian, dense_jacobian

    if hessian:
        return dense_hessian(g, diff, reverse=True, verdict=verdict, leaves=leaves)
    return dense_jacobian(g, diff, verdict, leaves)


def probe(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), *, hessian: bool = False,
    points: int = 3, seed: int = 0, why: str = "", check_alive: Callable[[], None] | None = None,
    leaves: Sequence[tuple[int, torch.dtype]] = (),
) -> Pattern:
    """Nonzeros of dense derivatives at ``args`` and ``points - 1`` random points near
    them, united.
    Entries that vanish at every probed point are missed: ``source="probe"`` says so.
    ``check_alive`` is called before each point. ``leaves``: the element count and dtype
    of each output leaf a flat ``fn`` concatenates (else ``fn``'s own leaves): the dense
    Jacobians' check allows each row its leaf's round-off (see :mod:`.dense`)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    argnums = tuple(argnums)
    n = sum(args[i].numel() for i in argnums)
    if hessian:
        _check_entries(n * n, "probing (a dense Hessian)")
    else:
        # A plain call, not under no_grad: a function may differentiate inside itself
        # (a force as torch.autograd.grad of an energy), which no_grad makes it fail.
        own = [(o.numel(), o.dtype) for o in pytree.tree_leaves(fn(*[a.detach().clone() for a in args]))]
        m = sum(size for size, _ in own)
        leaves = leaves if sum(size for size, _ in leaves) == m else own
        _check_entries(m * n, "probing (a dense Jacobian)")
    found: np.ndarray | None = None
    verdict: dict[str, bool] = {}
    for point in range(points):
        if check_alive is not None:
            check_alive()
        moved = list(args)
        for i in argnums:
            if point == 0:  # the request's own point first: its entries are never missed
                moved[i] = args[i].detach().clone()
                continue
            noise = torch.randn(args[i].shape, generator=gen, dtype=torch.float64).to(args[i].device, args[i].dtype)
            moved[i] = args[i].detach() + noise * (1 + args[i].detach().abs())
        diff = [moved[i] for i in argnums]

        def g(*d: torch.Tensor) -> torch.Tensor:
            full = [a.clone() if isinstance(a, torch.Tensor) else a for a in moved]  # pristine every call
            for i, v in zip(argnums, d):
                full[i] = v
            leaves = pytree.tree_leaves(fn(*full))
            return torch.cat([o.reshape(-1) for o in leaves])

        jac = _dense(g, diff, hessian, verdict, leaves)
        if hessian:
            blocks = [[h.reshape(diff[r].numel(), diff[c].numel()) for c, h in enumerate(row)] for r, row in enumerate(jac)]
            dense = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
        else:
            dense = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
        nz = (dense != 0).cpu().numpy()
        found = nz if found is None else found | nz
    assert found is not None
    if hessian:
        # A Hessian's pattern is symmetric, as star and acyclic colourings need: an
        # entry seen on one side holds its pair (reverse over reverse through a backward
        # that switches grad off, or under no_grad, saw one of them only).
        found = found | found.T
    notes = ("numerical probe at this point and random ones: entries that vanish at every probed point are missed",) + ((why,) if why else ())
    return Pattern.from_dense(found, source="probe", exact=False, notes=notes)
