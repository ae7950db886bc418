"""Functions for tests/test_parity_round24.py, round 24 of PyTorch's own torch.func test
cases (test_ops.py's OpInfo families the earlier rounds left out) replayed over HTTP."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from jacobian_service import Input, register

from .parity13_functions import Op  # (its functions are served beside these: no names shared)

_WT2 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
_IDX = torch.tensor([[0, 2], [3, 0]])
_CTC_T = torch.tensor([[1, 2, 2], [1, 1, 0]])


def _nan(x):
    # NaN at fixed places, as the nan* reductions meet them
    return torch.where(torch.tensor([[False, True, False], [True, False, False]]), float("nan"), x)


# test_ops.py's op_db families rounds 12 and 13 left out, each as ``op_<name>`` (no name of round 13's)
OPS: list[Op] = [
    Op("det", torch.linalg.det, ((3, 3),), twice=True, make="full"),
    Op("eigh_vectors", torch.linalg.eigh, ((3, 3),), make="spd"),
    Op("svd_full", lambda a: torch.linalg.svd(a, full_matrices=True), ((3, 2),)),
    Op("lu_factor", torch.linalg.lu_factor, ((3, 3),), make="full"),  # integer pivots: 422
    Op("cholesky_ex", torch.linalg.cholesky_ex, ((3, 3),), make="spd"),  # integer info: 422
    Op("qr_complete", lambda a: torch.linalg.qr(a, mode="complete"), ((3, 2),)),  # torch raises
    Op("matrix_exp", torch.linalg.matrix_exp, ((2, 2),), twice=True),
    Op("lgamma", torch.lgamma, ((2, 3),), twice=True),
    Op("erfinv", torch.erfinv, ((2, 3),), twice=True, make="unit"),
    Op("polygamma3", lambda x: torch.polygamma(3, x), ((2, 3),), twice=True, make="pos"),
    Op("bessel_j0", torch.special.bessel_j0, ((2, 3),)),  # no derivative: torch raises
    Op("rfft_as_real", lambda x: torch.view_as_real(torch.fft.rfft(x)), ((4,),), twice=True),
    Op("irfft_of_rfft", lambda x: torch.fft.irfft(torch.fft.rfft(x) * 2j, n=5), ((5,),), twice=True),
    Op("fftn_abs", lambda x: torch.fft.fftn(x, norm="forward").abs(), ((2, 3),), twice=True),
    Op("var_mean_none", lambda x: torch.var_mean(x, dim=None, correction=1, keepdim=True), ((2, 3),), twice=True),
    Op("aminmax", lambda x: torch.aminmax(x, dim=1, keepdim=True), ((2, 3),)),
    Op("nanmean_none", lambda x: torch.nanmean(_nan(x), dim=None, keepdim=True), ((2, 3),), twice=True),
    Op("nanmedian", lambda x: torch.nanmedian(_nan(x), 1), ((2, 3),)),
    Op("pdist", torch.pdist, ((3, 2),)),  # no forward AD: jvp refused, jacobian mode=fwd reverse's
    Op("embedding_pad", lambda w: nnf.embedding(_IDX, w, padding_idx=0), ((4, 2),), twice=True),
    Op("interp_area", lambda x: nnf.interpolate(x, size=(2, 2), mode="area"), ((1, 1, 3, 3),), twice=True),
    Op("grid_sample_3d", lambda x, g: nnf.grid_sample(x, g.tanh(), align_corners=False),
       ((1, 1, 2, 2, 2), (1, 1, 2, 2, 3)), (0, 1)),
    Op("conv_transpose2d_groups", lambda x: nnf.conv_transpose2d(x, _WT2, groups=2, dilation=2), ((1, 2, 2, 2),),
       twice=True),
    Op("ctc_zero_infinity", lambda lp: nnf.ctc_loss(lp.log_softmax(2), _CTC_T, (4, 2), (3, 3), reduction="mean",
                                                    zero_infinity=True), ((4, 2, 3),)),
    Op("sdpa_causal", lambda q, k, v: nnf.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7),
       ((1, 3, 2), (1, 3, 2), (1, 3, 2)), (0, 1, 2), True),
]

for _op in OPS:
    register(lambda *a, _fn=_op.fn: _fn(*a), name=f"op_{_op.name}",
             inputs=[Input(f"x{i}", shape=s) for i, s in enumerate(_op.shapes)])

_EIG_W = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


@register(inputs=[Input("a", shape=(3, 3))])
def eigvalsh_energy(a):
    """A weighted sum of linalg.eigvalsh's eigenvalues, which read the lower triangle."""
    return torch.linalg.eigvalsh(a) @ _EIG_W.to(a.dtype)


_ROWS = torch.tensor([0, 2, 2, 1])


@register(inputs=[Input("w", shape=(3, 2))])
def sparse_grad_embedding(w):
    """embedding(..., sparse=True): its backward answers a COO-layout gradient."""
    return nnf.embedding(_ROWS, w, sparse=True) * torch.arange(1.0, 3.0, dtype=w.dtype)


@register(inputs=[Input("a", shape=(3, 3)), Input("b", shape=(3, 2))])
def lu_solve(a, b):
    """linalg.lu_solve of a's LU factors (linalg.lu_factor): A^-1 B."""
    return torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b)
