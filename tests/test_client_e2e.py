"""The SDK against the real server on loopback (uvicorn in a thread), sync and async,
for every method and option, compared with in-process ``torch.func`` results."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client._protocol import RetryPolicy  # noqa: E402
from jacobian_service import examples  # noqa: E402

from ._client_support import real_server  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-6}
KEY = "test-key"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with real_server() as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[jc.Client]:
    with jc.Client(url) as c:
        yield c


@pytest.fixture(scope="module")
def strict_url() -> Iterator[str]:
    """Auth on, small limits, a short deadline, a queue of one, no batching."""
    with real_server(api_keys=KEY, max_request_bytes=4096, max_result_bytes=64 << 10, stream_threshold_bytes=1 << 30,
                     request_timeout_s=1.0, max_queue=1, max_batch_size=1) as u:
        yield u


def t(a: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(a))


def close(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), type(got)
        np.testing.assert_allclose(got, want.detach().numpy(), **TOL)
        assert got.dtype == want.detach().numpy().dtype
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            close(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for k in want:
            close(got[k], want[k])
    else:
        assert got == want


RNG = np.random.default_rng(0)
X = RNG.standard_normal(6).astype(np.float32)
Y = RNG.standard_normal(6).astype(np.float32)
TRANSPORTS = ["binary", "json"]


# --------------------------------------------------------------------------- metadata


def test_metadata(client: jc.Client) -> None:
    names = {f.name for f in client.functions()}
    assert {"sin", "sin_aux", "mlp", "softmax", "polar"} <= names
    info = client.function("add_square")
    assert isinstance(info, jc.FunctionInfo) and [i.name for i in info.inputs] == ["x", "y"]
    assert info.inputs[0] == jc.InputInfo("x", ("n",), "floating") and not info.has_aux
    assert client.function("sin_aux").has_aux
    assert "version" in client.info()
    assert client.health() and client.health(ready=False)


# --------------------------------------------------------------------------- jacobian


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_jacobian_sin_float32_and_float64(client: jc.Client, transport: str) -> None:
    for x in (X, X.astype(np.float64)):
        close(client.jacobian("sin", x, transport=transport), torch.func.jacrev(examples.sin)(t(x)))


def test_plain_numbers_take_the_declared_dtype(client: jc.Client) -> None:
    J = client.jacobian("sin", X.tolist())
    assert J.dtype == np.float32
    np.testing.assert_allclose(J, np.diag(np.cos(X)), **TOL)


def test_torch_tensor_inputs(client: jc.Client) -> None:
    x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    close(client.jacobian("sin", x), torch.func.jacrev(examples.sin)(x))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_has_aux_gives_jacobian_and_aux(client: jc.Client, transport: str) -> None:
    J, aux = client.jacobian("sin_aux", X, transport=transport)
    close((J, aux), torch.func.jacrev(examples.sin_aux, has_aux=True)(t(X)))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1,), "y", ("x", "y")])
def test_argnums_forms(client: jc.Client, transport: str, argnums: Any) -> None:
    index = {"x": 0, "y": 1}
    ref = argnums if not isinstance(argnums, (str, tuple)) else (
        index[argnums] if isinstance(argnums, str) else tuple(index.get(a, a) for a in argnums))
    want = torch.func.jacrev(examples.add_square, argnums=ref)(t(X), t(Y))
    close(client.jacobian("add_square", X, Y, argnums=argnums, transport=transport), want)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tuple_output_nests_like_jacrev(client: jc.Client, transport: str) -> None:
    r, th = np.abs(X) + 0.5, Y
    want = torch.func.jacrev(examples.polar, argnums=(0, 1))(t(r), t(th))
    close(client.jacobian("polar", r, th, argnums=(0, 1), transport=transport), want)


def test_dict_output(client: jc.Client) -> None:
    from tests.user_functions import dict_out

    close(client.jacobian("dict_out", X), torch.func.jacrev(dict_out)(t(X)))


@pytest.mark.parametrize("chunk_size", [None, 1, 16])
def test_batched_mlp_with_chunks(client: jc.Client, chunk_size: int | None) -> None:
    xs = RNG.standard_normal((3, 128)).astype(np.float32)
    want = torch.vmap(torch.func.jacrev(examples.mlp))(t(xs))
    close(client.jacobian("mlp", xs, batched=True, chunk_size=chunk_size), want)


@pytest.mark.parametrize("mode", ["rev", "fwd", "auto"])
def test_modes_agree(client: jc.Client, mode: str) -> None:
    angles = X[:3]
    close(client.jacobian("planar_arm", angles, mode=mode), torch.func.jacrev(examples.planar_arm)(t(angles)))


def test_return_output(client: jc.Client) -> None:
    J, out = client.jacobian("sin", X, return_output=True)
    close((J, out), (torch.func.jacrev(examples.sin)(t(X)), examples.sin(t(X))))
    J, out, aux = client.jacobian("sin_aux", X, return_output=True)
    np.testing.assert_allclose(out, aux)


def test_rows_are_a_slice_of_the_flattened_output(client: jc.Client) -> None:
    x = RNG.standard_normal(40).astype(np.float32)
    full = client.jacobian("softmax", x)
    np.testing.assert_array_equal(client.jacobian("softmax", x, rows=(7, 19)), full[7:19])
    assert client.jacobian("softmax", x, rows=(5, 5)).shape == (0, 40)


def test_jacrev_callable(client: jc.Client) -> None:
    jac = client.jacrev("add_square", argnums=(0, 1), chunk_size=2)
    close(jac(X, Y), torch.func.jacrev(examples.add_square, argnums=(0, 1))(t(X), t(Y)))
    close(client.jacrev("sin_aux")(X), torch.func.jacrev(examples.sin_aux, has_aux=True)(t(X)))


# --------------------------------------------------------------------------- other methods


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hessian(client: jc.Client, transport: str) -> None:
    x = X.astype(np.float64)
    close(client.hessian("sum_sin", x, transport=transport), torch.func.hessian(examples.sum_sin)(t(x)))
    close(client.hessian("add_square", X, Y, argnums=(0, 1), transport=transport),
          torch.func.hessian(examples.add_square, argnums=(0, 1))(t(X), t(Y)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_evaluate(client: jc.Client, transport: str) -> None:
    x = RNG.standard_normal(128).astype(np.float32)
    close(client.evaluate("mlp", x, transport=transport), examples.mlp(t(x)))
    close(client.evaluate("sin_aux", X, transport=transport), examples.sin_aux(t(X)))
    close(client.evaluate("polar", X, Y, transport=transport), examples.polar(t(X), t(Y)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vjp(client: jc.Client, transport: str) -> None:
    ct = RNG.standard_normal(6).astype(np.float32)
    _, pullback = torch.func.vjp(examples.add_square, t(X), t(Y))
    gx, gy = pullback(t(ct))
    close(client.vjp("add_square", X, Y, cotangents=ct, argnums=(0, 1), transport=transport), (gx, gy))
    close(client.vjp("add_square", X, Y, cotangents=ct, argnums=1, transport=transport), gy)
    # several cotangents at once, and a tuple output
    cts = RNG.standard_normal((4, 6)).astype(np.float32)
    want = torch.stack([pullback(t(c))[0] for c in cts])
    close(client.vjp("add_square", X, Y, cotangents=cts, batched_vectors=True, transport=transport), want)
    _, pb = torch.func.vjp(examples.polar, t(X), t(Y))
    close(client.vjp("polar", X, Y, cotangents=(ct, 2 * ct), argnums=(0, 1), transport=transport),
          pb((t(ct), t(2 * ct))))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_jvp(client: jc.Client, transport: str) -> None:
    tx, ty = RNG.standard_normal((2, 6)).astype(np.float32)
    _, want = torch.func.jvp(examples.add_square, (t(X), t(Y)), (t(tx), t(ty)))
    close(client.jvp("add_square", X, Y, tangents=(tx, ty), argnums=(0, 1), transport=transport), want)
    _, want0 = torch.func.jvp(lambda a: examples.add_square(a, t(Y)), (t(X),), (t(tx),))
    close(client.jvp("add_square", X, Y, tangents=tx, transport=transport), want0)
    txs = RNG.standard_normal((3, 6)).astype(np.float32)
    wants = torch.stack([torch.func.jvp(examples.sin, (t(X),), (t(v),))[1] for v in txs])
    close(client.jvp("sin", X, tangents=txs, batched_vectors=True, transport=transport), wants)


# --------------------------------------------------------------------------- streaming


def test_out_streams_a_large_jacobian_to_a_file(client: jc.Client, tmp_path: Path) -> None:
    x = RNG.standard_normal(1800).astype(np.float32)  # 13 MB: over the stream threshold
    J = client.jacobian("softmax", x, out=tmp_path / "J.npy")
    assert isinstance(J, np.memmap) and J.shape == (1800, 1800) and J.dtype == np.float32
    s = torch.softmax(t(x), 0).numpy()
    np.testing.assert_allclose(J, np.diag(s) - np.outer(s, s), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J.npy"]
    mem = client.jacobian("softmax", x)
    np.testing.assert_array_equal(mem, J)


def test_out_with_aux_is_not_acceptable(client: jc.Client, tmp_path: Path) -> None:
    with pytest.raises(jc.NotAcceptable):
        client.jacobian("sin_aux", X, out=tmp_path / "J.npy")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- errors


def test_errors_from_the_real_server(client: jc.Client) -> None:
    with pytest.raises(jc.FunctionNotFound) as nf:
        client.jacobian("sinn", X)
    assert "sin" in nf.value.detail and nf.value.request_id
    with pytest.raises(jc.InvalidInput):
        client.jacobian("mlp", np.ones(5, np.float32))
    with pytest.raises(jc.InvalidInput):
        client.jacobian("add_square", X)
    with pytest.raises(jc.InvalidInput):
        client.jacobian("sin", X, argnums=3)
    with pytest.raises(jc.FunctionError) as fe:
        client.jacobian("broken", X)
    assert "diverged" in fe.value.detail
    with pytest.raises(jc.FunctionNotFound):
        client.function("nope")


def test_auth_limits_and_deadline(strict_url: str) -> None:
    with jc.Client(strict_url) as anonymous:
        with pytest.raises(jc.Unauthorized):
            anonymous.jacobian("sin", X)
    with jc.Client(strict_url, api_key="wrong") as wrong:
        with pytest.raises(jc.Forbidden):
            wrong.functions()
    with jc.Client(strict_url, api_key=KEY) as ok:
        close(ok.jacobian("sin", X), torch.func.jacrev(examples.sin)(t(X)))
        with pytest.raises(jc.PayloadTooLarge):
            ok.jacobian("sin", np.ones(4096, np.float32))
        with pytest.raises(jc.ResultTooLarge):
            ok.jacobian("softmax", np.ones(200, np.float32), transport="json")


@pytest.mark.asyncio
async def test_overloaded_without_retries(strict_url: str) -> None:
    async with jc.AsyncClient(strict_url, api_key=KEY, retry=RetryPolicy(max_retries=0)) as c:
        results = await asyncio.gather(*(c.evaluate("slow", np.array([0.3], np.float32)) for _ in range(4)),
                                       return_exceptions=True)
    assert any(isinstance(r, jc.Overloaded) for r in results), results
    assert any(isinstance(r, np.ndarray) for r in results), results


def test_deadline_gives_timeout(strict_url: str) -> None:
    """Runs last on this server: the worker stays busy with the slow call afterwards."""
    with jc.Client(strict_url, api_key=KEY) as ok:
        with pytest.raises(jc.Timeout) as info:
            ok.evaluate("slow", np.array([3.0], np.float32))
    assert info.value.status_code == 504


# --------------------------------------------------------------------------- async


@pytest.mark.asyncio
async def test_async_every_method_concurrently(url: str, tmp_path: Path) -> None:
    xs = RNG.standard_normal((2, 128)).astype(np.float32)
    ct = RNG.standard_normal(6).astype(np.float32)
    async with jc.AsyncClient(url) as c:
        jac = c.jacrev("add_square", argnums=1)
        (funcs, info, one, healthy, J, (Ja, aux), Jt, Jb, H, out, v, j, Jr, Jf) = await asyncio.gather(
            c.functions(), c.info(), c.function("sin"), c.health(),
            c.jacobian("sin", X),
            c.jacobian("sin_aux", X, transport="json"),
            c.jacobian("add_square", X, Y, argnums=(0, 1)),
            c.jacobian("mlp", xs, batched=True, chunk_size=16),
            c.hessian("sum_sin", X),
            c.evaluate("polar", X, Y),
            c.vjp("sin", X, cotangents=ct),
            c.jvp("sin", X, tangents=ct),
            jac(X, Y),
            c.jacobian("softmax", X, out=tmp_path / "J.npy"),
        )
    assert healthy and "version" in info and one.name == "sin" and len(funcs) >= 10
    close(J, torch.func.jacrev(examples.sin)(t(X)))
    close((Ja, aux), torch.func.jacrev(examples.sin_aux, has_aux=True)(t(X)))
    close(Jt, torch.func.jacrev(examples.add_square, argnums=(0, 1))(t(X), t(Y)))
    close(Jb, torch.vmap(torch.func.jacrev(examples.mlp))(t(xs)))
    close(H, torch.func.hessian(examples.sum_sin)(t(X)))
    close(out, examples.polar(t(X), t(Y)))
    close(v, torch.func.vjp(examples.sin, t(X))[1](t(ct))[0])
    close(j, torch.func.jvp(examples.sin, (t(X),), (t(ct),))[1])
    close(Jr, torch.func.jacrev(examples.add_square, argnums=1)(t(X), t(Y)))
    assert isinstance(Jf, np.memmap)
    close(np.asarray(Jf), torch.func.jacrev(examples.softmax)(t(X)))


@pytest.mark.asyncio
async def test_async_errors(url: str) -> None:
    async with jc.AsyncClient(url) as c:
        with pytest.raises(jc.FunctionNotFound):
            await c.jacobian("nope", X)
        with pytest.raises(jc.InvalidInput):
            await c.hessian("mlp", X)
        with pytest.raises(jc.FunctionError):
            await c.evaluate("broken", X)
        await c.wait_ready(timeout=5)


# ----------------------------------------------------------------------------- hvp, return_output (issue 12)


def _cubic_hvp(x, w, tx, tw):
    from ._client_functions import cubic_pair

    g = torch.func.grad(lambda a, b: cubic_pair(a, b)[0], argnums=(0, 1))
    return torch.func.jvp(g, (torch.from_numpy(x), torch.from_numpy(w)), (torch.from_numpy(tx), torch.from_numpy(tw)))[1]


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_hvp_and_return_output(client: jc.Client, transport: str) -> None:
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(4), rng.standard_normal(4)
    tx, tw = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    # one vector, both inputs; aux comes last as everywhere
    got, aux = client.hvp("cubic_pair", x, w, tangents=(tx[0], tw[0]), argnums=(0, 1), transport=transport)
    want = _cubic_hvp(x, w, tx[0], tw[0])
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_.numpy(), rtol=1e-12)
    np.testing.assert_allclose(aux, x**2, rtol=1e-12)
    # a stack of vectors and the output, in one request
    got, output, aux = client.hvp("cubic_pair", x, w, tangents=(tx, tw), argnums=(0, 1), batched_vectors=True,
                                  return_output=True, transport=transport)
    for b in range(3):
        want = _cubic_hvp(x, w, tx[b], tw[b])
        np.testing.assert_allclose(got[0][b], want[0].numpy(), rtol=1e-12)
        np.testing.assert_allclose(got[1][b], want[1].numpy(), rtol=1e-12)
    np.testing.assert_allclose(output, np.sum(w * x**3) + np.sum(x * w**2), rtol=1e-12)
    # vjp / jvp with return_output: value and derivative together
    q = np.array([0.3, -0.2, 0.5])
    vjp, out = client.vjp("planar_arm", q, cotangents=np.array([1.0, 2.0]), return_output=True, transport=transport)
    np.testing.assert_allclose(out, examples.planar_arm(torch.from_numpy(q)).numpy(), rtol=1e-12)
    jvp, out2 = client.jvp("planar_arm", q, tangents=np.ones(3), return_output=True, transport=transport)
    np.testing.assert_allclose(out2, out, rtol=1e-12)
    with pytest.raises(jc.InvalidInput, match="scalar"):
        client.hvp("planar_arm", q, tangents=np.ones(3), transport=transport)


@pytest.mark.asyncio
async def test_async_hvp(url: str) -> None:
    x = np.array([0.3, -0.7, 1.1])
    async with jc.AsyncClient(url) as ac:
        got = await ac.hvp("sum_sin", x, tangents=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(got, -np.sin(x) * np.array([1.0, 2.0, 3.0]), rtol=1e-12)
