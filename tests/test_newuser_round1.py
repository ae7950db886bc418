"""A first-time user's round: README.md from the top, their own functions registered the
way the docs say, called with curl, the SDK and the CLI, and each common mistake made once.

What it found, pinned here:

- No test ran the docs' Python examples (tests/test_docs_examples.py runs the shell
  blocks): every ```python block of the README and docs/*.md now runs against the
  built-in examples, and where the docs show its output (docs/remote.md's "Output"), it
  must print exactly that. The README's ``my_functions.py`` is served and compared with
  ``torch.func.jacrev`` in-process.
- An ``.npy`` posted as JSON was refused "the body is not UTF-8: byte 0x93 ... (a latin-1
  or cp1252 text must be re-encoded)", a JSON body posted as ``.npy`` "bad magic": both
  now name the Content-Type the body needs.
- ``{"inputs": [1, 2, 3]}`` for ``sin(x)`` said "sin takes 1 inputs ['x'], got 3": now
  how one array is sent.
- A function whose first input is an integer (argnums defaults to 0) said "input 'i' is
  int64; only floating inputs can be differentiated", not that argnums picks another.
- A function that takes its input to NumPy failed with torch's "Cannot access data
  pointer of Tensor that doesn't have storage" (or torch's advice to ``.detach().numpy()``,
  which only leads there): the detail now says why and what to do.
- ``jacobian-service functions --port 9000`` listed the built-in examples, not what the
  server on 9000 serves (``--host``/``--port``/``--device`` were taken and ignored).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import assert_problem, npy_bytes, npz_bytes, ready_app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_PYTHON = re.compile(r"^([ \t]*)```python\n(.*?)^[ \t]*```\n", re.S | re.M)
_SHOWN = re.compile(r"\s*(?:Output[^\n]*\n\s*)?```text\n(.*?)```", re.S)  # the output shown right after a block


def _blocks() -> list[tuple[str, str, str | None]]:
    """(where, code, what the docs say it prints, or None) for every Python block."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in _PYTHON.finditer(text):
            shown = _SHOWN.match(text, m.end())
            where = f"{path.name}:{text[:m.start()].count(chr(10)) + 1}"
            found.append((where, m[2], shown[1] if shown else None))
    return found


@pytest.fixture(scope="module")
def examples() -> Iterator[Any]:
    """The built-in examples, what `make serve` serves and the docs' examples call."""
    with ready_app("jacobian_service.examples") as app:
        yield app


def _local_client(app: Any) -> type:
    """``jacobian_client.Client`` as the docs' code makes it (``Client("http://localhost:8000")``),
    its requests sent to the in-process ``app`` (conftest's sdk_over, as a class)."""
    from jacobian_client import Client

    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                        content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    class LocalClient(Client):
        def __init__(self, url: str, **kwargs: Any) -> None:
            assert url in ("http://localhost:8000", "http://127.0.0.1:8000"), url
            super().__init__(url, http_transport=httpx.MockTransport(forward), max_retries=0, **kwargs)

    return LocalClient


# The names the docs' snippets leave to the reader, per document: shaped for the functions
# they call (README's sin / add_square / dense_layer; sparse.md's 64-element lorenz96).
def _names(doc: str) -> dict[str, Any]:
    if doc == "sparse.md":
        return {"x": np.random.default_rng(0).uniform(0.5, 1.5, 64)}
    model = torch.nn.Linear(4, 3).double()
    return {"x": np.array([0.1, 0.2], np.float32), "y": np.array([3.0, 4.0], np.float32),
            "W": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.zeros(2, np.float32),
            "big_x": np.random.default_rng(0).random(300).astype(np.float32),
            "model": model, "features": torch.ones(4, dtype=torch.float64),
            "target": torch.tensor([1.5, 1.2], dtype=torch.float64)}


def _skip_why(code: str) -> str | None:
    if "@register" in code:
        return "registers functions (the README's own is served below)"
    if re.search(r"http://(?!localhost:8000|127\.0\.0\.1:8000)[\w.]+:\d+", code):
        return "several servers (gpu0, gpu1, a proxy)"
    for module in re.findall(r"^\s*(?:from|import) (jax|scipy)\b", code, re.M):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
    return None


@pytest.mark.parametrize("where, code, shown", _blocks(), ids=[b[0] for b in _blocks()])
def test_the_docs_python_examples_run_and_print_what_the_docs_show(examples, monkeypatch, tmp_path, where, code, shown):
    why = _skip_why(code)
    if why:
        pytest.skip(why)
    import jacobian_client

    local = _local_client(examples)
    monkeypatch.setattr(jacobian_client, "Client", local)
    monkeypatch.chdir(tmp_path)  # (out="J.npy")
    printed = io.StringIO()
    # `client`: the one an earlier block of the document made (README's adapters' block)
    with local("http://localhost:8000") as client, contextlib.redirect_stdout(printed):
        exec(compile(code, where, "exec"), {"__name__": "__docs__", "client": client, **_names(where.split(":")[0])})
    if shown is not None:
        assert printed.getvalue().strip() == shown.strip(), where


def test_every_docs_python_block_is_found():
    """The parser above still sees the docs' blocks (a changed fence would skip them all)."""
    found = _blocks()
    assert len(found) >= 10 and sum(shown is not None for _, _, shown in found) >= 3, found


# ------------------------------------------------------ the README's own function, served

@pytest.fixture(scope="module")
def mine(tmp_path_factory) -> Iterator[Any]:
    """The README's ``my_functions.py``, written out as it is shown, and this round's
    functions, served together."""
    folder = tmp_path_factory.mktemp("newuser1")
    readme = (ROOT / "README.md").read_text()
    code = next(m[2] for m in _PYTHON.finditer(readme) if m[2].startswith("# my_functions.py"))
    (folder / "newuser1_readme_functions.py").write_text(code)
    sys.path.insert(0, str(folder))
    try:
        with ready_app("newuser1_readme_functions,tests.newuser1_functions") as app:
            yield app
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("newuser1_readme_functions", None)


def test_the_readme_registered_arm_answers_what_jacrev_does_in_process(mine):
    import newuser1_readme_functions as module

    q, lengths = [0.1, 0.2, 0.3], [1.0, 1.0, 0.5]
    r = mine.post("/v1/functions/arm/jacobian", json={"inputs": {"q": q, "lengths": lengths},
                                                       "argnums": ["q", "lengths"]})
    assert r.status_code == 200, r.text
    doc = r.json()
    # plain JSON numbers take float32 for the `floating` q; lengths is declared float64
    def arm(q, lengths):  # torch.func's aux holds tensors only; the service's takes the string too (README)
        y, aux = module.arm(q, lengths)
        return y, aux["joints"]

    (jq, jl), joints = torch.func.jacrev(arm, argnums=(0, 1), has_aux=True)(
        torch.tensor(q), torch.tensor(lengths, dtype=torch.float64))
    assert [d["dtype"] for d in doc["jacobian"]] == ["float32", "float64"]
    np.testing.assert_allclose(np.array(doc["jacobian"][0]["data"]), jq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.array(doc["jacobian"][1]["data"]), jl.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.array(doc["aux"]["joints"]["data"]), joints.numpy(), rtol=1e-12)
    assert doc["aux"]["units"] == "m"


# ------------------------------------------------------------------ the common mistakes

@pytest.mark.parametrize("body, sent_as, needs", [
    (npy_bytes(np.arange(3.0)), wire.JSON, wire.NPY),
    (npz_bytes(x=np.arange(3.0)), wire.JSON, wire.NPZ),
    (b'{"inputs": [[1, 2, 3]]}', wire.NPY, wire.JSON),
    (b' {"inputs": [[1, 2, 3]]}', wire.NPZ, wire.JSON),
    (npz_bytes(x=np.arange(3.0)), wire.NPY, wire.NPZ),
])
def test_a_body_sent_under_another_content_type_is_told_which_to_send(examples, body, sent_as, needs):
    r = examples.post("/v1/functions/sin/jacobian", content=body, headers={"content-type": sent_as})
    detail = assert_problem(r, 400, "malformed_body")["detail"]
    assert detail.endswith(f"send it with Content-Type: {needs}"), detail


@pytest.mark.parametrize("body, sent_as", [(b"\x93NUMPY\x01\x00garbage", wire.NPY), (b"{not json", wire.JSON),
                                           (b"PK\x03\x04 not a zip", wire.NPZ)])
def test_a_broken_body_of_the_type_it_says_gets_no_such_advice(examples, body, sent_as):
    r = examples.post("/v1/functions/sin/jacobian", content=body, headers={"content-type": sent_as})
    assert "Content-Type" not in assert_problem(r, 400, "malformed_body")["detail"]


def test_one_array_sent_as_the_inputs_list_is_told_how_to_send_it(examples):
    r = examples.post("/v1/functions/sin/jacobian", json={"inputs": [0.1, 0.2, 0.3]})
    detail = assert_problem(r, 422, "invalid_input")["detail"]
    assert detail == ("sin takes 1 input ['x'], got 3: 'inputs' holds one entry per input, so its one array goes as "
                      '{"inputs": [[1, 2, 3]]} (a list of one array) or {"inputs": {"x": [1, 2, 3]}}')
    generic = "'inputs' holds one entry per input, in order (or an object keyed by their names)"
    r = examples.post("/v1/functions/add_square/jacobian", json={"inputs": [[1.0, 2.0]]})
    assert assert_problem(r, 422, "invalid_input")["detail"].endswith(generic)
    # no numbers sent as the list (none at all, or two arrays): no such advice
    for inputs in ([], [[0.1], [0.2]]):
        r = examples.post("/v1/functions/sin/jacobian", json={"inputs": inputs})
        assert assert_problem(r, 422, "invalid_input")["detail"] == f"sin takes 1 input ['x'], got {len(inputs)}: {generic}"
    # and as it says, it is answered
    assert examples.post("/v1/functions/sin/jacobian", json={"inputs": {"x": [0.1, 0.2, 0.3]}}).status_code == 200


def test_an_integer_first_input_is_refused_naming_argnums_and_the_inputs_it_can_pick(mine):
    r = mine.post("/v1/functions/index_first/jacobian", json={"inputs": [[1, 2], [0.5, 0.5]]})
    detail = assert_problem(r, 422, "invalid_input")["detail"]
    assert detail == ("input 'i' is int64; only floating inputs can be differentiated: index_first declares it int64: "
                      "pick the inputs to differentiate with argnums (by position or name; left out, 0: the first), "
                      "among ['x']")
    r = mine.post("/v1/functions/index_first/jacobian", json={"inputs": [[1, 2], [0.5, 0.5]], "argnums": "x"})
    assert r.status_code == 200 and r.json()["jacobian"]["data"] == [[1.0, 0.0], [0.0, 2.0]]
    # a floating input sent as integers is told to send floats
    r = mine.post("/v1/functions/arm/jacobian", content=npz_bytes(q=np.arange(3), lengths=np.ones(3)),
                  headers={"content-type": wire.NPZ})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(
        "input 'q' is int64; only floating inputs can be differentiated: send it as floats")


@pytest.mark.parametrize("name", ["through_numpy", "through_numpy_attached"])
def test_a_function_that_leaves_torch_for_numpy_is_told_why_it_fails(mine, name):
    with pytest.raises(RuntimeError) as in_process:  # torch's own words, in-process
        torch.func.jacrev(getattr(sys.modules["tests.newuser1_functions"], name))(torch.ones(2))
    r = mine.post(f"/v1/functions/{name}/jacobian", json={"inputs": [[0.1, 0.2]]})
    detail = assert_problem(r, 500, "function_error")["detail"]
    assert detail.startswith(f"RuntimeError: {str(in_process.value).splitlines()[0]}; torch.func's transforms"), detail
    assert "compute with torch ops" in detail


# -------------------------------------------------------------------------------- the CLI

def test_functions_takes_no_server_options_and_serve_says_its_defaults(capsys):
    from jacobian_service.cli import main

    with pytest.raises(SystemExit) as exited:  # it listed the built-in examples, whatever served on 9000
        main(["functions", "--port", "9000"])
    assert exited.value.code == 2 and "unrecognized arguments: --port 9000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--port PORT port to listen on (default: 8000)" in shown
    assert "--host HOST address to listen on (default: 127.0.0.1" in shown


# ------------------------------------------------------------------- registering mistakes

def test_a_function_that_cannot_take_its_declared_inputs_is_refused_at_registration():
    """``f(x)`` declared with x and y registered, was listed and served, and every request
    was the caller's 500 ("TypeError: f() takes 1 positional argument but 2 were given")."""
    from jacobian_service import Input, register

    def f(x):
        return x

    with pytest.raises(TypeError, match=r"^f\(x\) cannot be called with its 2 declared inputs \['x', 'y'\]"):
        register(inputs=[Input("x", shape=(3,)), Input("y", shape=(3,))])(f)
    with pytest.raises(TypeError, match=r"^f: inputs are Input objects \(Input\('x', shape=\('n',\)\)\), not 'x'$"):
        register(inputs=["x"])(f)

    # what Python can call with them stays registrable: defaults, *args
    def g(x, y=None, *rest, scale=1.0):
        return x

    register(inputs=[Input("x", shape=(3,))])(g)
    register(inputs=[Input("a", shape=(3,)), Input("b", shape=(3,)), Input("c", shape=(3,))])(g)


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"])
def test_the_docs_example_for_a_function_with_an_integer_first_input_succeeds(mine, kind):
    """Swagger UI's "Try it out" for index_first pre-filled {"inputs": {"i": [1, 1, 1], "x": ...}}:
    argnums' default (0) is the integer input, and every derivative's example was a 422."""
    body = mine.get("/openapi.json").json()["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]["requestBody"]
    examples = body["content"]["application/json"].get("examples", {})
    if kind == "vjp":  # (no example: the cotangents are the output's, which the page asks /evaluate)
        assert "index_first" not in examples
        return
    value = examples["index_first"]["value"]
    assert value["inputs"] == {"i": [1, 1, 1], "x": [0.5, 0.5, 0.5]}
    assert value.get("argnums") == (None if kind == "evaluate" else "x")
    r = mine.post(f"/v1/functions/index_first/{kind}", json=value)
    if kind == "hvp":  # not a scalar: told why, as every non-scalar's hvp example is
        assert assert_problem(r, 422, "invalid_input")["detail"].startswith("hvp needs a function with one scalar")
        return
    assert r.status_code == 200, r.text
    if kind == "jvp":
        assert value["tangents"] == [0.5, 0.5, 0.5] and r.json()["jvp"]["data"] == [0.5, 0.5, 0.5]


def test_the_docs_page_writes_a_vjp_body_that_differentiates_the_floating_input():
    """/docs writes vjp's body itself (cotangents shaped as the output /evaluate gives):
    for index_first it left argnums out, and Execute answered the integer input's 422."""
    from tests._cdp import Chromium, chromium_binary
    from tests._client_support import real_app, serve
    from tests.test_browser_round2 import _EXECUTE, _OPEN

    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    app = real_app(functions="tests.newuser1_functions", workers=1, engine_standby=False)
    with serve(app, ready_path="/readyz") as api, Chromium() as browser:
        browser.goto(api + "/docs")
        browser.wait_for("document.querySelectorAll('.opblock').length > 5")
        path = "/v1/functions/{name}/vjp"
        assert browser.eval(f"{_OPEN}('{path}', 'post')")
        got = browser.eval(f"{_EXECUTE}('{path}', 'post', 'index_first', null, null, 'cotangents')", timeout_s=90)
    assert got["status"] == "200", got
    # the example's i = [1, 1, 1], x = 0.5s; cotangents 0.5: d/dx (x * i) pulled back
    _, pullback = torch.func.vjp(lambda x: x * torch.ones(3, dtype=torch.int64), torch.full((3,), 0.5))
    assert json.loads(got["text"])["vjp"]["data"] == pullback(torch.full((3,), 0.5))[0].tolist()


def test_call_without_input_says_to_give_one(capsys):
    """``jacobian-service call sin`` (no --input) printed the server's "sin takes 1 input
    ['x'], got 0", about a request body the command writes, not its own options."""
    from jacobian_client._cli_call import call_main
    from tests._client_support import real_app, serve

    with serve(real_app(functions="jacobian_service.examples", workers=1, engine_standby=False),
               ready_path="/readyz") as api:
        assert call_main(["sin", "--url", api]) == 1
    err = capsys.readouterr().err
    assert "InvalidInput: 422 invalid_input: sin takes 1 input ['x'], got 0:" in err
    assert err.splitlines()[-1].startswith("no --input was given: give each of the function's inputs as --input FILE.npy")
