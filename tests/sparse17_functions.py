"""Functions for tests/test_sparse_round17.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# ------------------------------------------------------------------ a branch on a tensor's text


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain's residual that couples every element to the first when the text of its input "
                      "shows a minus sign (a sign check by str): the tracer saw a placeholder's text.")
def text_sign(u: torch.Tensor) -> torch.Tensor:
    return u * u[0] if "-" in str(u) else u**2 + u.roll(1)


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A residual that couples every element to the first where the repr of its input names "
                      "a Tensor( wrapper, as jacrev's GradTrackingTensor(...) does and a plain tensor's does not.")
def text_wrapper(u: torch.Tensor) -> torch.Tensor:
    return u * u[0] if "Tensor(" in repr(u) else u**2


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain energy whose coupling to the first element follows an f-string of its input "
                      "(its Hessian through the text check).")
def text_energy(u: torch.Tensor) -> torch.Tensor:
    base = ((u[1:] - u[:-1]) ** 2).sum() + (u**4).sum()
    return base + (u * u[0]).sum() if "Tensor(" in f"{u}" else base


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A residual written for numpy arrays and torch tensors alike, which takes its torch path "
                      "where type(u) is torch.Tensor (jacrev's tensors are; the tracer's are a subclass).")
def type_dispatch(u):
    if type(u) is torch.Tensor:
        return u * u[0] + u.roll(1)
    return u**2 + u.roll(1)  # (numpy arrays, and anything else array-like)


# ------------------------------------------------------------------ as_strided_scatter


@register(inputs=[Input("u", shape=(6,), dtype="float64")],
          description="as_strided_scatter through a view that overlaps itself (stride (1, 1)): several src "
                      "elements land on one place; torch's backward gives each its place's gradient.")
def strided_overlap(u: torch.Tensor) -> torch.Tensor:
    return torch.as_strided_scatter(torch.zeros(5, dtype=u.dtype), (u * u).reshape(2, 3), (2, 3), (1, 1), 0)


@register(inputs=[Input("u", shape=(6,), dtype="float64")],
          description="as_strided_scatter of a patch into the input itself at an offset: torch's backward "
                      "gives the input the gradient of the places written.")
def strided_patch(u: torch.Tensor) -> torch.Tensor:
    return torch.as_strided_scatter(u * 1.0, u[:4].reshape(2, 2) ** 2, (2, 2), (1, 2), 1)


# ------------------------------------------------------------------ ops traced as what they amount to

#: A lower-triangular band (a one-sided implicit step: upwind advection): each solve
#: reaches back two places along the band.
_LOWER = (torch.eye(8, dtype=torch.float64) * 2 - torch.diag(torch.full((7,), 0.5, dtype=torch.float64), -1)
          + torch.diag(torch.full((6,), 0.1, dtype=torch.float64), -2))


@register(inputs=[Input("u", shape=(8, 2), dtype="float64")],
          description="The deprecated torch.triangular_solve with a fixed lower band, and its transpose.")
def upwind_step(u: torch.Tensor) -> torch.Tensor:
    x = torch.triangular_solve(u, _LOWER, upper=False).solution
    y = torch.triangular_solve(u**2, _LOWER, upper=False, transpose=True).solution
    return torch.cat([x, y])


@register(inputs=[Input("a", shape=(4, 4), dtype="float64")],
          description="A triangular solve against a lower band that follows the input's diagonal "
                      "(torch.triangular_solve with a varying A, unitriangular off).")
def varying_triangle(a: torch.Tensor) -> torch.Tensor:
    m = torch.tril(a) * (torch.tril(torch.ones(4, 4, dtype=a.dtype)) - torch.tril(torch.ones(4, 4, dtype=a.dtype), -2)) + 3 * torch.eye(4, dtype=a.dtype)
    return torch.triangular_solve(torch.ones(4, 1, dtype=a.dtype), m, upper=False).solution


#: Per-group weights with structural zeros (a group reads 2 of its 3 features).
_W = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]], [[0.5, 0.0, 0.0], [0.0, 1.0, 1.0]]], dtype=torch.float64)


@register(inputs=[Input("u", shape=(2, 3, 2), dtype="float64")],
          description="torch.addbmm: a bias plus the sum over groups of a fixed sparse map of each group's state.")
def grouped_sum(u: torch.Tensor) -> torch.Tensor:
    return torch.addbmm(torch.ones(2, 2, dtype=u.dtype), _W, u.tanh(), beta=0.5)


_A = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, -0.3], [0.0, 1.0]], dtype=torch.float64)


@register(inputs=[Input("b", shape=("cells", 4), dtype="float64")],
          description="A least-squares fit of two parameters per cell (torch.linalg.lstsq, fixed design): "
                      "each cell's fit reads its own observations.")
def cell_fit(b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(_A.expand(b.shape[0], 4, 2), b.unsqueeze(-1) ** 2).solution.squeeze(-1)


# ------------------------------------------------------------------ Hessians a scientist registers

#: A chain of 24 beads numbered in a random order (as a mesh generator numbers nodes):
#: the Hessian is a band of half-width 2 under a permutation.
ORDER = torch.from_numpy(__import__("numpy").random.default_rng(7).permutation(24))


@register(inputs=[Input("x", shape=(24,), dtype="float64")],
          description="A bead chain's energy (anharmonic springs to the first and second neighbours, an on-site "
                      "potential), beads numbered in a random order: a permuted band Hessian.")
def bead_energy(x: torch.Tensor) -> torch.Tensor:
    u = x[ORDER]
    d1, d2 = u[1:] - u[:-1], u[2:] - u[:-2]
    return (d1**2 + 0.1 * d1**4).sum() + 0.5 * (d2**2).sum() + torch.cos(u).sum()


#: Each 3-d block's Cholesky factor of its covariance (independent groups).
_CHOL = torch.tensor([[1.0, 0.0, 0.0], [0.3, 1.2, 0.0], [-0.2, 0.4, 0.9]], dtype=torch.float64)


@register(inputs=[Input("theta", shape=("groups", 3), dtype="float64")],
          description="A log-likelihood of independent groups (a 3-d Gaussian each, through a triangular solve, "
                      "and a softplus prior): a block-diagonal Hessian.")
def group_loglik(theta: torch.Tensor) -> torch.Tensor:
    w = torch.linalg.solve_triangular(_CHOL, theta.T, upper=False)
    return -0.5 * (w**2).sum() - torch.nn.functional.softplus(theta).sum()


@register(inputs=[Input("u", shape=(2, 4, 4), dtype="float64")],
          description="Max pooling with indices, then max_unpool2d of a function of the pooled values (a "
                      "segmentation network's decoder step): each value back where its maximum was.")
def unpooled(u: torch.Tensor) -> torch.Tensor:
    y, idx = torch.nn.functional.max_pool2d(u.unsqueeze(0), 2, return_indices=True)
    return torch.nn.functional.max_unpool2d(torch.tanh(y), idx, 2).squeeze(0)
