"""Functions for the sparse API tests (tests/test_sparse_api.py), loaded by module name."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from jacobian_service import Input, register
from jacobian_service.sparsity import banded, coo


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))],
          description="x * y: at y = 0 the x-derivatives vanish, which probing would miss.")
def xy_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * y


@register(
    inputs=[Input("x", shape=("n",))],
    description="A non-periodic band: y[i] = x[i-1] + x[i]^2 + x[i+1] x[i+2] (zeros past the ends).",
    sparsity={"band": banded(1, 2), "hessian_only": banded(0, 0, hessian=True), "fixed3": coo([0], [0], shape=(3, 3))},
)
def band_1_2(x: torch.Tensor) -> torch.Tensor:
    p = F.pad(x, (1, 2))
    return p[:-3] + p[1:-2] ** 2 + p[2:-1] * p[3:]


@register(
    inputs=[Input("x", shape=("n",))],
    description="Chained Rosenbrock with its tridiagonal Hessian declared.",
    sparsity={"tridiagonal": banded(1, 1, hessian=True)},
)
def rosen_declared(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@register(inputs=[Input("x", shape=("n",))], has_aux=True,
          description="sin(x) with aux: sparse results carry aux beside them.")
def sin_with_aux(x: torch.Tensor):
    return torch.sin(x), {"total": x.sum(), "label": "sin"}


@register(inputs=[Input("x", shape=("n",), dtype="float64")], description="sqrt(x); raises for any negative entry")
def sqrt_positive(x: torch.Tensor) -> torch.Tensor:
    if bool((x < 0).any()):
        raise ValueError("x must be non-negative")
    return torch.sqrt(x)


@register(inputs=[Input("x", shape=("n",))],
          description="A Python loop of 7,500 small ops: tracing it takes seconds (detection deadline tests).")
def slow_detection(x: torch.Tensor) -> torch.Tensor:
    y = x
    for _ in range(1500):
        y = 0.999 * y + 1e-3 * torch.sin(x.roll(1))
    return y


@register(inputs=[Input("x", shape=("n",)), Input("A", shape=("n", "n"))],
          description="A @ x with A an input (an operator passed as data): the pattern follows A's zeros.")
def matvec_input(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return A @ x


@register(inputs=[Input("x", shape=("n",)), Input("idx", shape=("n",), dtype="int64")],
          description="x[idx] with idx an input: the pattern follows idx.")
def gather_input(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[idx]


@register(inputs=[Input("x", shape=("n",))], description="x[x > 0] * 3: the output's size follows the values.")
def positives(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0] * 3


#: How many leading elements ``leading`` returns: global state the pattern cache's key
#: does not hold (the tests change it between requests).
LEADING = [3]


@register(inputs=[Input("x", shape=("n",))], description="2 x[:k], k from global state: the output size follows it.")
def leading(x: torch.Tensor) -> torch.Tensor:
    return 2 * x[: LEADING[0]]


_FLIPS = [0]


@register(inputs=[Input("x", shape=("n",))], description="2 x[:k], k alternating 1, 2 from call to call.")
def flipping(x: torch.Tensor) -> torch.Tensor:
    _FLIPS[0] += 1
    return 2 * x[: 1 + _FLIPS[0] % 2]


def _no_grad_sum(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return x.sum()


@register(inputs=[Input("x", shape=("n",))], description="0.5 |x s|^2 with s = sum(x) under torch.no_grad.")
def no_grad_scale(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x * _no_grad_sum(x)) ** 2).sum()


@register(inputs=[Input("x", shape=("n",))], description="x.mul_(2) under torch.no_grad, then x**3: writes into its input.")
def doubles_in_place(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x.mul_(2)
    return x**3


@register(inputs=[Input("x", shape=("n",))], sparsity={"diag": banded(0, 0), "diagH": banded(0, 0, hessian=True)},
          description="2 x + roll(x, 1), declared diagonal: a WRONG declaration (it couples neighbours).")
def wrong_declared(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + torch.roll(x, 1)


@register(inputs=[Input("x", shape=("n",))], sparsity={"diagH": banded(0, 0, hessian=True)},
          description="A tridiagonal Hessian declared diagonal: a WRONG declaration.")
def wrong_declared_h(x: torch.Tensor) -> torch.Tensor:
    return (x[1:] * x[:-1]).sum() + (x**2).sum()


@register(inputs=[Input("x", shape=("n",))],
          description="Untraceable (it writes into a plain buffer), and a derivative nonzero only where x == 1 exactly.")
def probed_at_one(x: torch.Tensor) -> torch.Tensor:
    buf = torch.from_numpy(np.zeros(x.shape[0] + 1)).to(x.dtype)  # made by numpy: the tracer never sees it made
    buf[1:] = 2 * x  # a traced value into an untraced tensor: tracing gives up, probing runs
    r = torch.roll(x, 1)
    return buf[1:] + torch.where(r == 1.0, r, torch.zeros_like(x))


@register(inputs=[Input("x", shape=("n",))],
          description="fmax(x, 0) * roll(x, 1): at x = 0 (a tie) jvp and vjp give different derivatives.")
def fmax_ties(x: torch.Tensor) -> torch.Tensor:
    return torch.fmax(x, torch.zeros_like(x)) * torch.roll(x, 1)


@register(inputs=[Input("x", shape=("n",))], description="x**2 and argmax(x): an integer output, which jacrev refuses.")
def with_an_index(x: torch.Tensor):
    return x**2, torch.argmax(x)


@register(
    inputs=[Input("x", shape=("n",))],
    description="A force, -grad E of a chain energy, by torch.autograd.grad inside (create_graph: its Jacobian is -Hessian E).",
    sparsity={"tri": banded(1, 1)},
)
def chain_force(x: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:  # called plainly; under jacrev x already carries a graph
        x = x.detach().requires_grad_()
    energy = (x**4).sum() / 4 + (x[:-1] * x[1:]).sum()
    return -torch.autograd.grad(energy, x, create_graph=True)[0]


@register(inputs=[Input("u", shape=("n",))],
          description="A 1-D nonlinear finite-element residual: two-node element residuals index_add-ed into a fresh torch.zeros.")
def fem_1d(u: torch.Tensor) -> torch.Tensor:
    n = u.shape[0]
    e = torch.arange(n - 1)
    elements = torch.stack([e, e + 1], 1)  # nodes of each element
    ue = u[elements]
    flux = (1 + ue.mean(1) ** 2) * (ue[:, 1] - ue[:, 0])
    contributions = torch.stack([-flux, flux], 1) + ue**3 / 6
    residual = torch.zeros(n, dtype=u.dtype)
    residual.index_add_(0, elements.reshape(-1), contributions.reshape(-1))
    return residual


@register(inputs=[Input("u", shape=("ny", "nx"))],
          description="A 2-D nonlinear residual on a grid of triangles, assembled by index_add_ into a fresh torch.zeros.")
def fem_2d(u: torch.Tensor) -> torch.Tensor:
    ny, nx = u.shape
    i = torch.arange((ny - 1) * (nx - 1))
    a = (i // (nx - 1)) * nx + i % (nx - 1)  # lower-left node of each grid cell
    triangles = torch.cat([torch.stack([a, a + 1, a + nx], 1), torch.stack([a + 1, a + nx + 1, a + nx], 1)])
    ue = u.reshape(-1)[triangles]
    mean = ue.mean(1, keepdim=True)
    contributions = (1 + mean**2) * (ue - mean) + ue**3 / 12
    residual = torch.zeros(ny * nx, dtype=u.dtype)
    residual.index_add_(0, triangles.reshape(-1), contributions.reshape(-1))
    return residual.reshape(ny, nx)


_SEGMENTS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])


@register(inputs=[Input("x", shape=(10,))],
          description="Sum of squared segment products by index_reduce, which has no forward AD in torch.")
def segment_products(x: torch.Tensor) -> torch.Tensor:
    return (x.new_ones(4).index_reduce(0, _SEGMENTS, x, "prod") ** 2).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x + x**2 scattered to random places (torch.randint): a pattern that follows the draws.")
def random_scatter(x: torch.Tensor) -> torch.Tensor:
    idx = torch.randint(0, x.shape[0], (x.shape[0],))
    return torch.zeros_like(x).index_add(0, idx, x ** 2) + x


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x + x**2 scattered to places np.random draws: draws no torch op shows.")
def numpy_random_scatter(x: torch.Tensor) -> torch.Tensor:
    idx = torch.from_numpy(np.random.randint(0, x.shape[0], x.shape[0]))
    return torch.zeros_like(x).index_add(0, idx, x ** 2) + x


_PAIR_MASK = torch.tensor([[True, False, True], [False, True, True]])


@register(inputs=[Input("x", shape=(3,), dtype="float64")],
          description="x.masked_select(mask) * 2 with a (2, 3) mask broadcast over x: torch's vmap of its "
                      "backward is silently wrong over the seeds and, under request batching, over the points too")
def masked_pairs(x: torch.Tensor) -> torch.Tensor:
    return x.masked_select(_PAIR_MASK) * 2


_PROBE_MASK = torch.tensor([[True, False, False], [False, False, True]])
_PROBE_OPERATOR = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2, 2], [0, 1, 2, 0]]),
                                          torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), (3, 3),
                                          check_invariants=True)


@register(inputs=[Input("x", shape=(3,), dtype="float64")],
          description="(A @ x).masked_select(mask) * 2, A a sparse COO operator (the tracer cannot follow it: "
                      "probed) and a (2, 3) mask broadcast: jacrev's vmapped rows give its second row as zeros")
def sparse_operator_masked(x: torch.Tensor) -> torch.Tensor:
    return (_PROBE_OPERATOR @ x).masked_select(_PROBE_MASK) * 2


@register(inputs=[Input("u", shape=("nx", "ny", "nz"))],
          description="A 3-D reaction-diffusion residual on a periodic grid: the 7-point stencil by torch.roll.")
def heat3d_periodic(u: torch.Tensor) -> torch.Tensor:
    lap = sum(torch.roll(u, s, d) for d in range(3) for s in (1, -1)) - 6 * u
    return lap + u * (1 - u)


@register(inputs=[Input("u", shape=("nx", "ny", "nz"))],
          description="A 3-D reaction-diffusion residual, zero Dirichlet boundaries (F.pad): the 7-point stencil.")
def heat3d_dirichlet(u: torch.Tensor) -> torch.Tensor:
    p = F.pad(u, (1, 1, 1, 1, 1, 1))
    lap = (p[:-2, 1:-1, 1:-1] + p[2:, 1:-1, 1:-1] + p[1:-1, :-2, 1:-1] + p[1:-1, 2:, 1:-1]
           + p[1:-1, 1:-1, :-2] + p[1:-1, 1:-1, 2:] - 6 * u)
    return lap + u * (1 - u)


@register(inputs=[Input("u", shape=("n",))],
          description="1-D Burgers on a periodic grid, first-order upwind by torch.where, plus diffusion.")
def burgers_upwind(u: torch.Tensor) -> torch.Tensor:
    left, right = torch.roll(u, 1), torch.roll(u, -1)
    advection = torch.where(u > 0, u * (u - left), u * (right - u))
    return -advection + 0.1 * (left - 2 * u + right)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x.mul_(2) under torch.no_grad, then sum(x**3): forward-mode AD sees the in-place write.")
def doubles_in_place_energy(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x.mul_(2)
    return (x**3).sum()


def _ring_with_chords(n: int) -> torch.Tensor:
    i = torch.arange(n)
    edges = torch.cat([torch.stack([i, (i + 1) % n]), torch.stack([(i + 1) % n, i]), torch.stack([i, (i + 7) % n])], 1)
    weights = 1.0 + (torch.arange(edges.shape[1], dtype=torch.float64) % 3)
    return torch.sparse_coo_tensor(edges, weights, (n, n), check_invariants=True).coalesce()


_GRAPH = _ring_with_chords(40)


@register(inputs=[Input("x", shape=(40,), dtype="float64")],
          description="Graph diffusion with a reaction term: A @ x - x**3, A a constant sparse COO adjacency "
                      "(a ring with chords), as torch.sparse matrices are used")
def graph_diffusion(x: torch.Tensor) -> torch.Tensor:
    return _GRAPH @ x - torch.sparse.mm(_GRAPH, x.reshape(-1, 1)).reshape(-1) * 0.5 - x**3


_PROBE_BUFFER = torch.zeros(4, dtype=torch.float64)


@register(inputs=[Input("x", shape=(3,), dtype="float64")],
          description="A module-level buffer written from x (the tracer cannot follow it: probed), then "
                      "masked_select over a broadcast (2, 3) mask: jacrev's vmapped rows give its second row as zeros")
def buffer_masked(x: torch.Tensor) -> torch.Tensor:
    buf = _PROBE_BUFFER.clone()
    buf[1:] = x
    mixed = buf[1:] * torch.tensor([1.0, 4.0, 3.0], dtype=x.dtype) + buf[:-1] * 2
    return mixed.masked_select(_PROBE_MASK) * 2


@register(inputs=[Input("u", shape=("ny", "nx"))],
          description="A smoothed residual: u**2 minus its 3 x 3 average (avg_pool2d) plus a 2 x 2 max_pool1d of the rows.")
def pooled_residual(u: torch.Tensor) -> torch.Tensor:
    smooth = F.avg_pool2d(u[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    peaks = F.max_pool1d(u[None], 3, stride=1, padding=1)[0]
    return u**2 - smooth + 0.5 * peaks


@register(inputs=[Input("x", shape=(3,), dtype="float64")],
          description="masked_pairs again, under a name of its own (a verdict no other test has learned)")
def masked_select_pairs_once(x: torch.Tensor) -> torch.Tensor:
    return x.masked_select(_PAIR_MASK) * 2
