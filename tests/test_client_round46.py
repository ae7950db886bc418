"""Client round 46 (the SDK's side of hostile round 46, kept when its engine change was
reverted):

- The SDK's sparse reader: a float16 sparse answer (JSON or .npz) raised scipy's own
  ValueError (coo) or gave a csr/csc matrix whose toarray() raised: scipy.sparse holds no
  float16. It is read as float32 (exact), the dtype the service sends for it.
- The SciPy adapter's per_column naming one input twice ((0, 0), or (0, -2) of two):
  moved twice, a square held input went with rows for columns, silently. Refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jacobian_client.wire import decode_tree, read_sparse_npz, write_sparse_npz

pytest.importorskip("scipy")


_F16 = np.array([0.5, -1.25, 65504.0], np.float16)
_SPARSE = {
    "coo": {"row": [0, 1, 2], "col": [2, 0, 1]},
    "csr": {"indptr": [0, 1, 2, 3], "indices": [2, 0, 1]},
    "csc": {"indptr": [0, 1, 2, 3], "indices": [1, 2, 0]},
}


@pytest.mark.parametrize("fmt", sorted(_SPARSE))
def test_a_float16_sparse_answer_reads_as_float32(fmt: str) -> None:
    obj = {"format": fmt, "shape": [3, 3], "dtype": "float16", "data": _F16.tolist(), **_SPARSE[fmt]}
    matrix = decode_tree(obj)
    dense = matrix.toarray()
    assert dense.dtype == np.float32
    expected = np.zeros((3, 3), np.float32)
    if fmt == "coo":
        expected[[0, 1, 2], [2, 0, 1]] = _F16
    elif fmt == "csr":
        expected[[0, 1, 2], [2, 0, 1]] = _F16
    else:
        expected[[1, 2, 0], [0, 1, 2]] = _F16
    np.testing.assert_array_equal(dense, expected)


def test_a_float16_sparse_npz_reads_as_float32() -> None:
    from jacobian_client.wire import SparseCOO

    body = write_sparse_npz(SparseCOO(np.array([0, 1, 2]), np.array([2, 0, 1]), _F16, (3, 3)))
    matrix, _ = read_sparse_npz(body)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix.toarray()[[0, 1, 2], [2, 0, 1]], _F16.astype(np.float32))


class _Sent(Exception):
    pass


class _Recorder:
    """A client's _parts that records the batched request and sends nothing."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[Any], dict[str, Any]]] = []

    def _parts(self, kind: str, name: str, inputs: list[Any], options: dict[str, Any]) -> Any:
        self.sent.append((inputs, options))
        raise _Sent


@pytest.mark.parametrize("per_column", [(0, 0), (0, -2)])
def test_per_column_naming_an_input_twice_is_refused(per_column: tuple[int, ...]) -> None:
    """(0, 0), or (0, -2) of two inputs: the held input was moved twice, its columns'
    axis put back; a square (k, k) one went with rows in place of columns, silently."""
    pytest.importorskip("scipy")
    from jacobian_client.scipy import remote_objective

    client = _Recorder()
    obj = remote_objective(client, "f", argnum=1, shape=(2,), vectorized=True, per_column=per_column)
    held = np.arange(9.0).reshape(3, 3)  # (3, k=3): one column of 3 values per column of x
    with pytest.raises(ValueError, match="names input 0 twice"):
        obj.fun(np.zeros((2, 3)), held)
    assert client.sent == []
    # named once, its columns go first (in_dims 0), each its own
    with pytest.raises(_Sent):
        remote_objective(client, "f", argnum=1, shape=(2,), vectorized=True, per_column=(0,)).fun(np.zeros((2, 3)), held)
    (inputs, options), = client.sent
    np.testing.assert_array_equal(inputs[0], held.T)
    assert options["in_dims"] == (0, 0)
