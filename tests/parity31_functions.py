"""Functions for tests/test_parity_round31.py, round 31 of PyTorch's own torch.func test
cases (test_ops.py's OpInfo samples of ops whose derivatives are tricky: duplicate
indices, zeros in a product, gauge freedom, a norm at zero, NaN in an unselected branch)
replayed over HTTP."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from jacobian_service import Input, register

from .parity13_functions import (
    Op,  # (its functions are not served here: no names shared)
)

_DUP = torch.tensor([1, 3, 1])  # a duplicate index: accumulate adds, scatter_reduce reduces both
_ROWS = torch.tensor([0, 2])
_SCAT = torch.tensor([[0, 1, 0], [1, 1, 0]])
_ZERO = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)  # zeros in cumprod
_MASK = torch.tensor([[True, False, True], [False, False, True]])
_EMB = torch.tensor([[0, 2, 1], [1, 1, 3]])
_CTC_T = torch.tensor([1, 2, 2, 1])  # concatenated targets (1-d form)
_MASK_ROW = torch.tensor([[True, True, True], [False, True, False]])  # a row all -inf: logsumexp's NaN gradient
_TIE = torch.tensor([[True, False, True], [False, False, True]])  # where y is x: maximum's ties


def _zeroed_row(x):
    # a row of zeros, as OpInfo's norm samples meet one: the norm's gradient there is 0 (torch's choice)
    return x * torch.tensor([[1.0], [0.0]], dtype=x.dtype)


def _eigh_gauge(a):
    # eigenvectors are fixed up to sign: test_ops.py checks a gauge-invariant function of them
    a = (a + a.mT) / 2
    vals, vecs = torch.linalg.eigh(a)
    return vals, vecs * vecs


def _svd_gauge(a):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return s, u.abs(), vh.abs(), u @ torch.diag(s) @ vh


# test_ops.py-style samples no earlier round took, each as ``op_<name>``
OPS: list[Op] = [
    Op("index_put_acc", lambda x, v: x.index_put((_DUP,), v, accumulate=True), ((4, 3), (3, 3)), (0, 1), True),
    Op("index_put_rows", lambda x, v: x.index_put((_ROWS,), v), ((4, 3), (2, 3)), (0, 1), True),
    Op("index_add_dup", lambda x, s: x.index_add(0, _DUP, s, alpha=2.0), ((4, 3), (3, 3)), (0, 1), True),
    Op("scatter_reduce_sum", lambda x, s: x.scatter_reduce(1, _SCAT, s, "sum"), ((2, 3), (2, 3)), (0, 1), True),
    Op("scatter_reduce_prod", lambda x, s: x.scatter_reduce(1, _SCAT, s, "prod"), ((2, 3), (2, 3)), (0, 1)),
    Op("scatter_reduce_mean", lambda x, s: x.scatter_reduce(1, _SCAT, s, "mean", include_self=False),
       ((2, 3), (2, 3)), (0, 1), True),
    Op("scatter_reduce_amax", lambda x, s: x.scatter_reduce(1, _SCAT, s, "amax"), ((2, 3), (2, 3)), (0, 1)),
    Op("cumprod_zeros", lambda x: torch.cumprod(x * _ZERO.to(x.dtype), 1), ((2, 4),), twice=True),
    Op("prod_zeros", lambda x: torch.prod(x * _ZERO.to(x.dtype), 1), ((2, 4),), twice=True),
    Op("eigh_gauge", _eigh_gauge, ((3, 3),), twice=True, make="spd"),
    Op("svd_gauge", _svd_gauge, ((3, 2),), twice=True),
    Op("norm_zero_row", lambda x: torch.linalg.vector_norm(_zeroed_row(x), dim=1), ((2, 3),), twice=True),
    Op("norm_at_zero", lambda x: torch.linalg.vector_norm(x - x.detach()), ((2, 3),)),
    Op("norm3_at_zero", lambda x: torch.linalg.vector_norm(x - x.detach(), ord=3), ((2, 3),)),
    Op("matrix_norm_fro", lambda x: torch.linalg.matrix_norm(_zeroed_row(x)), ((2, 3),), twice=True),
    Op("where_nan_branch", lambda x: torch.where(x > 0, x.sqrt(), x), ((2, 3),), twice=True),
    Op("where_safe", lambda x: torch.where(x > 0, x.clamp(min=1e-3).sqrt(), x), ((2, 3),), twice=True),
    Op("nan_to_num_log", lambda x: torch.nan_to_num(x.log(), nan=0.0, neginf=-5.0), ((2, 3),), twice=True),
    Op("masked_fill_value", lambda x, v: x.masked_fill(_MASK, v), ((2, 3), ()), (0, 1), True),
    Op("grid_sample_border", lambda x, g: nnf.grid_sample(x, g, mode="bilinear", padding_mode="border",
                                                          align_corners=True), ((1, 1, 3, 3), (1, 2, 2, 2)), (0, 1)),
    Op("grid_sample_reflect", lambda x, g: nnf.grid_sample(x, 1.5 * g.tanh(), mode="bilinear",
                                                           padding_mode="reflection", align_corners=False),
       ((1, 2, 3, 3), (1, 2, 2, 2)), (0, 1)),
    Op("embedding_pad_dup", lambda w: nnf.embedding(_EMB, w, padding_idx=1), ((4, 2),), twice=True),
    Op("ctc_loss_1d_targets", lambda lp: nnf.ctc_loss(lp.log_softmax(2), _CTC_T, (4, 3), (2, 2), blank=0,
                                                      reduction="sum"), ((4, 2, 3),)),
    Op("embedding_max_norm", lambda w: nnf.embedding(_EMB, w.clone(), max_norm=1.0), ((4, 2),)),
    Op("embedding_freq_pad", lambda w: nnf.embedding(_EMB, w, padding_idx=3, scale_grad_by_freq=True), ((4, 2),),
       twice=True),
    Op("ctc_loss_impossible", lambda lp: nnf.ctc_loss(lp.log_softmax(2), torch.tensor([[1, 1, 1]]), (3,), (3,),
                                                      reduction="none"), ((3, 1, 3),)),
    Op("logsumexp_neg_inf", lambda x: torch.logsumexp(x.masked_fill(_MASK_ROW, float("-inf")), 1), ((2, 3),),
       twice=True),
    Op("maximum_ties", lambda x, y: torch.maximum(x, y.where(_TIE, x)), ((2, 3), (2, 3)), (0, 1), True),
    Op("clamp_tensor_bounds", lambda x, lo: x.clamp(min=lo, max=lo + 1.0), ((2, 3), (2, 3)), (0, 1), True),
    Op("grid_sample_nearest", lambda x, g: nnf.grid_sample(x, g.tanh(), mode="nearest", align_corners=False),
       ((1, 1, 3, 3), (1, 2, 2, 2)), (0, 1)),
    Op("grid_sample_bicubic", lambda x, g: nnf.grid_sample(x, 0.9 * g.tanh(), mode="bicubic", align_corners=True),
       ((1, 1, 4, 4), (1, 2, 2, 2)), (0, 1)),
    Op("masked_scatter", lambda x, s: x.masked_scatter(_MASK, s), ((2, 3), (5,)), (0, 1), True),
    Op("index_fill_take", lambda x: torch.take_along_dim(x.index_fill(1, torch.tensor([1]), 2.0), _SCAT, 1),
       ((2, 3),), twice=True),
    Op("fold_unfold", lambda x: nnf.fold(nnf.unfold(x, 2), (3, 3), 2), ((1, 2, 3, 3),), twice=True),
    Op("xlog1py_edge", lambda x: torch.special.xlog1py(x, x.detach().new_tensor([[-1.0, 0.0, 1.0]])), ((2, 3),),
       twice=True),
    Op("normalize_zero_row", lambda x: nnf.normalize(_zeroed_row(x), dim=1), ((2, 3),), twice=True),
    Op("pow_zero_base", lambda x, y: torch.pow(_zeroed_row(x), y), ((2, 3), (2, 3)), (0, 1)),
    Op("sinc_at_zero", lambda x: torch.sinc(_zeroed_row(x)), ((2, 3),), twice=True),
    Op("atan2_zero", lambda x, y: torch.atan2(_zeroed_row(x), _zeroed_row(y)), ((2, 3), (2, 3)), (0, 1)),
    Op("pinv_rank1", lambda x: torch.linalg.pinv(x[:, :1] @ x[:1, :]), ((3, 3),)),
    Op("put_acc", lambda x, v: x.clone().put_(torch.tensor([0, 4, 0]), v, accumulate=True), ((2, 3), (3,)), (0, 1),
       True),
    Op("renorm", lambda x: torch.renorm(x, p=2, dim=0, maxnorm=0.5), ((3, 2),), twice=True),
    Op("embedding_bag_psw_pad", lambda w, p: nnf.embedding_bag(_EMB.reshape(-1), w, torch.tensor([0, 3]), mode="sum",
                                                              per_sample_weights=p, padding_idx=1),
       ((4, 2), (6,)), (0, 1)),
    Op("triplet_zero", lambda a, p: nnf.triplet_margin_loss(a, a, p), ((2, 3), (2, 3)), (0, 1)),
    Op("dist_inf_ties", lambda x: torch.dist(x, x.detach().abs().amax() * torch.ones_like(x), p=float("inf")),
       ((2, 3),)),
    Op("index_reduce_amax", lambda x, s: x.index_reduce(0, _DUP, s, "amax"), ((4, 3), (3, 3)), (0, 1)),
    Op("logit_eps", lambda x: torch.special.logit(x, eps=0.2), ((2, 3),), twice=True, make="unit"),
]

for _op in OPS:
    register(lambda *a, _fn=_op.fn: _fn(*a), name=f"op_{_op.name}",
             inputs=[Input(f"x{i}", shape=s) for i, s in enumerate(_op.shapes)])


def _energy(fn):
    # a scalar of the op's output(s), whose Hessian test_ops.py's hessian checks take
    def energy(*xs):
        out = fn(*xs)
        leaves = out if isinstance(out, tuple) else (out,)
        return sum((v * v.detach().new_tensor(1.5) + v.sin()).sum() for v in leaves)
    return energy


ENERGIES = {op.name: _energy(op.fn) for op in OPS}
for _name, _fn in ENERGIES.items():
    _op = next(o for o in OPS if o.name == _name)
    register(_fn, name=f"energy_{_name}", inputs=[Input(f"x{i}", shape=s) for i, s in enumerate(_op.shapes)])


_INPLACE_MASK = torch.tensor([[True, False, True], [False, False, True]])


@register(inputs=[Input("x", shape=(2, 3))])
def masked_fill_inplace(x):
    # test_ops.py's inplace variants (masked_fill_) applied to the input itself
    x.masked_fill_(_INPLACE_MASK, 0.5)
    return x * x.sin()


@register(inputs=[Input("x", shape=(3, 2)), Input("v", shape=(2, 2))])
def index_put_inplace(x, v):
    x.index_put_((torch.tensor([1, 1]),), v, accumulate=True)
    return x.cos()


@register(inputs=[Input("x", shape=(2, 3))])
def transposed_out(x):
    return x.mT


@register(inputs=[Input("x", shape=(2, 3))])
def expanded_out(x):
    return x[0].expand(4, 3)


@register(inputs=[Input("x", shape=(2, 3, 4))])
def permuted_out(x):
    return x.permute(2, 0, 1)[:, :, ::2], x.sum(1).mT


@register(inputs=[Input("x", shape=(3, 2))])
def cdist_self(x):
    # distances of a set to itself: torch's vmap of cdist's backward drops the off-diagonal rows
    return torch.cdist(x, x)


@register(inputs=[Input("x", shape=("n", 2))])
def cdist_self_n(x):
    return torch.cdist(x, x)
