"""Wire round 5: what the service writes, it reads back; bfloat16 said on every route.

1. Every dtype a JSON answer writes (bool, int8-int64, uint8-uint64, float16, float32,
   float64; bfloat16 as float32 with ``meta.bfloat16``) goes back as an input where the
   declared input takes it. complex64 / complex128, which answers carry but no input
   takes (inputs and tangents are real), were refused as an "unknown dtype" in JSON: now
   the same words as a .npy's, saying why and what to send.
2. A bfloat16 result went as float32 with its flag (``meta.bfloat16``, ``X-Bfloat16``)
   on ``evaluate`` only: a Jacobian, Hessian, vjp, jvp or hvp of a bfloat16 function, and
   ``return_output``'s output, came back float32 with nothing to tell it from a float32
   one, in every format. Now every derivative says it (``bfloat16`` per result array,
   ``output_bfloat16``, ``aux_bfloat16``), gathered or streamed.
3. ``argnums=0,`` (a tuple of one) asked as .npy: the 406 said "several arrays"; it says
   the tuple, and how to get one array.
4. ``register(torch.sin)`` (a builtin) failed with an AttributeError (and, with inputs
   declared, was recorded in torch's module: never served): it registers, under its
   ``__name__``, in the registering module; without inputs it is refused, saying so.

One in-process app serves tests/wire5_functions.py (a small stream threshold: one
Jacobian of 8 rows streams).
"""

from __future__ import annotations

import functools
import io
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import Input, create_app, register
from jacobian_service.settings import Settings

from .conftest import assert_problem, sdk_over

f = torch.func
BF = {"dtype": "bfloat16", "shape": [3], "data": [0.5, 1.0, 1.5]}
XB = torch.tensor([0.5, 1.0, 1.5], dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def c() -> Iterator[TestClient]:
    settings = Settings(warmup=False, functions="tests.wire5_functions", stream_threshold_bytes=64)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


def same(got: Any, want: torch.Tensor) -> None:
    """A float32 array holding bfloat16's values (want), exactly."""
    assert got.dtype == np.float32, got.dtype
    np.testing.assert_array_equal(got, want.float().numpy())


# --------------------------------------------------------------------------- 4. builtins


def test_a_builtin_registers_under_its_name_and_is_served(c):
    r = c.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]})
    assert r.status_code == 200, r.text
    x = torch.tensor([0.5, 1.0])
    np.testing.assert_allclose(wire.decode_tree(r.json()["jacobian"]), f.jacrev(torch.sin)(x).numpy(), rtol=1e-6)
    r = c.post("/v1/functions/builtin_cos/hessian", json={"inputs": [[0.5, 1.0]]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["hessian"]), f.hessian(torch.cos)(x).numpy(), rtol=1e-6)


def test_register_takes_callables_that_are_not_defs_or_says_what_is_missing(monkeypatch):
    module = types.ModuleType("wire5_scratch")
    monkeypatch.setitem(sys.modules, "wire5_scratch", module)
    module.__dict__.update(register=register, Input=Input, torch=torch, functools=functools)
    exec("register(torch.tanh, inputs=[Input('x')])\n"
         "register(functools.partial(torch.pow, exponent=2), name='square', inputs=[Input('x')])\n",
         module.__dict__)
    # recorded in the module that registered them (torch.tanh's own __module__ is "torch")
    assert [s.name for s in module.__jacobian_functions__] == ["tanh", "square"]
    assert all(s.module == "wire5_scratch" for s in module.__jacobian_functions__)
    assert not any(s.fn is torch.tanh for s in getattr(torch, "__jacobian_functions__", []))
    with pytest.raises(TypeError, match=r"sin: Python cannot read its signature .*declare its inputs"):
        register(torch.sin)
    with pytest.raises(TypeError, match="it has no __name__; give one: register"):
        register(functools.partial(torch.pow, exponent=2), inputs=[Input("x")])


# --------------------------------------------------------------------------- 1. round trip


def test_every_real_dtype_an_answer_writes_goes_back_as_an_input(c):
    """Each array of an evaluate's JSON answer, posted back as it came, where a declared
    input of that dtype (an integer input for the unsigned ones) takes it."""
    r = c.post("/v1/functions/of_dtype/evaluate", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 200, r.text
    doc = r.json()
    leaves, flags = doc["output"], doc["meta"]["bfloat16"]
    written = [leaf["dtype"] for leaf in leaves]
    assert written == ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                       "float32", "float32", "float64", "complex64", "complex128"]
    assert flags == [False] * 10 + [True] + [False] * 4  # the 11th float32 stands for bfloat16
    for leaf, bf in zip(leaves[:13], flags):
        name = "bfloat16" if bf else leaf["dtype"]
        target = "int64" if name.startswith("uint") and name != "uint8" else name
        sent = {**leaf, "dtype": name}  # a bfloat16 goes back named so, as meta.bfloat16 says
        r = c.post(f"/v1/functions/takes_{target}/evaluate", json={"inputs": [sent, 1.5]})
        assert r.status_code == 200, (name, r.text)
        x = torch.tensor(leaf["data"]).to(getattr(torch, target))
        want = 1.5 * x.to(torch.float32).sum()
        assert r.json()["output"]["data"] == pytest.approx(float(want)), name


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_inputs_are_refused_saying_why_in_json_and_npy_alike(c, dtype):
    leaf = {"dtype": dtype, "shape": [2], "data": [[1, 2], [3, 4]]}
    words = f"unsupported dtype {dtype} here: inputs and tangents are real"
    detail = assert_problem(c.post("/v1/functions/sin/evaluate", json={"inputs": [leaf]}), 422, "invalid_input")["detail"]
    assert detail.startswith(f"input 'x': {words}") and "real and imaginary parts" in detail, detail
    assert "unknown" not in detail
    buf = io.BytesIO()
    np.save(buf, np.array([1 + 2j, 3 + 4j], dtype))
    r = c.post("/v1/functions/sin/evaluate", content=buf.getvalue(), headers={"content-type": wire.NPY})
    assert assert_problem(r, 422, "invalid_input")["detail"] == detail
    r = c.post("/v1/functions/sin/jvp", json={"inputs": [[1.0, 2.0]], "tangents": leaf})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(f"tangents: {words}")
    # an answer's reader still takes them
    assert wire.decode_tree(leaf, limits=wire.Limits(complex=True)).dtype == np.dtype(dtype)


# --------------------------------------------------------------------------- 2. bfloat16 said


def _flags(r: Any, media: str) -> tuple[dict[str, Any], str | None]:
    """The answer's half-precision meta and its X-Bfloat16."""
    assert r.status_code == 200, r.text
    if media == wire.JSON:
        meta = r.json()["meta"]
    elif media == wire.NPZ:
        meta = wire.read_result_npz(r.content)[1]
    else:
        meta = {}
    return {k: v for k, v in meta.items() if k.endswith("bfloat16")}, r.headers.get("x-bfloat16")


ROUTES = [
    ("jacobian", {}, lambda: f.jacrev(torch.sin)(XB)),
    ("jacobian", {"mode": "fwd"}, lambda: f.jacrev(torch.sin)(XB)),
    ("hessian", {}, lambda: f.hessian(torch.sin)(XB)),
    ("vjp", {"cotangents": [1, 2, 3]}, lambda: f.vjp(torch.sin, XB)[1](torch.tensor([1.0, 2, 3]).bfloat16())[0]),
    ("jvp", {"tangents": [1, 2, 3]}, lambda: f.jvp(torch.sin, (XB,), (torch.tensor([1.0, 2, 3]).bfloat16(),))[1]),
    ("hvp", {"tangents": [1, 2, 3], "cotangents": [1, 1, 1]},
     lambda: f.jvp(lambda x: f.vjp(torch.sin, x)[1](torch.ones(3).bfloat16())[0], (XB,),
                   (torch.tensor([1.0, 2, 3]).bfloat16(),))[1]),
]


@pytest.mark.parametrize("kind,options,want", ROUTES, ids=[f"{k}{o.get('mode', '')}" for k, o, _ in ROUTES])
@pytest.mark.parametrize("media", [wire.JSON, wire.NPZ, wire.NPY])
def test_every_derivative_of_bfloat16_says_so_in_every_format(c, kind, options, want, media):
    extra = {} if media == wire.NPY else {"return_output": True}
    r = c.post(f"/v1/functions/sin/{kind}", json={"inputs": [BF], **options, **extra}, headers={"accept": media})
    meta, header = _flags(r, media)
    assert header == "true"
    if media == wire.NPY:
        same(np.load(io.BytesIO(r.content)), want())
        return
    assert meta == {"bfloat16": [True], "output_bfloat16": [True]}, meta
    trees = r.json() if media == wire.JSON else wire.read_result_npz(r.content)[0]
    value, output = trees[wire.RESULT_KEY[kind]], trees["output"]
    if media == wire.JSON:
        value, output = wire.decode_tree(value), wire.decode_tree(output)
    same(value, want())
    same(output, torch.sin(XB))


def test_aux_and_mixed_dtypes_are_said_per_array(c):
    """A has_aux function's aux (a bfloat16 leaf beside a float32 one), and a bfloat16 x
    beside a float32 w: per array, as the function returned it (jacrev's blocks in their
    inputs' dtypes); per-example Jacobians too. A float32 call says nothing."""
    r = c.post("/v1/functions/bf16_aux/vjp", json={"inputs": [BF], "cotangents": [1, 1, 1], "return_output": True})
    assert _flags(r, wire.JSON) == ({"bfloat16": [True], "output_bfloat16": [True], "aux_bfloat16": [True, False]},
                                    "true")
    w = [1.0, 2.0, 3.0]
    r = c.post("/v1/functions/mixed/jacobian", json={"inputs": [BF, w], "argnums": [0, 1], "return_output": True})
    meta, header = _flags(r, wire.JSON)
    # (output leaf, input) blocks: (x*w: x, w), (w.sum()*x: x, w): bfloat16 where the input is
    assert meta == {"bfloat16": [True, False, True, False], "output_bfloat16": [True, False]}, meta
    assert header == "true, false, true, false"
    jac = f.jacrev(lambda x, w: (x * w.to(x.dtype), w.sum() * x.float()), argnums=(0, 1))(XB, torch.tensor(w))
    got = wire.decode_tree(r.json()["jacobian"])
    for g, wnt in zip([a for row in got for a in row], [a for row in jac for a in row]):
        np.testing.assert_array_equal(g, wnt.float().numpy())
    batch = {"dtype": "bfloat16", "shape": [2, 3], "data": [[0.5, 1.0, 1.5], [2.0, 2.5, 3.0]]}
    r = c.post("/v1/functions/sin/jacobian", json={"inputs": [batch], "batched": True, "return_output": True})
    assert _flags(r, wire.JSON) == ({"bfloat16": [True], "output_bfloat16": [True]}, "true")
    r = c.post("/v1/functions/to_bf16/jacobian", json={"inputs": [[0.5, 1.0]], "return_output": True})
    assert _flags(r, wire.JSON) == ({"bfloat16": [False], "output_bfloat16": [True]}, "false")
    r = c.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]], "return_output": True})
    assert _flags(r, wire.JSON) == ({}, None)


@pytest.mark.parametrize("media", [wire.NPY, wire.JSON])
def test_a_streamed_bfloat16_jacobian_says_so(c, media):
    """8 rows of 8 float32 (256 bytes, over the 64 the app streams from): streamed as .npy
    (the flag in its head) and as JSON (meta last)."""
    x = torch.linspace(0.1, 0.8, 8).bfloat16()
    body = {"inputs": [{"dtype": "bfloat16", "shape": [8], "data": x.float().tolist()}]}
    r = c.post("/v1/functions/sin/jacobian", json=body, headers={"accept": media})
    assert r.status_code == 200, r.text
    assert r.headers.get("content-length") is None or media == wire.NPY
    assert r.headers["x-bfloat16"] == "true"
    want = f.jacrev(torch.sin)(x)
    if media == wire.NPY:
        same(np.load(io.BytesIO(r.content)), want)
    else:
        doc = r.json()
        assert doc["meta"]["bfloat16"] == [True] and doc["meta"]["chunk_size"] is not None
        same(wire.decode_tree(doc["jacobian"]), want)


@pytest.mark.parametrize("media", [wire.NPY, wire.JSON])
def test_a_streamed_jacobian_of_a_bfloat16_output_says_what_a_gathered_one_says(c, media):
    """float32 inputs, a bfloat16 output: half precision took part, so a gathered answer
    says ``bfloat16: [false]`` (jacrev's block takes the input's float32); streamed, the
    same request said nothing (the route knew the inputs' dtypes only)."""
    x = np.linspace(0.1, 0.8, 8).tolist()
    streamed = c.post("/v1/functions/to_bf16/jacobian", json={"inputs": [x]}, headers={"accept": media})
    gathered = c.post("/v1/functions/to_bf16/jacobian", json={"inputs": [x[:2]]}, headers={"accept": media})
    assert streamed.status_code == gathered.status_code == 200, (streamed.text, gathered.text)
    assert streamed.headers.get("content-length") is None or media == wire.NPY
    assert streamed.headers.get("x-bfloat16") == gathered.headers.get("x-bfloat16") == "false"
    if media == wire.JSON:
        assert streamed.json()["meta"]["bfloat16"] == gathered.json()["meta"]["bfloat16"] == [False]
        want = f.jacrev(lambda t: torch.sin(t).to(torch.bfloat16))(torch.tensor(x, dtype=torch.float32))
        np.testing.assert_array_equal(wire.decode_tree(streamed.json()["jacobian"]), want.float().numpy())


# --------------------------------------------------------------------------- 3. a tuple of one


def test_a_tuple_of_one_jacobian_as_npy_is_refused_saying_the_tuple(c):
    for argnums in ([0], ["x"]):
        r = c.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]], "argnums": argnums},
                   headers={"accept": wire.NPY})
        detail = assert_problem(r, 406, "not_acceptable")["detail"]
        assert "argnums is a tuple" in detail and "one int or name for one array" in detail, detail
        assert "several arrays" not in detail
    buf = io.BytesIO()
    np.save(buf, np.array([0.5, 1.0], np.float32))
    r = c.post("/v1/functions/sin/jacobian?argnums=0,", content=buf.getvalue(),
               headers={"content-type": wire.NPY, "accept": wire.NPY})
    detail = assert_problem(r, 406, "not_acceptable")["detail"]
    assert "argnums is a tuple" in detail, detail
    r = c.post("/v1/functions/bf16_aux/jacobian", json={"inputs": [[0.5, 1.0]]}, headers={"accept": wire.NPY})
    assert "the function's aux comes beside it" in assert_problem(r, 406, "not_acceptable")["detail"]
    r = c.post("/v1/functions/mixed/jacobian", json={"inputs": [[0.5, 1.0], [1.0, 2.0]]}, headers={"accept": wire.NPY})
    assert "one per output leaf" in assert_problem(r, 406, "not_acceptable")["detail"]
    # the SDK asks for what carries a tuple, and gives the tuple back
    with sdk_over(c) as client:
        got = client.jacobian("sin", np.array([0.5, 1.0], np.float32), argnums=(0,))
    assert isinstance(got, tuple) and len(got) == 1
    np.testing.assert_allclose(got[0], f.jacrev(torch.sin, argnums=(0,))(torch.tensor([0.5, 1.0]))[0].numpy())


def test_a_stream_heads_flags_cross_the_engine_pipe():
    """Under serve the head comes from the engine process (ipc): its flags with it."""
    from jacobian_service import ipc
    from jacobian_service.scheduler import JobInfo, StreamHead

    for meta in ({"bfloat16": [False]}, None):
        head = StreamHead(7, (8, 8), "<f4", 8, 256, meta=meta)
        header, frames = ipc.parse(ipc.encode_reply(1, head, JobInfo(device="cpu")))
        got, _ = ipc.decode_reply(header, frames)
        assert (got.stream_id, got.shape, got.meta) == (7, (8, 8), meta)
