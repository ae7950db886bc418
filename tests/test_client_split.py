"""Row-split scale-out (issue 6 item 4): one Jacobian's rows fetched from two real
servers on loopback and assembled, equal to the single-server result."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client._protocol import RetryPolicy  # noqa: E402
from jacobian_client.split import ajacobian_split, jacobian_split  # noqa: E402

from ._client_support import real_server  # noqa: E402
from ._ports import dead_port  # noqa: E402

RNG = np.random.default_rng(1)


@pytest.fixture(scope="module")
def urls() -> Iterator[list[str]]:
    with real_server() as a, real_server() as b:
        yield [a, b]


@pytest.mark.parametrize("chunk_rows", [None, 1, 37])
def test_split_equals_single_server(urls: list[str], chunk_rows: int | None) -> None:
    x = RNG.standard_normal(150).astype(np.float32)
    with jc.Client(urls[0]) as client:
        want = client.jacobian("softmax", x)
    got = jacobian_split(urls, "softmax", x, chunk_rows=chunk_rows)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_split_into_a_file(urls: list[str], tmp_path: Path) -> None:
    x = RNG.standard_normal(300).astype(np.float64)
    with jc.Client(urls[1]) as client:
        want = client.jacobian("softmax", x)
    out = tmp_path / "J.npy"
    got = jacobian_split(urls, "softmax", x, chunk_rows=64, out=out)
    assert isinstance(got, np.memmap) and got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.load(out), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J.npy"]


def test_split_multidimensional_output_and_cast_dtype(urls: list[str]) -> None:
    x = RNG.standard_normal(128)  # float64 into a float32 function: the server casts
    with jc.Client(urls[0]) as client:
        want = client.jacobian("mlp", x)
    got = jacobian_split(urls, "mlp", x, chunk_rows=10)
    assert got.dtype == np.float32 and got.shape == (64, 128)
    # Blocks of 10 rows run as different GEMM shapes than one block of 64: equal to
    # rounding. Row by row on both sides the bytes are the same.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    with jc.Client(urls[0]) as client:
        want1 = client.jacobian("mlp", x, chunk_size=1)
    np.testing.assert_array_equal(jacobian_split(urls, "mlp", x, chunk_rows=10, chunk_size=1), want1)
    xs = RNG.standard_normal((4, 3)).astype(np.float32)
    with jc.Client(urls[0]) as client:
        want2 = client.jacobian("scaled_norm", xs, np.float64(2.0), np.int64(1))[0]
    assert want2.shape == (4, 4, 3)


def test_split_survives_a_dead_server(urls: list[str]) -> None:
    x = RNG.standard_normal(60).astype(np.float32)
    with jc.Client(urls[0]) as client:
        want = client.jacobian("softmax", x)
    with dead_port() as port:  # (nothing answers there, for the test's whole time)
        dead = f"http://127.0.0.1:{port}"
        got = jacobian_split([dead, urls[0], urls[1]], "softmax", x, chunk_rows=7,
                             retry=RetryPolicy(max_retries=1, backoff_base=0.01))
        np.testing.assert_array_equal(got, want)
        with pytest.raises(jc.TransportError):
            jacobian_split([dead], "softmax", x, retry=RetryPolicy(max_retries=0))


@pytest.mark.asyncio
async def test_split_errors(urls: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aux"):
        await ajacobian_split(urls, "sin_aux", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="several outputs"):
        await ajacobian_split(urls, "polar", np.ones(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(jc.FunctionError):
        await ajacobian_split(urls, "broken", np.ones(3, np.float32))
    with pytest.raises(jc.InvalidInput):
        await ajacobian_split(urls, "mlp", np.ones(3, np.float32), out=tmp_path / "J.npy")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="running event loop"):
        jacobian_split(urls, "softmax", np.ones(3, np.float32))


@pytest.mark.asyncio
async def test_split_by_parameter_name(urls: list[str]) -> None:
    x, y = RNG.standard_normal((2, 20)).astype(np.float32)
    async with jc.AsyncClient(urls[0]) as client:
        want = await client.jacobian("add_square", x, y, argnums=1)
    got = await ajacobian_split(urls, "add_square", x, y, argnums="y", chunk_rows=3)
    np.testing.assert_array_equal(got, want)
