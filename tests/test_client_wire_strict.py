"""Issue 10 through the SDK: 0-d arrays keep their shape on the JSON transport (item 5)
and nested cotangents travel on both transports (item 4)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client._arrays import as_wire_value, json_array  # noqa: E402

from ._client_support import real_server  # noqa: E402
from .user_functions import nested_out  # noqa: E402


@pytest.fixture(scope="module")
def client() -> Iterator[jc.Client]:
    with real_server() as url, jc.Client(url) as c:
        yield c


@pytest.mark.parametrize("value", [np.float64(1.5), np.asarray(1.5), np.asarray(2, dtype=np.int32)])
@pytest.mark.parametrize("binary", [False, True])
def test_json_array_keeps_0d_arrays_0d(value, binary):
    doc = json_array(as_wire_value(value), binary=binary)
    assert doc["shape"] == []


def test_json_array_sends_non_contiguous_arrays_in_c_order():
    arr = np.arange(6.0).reshape(2, 3).T
    doc = json_array(arr, binary=False)
    assert doc["shape"] == [3, 2] and doc["data"] == arr.tolist()


@pytest.mark.parametrize("transport", ["json", "binary"])
def test_0d_arrays_round_trip(client, transport):
    x = np.asarray(3.0, dtype=np.float64)
    out = client.evaluate("scalar_square", x, transport=transport)
    assert out.shape == () and out.dtype == np.float64 and out == 9.0
    jac = client.jacobian("scalar_square", x, transport=transport)
    assert jac.shape == () and jac == 6.0
    got = client.vjp("scalar_square", x, cotangents=np.asarray(2.0), transport=transport)
    assert got.shape == () and got == 12.0
    got = client.jvp("scalar_square", x, tangents=np.float64(0.5), transport=transport)
    assert got.shape == () and got == 3.0


@pytest.mark.parametrize("transport", ["json", "binary"])
def test_nested_cotangents_through_the_sdk(client, transport):
    x = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    rng = np.random.default_rng(1)
    v1, v2, v3 = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
    _, pullback = torch.func.vjp(nested_out, torch.from_numpy(x))
    want = pullback((torch.from_numpy(v1), (torch.from_numpy(v2), torch.from_numpy(v3))))[0].numpy()
    got = client.vjp("nested_out", x, cotangents=(v1, (v2, v3)), transport=transport)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
