"""The engine's tensors for a request's arrays: always copies, never the arrays
themselves (a function may write into its inputs; a later call of the same request, and
the batch-mates sharing a stacked array, must see the values sent), in the dtype asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call


def _spec() -> FunctionSpec:
    return FunctionSpec("ident", lambda x: x, (Input("x", shape=("n",)),))


@pytest.mark.parametrize("writeable", [True, False])
@pytest.mark.parametrize("sent,asked", [("float32", "float32"), ("float64", "float32"), ("int64", "float64"),
                                        ("bool", "bool")])
def test_request_arrays_become_copies_in_the_dtype_asked(writeable, sent, asked):
    arr = np.arange(5).astype(sent)
    arr.flags.writeable = writeable
    engine = Engine(torch.device("cpu"), 1 << 20)
    (t,) = engine.tensors(Call(spec=_spec(), args=[arr], dtypes=[asked]))
    assert t.dtype == getattr(torch, asked)
    np.testing.assert_array_equal(t.numpy(), arr.astype(asked))
    before = arr.copy()
    t.zero_() if asked != "bool" else t.logical_not_()
    np.testing.assert_array_equal(arr, before)  # the request's array is untouched


def test_a_small_jacobian_is_jacrevs_bitwise_whole_or_by_rows():
    """The engine's fast path for one vector output (its identity made at once, no
    pytree walks, vjp without has_aux) against torch.func.jacrev; rows take the general
    basis, and give the same rows (to float32 rounding: a vmap of 7 rows runs other GEMM shapes)."""
    from jacobian_service.examples import mlp

    spec = FunctionSpec("mlp", mlp, (Input("x", shape=(128,)),))
    x = np.random.default_rng(1).standard_normal(128).astype(np.float32)
    engine = Engine(torch.device("cpu"), 1 << 28)
    want = torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()
    whole = engine.jacobian_npy(Call(spec=spec, args=[x], dtypes=["float32"]), 8 << 20).value
    rows = engine.jacobian(Call(spec=spec, args=[x], dtypes=["float32"], rows=(3, 10))).value
    assert whole.shape == (64, 128) and np.array_equal(whole, want)
    np.testing.assert_allclose(rows, want[3:10], rtol=1e-5, atol=1e-6)  # 7 rows in one vmap: other GEMM shapes


def test_an_integer_leaf_nested_in_a_list_output_is_refused():
    """The floating check takes a flat list of tensors without a walk; a list that nests
    (a tuple inside) is still walked to its leaves."""
    from jacobian_service.engine.calling import check_floating
    from jacobian_service.errors import InvalidInput

    check_floating([torch.ones(2), torch.ones(3)])
    with pytest.raises(InvalidInput, match=r"the output\[1\]\[0\] is int64"):  # the request's 422 (round 21)
        check_floating([torch.ones(2), (torch.ones(2, dtype=torch.int64),)])
    with pytest.raises(InvalidInput, match="the output is int64"):
        check_floating(torch.ones(2, dtype=torch.int64))
