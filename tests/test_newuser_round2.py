"""A first-day user's second round: their own functions registered as README's
"Registering your own functions" says (a simulator step, a robot's kinematics over a
pytree, a small ``nn.Module``, aux, integer and boolean side inputs), called over HTTP,
the SDK and ``jacobian-service call``, and each wrong declaration made once.

What it found, pinned here:

- Inputs declared in another order than the function's parameters (``def f(x, y)`` with
  ``[Input("y"), Input("x")]``) were served with the arguments swapped, silently:
  ``{"x": X, "y": Y}`` computed ``f(Y, X)``. Now an error at import naming the order.
- ``register(lambda x: ..., inputs=[...])`` served ``/v1/functions/<lambda>/...``: now an
  error at import asking for ``name=``.
- An ``nn.Module`` instance registered with ``name=`` was described by ``torch.nn.Linear``'s
  class docstring (150 lines in the listing and ``/docs``): now no description.
- A scalar input (``shape=()``) was warmed up as three numbers (``() or (3,)``), so a
  function reading it as one (``int(steps)``) logged "warm-up of int_bool failed: only
  one element tensors can be converted to Python scalars" though it serves every request.
- The Jacobian of a function with no floating input said "pick ... with argnums ...
  among []": now that it has no derivative and ``/evaluate`` serves it.
- A body without ``inputs`` (the inputs at the top, ``{"x": ...}``) said only "the body
  has no 'inputs'": now what the body should be.
- ``jacobian-service call`` with an ``.npz`` of several inputs said "missing input 'dt'"
  and, of the server's advice, "send them all as application/x-npz", which it cannot: it
  now says an ``.npz`` is one pytree input (its help too), and closes the file it read.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch

from jacobian_service import Array, Input, register

from . import newuser2_functions as mine
from .conftest import assert_problem, ready_app, sdk_over


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    with ready_app("tests.newuser2_functions") as c:
        yield c


def _close(got: Any, want: Any) -> None:
    g, w = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(g) == len(w)
    for a, b in zip(g, w):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_the_users_functions_match_jacrev_in_process(app):
    state, dt, k = torch.tensor([1.0, 2.0, 3.0]), torch.tensor(0.1), torch.tensor([1.0, 0.5, 2.0])
    q = {"shoulder": torch.tensor(0.3), "elbow": torch.tensor(0.5), "links": torch.tensor([1.0, 0.5])}
    params = {name: p.detach() for name, p in mine.net.named_parameters()}
    x = torch.tensor([0.1, 0.2, 0.3])
    with sdk_over(app) as client:
        _close(client.jacobian("sim_step", state.numpy(), dt.numpy(), k.numpy(), argnums=(0, 1, 2)),
               torch.func.jacrev(mine.sim_step, argnums=(0, 1, 2))(state, dt, k))
        _close(client.jacobian("robot_fk", {n: v.numpy() for n, v in q.items()}), torch.func.jacrev(mine.robot_fk)(q))
        _close(client.jacobian("small_net", {n: v.numpy() for n, v in params.items()}, x.numpy(), argnums=(0, 1)),
               torch.func.jacrev(mine.small_net, argnums=(0, 1))(params, x))
        J, aux = client.jacobian("with_aux", x.numpy())
        _close((J, aux["norm"]), torch.func.jacrev(mine.with_aux, has_aux=True)(x))
        _close(client.jacobian("int_bool", x.numpy(), np.int64(2), np.bool_(True)),
               torch.func.jacrev(mine.int_bool)(x, torch.tensor(2), torch.tensor(True)))


def test_inputs_declared_out_of_the_signatures_order_fail_at_import():
    def f(x, y):
        return x * 2 + y

    with pytest.raises(ValueError, match=r"f: input 'y' is declared at position 0, where the function takes 'x'.*"
                                         r"declare them in the signature's order \['x', 'y'\]"):
        register(f, inputs=[Input("y"), Input("x")])
    with pytest.raises(ValueError, match="input 'x' is declared at position 1"):
        register(f, name="f_half", inputs=[Input("a"), Input("x")])  # one of them, elsewhere
    register(f, name="f_renamed", inputs=[Input("a"), Input("b")])  # other names: only names
    register(f, name="f_in_order", inputs=[Input("x"), Input("y")])

    def g(x, y=2.0):
        return x * y

    assert [i.name for i in register(g).__jacobian_spec__.inputs] == ["x", "y"]  # README: a default is not used
    assert [i.name for i in register(g, name="g_x", inputs=[Input("x")]).__jacobian_spec__.inputs] == ["x"]


def test_a_lambda_needs_a_name_at_import():
    with pytest.raises(TypeError, match=r"a lambda has no name of its own.*name="):
        register(lambda x: x * 2, inputs=[Input("x")])
    assert register(lambda x: x * 2, name="double", inputs=[Input("x")]).__jacobian_spec__.name == "double"


def test_a_module_instance_is_not_described_by_its_class_docstring(app):
    assert app.get("/v1/functions/linear").json()["description"] == ""
    assert app.get("/v1/functions/sim_step").json()["description"] == "One explicit Euler step of a spring chain."

    class Documented(torch.nn.Module):
        """Its own words."""

        def forward(self, x):
            return x

    assert register(Documented(), name="documented", inputs=[Input("x")]).__jacobian_spec__.description == \
        "Its own words."


def test_a_scalar_input_is_warmed_up_as_a_scalar():
    from jacobian_service.engine.devices import warmup_call

    call = warmup_call(mine.int_bool.__jacobian_spec__)
    assert [np.shape(a) for a in call.args] == [(3,), (), ()]
    torch.func.jacrev(mine.int_bool)(*(torch.as_tensor(a) for a in call.args))  # what the warm-up runs: no error


def test_no_floating_input_says_there_is_no_derivative_and_evaluate_serves_it(app):
    r = app.post("/v1/functions/ints_only/jacobian", json={"inputs": [[1, 2]]})
    body = assert_problem(r, 422, "invalid_input")
    assert "among []" not in body["detail"]
    assert "ints_only declares no floating input" in body["detail"] and "/evaluate" in body["detail"]
    assert app.post("/v1/functions/ints_only/evaluate", json={"inputs": [[1, 2]]}).json()["output"]["data"] == [2, 4]


def test_a_body_without_inputs_says_what_to_send(app):
    r = app.post("/v1/functions/sim_step/jacobian", json={"state": [1, 2, 3], "dt": 0.1, "k": [1, 1, 1]})
    detail = assert_problem(r, 422, "invalid_input")["detail"]
    assert detail == ("the body has no 'inputs' (the body's keys ('state', 'dt', 'k') are sim_step's inputs: they "
                      "go under 'inputs'); send {\"inputs\": {\"state\": ..., \"dt\": ..., \"k\": ...}} (or a list "
                      "of them, in order)")
    detail = assert_problem(app.post("/v1/functions/sim_step/jacobian", json={"input": {}}), 422, "invalid_input")
    assert detail["detail"].startswith("the body has no 'inputs' (it has 'input'); send {\"inputs\": {\"state\"")


def test_the_cli_takes_an_npz_as_one_pytree_input_and_says_so(app, tmp_path, monkeypatch, capsys):
    from jacobian_client import Client, _cli_call

    def forward(request: httpx.Request) -> httpx.Response:  # (conftest's sdk_over, as a class the CLI makes)
        r = app.request(request.method, request.url.path, content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    class Local(Client):
        def __init__(self, url: str, **kwargs: Any) -> None:
            super().__init__(url, http_transport=httpx.MockTransport(forward), max_retries=0, **kwargs)

    monkeypatch.setattr(_cli_call, "Client", Local)
    q = {"shoulder": np.float32(0.3), "elbow": np.float32(0.5), "links": np.array([1, 0.5], np.float32)}
    np.savez(tmp_path / "q.npz", **q)
    assert _cli_call.call_main(["robot_fk", "--input", str(tmp_path / "q.npz"), "--out", str(tmp_path / "J.npz")]) == 0
    with np.load(tmp_path / "J.npz") as got:
        want = torch.func.jacrev(mine.robot_fk)({n: torch.as_tensor(v) for n, v in q.items()})
        _close([got[f"jacobian/{n}.npy" if f"jacobian/{n}.npy" in got else f"jacobian/{n}"] for n in want],
               list(want.values()))
    np.savez(tmp_path / "all.npz", state=np.ones(3, np.float32), dt=np.float32(0.1), k=np.ones(3, np.float32))
    capsys.readouterr()
    assert _cli_call.call_main(["sim_step", "--input", str(tmp_path / "all.npz")]) == 1
    err = capsys.readouterr().err
    assert "missing input 'dt'" in err
    assert "each --input is one of sim_step's inputs, in order (1 given); an .npz file is one dict-valued" in err


@pytest.mark.parametrize("make, words", [
    # shape="batch" was five symbols b, a, t, c, h, silently; shape=3 "'int' object is not iterable"
    (lambda: Input("x", shape="batch"), "input 'x': shape is a tuple of dims, ints and symbol names: "
                                        "shape=('batch',), not shape='batch'"),
    (lambda: Input("x", shape=3), "input 'x': shape is a tuple of dims, ints and symbol names: shape=(3,), not shape=3"),
    (lambda: Input("p", tree={"w": Array(2)}), "shape=(2,), not shape=2"),
    (lambda: Input("x", dtype=torch.float32), "(a dtype is named by a string: dtype='float32')"),
    (lambda: Input("x", dtype=np.float64), "(a dtype is named by a string: dtype='float64')"),
    (lambda: Input("p", tree={"w": (3,)}), "got int 3: a leaf is an Array (Array((3,))"),
    # inputs=Input("x"): "'Input' object is not iterable"; has_aux="no" was taken as True
    (lambda: register(lambda x: x, name="g", inputs=Input("x")), "g: inputs is a list of Input, one per parameter"),
    (lambda: register(lambda x: x, name="g", inputs=[Input("x")], has_aux="no"), "g: has_aux is True or False, not 'no'"),
])
def test_a_wrong_declaration_fails_at_import_saying_how_to_write_it(make, words):
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    assert words in str(info.value)


def test_a_shape_given_as_a_list_or_torch_size_still_declares_it():
    assert Input("x", shape=["n", 2]).shape == ("n", 2)
    assert Input("x", shape=torch.Size([3])).shape == (3,)
    assert Array(None).shape is None


@pytest.mark.parametrize("name, words", [
    # "the output[1]['note'] is a str, not a tensor": not that aux is declared
    ("aux_undeclared", "the output[1]['note'] is a str, not a tensor: return a tensor, or a tuple, list or dict "
                       "of tensors; if output[1] is aux, register aux_undeclared with has_aux=True (torch.func: "
                       "expected f(*primals) to return only tensors, got unsupported type <class 'str'>)"),
    # "did not return (output, aux)": not what it returned
    ("aux_forgotten", "aux_forgotten has has_aux=True but did not return (output, aux): it returned a tensor; "
                      "return both, or register it without has_aux"),
])
@pytest.mark.parametrize("kind", ["jacobian", "evaluate"])
def test_an_aux_declaration_that_does_not_match_the_return_says_so(app, name, words, kind):
    problem = assert_problem(app.post(f"/v1/functions/{name}/{kind}", json={"inputs": [[1.0, 2.0]]}), 500,
                             "function_error")
    assert problem["detail"] == words
