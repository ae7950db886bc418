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
    with ready_app("jacobian_service.examples,tests.remote28_functions") as a:
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


@pytest.mark.parametrize("name, inputs, why, code", [
    ("sin_aux", (X,), "aux", "aux"),
    ("polar", (X, Y), "several arrays", "several_arrays"),
    ("dense_layer", ({"w": np.ones((2, 5)), "b": np.ones(2)}, X), "pytree parameter", "pytree"),
])
def test_server_refusal_said_in_the_sdks_terms(cc: Counted, tmp_path: Any, name: str, inputs: tuple,
                                               why: str, code: str) -> None:
    with pytest.raises(jc.NotAcceptable) as info:
        cc.client.jacobian(name, *inputs, out=tmp_path / "J.npy")
    message = str(info.value)
    assert "out= streams one array" in message and "leave out= off" in message and why in message
    assert "x-npz" not in message and "ask for" not in message
    assert info.value.status_code == 406 and info.value.code == "not_acceptable"
    # (round 27) what it could not carry, in members for code to read: the code and its words
    assert info.value.problem["not_one_array"] == code and why in info.value.problem["reason"]
    assert cc.take() == ["jacobian"]


def test_out_refusal_is_read_from_the_problems_members_not_its_detail(tmp_path: Any) -> None:
    """The SDK's out= refusal cut the server's detail at "; ask for " to find the reason:
    a detail worded otherwise came back whole, the raw caller's format advice inside. It
    reads the ``reason`` member (beside ``not_one_array``) now."""
    problem = {"type": "urn:jacobian-service:problem:not_acceptable", "title": "Not acceptable", "status": 406,
               "code": "not_acceptable", "detail": "no .npy for this one; try application/x-npz (reworded)",
               "not_one_array": "aux", "reason": "the function's aux comes beside it"}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(406, json=problem, headers={"content-type": "application/problem+json"})

    with jc.Client("http://sdk.test", http_transport=httpx.MockTransport(answer), max_retries=0) as c:
        with pytest.raises(jc.NotAcceptable) as info:
            c.jacobian("sin_aux", X, out=tmp_path / "J.npy")
    assert str(info.value).startswith("406 not_acceptable: out= streams one array into one .npy file; the jacobian of "
                                      "'sin_aux' is not one (the function's aux comes beside it): leave out= off")
    assert "x-npz" not in str(info.value) and "reworded" not in str(info.value)
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
    assert "missing input 'y'; add_square takes ['x', 'y']: pass each input, in order or by name" in str(info.value)
    # (round 27) nor the format advice after it: "send them all as application/x-npz or
    # JSON" came along; the SDK words it from the problem's members, not the detail
    assert "application/" not in str(info.value) and "x-npz" not in str(info.value)
    assert (info.value.problem["missing"], info.value.problem["inputs"]) == (["y"], ["x", "y"])
    torch = pytest.importorskip("torch")
    from jacobian_client.torch import remote

    with pytest.raises(jc.InvalidInput, match=r"missing input 'y'; add_square takes \['x', 'y'\]: pass each") as info:
        remote(cc.client, "add_square")(torch.ones(3, dtype=torch.float64))
    assert "application/" not in str(info.value)
    # one too many: the positions past the function's inputs are counted
    with pytest.raises(jc.InvalidInput, match=r"unknown inputs \['1'\]; sin takes \['x'\]: 1 input, and 2 were given"):
        cc.client.jacobian("sin", X, X)
    assert cc.take() == ["jacobian", "evaluate", "jacobian"]
    # a raw .npy to a vector endpoint of a one-input function keeps its words
    r = app.post("/v1/functions/sin/vjp", content=b"", headers={"content-type": "application/x-npy"})
    assert r.status_code == 422 and "carries one input; sin vjp needs more" in r.json()["detail"]
    # a raw HTTP caller, who chose .npy, keeps the advice, with the members beside it
    r = app.post("/v1/functions/polar/jacobian", content=_npy(X), headers={"content-type": "application/x-npy"})
    problem = r.json()
    assert r.status_code == 422 and "send them all as application/x-npz or JSON" in problem["detail"]
    assert (problem["missing"], problem["inputs"]) == (["theta"], ["r", "theta"])
    # a JSON body of several left out names each, and what it sent that the function does not take
    r = app.post("/v1/functions/add_square/jacobian", json={"inputs": {"z": [1.0]}})
    assert r.status_code == 422 and (r.json()["missing"], r.json()["inputs"]) == (["x", "y"], ["x", "y"])
    assert "unknown ['z']" in r.json()["detail"]
    # (browser round 20) the same inputs left out of a positional list, or of the sparsity
    # query's shapes: the members too (a page reading `missing` found none there); one too
    # many has none (nothing is missing)
    for method, path, kw, missing in (
            ("POST", "/v1/functions/add_square/jacobian", {"json": {"inputs": [[1.0]]}}, ["y"]),
            ("POST", "/v1/functions/polar/evaluate", {"json": {"inputs": []}}, ["r", "theta"]),
            ("GET", "/v1/functions/add_square/sparsity", {"params": {"shapes": "3"}}, ["y"]),
            ("POST", "/v1/functions/sin/jacobian", {"json": {"inputs": [[1.0], [2.0]]}}, None),
            ("GET", "/v1/functions/sin/sparsity", {"params": {"shapes": "3;3"}}, None)):
        problem = app.request(method, path, **kw).json()
        assert (problem["status"], problem.get("missing")) == (422, missing), (path, kw, problem)
        if missing:
            assert problem["inputs"] == (["r", "theta"] if "polar" in path else ["x", "y"]), problem


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# --------------------------------------------------------------------------- inputs by name (round 27)


def test_the_sdks_methods_take_inputs_by_name(cc: Counted) -> None:
    """``client.jacobian("add_square", x=X, y=Y)``, as the function is called in-process,
    was "TypeError: jacobian() got an unexpected keyword argument 'x'": the SDK took
    inputs by position alone (the torch and JAX adapters took names). Every method of a
    function's inputs takes them now, placed by the names the function declares (one
    GET, kept), sent by name; a wrong call is a TypeError naming the inputs, as Python's."""
    c = cc.client
    want = c.jacobian("add_square", X, Y, argnums=(0, 1))
    cc.take()
    got = c.jacobian("add_square", y=Y, x=X, argnums=(0, 1))
    assert cc.take() == ["add_square", "jacobian"]  # the names once, then by name on the wire
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(c.jacobian("add_square", X, y=Y, argnums="y"), want[1])
    np.testing.assert_array_equal(c.evaluate("add_square", X, y=Y), X + Y**2)
    np.testing.assert_array_equal(c.vjp("add_square", y=Y, x=X, cotangents=X, argnums=1), 2 * Y * X)
    np.testing.assert_array_equal(c.jvp("add_square", X, y=Y, tangents=Y, argnums="y"), 2 * Y * Y)
    np.testing.assert_allclose(c.hvp("add_square", X, y=Y, tangents=X, cotangents=Y, argnums=1), 2 * Y * X, atol=0)
    np.testing.assert_array_equal(c.hessian("add_square", x=X, y=Y, argnums=1)[2, 2], 2 * np.eye(5)[2])
    np.testing.assert_array_equal(c.jacrev("add_square", argnums=1)(y=Y, x=X), want[1])
    # a pytree parameter by name, differentiated by name: nested as the caller gave it
    p = {"w": np.ones((2, 5)), "b": np.zeros(2)}
    got = c.jacobian("dense_layer", x=X, params=p, argnums="params")
    want = c.jacobian("dense_layer", p, X, argnums="params")
    assert set(got) == {"w", "b"} and all(np.array_equal(got[k], want[k]) for k in got)
    assert cc.take() == ["jacobian", "evaluate", "vjp", "jvp", "hvp", "hessian", "jacobian", "dense_layer",
                         "jacobian", "jacobian"]  # dense_layer's names once
    for call, message in [
        (lambda: c.jacobian("add_square", X, x=X), r"client.jacobian\('add_square'\) got multiple values for input 'x' \(by position and by name\)"),
        (lambda: c.vjp("add_square", X, z=Y, cotangents=X), "unexpected keyword argument 'z'; its inputs are x, y"),
        (lambda: c.evaluate("add_square", y=Y), r"is missing input 'x' \(its inputs are x, y\)"),
        (lambda: c.hessian("add_square", X, X, X, y=Y), r"takes 2 inputs \(x, y\) but 3 positional"),
    ]:
        with pytest.raises(TypeError, match=message):
            call()
    assert set(cc.take()) <= {"add_square"}  # none computed: at most the names asked again
    # (round 28) asked again once for a wrong call, not at each: it asked every time
    for _ in range(3):
        with pytest.raises(TypeError, match="unexpected keyword argument 'q'"):
            c.jvp("add_square", q=Y, tangents=X)
    assert cc.take() == ["add_square"]


def test_a_scipy_objective_takes_its_inputs_by_name(cc: Counted) -> None:
    """``remote_objective(client, "add_square", argnum="y")`` said "invalid literal for
    int() with base 10: 'y'"; the inputs held fixed went by position only. ``argnum``
    and ``args`` (a mapping) now go by the function's names too."""
    pytest.importorskip("scipy")
    from scipy.optimize import least_squares

    from jacobian_client.scipy import remote_objective

    obj = remote_objective(cc.client, "add_square", argnum="y", args={"x": X})
    np.testing.assert_array_equal(obj.jac(Y), np.diag(2 * Y))
    np.testing.assert_array_equal(obj.fun(Y), X + Y**2)
    p = {"w": np.linspace(-1, 1, 10).reshape(2, 5), "b": np.array([0.1, -0.2])}
    by_name = remote_objective(cc.client, "dense_layer", argnum="x", args={"params": p})
    by_position = remote_objective(cc.client, "dense_layer", argnum=1, args=(p,))
    a, b = (least_squares(o.fun, X, jac=o.jac) for o in (by_name, by_position))
    np.testing.assert_array_equal(a.x, b.x)
    assert a.nfev == b.nfev
    for kwargs, message in [({"argnum": "z"}, "argnum='z' names no input; its inputs are x, y"),
                            ({"argnum": "y", "args": {"y": Y}}, "input 'y' is x"),
                            ({"argnum": "y", "args": {"q": Y}}, "unexpected keyword argument 'q'"),
                            ({"argnum": 1.5}, "argnum is an input's position")]:
        with pytest.raises(TypeError, match=message):
            remote_objective(cc.client, "add_square", **kwargs)


def test_a_batch_given_to_a_remote_function_of_one_example_says_vmap(cc: Counted) -> None:
    """``arm(batch)``, as a scientist calls the local ``planar_arm`` (which broadcasts over
    leading dimensions), was the bare 422 "input 'angles': expected shape (k,), got (4,
    3)"; it now says the remote function takes one example and to map it with vmap
    (which sends one batched request, and answers as in-process)."""
    torch = pytest.importorskip("torch")
    from jacobian_client.torch import remote

    from jacobian_service import examples as ex

    arm = remote(cc.client, "planar_arm")
    batch = torch.linspace(0.1, 1.2, 12, dtype=torch.float64).reshape(4, 3)
    with pytest.raises(jc.InvalidInput, match=r"remote\('planar_arm'\) takes one example \(input 'angles' declared "
                                              r"\(k,\)\); for a batch, map it with vmap") as info:
        arm(batch)
    assert info.value.problem["got_shape"] == [4, 3]  # the service's members kept
    torch.testing.assert_close(torch.func.vmap(arm)(batch), ex.planar_arm(batch))
    with pytest.raises(jc.InvalidInput) as info:  # two dimensions more: no batch of examples
        arm(batch.reshape(2, 2, 3))
    assert "vmap" not in str(info.value)


def test_the_async_client_takes_inputs_by_name(app: Any) -> None:
    async def main() -> None:
        async with jc.AsyncClient("http://sdk.test", http_transport=httpx.MockTransport(_forward(app)),
                                  max_retries=0) as ac:
            np.testing.assert_array_equal(await ac.jacobian("add_square", y=Y, x=X, argnums="y"), np.diag(2 * Y))
            np.testing.assert_array_equal((await ac.evaluate("polar", theta=Y, r=X))[0], X * np.cos(Y))
            with pytest.raises(TypeError, match="client.jvp\\('polar'\\) got an unexpected keyword argument 'rho'"):
                await ac.jvp("polar", rho=X, theta=Y, tangents=X)

    asyncio.run(main())


def _forward(app: Any) -> Any:
    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                        content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    return forward


# --------------------------------------------------------------------------- round 28


M = np.linspace(2.0, 3.0, 5)


def test_an_input_named_as_an_option_is_never_taken_for_it(cc: Counted) -> None:
    """``r28_modes(x, mode)``: ``client.jacobian("r28_modes", X, mode=M)`` set jacobian's
    ``mode`` option to the array ("The truth value of an array ... is ambiguous"), and
    ``jacrev("r28_modes")(x=X, mode=M)`` did too. A method's option given by an input's
    name, that input left out, is now a TypeError saying to pass it by position; a
    method without that option (evaluate, jvp) and jacrev's callable take it by name."""
    c = cc.client
    np.testing.assert_array_equal(c.jacobian("r28_modes", X, M), np.diag(M))
    np.testing.assert_array_equal(c.jacobian("r28_modes", X, M, mode="fwd"), np.diag(M))  # beside it: the option
    cc.take()
    clash = (r"client.jacobian\('r28_modes'\): mode= sets its own option 'mode', and r28_modes also takes an input "
             r"'mode', which this call leaves out; pass input 'mode' by position \(r28_modes's inputs, in order: x, mode\)")
    for call, message in [
        (lambda: c.jacobian("r28_modes", X, mode=M), clash),
        (lambda: c.jacobian("r28_modes", x=X, mode=M), clash),
        (lambda: c.sparsity("r28_modes", (5,), mode=M), r"client.sparsity\('r28_modes'\): mode= sets its own option"),
        (lambda: c.jacobian("r28_modes", x=X), r"missing input 'mode' \(its inputs are x, mode\); 'mode' is also its "
                                               r"own option, so mode= cannot pass it: pass input 'mode' by position"),
    ]:
        with pytest.raises(TypeError, match=message):
            call()
    # nothing computed; the names asked for the first, and again once for the second call's
    # kind (x by name: kept names may be out of date), kept since
    assert cc.take() == ["r28_modes", "r28_modes"]
    np.testing.assert_array_equal(c.evaluate("r28_modes", mode=M, x=X), X * M)
    np.testing.assert_array_equal(c.jvp("r28_modes", X, mode=M, tangents=Y, argnums="mode"), X * Y)
    np.testing.assert_array_equal(c.jacrev("r28_modes", argnums="mode")(x=X, mode=M), np.diag(X))
    np.testing.assert_array_equal(c.jacrev("r28_modes", mode="fwd")(X, mode=M), np.diag(M))
    assert cc.take() == ["evaluate", "jvp", "jacobian", "jacobian"]


def test_sparsity_and_jacobian_split_take_inputs_by_name(cc: Counted, app: Any, tmp_path: Any) -> None:
    """``client.sparsity("add_square", x=(5,), y=Y)`` and ``jacobian_split(urls,
    "add_square", x=X, y=Y)`` were "unexpected keyword argument" (the split's keywords
    all went to its clients); they take inputs as jacobian() does now."""
    c = cc.client
    by_name, by_position = c.sparsity("add_square", y=Y, x=(5,), argnums="y"), c.sparsity("add_square", (5,), Y,
                                                                                          argnums=1)
    np.testing.assert_array_equal(by_name["matrix"].toarray(), by_position["matrix"].toarray())
    np.testing.assert_array_equal(by_name["matrix"].toarray(), np.eye(5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'; its inputs are x, y"):
        c.sparsity("add_square", x=(5,), z=(5,))
    options = {"http_transport": httpx.MockTransport(_forward(app)), "max_retries": 0}
    urls = ["http://a.test", "http://b.test"]
    J = jacobian_split(urls, "add_square", y=Y, x=X, argnums="y", chunk_rows=2, **options)
    np.testing.assert_array_equal(J, np.diag(2 * Y))
    J = jacobian_split(urls, "r28_modes", X, M, argnums="mode", out=tmp_path / "J.npy", **options)
    np.testing.assert_array_equal(J, np.diag(X))
    with pytest.raises(TypeError, match=r"jacobian_split\('r28_modes'\): mode= sets its own option 'mode'"):
        jacobian_split(urls, "r28_modes", X, mode=M, **options)
    with pytest.raises(TypeError, match=r"jacobian_split\('add_square'\) is missing input 'y'"):
        jacobian_split(urls, "add_square", x=X, **options)
    assert _files(tmp_path) == ["J.npy"]


# --------------------------------------------------------------------------- round 29


_AS_ARGUMENTS = r"inputs go as the call's own arguments, in order or by name \(x=\.\.\., y=\.\.\.\)"


def test_inputs_given_as_the_http_bodys_inputs_are_told_how_to_go(app: Any) -> None:
    """A caller who knows the HTTP body (``{"inputs": {"x": ..., "y": ...}}``) wrote
    ``client.evaluate("add_square", {"x": X, "y": Y})`` and read the wire's words: "missing
    input 'y'" (npz), "'inputs' holds one entry per input" (JSON), and for ``sin`` "send
    it as the member '0', not ['0/x']"; or ``inputs={...}`` and read only that no input is
    so named. Both now say that inputs go as the call's arguments (the 422's members
    kept); a pytree input's dict, and its own refusal, are as before. The names come from
    the 422's members, else are asked once, by a method's own call only: an adapter's
    refused request asks nothing more (round 14)."""
    torch = pytest.importorskip("torch")
    from jacobian_client.torch import remote

    with sdk_over(app) as c, counting(c) as cc:
        for transport in ("binary", "json"):
            with pytest.raises(jc.InvalidInput, match=r"input 'x' was given a dict keyed by add_square's input names "
                                                      r"\(x, y\): " + _AS_ARGUMENTS) as info:
                c.evaluate("add_square", {"x": X, "y": Y}, transport=transport)
            assert (info.value.status, info.value.problem["missing"]) == (422, ["y"])
        assert cc.take() == ["evaluate", "evaluate"]  # the names from the 422 (members)
        with pytest.raises(jc.InvalidInput, match=r"input 'x' was given a dict keyed by sin's input names \(x\)"):
            c.jacobian("sin", {"x": X})  # a 422 without the names: asked, once
        assert cc.take() == ["jacobian", "sin"]
        with pytest.raises(jc.InvalidInput, match=r"dict keyed by add_square's input names \(x, y\): " + _AS_ARGUMENTS):
            remote(c, "add_square")({"x": torch.tensor(X), "y": torch.tensor(Y)})
        cc.take()
        # an adapter's refused request asks nothing more: a pytree parameter's dict is its everyday input
        with pytest.raises(jc.InvalidInput, match=r"input 'params' is a tree of 2 arrays"):
            remote(c, "dense_layer")({"w": torch.ones(2, 5)}, torch.tensor(X))
        assert cc.take() == ["evaluate"]
        p = {"w": np.ones((2, 5)), "b": np.zeros(2)}
        np.testing.assert_allclose(c.evaluate("dense_layer", p, X), np.tanh(np.ones((2, 5)) @ X))
        with pytest.raises(jc.InvalidInput, match=r"input 'params' is a tree of 2 arrays.*missing \['0/b'\]"):
            c.evaluate("dense_layer", {"w": p["w"]}, X)
        assert cc.take() == ["evaluate", "evaluate", "dense_layer"]
        for call in (lambda: c.evaluate("add_square", inputs={"x": X, "y": Y}),
                     lambda: c.jacobian("add_square", inputs=[X, Y]),
                     lambda: c.jacrev("add_square")(inputs={"x": X, "y": Y}),
                     lambda: remote(c, "add_square")(inputs={"x": torch.tensor(X), "y": torch.tensor(Y)})):
            with pytest.raises(TypeError, match=r"unexpected keyword argument 'inputs'; its inputs are x, y: " + _AS_ARGUMENTS):
                call()
        with pytest.raises(TypeError, match="unexpected keyword argument 'z'; its inputs are x, y$"):
            c.evaluate("add_square", X, z=Y)

    async def main() -> None:
        async with jc.AsyncClient("http://sdk.test", http_transport=httpx.MockTransport(_forward(app)),
                                  max_retries=0) as ac:
            with pytest.raises(jc.InvalidInput, match=r"dict keyed by add_square's input names \(x, y\): " + _AS_ARGUMENTS):
                await ac.evaluate("add_square", {"x": X, "y": Y})
            with pytest.raises(TypeError, match=r"unexpected keyword argument 'inputs'; its inputs are x, y: " + _AS_ARGUMENTS):
                await ac.vjp("add_square", inputs={"x": X, "y": Y}, cotangents=X)

    asyncio.run(main())
