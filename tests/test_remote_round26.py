"""Remote functions in a scientist's programs, round 26: ``out=`` (a Jacobian or Hessian
streamed into a ``.npy`` file) asked as the in-memory call is asked.

* ``argnums=(0,)`` (or ``("y",)``) with ``out=`` was a 406 telling the caller to "ask for
  application/x-npz", which an SDK caller cannot: a tuple of one Jacobian is one array
  on the wire, asked as ``argnums=0`` and returned as jacrev's tuple (a Hessian's tuple of
  tuples), in the file; sync and async.
* Several argnums, or ``return_output=True``, with ``out=``: a ValueError before anything
  is sent (was the server's 406 after the upload).
* A function whose result is more than one array (aux, several outputs, a pytree
  parameter), which only the server knows: its 406 said in the SDK's terms (``out=``),
  not "ask for application/x-npz"; still a ``NotAcceptable``.
* ``out=`` naming a directory, or a file in a directory that does not exist: the
  OSError came only after the server's work (the directory's once the whole result had
  been received and written beside it); now before any request, ``jacobian_split`` too.

One in-process app (``ready_app``) serves the module; the SDK reaches it through
``sdk_over`` (no socket).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("jacobian_service.app")

import jacobian_client as jc
from jacobian_client.split import jacobian_split

from ._remote_support import Counted, counting
from .conftest import ready_app, sdk_over


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    with ready_app("jacobian_service.examples") as a:
        yield a


@pytest.fixture(scope="module")
def sdk(app: Any) -> Iterator[Any]:
    with sdk_over(app) as client:
        yield client


@pytest.fixture
def cc(sdk: Any) -> Iterator[Counted]:
    with counting(sdk) as c:
        yield c


X = np.linspace(0.1, 1.0, 5)
Y = np.linspace(1.0, 2.0, 5)


def _files(d: Any) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.parametrize("argnums", [(0,), ("y",), [1]])
def test_one_argnum_tuple_streams_into_the_file(cc: Counted, tmp_path: Any, argnums: Any) -> None:
    want = cc.client.jacobian("add_square", X, Y, argnums=argnums)
    cc.take()
    got = cc.client.jacobian("add_square", X, Y, argnums=argnums, out=tmp_path / "J.npy")
    assert cc.take() == ["jacobian"]  # one request, no 406 first
    assert isinstance(got, tuple) and len(got) == 1 and isinstance(got[0], np.memmap)
    assert isinstance(want, tuple) and len(want) == 1
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(np.load(tmp_path / "J.npy"), want[0])
    assert _files(tmp_path) == ["J.npy"]


def test_one_argnum_tuple_hessian_and_batched_and_rows(cc: Counted, tmp_path: Any) -> None:
    c = cc.client
    # torch.func.hessian(f, argnums=(0,)) is a tuple of a tuple
    want = c.hessian("add_square", X, Y, argnums=(1,))
    got = c.hessian("add_square", X, Y, argnums=(1,), out=tmp_path / "H.npy")
    assert isinstance(got, tuple) and isinstance(got[0], tuple) and len(got) == len(got[0]) == 1
    np.testing.assert_array_equal(got[0][0], want[0][0])
    np.testing.assert_allclose(got[0][0], np.diag(np.full(5, 2.0))[:, :, None] * np.eye(5)[None], atol=0)

    XB, YB = np.stack([X, 2 * X]), np.stack([Y, Y + 1])
    want = c.jacobian("add_square", XB, YB, argnums=(0,), batched=True)
    got = c.jacobian("add_square", XB, YB, argnums=(0,), batched=True, out=tmp_path / "B.npy")
    assert isinstance(got, tuple) and got[0].shape == (2, 5, 5)
    np.testing.assert_array_equal(got[0], want[0])

    want = c.jacobian("add_square", X, Y, argnums=(1,), rows=(1, 3))
    got = c.jacobian("add_square", X, Y, argnums=(1,), rows=(1, 3), out=tmp_path / "R.npy")
    assert isinstance(got, tuple) and got[0].shape == (2, 5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[0], 2 * np.diag(Y)[1:3], atol=0)


def test_one_argnum_tuple_async(app: Any, tmp_path: Any) -> None:
    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                        content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    async def main() -> tuple[Any, Any]:
        async with jc.AsyncClient("http://sdk.test", http_transport=httpx.MockTransport(forward),
                                  max_retries=0) as ac:
            got = await ac.jacobian("add_square", X, Y, argnums=(0,), out=tmp_path / "J.npy")
            with pytest.raises(jc.NotAcceptable, match="out=") as info:
                await ac.jacobian("polar", X, Y, out=tmp_path / "P.npy")
            assert "x-npz" not in str(info.value)
            return got, await ac.jacobian("add_square", X, Y, argnums=(0,))

    got, want = asyncio.run(main())
    assert isinstance(got, tuple) and isinstance(got[0], np.memmap)
    np.testing.assert_array_equal(got[0], want[0])
    assert _files(tmp_path) == ["J.npy"]


@pytest.mark.parametrize("kind, options, match", [
    ("jacobian", {"argnums": (0, 1)}, r"argnums=\(0, 1\) asks for 2"),
    ("hessian", {"argnums": ("x", "y")}, r"argnums=\('x', 'y'\) asks for 2"),
    ("jacobian", {"return_output": True}, "return_output=True"),
    ("hessian", {"return_output": True, "argnums": (0,)}, "return_output=True"),
])
def test_several_arrays_into_one_file_refused_before_sending(
        cc: Counted, tmp_path: Any, kind: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        getattr(cc.client, kind)("add_square", X, Y, out=tmp_path / "J.npy", **options)
    assert "out=" in str(info.value)
    assert cc.take() == []  # nothing sent (the server's 406 came after the upload)
    assert _files(tmp_path) == []


def test_sparse_dense_form_with_several_argnums_still_streams(cc: Counted, tmp_path: Any) -> None:
    # one 2-D matrix whatever argnums is: not refused, not wrapped
    got = cc.client.jacobian("add_square", X, Y, argnums=(0, 1), sparsity="auto", sparse_format="dense",
                             out=tmp_path / "S.npy")
    assert isinstance(got, np.memmap) and got.shape == (5, 10)
    np.testing.assert_allclose(got, np.hstack([np.eye(5), np.diag(2 * Y)]), atol=0)


@pytest.mark.parametrize("name, inputs, why", [
    ("sin_aux", (X,), "aux"),
    ("polar", (X, Y), "several arrays"),
    ("dense_layer", ({"w": np.ones((2, 5)), "b": np.ones(2)}, X), "pytree parameter"),
])
def test_server_refusal_said_in_the_sdks_terms(cc: Counted, tmp_path: Any, name: str, inputs: tuple,
                                               why: str) -> None:
    with pytest.raises(jc.NotAcceptable) as info:
        cc.client.jacobian(name, *inputs, out=tmp_path / "J.npy")
    message = str(info.value)
    assert "out= streams one array" in message and "leave out= off" in message and why in message
    assert "x-npz" not in message and "ask for" not in message
    assert info.value.status_code == 406 and info.value.code == "not_acceptable"
    assert cc.take() == ["jacobian"]
    assert _files(tmp_path) == []


def test_unwritable_out_refused_before_sending(cc: Counted, tmp_path: Any) -> None:
    with pytest.raises(IsADirectoryError, match="out= names a directory"):
        cc.client.jacobian("softmax", X, out=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cc.client.hessian("sum_sin", X, out=tmp_path / "missing" / "H.npy")
    assert cc.take() == []
    assert _files(tmp_path) == []
    # a server that cannot be reached is never asked: the path is checked first
    with pytest.raises(IsADirectoryError):
        jacobian_split(["http://127.0.0.1:9"], "softmax", X, out=tmp_path, max_retries=0)
    got = cc.client.jacobian("softmax", X, out=tmp_path / "J.npy")  # a good path still streams
    np.testing.assert_allclose(got, cc.client.jacobian("softmax", X), atol=0)


# --------------------------------------------------------------------------- arity


def test_an_input_left_out_is_named_not_the_format_the_sdk_chose(cc: Counted, app: Any) -> None:
    """One array of a two-input function goes as .npy (the SDK's choice): the 422 said
    "an application/x-npy body carries one input; ... send application/x-npz", a format
    the caller never chose, not which input was missing; a JSON body said which."""
    with pytest.raises(jc.InvalidInput) as info:
        cc.client.jacobian("add_square", X)
    assert "missing input 'y'; add_square takes ['x', 'y']" in str(info.value)
    torch = pytest.importorskip("torch")
    from jacobian_client.torch import remote

    with pytest.raises(jc.InvalidInput, match=r"missing input 'y'; add_square takes \['x', 'y'\]"):
        remote(cc.client, "add_square")(torch.ones(3, dtype=torch.float64))
    # one too many: the positions past the function's inputs are counted
    with pytest.raises(jc.InvalidInput, match=r"unknown inputs \['1'\]; sin takes \['x'\]: 1 input, and 2 were given"):
        cc.client.jacobian("sin", X, X)
    assert cc.take() == ["jacobian", "evaluate", "jacobian"]
    # a raw .npy to a vector endpoint of a one-input function keeps its words
    r = app.post("/v1/functions/sin/vjp", content=b"", headers={"content-type": "application/x-npy"})
    assert r.status_code == 422 and "carries one input; sin vjp needs more" in r.json()["detail"]
