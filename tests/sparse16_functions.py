"""Functions for tests/test_sparse_round16.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain's residual scaled by a buffer the function moves to shared memory (share_memory_): "
                      "jacrev refuses it (torch's error), the tracer must too, not crash.")
def shared_buffer(u: torch.Tensor) -> torch.Tensor:
    scale = torch.full(u.shape, 2.0, dtype=u.dtype).share_memory_()
    return scale * u**2 + u.roll(1)


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain's residual through a DLPack round trip of its input (torch.utils.dlpack): jacrev "
                      "refuses it (torch's error), the tracer must too, not crash.")
def dlpack_round_trip(u: torch.Tensor) -> torch.Tensor:
    v = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(u))
    return v * u + u.roll(1)


# ------------------------------------------------------------------ functions of each matrix of a batch

#: What a cell (a finite element, a grid cell's local system) computes from its own 3 x 3
#: matrix: one registered function each, ``cells`` of them in a batch.
CELL_FUNCTIONS = {
    "cell_det": lambda a: torch.linalg.det(a),
    "cell_logdet": lambda a: torch.logdet(a),
    "cell_inv": lambda a: torch.linalg.inv(a),
    "cell_eigvalsh": lambda a: torch.linalg.eigvalsh(a + a.mT),
    "cell_svdvals": lambda a: torch.linalg.svdvals(a),
    "cell_cholesky": lambda a: torch.linalg.cholesky(a @ a.mT),
    "cell_qr": lambda a: torch.linalg.qr(a).R,
    "cell_matrix_exp": lambda a: torch.linalg.matrix_exp(0.1 * a),
    "cell_pinv": lambda a: torch.linalg.pinv(a),
    "cell_lu_factor": lambda a: torch.linalg.lu_factor(a).LU,
    "cell_lu_unpack": lambda a: torch.lu_unpack(*torch.linalg.lu_factor(a))[2],
}

for _name, _fn in CELL_FUNCTIONS.items():
    register(name=_name, inputs=[Input("a", shape=("cells", 3, 3), dtype="float64")],
             description="A function of each cell's own 3 x 3 matrix: a block per cell.")(_fn)


def _mesh(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows x cols grid of nodes cut into triangles: reference positions and elements."""
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    nodes = torch.stack([j, i], -1).reshape(-1, 2).to(torch.float64)
    a = (i[:-1, :-1] * cols + j[:-1, :-1]).reshape(-1)
    tris = torch.cat([torch.stack([a, a + 1, a + cols + 1], 1), torch.stack([a, a + cols + 1, a + cols], 1)])
    return nodes, tris


REFERENCE, TRIANGLES = _mesh(3, 4)
_EDGES = torch.stack([REFERENCE[TRIANGLES[:, 1]] - REFERENCE[TRIANGLES[:, 0]],
                      REFERENCE[TRIANGLES[:, 2]] - REFERENCE[TRIANGLES[:, 0]]], -1)
_EDGES_INV = torch.linalg.inv(_EDGES)


@register(inputs=[Input("x", shape=(12, 2), dtype="float64")],
          description="A neo-Hookean membrane's energy on a 3 x 4 node triangle mesh: each element's deformation "
                      "gradient, its determinant's log. The Hessian couples nodes of one element.")
def neo_hookean(x: torch.Tensor) -> torch.Tensor:
    edges = torch.stack([x[TRIANGLES[:, 1]] - x[TRIANGLES[:, 0]], x[TRIANGLES[:, 2]] - x[TRIANGLES[:, 0]]], -1)
    F = edges @ _EDGES_INV
    log_j = torch.log(torch.linalg.det(F))
    return (0.5 * ((F * F).sum((-2, -1)) - 2) - log_j + 0.5 * log_j**2).sum()


@register(inputs=[Input("u", shape=("m", "n"), dtype="float64")],
          description="A coarse grid copied onto a finer one by nearest neighbours at scale 1.7 (nearest and "
                      "nearest-exact), beside the grid with ghost cells of value 1: each output copies one input.")
def nearest_prolongation(u: torch.Tensor) -> torch.Tensor:
    grid = u[None, None]
    fine = torch.nn.functional.interpolate(grid, scale_factor=1.7, mode="nearest")
    exact = torch.nn.functional.interpolate(grid, scale_factor=(1.7, 1.3), mode="nearest-exact")
    ghosts = torch.constant_pad_nd(u, [1, 1, 1, 1], 1)
    return torch.cat([fine.reshape(-1), exact.reshape(-1), 2 * ghosts.reshape(-1)])


@register(inputs=[Input("x", shape=(8,), dtype="float64")],
          description="diag(x[:4]) + x[4:] v^T for a constant v with zeros (torch.addr): a rank-one update.")
def rank_one_update(x: torch.Tensor) -> torch.Tensor:
    return torch.addr(torch.diag(x[:4]), x[4:], torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=x.dtype))


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A mode filter: the most frequent value of each window of 3 (torch.mode).")
def mode_filter(x: torch.Tensor) -> torch.Tensor:
    return torch.mode(x.unfold(0, 3, 1), -1).values


@register(inputs=[Input("x", shape=("points", 3), dtype="float64")],
          description="The distances between every pair of points (F.pdist): each reads its two points.")
def pair_distances(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pdist(x)
