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
