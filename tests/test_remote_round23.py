"""Lists over the wire, round 23: an output or aux that holds a list came back from the
SDK and its adapters holding a tuple (JSON and .npz have one sequence), so
``out.append(...)`` raised, ``tree_map`` over a remote output and a local one met
mismatched nodes, and jax saw another pytree. The service now says which sequences were
lists (``meta.lists``); each answer here is compared, structure and values, with the
local function's ``torch.func`` result.

One in-process app (``ready_app``) serves the module; the SDK reaches it through
``sdk_over`` (no socket), or through ``over`` where a test rewrites the service's answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc
from jacobian_client import wire
from torch.utils import _pytree as pytree

from . import remote23_functions as r23
from ._remote_support import jx  # noqa: F401 (fixture)
from .conftest import ready_app, sdk_over

f = torch.func
D = torch.float64
X = np.array([0.3, -1.2, 0.7])


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    with ready_app("tests.remote23_functions") as a:
        yield a


@pytest.fixture(scope="module")
def sdk(app: Any) -> Iterator[Any]:
    with sdk_over(app) as client:
        yield client


@contextlib.contextmanager
def over(app: Any, rewrite: Callable[[dict[str, Any]], None]) -> Iterator[Any]:
    """A JSON-transport client whose answers' documents pass through ``rewrite`` first
    (an older service's answer, or one that contradicts itself)."""
    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                        content=request.content, headers=dict(request.headers))
        body = r.content
        if r.status_code == 200 and r.headers.get("content-type") == wire.JSON:
            doc = wire.loads(body)
            rewrite(doc)
            body = wire.dumps(doc)
        headers = {k: v for k, v in r.headers.items()
                   if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")}
        return httpx.Response(r.status_code, headers=headers, content=body)

    with jc.Client("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0,
                   transport="json") as client:
        yield client


def np_tree(tree: Any) -> Any:
    """A torch tree as numpy, its node types kept."""
    return pytree.tree_map(lambda t: t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t), tree)


def same_tree(got: Any, want: Any, tol: float = 1e-12) -> None:
    """Same pytree (list and tuple told apart, as torch and jax tell them) and values."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec, f"\n got: {got_spec}\nwant: {want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def local(name: str) -> Any:
    """The registered function itself, run in-process (``register`` returns it as it is)."""
    return getattr(r23, name)


x_t = torch.tensor(X, dtype=D)


# --------------------------------------------------------------------------- the SDK


@pytest.mark.parametrize("transport", ["json", "binary"])
def test_sdk_answers_lists_where_torch_func_gives_them(sdk, transport):
    """evaluate, jacobian (with its output), jvp and per-example evaluate, on both
    transports (JSON; .npz): each tree as torch.func gives it, lists and tuples as they are."""
    mixed, lst = local("r23_mixed"), local("r23_list")
    same_tree(sdk.evaluate("r23_mixed", X, transport=transport), np_tree(mixed(x_t)))
    same_tree(sdk.evaluate("r23_list", X, transport=transport), np_tree(lst(x_t)))

    jac, out = sdk.jacobian("r23_list", X, return_output=True, transport=transport)
    same_tree(jac, np_tree(f.jacrev(lst)(x_t)))
    same_tree(out, np_tree(lst(x_t)))
    jac, aux = sdk.jacobian("r23_mixed", X, transport=transport)
    want_jac, want_aux = f.jacrev(mixed, has_aux=True)(x_t)
    same_tree((jac, aux), (np_tree(want_jac), np_tree(want_aux)))

    v = np.array([1.0, 0.5, -2.0])
    tangent_out = sdk.jvp("r23_list", X, tangents=v, transport=transport)
    same_tree(tangent_out, np_tree(f.jvp(lst, (x_t,), (torch.tensor(v, dtype=D),))[1]))

    xs = np.stack([X, X + 1.0])
    same_tree(sdk.evaluate("r23_mixed", xs, batched=True, transport=transport),
              np_tree(f.vmap(mixed)(torch.tensor(xs, dtype=D))))


def test_meta_lists_is_said_only_where_a_tree_holds_a_list(app):
    """The key names each list node by its path (positions and dict keys); answers
    without a list (a tuple output) carry no new key, as SPEC-era clients read them."""
    r = app.post("/v1/functions/r23_mixed/jacobian", json={"inputs": [X.tolist()], "return_output": True})
    assert r.status_code == 200
    lists = r.json()["meta"]["lists"]
    assert lists == {"jacobian": [["seq"]], "output": [["seq"]], "aux": [[], [1, "n"]]}
    for accept in (wire.JSON, wire.NPZ):
        r = app.post("/v1/functions/r23_tuple/evaluate", json={"inputs": [X.tolist()]}, headers={"accept": accept})
        assert r.status_code == 200
        meta = r.json()["meta"] if accept == wire.JSON else wire.read_result_npz(r.content)[1]
        assert "lists" not in meta
    r = app.post("/v1/functions/r23_list/evaluate", json={"inputs": [X.tolist()]}, headers={"accept": wire.NPZ})
    assert wire.read_result_npz(r.content)[1]["lists"] == {"output": [[]]}


def test_an_older_service_without_the_key_still_answers_tuples(app):
    def strip(doc: dict[str, Any]) -> None:
        doc["meta"].pop("lists", None)

    with over(app, strip) as old:
        assert old.evaluate("r23_list", X).__class__ is tuple
        out, aux = old.evaluate("r23_mixed", X)
        assert type(out["seq"]) is tuple and type(aux) is tuple


def test_a_meta_lists_naming_no_sequence_is_an_unreadable_answer(app):
    def lie(doc: dict[str, Any]) -> None:
        doc["meta"]["lists"] = {"output": [[0, 0]]}  # the output's first entry is an array

    with over(app, lie) as liar, pytest.raises(jc.TransportError, match="meta.lists names"):
        liar.evaluate("r23_list", X)


def test_paths_tell_a_dict_key_from_a_position():
    tree = {"0": [np.zeros(1), (np.ones(1), [np.ones(2)])], "t": (np.zeros(2),)}
    paths = wire.list_paths(tree)
    assert paths == [["0"], ["0", 1, 1]]
    as_tuples = wire.decode_tree(wire.encode_tree(tree))
    same_tree(wire.with_lists(as_tuples, paths), tree)
    with pytest.raises(wire.WireError):
        wire.with_lists(as_tuples, [[0]])  # a position where the root is a dict
    # a SparseCOO is a NamedTuple, yet a leaf: neither listed nor rebuilt as a tuple
    coo = wire.SparseCOO(np.array([0]), np.array([1]), np.array([2.0]), (2, 2))
    assert wire.list_paths([coo]) == [[]]
    assert type(wire.with_lists((coo,), [[]])[0]) is wire.SparseCOO


# --------------------------------------------------------------------------- the adapters


def test_torch_adapter_gives_lists_as_the_local_function(sdk):
    from jacobian_client.torch import remote

    mixed, lst = remote(sdk, "r23_mixed"), remote(sdk, "r23_list")
    x = x_t.clone().requires_grad_()
    out = lst(x)
    same_tree(np_tree(out), np_tree(local("r23_list")(x_t)))
    out.append(x.sum())  # a list, as the function returns it
    assert len(out) == 3
    # tree_map over a remote output and a local one: one structure
    diff = pytree.tree_map(lambda a, b: a - b, mixed(x_t), local("r23_mixed")(x_t))
    assert max(float(t.abs().max()) for t in pytree.tree_leaves(diff)) < 1e-12
    same_tree(np_tree(f.jacrev(mixed, has_aux=True)(x_t)), np_tree(f.jacrev(local("r23_mixed"), has_aux=True)(x_t)))
    xs = torch.stack([x_t, x_t * 2])
    same_tree(np_tree(f.vmap(lst)(xs)), np_tree(f.vmap(local("r23_list"))(xs)))
    # backward through a list output reaches the input
    total = out[0].sum() + out[1]
    total.backward()
    want = f.grad(lambda v: local("r23_list")(v)[0].sum() + local("r23_list")(v)[1])(x_t)
    np.testing.assert_allclose(x.grad.numpy(), want.numpy(), rtol=1e-12)


def test_jax_adapter_gives_lists_as_the_local_function(sdk, jx):  # noqa: F811 (the fixture)
    import jax.numpy as jnp
    from jacobian_client.jax import remote

    jax = jx
    mixed, lst = remote(sdk, "r23_mixed"), remote(sdk, "r23_list")
    q = jnp.asarray(X)
    for fn, name in ((mixed, "r23_mixed"), (lst, "r23_list")):
        got = fn(q)
        want = np_tree(local(name)(x_t))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        same_tree(jax.tree.map(np.asarray, got), want)
    # jax tells a list from a tuple: tree_map over the remote and the local output
    jax.tree.map(lambda a, b: a - b, lst(q), np_tree(local("r23_list")(x_t)))
    got = jax.jacrev(mixed, has_aux=True)(q)
    want = np_tree(f.jacrev(local("r23_mixed"), has_aux=True)(x_t))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    same_tree(jax.tree.map(np.asarray, got), want)
    got = jax.jit(lst)(q)  # under jit the structure comes from the shape probe's answer
    assert jax.tree.structure(got) == jax.tree.structure(np_tree(local("r23_list")(x_t)))
