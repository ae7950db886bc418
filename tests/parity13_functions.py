"""Functions for tests/test_parity_round13.py, round 13 of PyTorch's own torch.func test
cases replayed over HTTP.

1. test/functorch/test_ops.py's checks (test_vjp, test_jvp, test_vmapvjp, test_jvpvjp,
   test_vmapjvpall) over ``op_db`` ops that round 12's sample left out: ops of several
   tensor inputs, ops with integer outputs beside float ones, kwargs, reductions with
   dim / keepdim, linalg (gauge-invariant functions of eigh / svd, as torch's tests
   take), nn.functional (convolutions, pooling, normalizations with running stats,
   losses and their reductions, interpolate, grid_sample, embedding_bag, ctc_loss,
   attention), special functions, complex intermediates. Each is registered as
   ``op_<name>``, its inputs float64 (their samples are made by the test).
2. nn.Module per-sample gradients (functional_call + vmap(grad)), model ensembles
   (stack_module_state), BatchNorm under vmap, random functions under vmap, nested vmap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as nnf
from jacobian_service import Array, Input, register
from torch import nn

_G = torch.Generator().manual_seed(13)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_G, dtype=torch.float64)


class Op(NamedTuple):
    """An op_db op as test_ops.py calls it: ``fn(*inputs)``, each input's shape, which of
    them a sample's ``argnums`` differentiates, whether torch twice-differentiates it
    (supports_gradgrad, and cheap enough here) and how its sample is made (``"randn"``,
    ``"spd"``: symmetric positive definite, ``"full"``: full rank, ``"pos"``: positive,
    ``"unit"``: in (0, 1); one word for every input or one per input)."""

    name: str
    fn: Callable[..., Any]
    shapes: tuple[tuple[int, ...], ...]
    argnums: tuple[int, ...] = (0,)
    twice: bool = False
    make: Any = "randn"


_W = _rand(2, 2, 3, 3)  # conv2d's weight
_WT = _rand(2, 3, 2)  # conv_transpose1d's: (in, out, k)
_TARGET = torch.tensor([1, 0, 2])
_EMB_IDX = torch.tensor([0, 2, 4, 1, 3, 2])
_EMB_OFF = torch.tensor([0, 2, 5])
_CTC_TARGETS = torch.tensor([[1, 2, 2], [1, 1, 0]])
_RUN_MEAN, _RUN_VAR = _rand(3), _rand(3).abs() + 0.5
_MASK = torch.tensor([[True, False, True], [False, True, False]])


def _batch_norm(x, w, b, training: bool):
    # running stats cloned per call: in training mode batch_norm writes them in place
    return nnf.batch_norm(x, _RUN_MEAN.clone(), _RUN_VAR.clone(), w, b, training=training)


def _ctc(log_probs):
    lp = log_probs.log_softmax(2)
    return nnf.ctc_loss(lp, _CTC_TARGETS, (4, 4), (3, 2), reduction="sum")


def _eigh_invariant(a):
    # eigenvectors are defined up to sign: V diag(exp(L)) V^T, as torch's tests take
    # gauge-invariant functions of them
    lam, v = torch.linalg.eigh(a)
    return lam, (v * lam.exp()) @ v.mT


def _svd_invariant(a):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return s, u[:, :1] @ vh[:1]  # the leading singular pair's u v^T, sign-free


OPS: list[Op] = [
    # several tensor inputs, argnums over each
    Op("atan2", torch.atan2, ((2, 3), (2, 3)), (0, 1), True),
    Op("hypot", torch.hypot, ((2, 3), (2, 3)), (0, 1)),
    Op("lerp", torch.lerp, ((2, 3), (2, 3), (2, 3)), (0, 1, 2), True),
    Op("addmm", lambda b, m1, m2: torch.addmm(b, m1, m2, beta=0.5, alpha=2.0), ((2, 2), (2, 3), (3, 2)), (0, 1, 2), True),
    Op("bmm", torch.bmm, ((2, 2, 3), (2, 3, 2)), (0, 1), True),
    Op("where", lambda x, y: torch.where(_MASK, x, y), ((2, 3), (2, 3)), (0, 1)),
    Op("div_floor", lambda x, y: torch.div(x, y, rounding_mode=None), ((2, 3), (2, 3)), (0, 1), True, ("randn", "pos")),
    Op("addcmul", lambda x, a, b: torch.addcmul(x, a, b, value=0.5), ((2, 3), (2, 3), (2, 3)), (0, 1, 2), True),
    Op("kron", torch.kron, ((2, 2), (2, 1)), (0, 1), True),
    Op("xlogy", torch.special.xlogy, ((2, 3), (2, 3)), (0, 1), True, ("randn", "pos")),
    # integer (or bool) outputs beside float ones
    Op("max_with_indices", lambda x: torch.max(x, 1), ((2, 3),)),
    Op("sort_both", lambda x: torch.sort(x, 1, descending=True), ((2, 3),)),
    Op("topk", lambda x: torch.topk(x, 2, dim=1), ((2, 3),)),
    Op("cummax", lambda x: torch.cummax(x, 0), ((3, 2),)),
    Op("unique", lambda x: torch.unique(x, return_counts=True), ((5,),)),
    Op("histc", lambda x: torch.histc(x, bins=4, min=-2, max=2), ((6,),)),
    Op("isfinite_mul", lambda x: (x * 2, torch.isfinite(x)), ((3,),)),
    # kwargs, reductions with dim / keepdim
    Op("sum_keepdim", lambda x: torch.sum(x, dim=1, keepdim=True), ((2, 3),), twice=True),
    Op("mean_dims", lambda x: torch.mean(x, dim=(0, 2)), ((2, 3, 2),), twice=True),
    Op("std_correction", lambda x: torch.std(x, dim=0, correction=0, keepdim=True), ((3, 2),), twice=True),
    Op("vector_norm", lambda x: torch.linalg.vector_norm(x, ord=3, dim=1), ((2, 3),), twice=True),
    Op("amax", lambda x: torch.amax(x, dim=(0, 1)), ((2, 3),)),
    Op("prod_dim", lambda x: torch.prod(x, 1, keepdim=True), ((2, 3),), twice=True),
    Op("median_dim", lambda x: torch.median(x, 1).values, ((2, 3),)),
    Op("kthvalue", lambda x: torch.kthvalue(x, 2, 1, keepdim=True).values, ((2, 3),)),
    Op("logcumsumexp", lambda x: torch.logcumsumexp(x, 1), ((2, 3),), twice=True),
    Op("trace_tril", lambda x: torch.trace(x) + torch.tril(x, -1).sum(), ((3, 3),), twice=True),
    Op("softplus_kw", lambda x: nnf.softplus(x, beta=2.0, threshold=1.0), ((2, 3),), twice=True),
    # linalg
    Op("slogdet", torch.linalg.slogdet, ((3, 3),), twice=True, make="full"),
    Op("solve", torch.linalg.solve, ((3, 3), (3, 2)), (0, 1), True, ("full", "randn")),
    Op("cholesky", torch.linalg.cholesky, ((3, 3),), twice=True, make="spd"),
    Op("eigh", _eigh_invariant, ((3, 3),), make="spd"),
    Op("svd", _svd_invariant, ((3, 2),)),
    Op("qr", torch.linalg.qr, ((3, 2),)),
    Op("lstsq", lambda a, b: torch.linalg.lstsq(a, b).solution, ((4, 3), (4, 2)), (0, 1)),
    Op("pinv", torch.linalg.pinv, ((3, 2),)),
    Op("matrix_power", lambda x: torch.linalg.matrix_power(x, 3), ((2, 2),), twice=True),
    Op("nuclear_norm", lambda x: torch.linalg.matrix_norm(x, "nuc"), ((3, 2),)),
    # nn.functional
    Op("conv2d", lambda x, w: nnf.conv2d(x, w, padding=1, stride=2), ((1, 2, 4, 4), (2, 2, 3, 3)), (0, 1), True),
    Op("conv_transpose1d", lambda x: nnf.conv_transpose1d(x, _WT, stride=2), ((1, 2, 3),), twice=True),
    Op("avg_pool2d", lambda x: nnf.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False), ((1, 1, 3, 3),), twice=True),
    Op("max_pool2d_indices", lambda x: nnf.max_pool2d(x, 2, return_indices=True), ((1, 1, 4, 4),)),
    Op("adaptive_avg_pool2d", lambda x: nnf.adaptive_avg_pool2d(x, (2, 1)), ((1, 2, 3, 3),), twice=True),
    Op("lp_pool1d", lambda x: nnf.lp_pool1d(x, 2.0, 2), ((1, 2, 4),), make="pos"),
    Op("batch_norm_train", lambda x, w, b: _batch_norm(x, w, b, True), ((4, 3), (3,), (3,)), (0, 1, 2)),
    Op("batch_norm_eval", lambda x, w, b: _batch_norm(x, w, b, False), ((4, 3), (3,), (3,)), (0, 1, 2), True),
    Op("group_norm", lambda x: nnf.group_norm(x, 2), ((2, 4, 3),)),
    Op("instance_norm", lambda x: nnf.instance_norm(x), ((2, 2, 4),)),
    Op("mse_none", lambda x, y: nnf.mse_loss(x, y, reduction="none"), ((2, 3), (2, 3)), (0, 1), True),
    Op("mse_sum", lambda x, y: nnf.mse_loss(x, y, reduction="sum"), ((2, 3), (2, 3)), (0, 1), True),
    Op("huber_mean", lambda x, y: nnf.huber_loss(x, y, delta=0.5), ((2, 3), (2, 3)), (0, 1)),
    Op("cross_entropy_ls", lambda x: nnf.cross_entropy(x, _TARGET, label_smoothing=0.1), ((3, 4),), twice=True),
    Op("nll_none", lambda x: nnf.nll_loss(x.log_softmax(1), _TARGET, reduction="none"), ((3, 4),), twice=True),
    Op("kl_div_batchmean", lambda x, y: nnf.kl_div(x, y, reduction="batchmean", log_target=True),
       ((2, 3), (2, 3)), (0, 1), True),
    Op("bce", lambda x, y: nnf.binary_cross_entropy(x, y), ((2, 3), (2, 3)), (0, 1), True, "unit"),
    Op("gaussian_nll", lambda x, y, v: nnf.gaussian_nll_loss(x, y, v), ((2, 3), (2, 3), (2, 3)), (0, 1, 2), True,
       ("randn", "randn", "pos")),
    Op("interpolate_bilinear", lambda x: nnf.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
       ((1, 1, 2, 3),), twice=True),
    Op("interpolate_bicubic", lambda x: nnf.interpolate(x, size=(3, 4), mode="bicubic", align_corners=True),
       ((1, 1, 2, 2),), twice=True),
    Op("grid_sample", lambda x, g: nnf.grid_sample(x, g.tanh(), align_corners=False), ((1, 1, 3, 3), (1, 2, 2, 2)),
       (0, 1)),
    Op("embedding_bag", lambda w, psw: nnf.embedding_bag(_EMB_IDX, w, _EMB_OFF, mode="sum", per_sample_weights=psw),
       ((5, 2), (6,)), (0, 1)),
    Op("ctc_loss", _ctc, ((4, 2, 3),)),
    Op("sdpa", nnf.scaled_dot_product_attention, ((1, 3, 2), (1, 3, 2), (1, 3, 2)), (0, 1, 2)),
    Op("cosine_similarity", lambda x, y: nnf.cosine_similarity(x, y, dim=1), ((2, 3), (2, 3)), (0, 1), True),
    Op("pixel_shuffle", lambda x: nnf.pixel_shuffle(x, 2), ((1, 4, 1, 2),)),
    # special functions
    Op("digamma", torch.special.digamma, ((2, 3),), twice=True, make="pos"),
    Op("polygamma", lambda x: torch.special.polygamma(2, x), ((2, 3),), make="pos"),
    Op("i0e", torch.special.i0e, ((2, 3),)),
    Op("erfcx", torch.special.erfcx, ((2, 3),), twice=True),
    Op("ndtri", torch.special.ndtri, ((2, 3),), twice=True, make="unit"),
    Op("log_ndtr", torch.special.log_ndtr, ((2, 3),), twice=True),
    Op("entr", torch.special.entr, ((2, 3),), twice=True, make="pos"),
    Op("zeta", lambda x: torch.special.zeta(x, torch.full_like(x, 2.0)), ((2, 3),), make="pos"),
    # complex in between, real out: abs and angle of complex(x, y)
    Op("complex_abs", lambda x, y: torch.complex(x, y).abs(), ((3,), (3,)), (0, 1), True),
    Op("complex_angle", lambda x, y: torch.complex(x, y).angle(), ((3,), (3,)), (0, 1), True),
]

for _op in OPS:
    register(lambda *a, _fn=_op.fn: _fn(*a), name=f"op_{_op.name}",
             inputs=[Input(f"x{i}", shape=s) for i, s in enumerate(_op.shapes)])



@register(inputs=[Input("x", shape=(2, 2))])
def eigvals(x):
    """A complex output (eigenvalues of a real matrix): the wire carries no complex."""
    return torch.linalg.eigvals(x)


# --- 2. nn.Module per-sample gradients (torch's per-sample-grads tutorial) ---

torch.manual_seed(13)
MODEL = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
PARAMS = {k: Array(tuple(v.shape)) for k, v in MODEL.named_parameters()}


@register(inputs=[Input("params", tree=PARAMS), Input("x", shape=(4,)), Input("target", shape=(), dtype="int64")])
def sample_loss(params, x, target):
    """One example's loss through functional_call: vmap(grad(sample_loss), in_dims=(None,
    0, 0)) is the per-sample gradient of the model's parameters."""
    out = torch.func.functional_call(MODEL, params, (x.unsqueeze(0),))
    return nnf.cross_entropy(out, target.unsqueeze(0))


@register(inputs=[Input("params", tree=PARAMS), Input("x", shape=("b", 4))])
def model_call(params, x):
    """One model of an ensemble (torch.func.stack_module_state's params): vmap over the
    stacked parameters, in_dims=(0, None) for one minibatch, (0, 0) for one each."""
    return torch.func.functional_call(MODEL, params, (x,))


# --- BatchNorm under vmap: eval mode, train mode (running stats), running stats off ---

_BN_TRAIN = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double().train()
_BN_EVAL = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double().eval()
_BN_NO_STATS = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double().train()
torch.func.replace_all_batch_norm_modules_(_BN_NO_STATS)


@register(inputs=[Input("x", shape=(4, 3))])
def bn_train(x):
    """BatchNorm1d in training mode, tracking running stats: torch's vmap refuses it."""
    return _BN_TRAIN(x)


@register(inputs=[Input("x", shape=(4, 3))])
def bn_eval(x):
    return _BN_EVAL(x)


@register(inputs=[Input("x", shape=(4, 3))])
def bn_no_stats(x):
    """replace_all_batch_norm_modules_: no running stats, vmap runs it."""
    return _BN_NO_STATS(x)


# --- random functions, nested vmap ---


@register(inputs=[Input("x", shape=("n",))])
def dropout(x):
    """A fresh mask at every call: under vmap torch wants randomness "different" or
    "same" (its default, "error", raises)."""
    return nnf.dropout(x, p=0.5, training=True)


@register(inputs=[Input("x", shape=(3, 2))])
def nested_vmap(x):
    """vmap inside f: per row, the gradient of a row's energy (a vmap of a grad)."""
    energy = lambda r: (r.sin() * r).sum()
    return torch.func.vmap(torch.func.grad(energy))(x) + torch.func.vmap(torch.func.vmap(torch.cos))(x)


@register(inputs=[Input("x", shape=(3, 4))])
def vmap_different_inside(x):
    """vmap(randomness="different") inside f: every row its own mask."""
    return torch.func.vmap(lambda r: nnf.dropout(r, 0.5, training=True), randomness="different")(x)


@register(inputs=[Input("x", shape=(3,)), Input("y", shape=(3,))])
def two_in(x, y):
    return x.sin() * y


@register(inputs=[Input("x", shape=("n",))])
def noisy_quad(x):
    """A fresh random scale at every call: its Hessian is 2 r I for the call's own r."""
    return (x ** 2).sum() * torch.rand((), dtype=x.dtype)


@register(inputs=[Input("x", shape=("n",))])
def noisy_vec(x):
    """A fresh random scale per element: J = diag(2 r x)."""
    return x ** 2 * torch.rand(x.shape, dtype=x.dtype)


_BN_MOD = nn.BatchNorm1d(3).double().train()
BN_PARAMS = {"weight": Array((3,)), "bias": Array((3,))}
BN_BUFFERS = {"running_mean": Array((3,)), "running_var": Array((3,)), "num_batches_tracked": Array((), dtype="int64")}


@register(inputs=[Input("params", tree=BN_PARAMS), Input("buffers", tree=BN_BUFFERS), Input("x", shape=(4, 3))])
def bn_functional(params, buffers, x):
    """BatchNorm1d in training mode through functional_call, its buffers an input (the way
    torch's docs batch it: each example its own running stats, in_dims 0 for them); it
    writes the running stats into the buffers it is given."""
    return torch.func.functional_call(_BN_MOD, (params, buffers), (x,))


@register(inputs=[Input("seconds", shape=())])
def hold(seconds):
    """Keeps the engine busy, so that requests sent meanwhile queue and go as one batch."""
    time.sleep(float(seconds))
    return seconds * 1
