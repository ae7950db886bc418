"""PyTorch's own torch.func test cases, round 10 (test/functorch/test_vmap.py's in_dims /
out_dims, test_eager_transforms.py's per-sample gradients, custom autograd.Functions,
in-place ops, detach, item, randomness) replayed over HTTP against
tests/parity10_functions.py.

Per-example requests are ``vmap(jacrev(f), in_dims, out_dims)`` (or hessian, or f):
every answer is compared with in-process torch.func (values, shapes, dtypes, structure);
where torch raises, the exact status and code, the detail saying what torch says, and
that torch raises as well. One in-process app serves the module (no server start)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from jacobian_client import Client, wire
from torch.func import hessian, jacrev, vmap

from . import parity10_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, post, same, t

FUNCTIONS = "tests.parity10_functions"
RNG = np.random.default_rng(10)


def rand(*shape: int, dtype: str = "float32") -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


XS, P = rand(4, 3), rand(3)  # four examples of x, one p every example shares
XT = rand(3, 4)  # the batch in dim 1 (in_dims=1)
PARAMS = {"w": rand(2, 3), "b": rand(2)}
YS = rand(4, 2)


@pytest.fixture(scope="module")
def c():
    with ready_app(FUNCTIONS) as client:
        yield client


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def _torch_dims(d):
    """JSON's dims -> torch's: lists are tuples (per input, per tuple node)."""
    if isinstance(d, list):
        return tuple(_torch_dims(v) for v in d)
    if isinstance(d, dict):
        return {k: _torch_dims(v) for k, v in d.items()}
    return d


# --- in_dims / out_dims (test_vmap.py: test_in_dims, test_out_dims, test_nested_*) ---

JACOBIAN_CASES = [
    # (function, inputs, options) -> vmap(jacrev(f, argnums), in_dims, out_dims)
    ("shared_scale", [XS, P], {"in_dims": [0, None]}),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "argnums": [0, 1]}),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "argnums": 1, "out_dims": 1}),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "argnums": [0, 1], "out_dims": [-1, 0], "chunk_size": 1}),
    ("shared_scale", [P, XS], {"in_dims": [None, 0], "argnums": [1, 0], "out_dims": 2}),
    ("shared_scale", [XT, P], {"in_dims": [1, None], "argnums": [0, 1]}),
    ("shared_scale", [XT, XS], {"in_dims": [-1, 0], "out_dims": -1}),
    ("row_norms", [rand(2, 3, 4)], {"in_dims": 1}),
    ("int_power", [np.abs(XS), np.array(3)], {"in_dims": [0, None]}),  # an integer input shared
    ("int_power", [np.abs(XS), np.array([2, 3, 1, 2])], {"in_dims": 0}),  # ... and batched
    ("row_norms", [rand(2, 3, 4)], {"in_dims": -1, "out_dims": -1}),
    # test_per_sample_grads: params shared, examples batched; nested per the pytree, and by name
    ("linear_loss", [PARAMS, XS, YS], {"in_dims": [None, 0, 0]}),
    ("linear_loss", [{"w": PARAMS["w"], "b": rand(4, 2)}, XS, YS], {"in_dims": [{"w": None, "b": 0}, 0, 0],
                                                                     "argnums": [0, 1]}),
    ("linear_loss", [PARAMS, XS, YS], {"in_dims": {"params": None}, "out_dims": [{"w": 2, "b": 0}, 1],
                                       "argnums": ["params", "x"]}),
    # d/dp is the same for every example: out_dims=None answers it once, as torch does
    ("ignores_x", [XS, rand(2)], {"in_dims": [0, None], "argnums": 1, "out_dims": None}),
    ("ignores_x", [XS, rand(2)], {"in_dims": [0, None], "argnums": [0, 1], "out_dims": [0, None]}),
]


def _want_jacobian(fn, inputs, options, kind=jacrev):
    in_dims = options["in_dims"]
    if isinstance(in_dims, dict):  # by name: the rest take torch's default, 0
        names = ["params", "x", "y"]
        in_dims = [in_dims.get(n, 0) for n in names]
    argnums = options.get("argnums", 0)
    if isinstance(argnums, list):
        argnums = tuple({"params": 0, "x": 1}.get(a, a) for a in argnums)
    transform = kind(fn, argnums=argnums) if kind is hessian else kind(fn, argnums=argnums, chunk_size=options.get("chunk_size"))
    return vmap(transform, in_dims=_torch_dims(in_dims), out_dims=_torch_dims(options.get("out_dims", 0)))(*t(inputs))


@pytest.mark.parametrize(("name", "inputs", "options"), JACOBIAN_CASES)
def test_per_example_jacobians_take_in_dims_and_out_dims_as_vmap(c, name, inputs, options):
    got, _ = answer(post(c, name, "jacobian", inputs, batched=True, **options), "jacobian")
    same(got, _want_jacobian(getattr(F, name), inputs, options))


def test_per_example_hessians_and_evaluate_take_them_too(c):
    options = {"in_dims": [None, 0, 0], "argnums": 1, "out_dims": 2}
    got, _ = answer(post(c, "linear_loss", "hessian", [PARAMS, XS, YS], batched=True, **options), "hessian")
    same(got, _want_jacobian(F.linear_loss, [PARAMS, XS, YS], options, hessian))
    got, _ = answer(post(c, "ignores_x", "hessian", [XS, rand(2)], batched=True, in_dims=[0, None], argnums=1,
                         out_dims=None), "hessian")
    same(got, 2 * np.eye(2, dtype=np.float32))  # vmap(hessian(f, 1), (0, None), out_dims=None): one, unbatched
    # grad switched off inside f: torch's own strategy, example by example, p shared
    got, _ = answer(post(c, "no_grad_shared", "hessian", [XS, P], batched=True, in_dims=[0, None], argnums=[0, 1],
                           out_dims=1), "hessian")
    same(got, vmap(hessian(F.no_grad_shared, argnums=(0, 1)), in_dims=(0, None), out_dims=1)(*t([XS, P])))
    got, _ = answer(post(c, "shared_scale", "evaluate", [XT, P], batched=True, in_dims=[1, None], out_dims=1), "output")
    same(got, vmap(F.shared_scale, in_dims=(1, None), out_dims=1)(*t([XT, P])))


def test_an_int_out_dims_moves_the_aux_too(c):
    """vmap(jacrev(f, has_aux=True), in_dims=(0, None), out_dims=1): jac and aux both."""
    r = post(c, "scaled_with_aux", "jacobian", [XS, P], batched=True, in_dims=[0, None], out_dims=1, argnums=[0, 1])
    got, doc = answer(r, "jacobian")
    jac, aux = vmap(jacrev(F.scaled_with_aux, argnums=(0, 1), has_aux=True), in_dims=(0, None), out_dims=1)(*t([XS, P]))
    same(got, jac)
    same(wire.decode_tree(doc["aux"]), aux)


def test_in_dims_and_out_dims_in_the_query_string_with_an_npz_body(c):
    buf = io.BytesIO()
    np.savez(buf, x=XT, p=P)
    r = c.post("/v1/functions/shared_scale/jacobian?batched=true&in_dims=1,none&out_dims=-1&argnums=x,p",
               content=buf.getvalue(), headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    want = vmap(jacrev(F.shared_scale, argnums=(0, 1)), in_dims=(1, None), out_dims=-1)(*t([XT, P]))
    same((z["jacobian/0"], z["jacobian/1"]), want)
    r = c.post('/v1/functions/linear_loss/jacobian?batched=true&in_dims=[{"w":null,"b":null},0,0]',
               content=_npz(params_w=PARAMS["w"], params_b=PARAMS["b"], x=XS, y=YS),
               headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    want = vmap(jacrev(F.linear_loss), in_dims=(None, 0, 0))(*t([PARAMS, XS, YS]))
    same({"w": z["jacobian/w"], "b": z["jacobian/b"]}, want)


def _npz(**members: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k.replace("_", "/", 1) if k.startswith("params_") else k: v for k, v in members.items()})
    return buf.getvalue()


def test_the_sdk_passes_in_dims_and_out_dims_on_both_transports(c):
    def forward(request: httpx.Request) -> httpx.Response:
        r = c.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                      content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    want = vmap(jacrev(F.shared_scale, argnums=(0, 1)), in_dims=(1, None), out_dims=(1, -1))(*t([XT, P]))
    want_l = vmap(jacrev(F.linear_loss), in_dims=({"w": None, "b": None}, 0, 0), out_dims=0)(*t([PARAMS, XS, YS]))
    with Client("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0) as client:
        for transport in ("binary", "json"):
            got = client.jacobian("shared_scale", XT, P, argnums=(0, 1), batched=True, in_dims=(1, None),
                                  out_dims=(1, -1), transport=transport)
            same(got, want)
            same(client.jacobian("linear_loss", PARAMS, XS, YS, batched=True, in_dims=(None, 0, 0),
                                 transport=transport), want_l)
            same(client.evaluate("shared_scale", XT, P, batched=True, in_dims=(1, None), transport=transport),
                 vmap(F.shared_scale, in_dims=(1, None))(*t([XT, P])))
            # torch nests a list output's Jacobian in lists, and so does the SDK (meta.lists;
            # it gave tuples before round 23: tests/test_remote_round23.py)
            J = client.jacobian("returns_list", P, transport=transport)
            want_list = jacrev(F.returns_list)(t(P))
            assert isinstance(want_list, list) and isinstance(J, list) and isinstance(J[1], tuple)
            same(J, want_list)
            H = client.hessian("ignores_x", XS, P[:2], argnums=1, batched=True, in_dims=(0, None), out_dims=None,
                               transport=transport)
            same(H, 2 * np.eye(2, dtype=np.float32))


# --- where torch's vmap raises: a 422 saying what torch says ---

ERROR_CASES = [
    # (function, inputs, options, what the detail says, torch's call that raises)
    ("shared_scale", [XS, P], {"in_dims": [2, None]}, "-2 <= in_dim < 2",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(2, None))(*t([XS, P]))),
    ("shared_scale", [XS, P], {"in_dims": [-3, None]}, "Got in_dim=-3",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(-3, None))(*t([XS, P]))),
    ("shared_scale", [XS, rand(5, 3)], {"in_dims": 0}, "same size in the mapped dimension",
     lambda: vmap(jacrev(F.shared_scale))(*t([XS, rand(5, 3)]))),
    ("shared_scale", [P, P], {"in_dims": [None, None]}, "at least one Tensor to vmap over",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(None, None))(*t([P, P]))),
    ("shared_scale", [XS, P], {"in_dims": [0]}, "not compatible with the structure of `inputs`",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(0,))(*t([XS, P]))),
    ("shared_scale", [XS, P], {"in_dims": [0.5, None]}, "must be either an integer dimension or None",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(0.5, None))(*t([XS, P]))),
    ("shared_scale", [XS, P], {"in_dims": [True, None]}, "integer dimension or null", None),
    # a 0-d input has no dim to batch over, by default or as asked: null shares it
    ("int_power", [XS, np.array(3)], {"in_dims": 0}, "in_dims null shares one input",
     lambda: vmap(jacrev(F.int_power), in_dims=0)(*t([XS, np.array(3)]))),
    ("int_power", [XS, np.array(3)], {"in_dims": [0, -1]}, "give it null to share it",
     lambda: vmap(jacrev(F.int_power), in_dims=(0, -1))(*t([XS, np.array(3)]))),
    ("linear_loss", [PARAMS, XS, YS], {"in_dims": [[None, None], 0, 0]}, "not compatible with the structure",
     lambda: vmap(jacrev(F.linear_loss), in_dims=((None, None), 0, 0))(*t([PARAMS, XS, YS]))),
    ("linear_loss", [PARAMS, XS, YS], {"in_dims": {"wrong": None}}, "not inputs of linear_loss", None),
    # the example's shape is the declared one: x (3,) batched over dim 1 of a (4, 3) is (4,)
    ("linear_loss", [PARAMS, XS, YS], {"in_dims": [None, 1, 0]}, "batched over dim 1 (in_dims)", None),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "out_dims": 3}, "Dimension out of range",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(0, None), out_dims=3)(*t([XS, P]))),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "out_dims": None}, "can not return a BatchedTensor",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(0, None), out_dims=None)(*t([XS, P]))),
    # d/dp is the same in every example, yet batched in torch (jacrev's cotangents follow the output)
    ("separable", [XS, P[:2]], {"in_dims": [0, None], "argnums": 1, "out_dims": None}, "can not return a BatchedTensor",
     lambda: vmap(jacrev(F.separable, argnums=1), in_dims=(0, None), out_dims=None)(*t([XS, P[:2]]))),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "out_dims": [0, 1]}, "not compatible with the structure of `outputs`",
     lambda: vmap(jacrev(F.shared_scale), in_dims=(0, None), out_dims=(0, 1))(*t([XS, P]))),
    ("shared_scale", [XS, P], {"in_dims": [0, None], "out_dims": "1"}, "integer dimension or null", None),
]


@pytest.mark.parametrize(("name", "inputs", "options", "says", "torch_call"), ERROR_CASES)
def test_what_torchs_vmap_refuses_is_a_422_saying_so(c, name, inputs, options, says, torch_call):
    if torch_call is not None:
        with pytest.raises((ValueError, IndexError, RuntimeError)):
            torch_call()
    body = assert_problem(post(c, name, "jacobian", inputs, batched=True, **options), 422, "invalid_input")
    assert says in body["detail"], body["detail"]


def test_in_dims_need_batched_and_are_no_option_of_vjp(c):
    body = assert_problem(post(c, "shared_scale", "jacobian", [P, P], in_dims=[0, None]), 422, "invalid_input")
    assert "batched=true" in body["detail"]
    body = assert_problem(post(c, "shared_scale", "vjp", [P, P], in_dims=[0, None], cotangents=P.tolist()), 422, "invalid_input")
    assert "in_dims" in body["detail"] and "jacobian, hessian and evaluate" in body["detail"]
    # their defaults ask for nothing, on any endpoint (one body shape for every endpoint)
    got, _ = answer(post(c, "shared_scale", "vjp", [P, P], in_dims=0, out_dims=0, cotangents=P.tolist()), "vjp")
    same(got, torch.func.vjp(F.shared_scale, *t([P, P]))[1](t(P))[0])


def test_in_dims_and_out_dims_reach_an_engine_process():
    """The front end hands a call to an engine process over its socket (ipc): in_dims
    and out_dims go with it (the in-process app above hands the call as it is)."""
    import orjson
    from jacobian_service import ipc
    from jacobian_service.errors import InvalidInput
    from jacobian_service.parsing import parse_call
    from jacobian_service.registry import Registry

    spec = Registry.from_modules([FUNCTIONS], use_entry_points=False).get("linear_loss")
    body = orjson.dumps({"inputs": [{k: v.tolist() for k, v in PARAMS.items()}, XT.T.tolist(), YS.tolist()],
                         "batched": True, "in_dims": [None, 0, 0], "out_dims": [{"w": 1, "b": None}, -1],
                         "argnums": [0, 1]})
    call = parse_call(spec, "jacobian", wire.JSON, body, {}, wire.Limits())
    assert call.in_dims == (None, None, 0, 0)
    frames = ipc.encode_call(1, "jacobian", call)
    header, rest = ipc.parse([bytes(f) if isinstance(f, memoryview) else f for f in frames])
    got = ipc.decode_call(header, rest, spec)
    assert got.in_dims == call.in_dims and got.out_dims == call.out_dims
    assert got.signature(batched=True) == call.signature(batched=True)
    # a dim past int64 is no dim, and could not travel (orjson refuses it): a 422 first
    plain = orjson.dumps({"inputs": [{k: v.tolist() for k, v in PARAMS.items()}, XS.tolist(), YS.tolist()],
                          "batched": True})
    for query in ({"in_dims": "none,0,0", "out_dims": "99999999999999999999"}, {"in_dims": "none,-99999999999999999999,0"}):
        with pytest.raises(InvalidInput, match="integer dimension or null"):
            parse_call(spec, "jacobian", wire.JSON, plain, query, wire.Limits())


# --- TestAutogradFunction, in-place, detach, item, no_grad, randomness, mixed dtypes ---

X = rand(3)


def _stack(fn, xs):
    """torch's answer example by example, where torch's own vmap refuses the function."""
    return torch.stack([fn(x) for x in t(xs)])


SAME_AS_TORCH = [
    # (function, endpoint, inputs, options, torch's answer)
    ("custom_setup", "jacobian", [X], {}, lambda x: jacrev(F.custom_setup)(x)),
    ("custom_setup", "jacobian", [X], {"mode": "fwd"}, lambda x: torch.func.jacfwd(F.custom_setup)(x)),
    ("custom_setup", "jacobian", [XS], {"batched": True}, lambda x: vmap(jacrev(F.custom_setup))(x)),
    ("custom_setup", "hessian", [X], {}, lambda x: hessian(F.custom_setup)(x)),
    # no vmap rule: torch's jacrev runs it (its vmap is over the backward, plain ops);
    # jacfwd and vmap(jacrev) vmap its forward and raise (below: the service loops)
    ("custom_no_vmap", "jacobian", [X], {}, lambda x: jacrev(F.custom_no_vmap, chunk_size=1)(x)),
    ("custom_no_vmap", "jacobian", [X], {"chunk_size": 2}, lambda x: jacrev(F.custom_no_vmap)(x)),
    # x.detach(): no derivative through those terms; nothing at all through detached_only
    ("detached", "jacobian", [X], {}, lambda x: jacrev(F.detached)(x)),
    ("detached", "jacobian", [X], {"mode": "fwd"}, lambda x: torch.func.jacfwd(F.detached)(x)),
    ("detached", "hessian", [X], {}, lambda x: hessian(F.detached)(x)),
    ("detached_only", "jacobian", [XS], {"batched": True}, lambda x: vmap(jacrev(F.detached_only))(x)),
    # .item(): a number with no derivative, in every chunking
    ("uses_item", "jacobian", [X], {"chunk_size": 2}, lambda x: jacrev(F.uses_item, chunk_size=2)(x)),
    ("uses_item", "jacobian", [X], {"mode": "fwd"}, lambda x: torch.func.jacfwd(F.uses_item)(x)),
    ("uses_item", "hessian", [X], {}, lambda x: hessian(F.uses_item)(x)),
    ("no_grad_inside", "jacobian", [X], {}, lambda x: jacrev(F.no_grad_inside)(x)),
    ("no_grad_inside", "hessian", [X], {}, lambda x: hessian(F.no_grad_inside)(x)),
    # a generator seeded in f: jacrev runs f once, so its Jacobian is the noise's diagonal
    ("seeded_noise", "jacobian", [X], {}, lambda x: jacrev(F.seeded_noise)(x)),
]


@pytest.mark.parametrize(("name", "endpoint", "inputs", "options", "want"), SAME_AS_TORCH)
def test_functions_torch_transforms_run_answer_as_torch(c, name, endpoint, inputs, options, want):
    got, _ = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, want(*t(inputs)))


def test_several_outputs_of_mixed_dtypes_keep_each_blocks_dtype(c):
    x64, y32 = RNG.standard_normal(3), rand(3)
    for endpoint, transform in (("jacobian", jacrev), ("hessian", hessian)):
        for mode in ({}, {"mode": "fwd"}) if endpoint == "jacobian" else ({},):
            got, _ = answer(post(c, "mixed_dtypes", endpoint, [x64, y32], argnums=[0, 1], **mode), endpoint)
            same(got, transform(F.mixed_dtypes, argnums=(0, 1))(*t([x64, y32])))


@pytest.mark.parametrize(("name", "options", "torch_call"), [
    # forward(ctx, ...) without setup_context: torch.func refuses it in every transform
    ("custom_old_style", {}, lambda x: jacrev(F.custom_old_style)(x)),
    ("custom_old_style", {"mode": "fwd"}, lambda x: torch.func.jacfwd(F.custom_old_style)(x)),
    ("custom_old_style", {"batched": True}, lambda x: vmap(jacrev(F.custom_old_style))(x)),
    # x.mul_(2) on the input being differentiated: autograd refuses the leaf's in-place op
    ("inplace_on_input", {}, lambda x: jacrev(F.inplace_on_input)(x)),
    ("inplace_on_input", {"chunk_size": 1}, lambda x: jacrev(F.inplace_on_input, chunk_size=1)(x)),
])
def test_what_torch_refuses_is_the_functions_error_as_torch_words_it(c, name, options, torch_call):
    x = XS if options.get("batched") else X
    with pytest.raises(RuntimeError) as raised:
        torch_call(t(x))
    body = assert_problem(post(c, name, "jacobian", [x], **options), 500, "function_error")
    assert str(raised.value).split("\n")[0][:80] in body["detail"], (body["detail"], str(raised.value))


def test_where_torchs_vmap_refuses_f_per_example_requests_run_example_by_example(c):
    """.item() of a batched input, an autograd.Function without a vmap rule, random
    numbers: torch's vmap(jacrev(f)) raises; the service answers jacrev example by
    example (README: where vmap cannot run, a loop), with in_dims and out_dims as vmap's."""
    for name in ("uses_item", "custom_no_vmap"):
        with pytest.raises(RuntimeError):
            vmap(jacrev(getattr(F, name)))(t(XS))
        got, _ = answer(post(c, name, "jacobian", [XS], batched=True), "jacobian")
        same(got, _stack(jacrev(getattr(F, name), chunk_size=1), XS))
    p = t(P)
    blocks = _stack(lambda x: torch.cat([b.flatten() for b in jacrev(F.item_scale, argnums=(0, 1))(x, p)]), XS)
    want = [blocks[:, :9].reshape(-1, 3, 3), blocks[:, 9:].reshape(-1, 3, 3)]
    for out_dims in (0, -1):
        got, _ = answer(post(c, "item_scale", "jacobian", [XS, P], batched=True, in_dims=[0, None], argnums=[0, 1],
                             out_dims=out_dims), "jacobian")
        same(got, tuple(w.movedim(0, out_dims) for w in want))


# --- TestJvp / TestVjp: the dtype of vectors ---


@pytest.mark.parametrize("endpoint", ["jvp", "hvp"])
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_tangents_are_refused_as_torch_refuses_them(c, endpoint, dtype):
    """torch.func.jvp raises for a tangent that is not floating ("Expected tangent to be
    floating point or complex, but got: torch.int64"), and so does jvp(grad(f)): an
    integer tangent sent with its dtype (JSON's dtype, an .npz member) was cast and
    answered, 200. Plain JSON numbers carry no dtype, and stay numbers."""
    v = np.array([1, 0, 1]).astype(dtype)
    f = (lambda a: F.shared_scale(a, t(P))) if endpoint == "jvp" else (lambda a: F.separable(a, t(P[:2])))
    g = f if endpoint == "jvp" else torch.func.grad(f)
    with pytest.raises(ValueError, match="Expected tangent to be floating point"):
        torch.func.jvp(g, (t(X),), (torch.from_numpy(v),))
    inputs = [X, P] if endpoint == "jvp" else [X, P[:2]]
    name = "shared_scale" if endpoint == "jvp" else "separable"
    tangents = {"dtype": dtype, "shape": [3], "data": v.tolist()}
    body = assert_problem(post(c, name, endpoint, inputs, tangents=tangents), 422, "invalid_input")
    assert f"torch.{dtype}" in body["detail"] and "floating point" in body["detail"], body["detail"]
    buf = io.BytesIO()
    np.savez(buf, x=inputs[0], p=inputs[1], tangents=v)
    r = c.post(f"/v1/functions/{name}/{endpoint}", content=buf.getvalue(), headers={"content-type": wire.NPZ})
    assert "floating point" in assert_problem(r, 422, "invalid_input")["detail"]
    # the same numbers written plain: numbers, as torch's float tangents
    got, _ = answer(post(c, name, endpoint, inputs, tangents=[1, 0, 1]), endpoint)
    same(got, torch.func.jvp(g, (t(X),), (torch.tensor([1.0, 0.0, 1.0]),))[1])


def test_integer_cotangents_are_cast_as_torch_casts_them(c):
    """torch.func.vjp takes an integer cotangent (autograd casts it to the output's dtype)."""
    v = np.array([1, 2, 3])
    want = torch.func.vjp(F.shared_scale, *t([X, P]))[1](torch.from_numpy(v))[0]
    for cotangents in ({"dtype": "int64", "shape": [3], "data": v.tolist()}, v.tolist()):
        got, _ = answer(post(c, "shared_scale", "vjp", [X, P], cotangents=cotangents), "vjp")
        same(got, want)
    assert want.dtype == torch.float32


@pytest.mark.parametrize("option", ["in_dims", "out_dims"])
def test_dims_nested_without_end_are_a_422_not_a_recursion(c, option):
    """A query string's JSON has no depth limit of its own: 900 nested lists of out_dims
    were a RecursionError, 500 internal_error."""
    buf = io.BytesIO()
    np.savez(buf, x=XS, p=XS)
    for depth in (70, 900):
        r = c.post(f"/v1/functions/shared_scale/jacobian?batched=true&{option}={'[' * depth}{']' * depth}",
                   content=buf.getvalue(), headers={"content-type": wire.NPZ})
        assert assert_problem(r, 422, "invalid_input")["detail"] == f"{option} is nested deeper than 64 levels"
    body = {"inputs": [XS.tolist(), XS.tolist()], "batched": True, option: [[[[[[[[[[0]]]]]]]]]]}
    assert option in assert_problem(c.post("/v1/functions/shared_scale/jacobian", json=body), 422, "invalid_input")["detail"]
