"""PyTorch's own torch.func test cases, round 9 (test/functorch/test_eager_transforms.py:
TestJac's pytrees in and out, 0-d and unrelated outputs, argnums and chunk_size;
TestHessian of several arguments; TestJvp / TestVjp's pytree primals and aux;
TestLinearize's nested input and output, as jvp; functional_call; dtypes on the wire;
per-example Jacobians against vmap(jacrev)) replayed over HTTP against
tests/parity9_functions.py.

Every answer is compared with in-process torch.func: values, shapes, dtypes and the
structure of pytree answers; where torch raises, the exact status and code, and that
torch raises as well. One in-process app serves the module (no server start)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from jacobian_client import wire
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from . import parity9_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, no_aux, post, same, t, wire_tree

FUNCTIONS = "tests.parity9_functions"
RNG = np.random.default_rng(9)


def rand(*shape: int, dtype: str = "float32") -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


X, Y = rand(3), rand(3)
A, B = np.array(0.3, np.float32), np.array(-0.4, np.float32)
ONE = np.array(1.0, np.float32)
PARAMS = {k: v.detach().numpy().copy() for k, v in F.NET.named_parameters()}
NESTED = {"x": rand(3, 1), "yz": (rand(3, 1), rand(3, 1))}


def tt(*values: float) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(float(v)) for v in values)


@pytest.fixture(scope="module")
def c():
    with ready_app(FUNCTIONS) as client:
        yield client


# --- vectors nested as the primals / outputs, tuples of equal-shaped leaves included ---

VECTOR_CASES = [
    # (function, endpoint, inputs, options, torch's answer)
    # TestJvp.test_pytree_inputs: jvp(f, ((one, one), one, one), ((one, one), one, one))
    ("pytree_in", "jvp", [(ONE, ONE), ONE, ONE], {"argnums": [0, 1, 2], "tangents": [[1.0, 2.0], 3.0, 4.0]},
     lambda a, b, c_: jvp(F.pytree_in, (a, b, c_), (tt(1, 2), *tt(3, 4)))[1]),
    # ... its leaves as one flat list, and the tuple parameter alone
    ("pytree_in", "jvp", [(ONE, ONE), ONE, ONE], {"argnums": [0, 1, 2], "tangents": [1.0, 2.0, 3.0, 4.0]},
     lambda a, b, c_: jvp(F.pytree_in, (a, b, c_), (tt(1, 2), *tt(3, 4)))[1]),
    ("pytree_in", "jvp", [(ONE, ONE), ONE, ONE], {"tangents": [1.0, 2.0]},
     lambda a, b, c_: jvp(lambda p: F.pytree_in(p, b, c_), (a,), (tt(1, 2),))[1]),
    # a stack of them: each leaf's vectors, leaf after leaf
    ("pytree_in", "jvp", [(ONE, ONE), ONE, ONE],
     {"argnums": [0, 1], "tangents": [[[1.0, 2.0], [3.0, 4.0]], [5.0, 6.0]], "batched_vectors": True},
     lambda a, b, c_: vmap(lambda u, w, z: jvp(lambda p, q: F.pytree_in(p, q, c_), (a, b), ((u, w), z))[1])(
         torch.tensor([1.0, 2]), torch.tensor([3.0, 4]), torch.tensor([5.0, 6]))),
    ("pytree_in", "hvp", [(A, B), ONE, ONE], {"argnums": [0, 1], "tangents": [[1.0, 2.0], 3.0]},
     lambda a, b, c_: jvp(grad(lambda p, q: F.pytree_in(p, q, c_), argnums=(0, 1)), (a, b), (tt(1, 2), torch.tensor(3.0)))[1]),
    # two 0-d outputs' cotangents, and two 0-d inputs' tangents, as [1.0, 2.0]
    ("two_outputs", "vjp", [A, B], {"argnums": [0, 1], "cotangents": [1.0, 2.0]},
     lambda x, y: vjp(F.two_outputs, x, y)[1](tt(1, 2))),
    ("two_outputs", "jvp", [A, B], {"argnums": [0, 1], "tangents": [1.0, 2.0]},
     lambda x, y: jvp(F.two_outputs, (x, y), tt(1, 2))[1]),
    ("two_outputs", "vjp", [A, B], {"argnums": [0, 1], "cotangents": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "batched_vectors": True},
     lambda x, y: vmap(lambda u, v: vjp(F.two_outputs, x, y)[1]((u, v)))(torch.tensor([1.0, 2, 3]), torch.tensor([4.0, 5, 6]))),
    # TestLinearize.test_linearize_nested_input_nested_output, as jvp (no linearize
    # endpoint: a stack of tangents is linearize's jvp_fn under vmap) and as vjp, whose
    # cotangent for the tuple "d" of two (3, 1) outputs is one regular (2, 3, 1) list
    ("nested_io", "jvp", [NESTED], {"tangents": wire_tree(NESTED)},
     lambda a: jvp(F.nested_io, (a,), (t(NESTED),))[1]),
    ("nested_io", "jvp", [NESTED], {"tangents": wire_tree({"x": np.stack([NESTED["x"]] * 2),
                                                            "yz": tuple(np.stack([v, -v]) for v in NESTED["yz"])}),
                                    "batched_vectors": True},
     lambda a: vmap(lambda v: jvp(F.nested_io, (a,), (v,))[1])(
         t({"x": np.stack([NESTED["x"]] * 2), "yz": tuple(np.stack([v, -v]) for v in NESTED["yz"])}))),
    ("nested_io", "vjp", [NESTED], {"cotangents": {"a": 1.0, "b": {"c": [[1.0], [2.0], [3.0]],
                                                                   "d": [[[1.0], [0.0], [2.0]], [[0.5], [1.0], [1.5]]]}}},
     lambda a: vjp(F.nested_io, a)[1]({"a": torch.tensor(1.0), "b": {"c": torch.tensor([[1.0], [2.0], [3.0]]),
                                                                      "d": (torch.tensor([[1.0], [0.0], [2.0]]),
                                                                            torch.tensor([[0.5], [1.0], [1.5]]))}})[0]),
]


@pytest.mark.parametrize(("name", "endpoint", "inputs", "options", "want"), VECTOR_CASES,
                         ids=[f"{v[0]}-{v[1]}-{i}" for i, v in enumerate(VECTOR_CASES)])
def test_vectors_nested_as_torch_nests_them(c, name, endpoint, inputs, options, want):
    """A tuple of equal-shaped leaves written as plain JSON lists reads as one array
    (``[1.0, 2.0]`` for two 0-d tangents): torch.func.jvp's own pytree primals
    ``((one, one), one, one)`` were a 422 "tangents[0]: expected 2 entries", their
    flat list of leaves "tangents: expected 3 entries", and two 0-d outputs'
    cotangents ``[1.0, 2.0]`` "expected one array of shape [], got float32"."""
    got, _ = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, want(*t(inputs)), rtol=1e-5)


def test_a_split_vector_of_the_wrong_shape_names_its_path(c):
    r = post(c, "nested_io", "vjp", [NESTED], cotangents={"a": 1.0, "b": {"c": [[1.0], [2.0], [3.0]],
                                                                          "d": [[1.0, 0.0, 2.0], [0.5, 1.0, 1.5]]}})
    assert assert_problem(r, 422, "invalid_input")["detail"] == "cotangents.b.d[0]: expected shape [3, 1], got [3]"


# --- TestJac / TestHessian / functional_call, replayed: answered as torch answers ---

M23, M35, M55, M53 = rand(2, 3), rand(3, 5), rand(5, 5), rand(5, 3)
TORCH_CASES = [
    # (function, endpoint, inputs, options, torch's answer)
    # test_multiple_args, test_argnums_effect_on_return: argnums=1, (0,) a tuple of one
    ("mul", "jacobian", [X, Y], {"argnums": 1}, jacrev(F.mul, argnums=1)),
    ("mul", "jacobian", [X, Y], {"argnums": [0], "mode": "fwd"}, jacfwd(F.mul, argnums=(0,))),
    # test_multiple_outputs_multiple_argnums / _single_argnums / _pytree
    ("two_outputs", "jacobian", [X, Y], {"argnums": [0, 1]}, jacrev(F.two_outputs, argnums=(0, 1))),
    ("two_outputs", "jacobian", [X, Y], {"argnums": [0], "mode": "fwd"}, jacfwd(F.two_outputs, argnums=(0,))),
    ("left_right", "jacobian", [X, Y], {"argnums": [-1, 0]}, jacrev(F.left_right, argnums=(-1, 0))),
    # test_multiple_inputs_pytree, test_multiple_inputs_outputs_pytree: a tuple parameter
    # of 0-d leaves in, a tuple holding a dict out, every argnums torch's test takes
    *[(name, "jacobian", [(A, B), A, B], options, jacrev(getattr(F, name), **want))
      for name in ("pytree_in", "pytree_in_out")
      for options, want in [({}, {}), ({"argnums": [0]}, {"argnums": (0,)}), ({"argnums": [0, 1]}, {"argnums": (0, 1)}),
                            ({"argnums": [0, 1, 2], "mode": "fwd"}, {"argnums": (0, 1, 2)}),
                            ({"argnums": [-1, 0], "chunk_size": 1}, {"argnums": (-1, 0)})]],
    ("pytree_in_out", "hessian", [(A, B), A, B], {"argnums": [0, 2]}, hessian(F.pytree_in_out, argnums=(0, 2))),
    # test_multiple_inputs_outputs_pytree_multidim: a dict in, a dict out
    ("dict_in_dict_out", "jacobian", [{"a": X, "b": Y}], {}, jacrev(F.dict_in_dict_out)),
    ("dict_in_dict_out", "jacobian", [{"a": X, "b": Y}], {"mode": "fwd"}, jacfwd(F.dict_in_dict_out)),
    # test_outputs_can_any_pytree: [(out, {"a": x, "out": [x, out]})], at each chunk size
    *[("composite_output", "jacobian", [M23], {"chunk_size": cs}, jacrev(F.composite_output, chunk_size=cs))
      for cs in (None, 1, 4)],
    ("composite_output", "jacobian", [np.stack([M23, -M23])], {"batched": True, "chunk_size": 1},
     vmap(jacrev(F.composite_output))),
    # test_diff_numel, test_take, test_dimensionality (0-d in, 0-d out)
    ("diff_numel", "jacobian", [rand(2, 4)], {}, jacrev(F.diff_numel)),
    ("diff_numel", "jacobian", [rand(2, 4)], {"mode": "fwd"}, jacfwd(F.diff_numel)),
    ("take", "jacobian", [rand(5)], {}, jacrev(F.take)),
    ("sin_sq", "jacobian", [A], {}, jacrev(F.sin_sq)),
    # test_against_reference_multi_input / _multi_output (three shapes, a 0-d) / _zero_dim
    ("multi_input", "jacobian", [M23, M35], {"argnums": [0, 1]}, jacrev(F.multi_input, argnums=(0, 1))),
    *[("multi_input_output", "jacobian", [M53, M35], {"argnums": [0, 1], "chunk_size": cs},
       jacrev(F.multi_input_output, argnums=(0, 1))) for cs in (None, 1, 7)],
    ("multi_input_output", "jacobian", [M53, M35], {"argnums": [0, 1], "mode": "fwd"},
     jacfwd(F.multi_input_output, argnums=(0, 1))),
    ("zero_dim_outputs", "jacobian", [X, Y], {"argnums": [0, 1]}, jacrev(F.zero_dim_outputs, argnums=(0, 1))),
    # test_against_reference_default_arg, test_jac_with_non_tensor_args
    ("default_arg", "jacobian", [X, Y], {"argnums": [0, 1]}, jacrev(F.default_arg, argnums=(0, 1))),
    ("non_tensor_arg", "jacobian", [rand(3, 3), np.array(3)], {"mode": "fwd"}, jacrev(F.non_tensor_arg)),
    # TestJvp.test_jvp_new_tensor; views as outputs (a strided slice, a transpose, an expand)
    ("new_tensor", "jvp", [rand(4, 4)], {"tangents": np.zeros((4, 4)).tolist()},
     lambda x: jvp(F.new_tensor, (x,), (torch.zeros(4, 4),))[1]),
    ("noncontiguous_out", "jacobian", [rand(4)], {}, jacrev(F.noncontiguous_out)),
    ("noncontiguous_out", "jacobian", [rand(4)], {"mode": "fwd"}, jacfwd(F.noncontiguous_out)),
    # TestHessian: several arguments, argnums in any order; an output unrelated to one
    # input, and to all
    ("hessian_multi", "hessian", [M23, M35, M55], {"argnums": [2, 0, 1]}, hessian(F.hessian_multi, argnums=(2, 0, 1))),
    ("hessian_unrelated", "hessian", [X[:2], Y], {"argnums": [0, 1]}, hessian(F.hessian_unrelated, argnums=(0, 1))),
    ("hessian_constant", "hessian", [X[:2], Y], {"argnums": [0, 1]}, hessian(F.hessian_constant, argnums=(0, 1))),
    ("two_outputs", "hessian", [A, B], {"argnums": [0, 1]}, hessian(F.two_outputs, argnums=(0, 1))),
    # test_jacfwd_different_levels: vmap(hessian(loss)) == vmap(jacrev(jacrev(loss)))
    ("levels_loss", "hessian", [0.1 * rand(3, 2, 2), rand(3, 4, 2), rand(3, 4, 2)], {"batched": True},
     vmap(jacrev(jacrev(F.levels_loss)))),
    # functional_call: a module's parameters as a dict parameter, its buffers beside them
    ("net_call", "jacobian", [PARAMS, X], {"argnums": [0, 1]}, jacrev(F.net_call, argnums=(0, 1))),
    ("net_call_buffers", "jacobian", [PARAMS, {"scale": np.array([1.0, 3.0], np.float32)}, X], {"argnums": [0, 1, 2]},
     jacrev(F.net_call_buffers, argnums=(0, 1, 2))),
    ("net_loss", "hessian", [PARAMS, X, Y[:2]], {"argnums": [0, 1]}, hessian(F.net_loss, argnums=(0, 1))),
    # per-example: vmap(jacrev(f)) over every input, pytree parameters' leaves stacked; an
    # input vmap would take with in_dims=None is sent repeated (or with in_dims, round 10)
    ("mul", "jacobian", [np.stack([X, Y]), np.stack([Y, X])], {"batched": True, "argnums": [0, 1]},
     vmap(jacrev(F.mul, argnums=(0, 1)))),
    ("pytree_in_out", "jacobian", [(rand(4), rand(4)), rand(4), rand(4)], {"batched": True, "argnums": [0, 2]},
     vmap(jacrev(F.pytree_in_out, argnums=(0, 2)))),
    ("net_loss", "jacobian", [{k: np.stack([v] * 3) for k, v in PARAMS.items()}, rand(3, 3), rand(3, 2)], {"batched": True},
     lambda p, x, y: vmap(jacrev(F.net_loss), in_dims=(None, 0, 0))({k: v[0] for k, v in p.items()}, x, y)),
]


@pytest.mark.parametrize(("name", "endpoint", "inputs", "options", "want"), TORCH_CASES,
                         ids=[f"{v[0]}-{v[1]}-{i}" for i, v in enumerate(TORCH_CASES)])
def test_torch_eager_transform_cases(c, name, endpoint, inputs, options, want):
    got, _ = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, want(*t(inputs)), rtol=1e-5)


# --- aux: TestJvp / TestVjp's test_aux_tensor, test_aux_pytree; numbers and None beside ---


@pytest.mark.parametrize("name", ["aux_cos", "aux_pytree"])
@pytest.mark.parametrize(("endpoint", "options"), [("jvp", {"tangents": Y.tolist()}), ("vjp", {"cotangents": Y.tolist()}),
                                                   ("jacobian", {"mode": "fwd", "chunk_size": 1})])
def test_aux_as_torch(c, name, endpoint, options):
    fn, x, v = getattr(F, name), t(X), t(Y)
    got, doc = answer(post(c, name, endpoint, [X], **options), endpoint)
    if endpoint == "jvp":
        _, want, aux = jvp(fn, (x,), (v,), has_aux=True)
    elif endpoint == "vjp":
        _, pullback, aux = vjp(fn, x, has_aux=True)
        (want,) = pullback(v)
    else:
        want, aux = jacfwd(fn, has_aux=True)(x)
    same(got, want, rtol=1e-5)
    same(wire.decode_tree(doc["aux"]), aux)


def test_aux_numbers_and_none_ride_beside(c):
    """torch.func refuses aux that is no tensor ("Expected tensors, got unsupported
    type int"); the service carries numbers, strings and None (README), on jvp too."""
    got, doc = answer(post(c, "aux_numbers", "jvp", [X], tangents=Y.tolist()), "jvp")
    x = t(X)
    same(got, jvp(no_aux(F.aux_numbers), (x,), (t(Y),))[1], rtol=1e-5)
    aux = wire.decode_tree(doc["aux"])
    assert {k: aux[k] for k in ("n", "f", "none", "s")} == {"n": 1, "f": 1.5, "none": None, "s": "abc"}
    same(aux["t"][0], x.cos())
    assert aux["t"][1] == 2
    with pytest.raises(RuntimeError, match="Expected tensors, got unsupported type"):
        jvp(F.aux_numbers, (x,), (t(Y),), has_aux=True)


# --- where torch raises: a 500 function_error saying what torch says ---


@pytest.mark.parametrize(
    ("name", "endpoint", "options", "torch_call", "says"),
    [
        # requires_grad_ inside a transformed function (on a detached copy, even)
        *[("requires_grad_inside", endpoint, options, call, "requires_grad_()")
          for endpoint, options, call in [("jacobian", {}, lambda x: jacrev(F.requires_grad_inside)(x)),
                                          ("jacobian", {"mode": "fwd"}, lambda x: jacfwd(F.requires_grad_inside)(x)),
                                          ("hessian", {}, lambda x: hessian(F.requires_grad_inside)(x)),
                                          ("vjp", {"cotangents": [1, 1, 1]}, lambda x: vjp(F.requires_grad_inside, x)),
                                          ("jvp", {"tangents": [1, 1, 1]},
                                           lambda x: jvp(F.requires_grad_inside, (x,), (torch.ones(3),)))]],
        # an integer output beside a float one: reverse mode refuses it
        ("with_int_output", "jacobian", {}, lambda x: jacrev(F.with_int_output)(x), "floating"),
        ("with_int_output", "hessian", {}, lambda x: hessian(F.with_int_output)(x), "floating"),
        ("with_int_output", "vjp", {"cotangents": [[1, 1, 1], [1, 1, 1]]}, lambda x: vjp(F.with_int_output, x),
         "floating"),
    ],
)
def test_where_torch_raises_the_function_fails(c, name, endpoint, options, torch_call, says):
    # (an integer output did not fail: no derivative was there to ask for, the request's 422)
    status, code = (422, "invalid_input") if name == "with_int_output" else (500, "function_error")
    body = assert_problem(post(c, name, endpoint, [X], **options), status, code)
    assert says in body["detail"]
    with pytest.raises(RuntimeError):
        torch_call(t(X))


def test_where_torch_answers_an_integer_output_so_does_jvp(c):
    """torch.func.jvp answers an integer output's tangent (int64 zeros), a stack too."""
    x = t(X)
    got, _ = answer(post(c, "with_int_output", "jvp", [X], tangents=[1, 2, 3]), "jvp")
    same(got, jvp(F.with_int_output, (x,), (torch.tensor([1.0, 2, 3]),))[1])
    vs = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    got, _ = answer(post(c, "with_int_output", "jvp", [X], tangents=vs.tolist(), batched_vectors=True), "jvp")
    same(got, vmap(lambda v: jvp(F.with_int_output, (x,), (v,))[1])(vs))
    got, _ = answer(post(c, "requires_grad_inside", "evaluate", [X]), "output")  # no transform: it runs
    same(got, F.requires_grad_inside(x))


# --- dtypes on the wire: float64 and float16 as sent, bfloat16 as float32, no complex ---


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize(
    ("endpoint", "options", "want"),
    [
        ("jacobian", {"mode": "fwd"}, lambda x: jacrev(F.sin_sq)(x)),
        ("hessian", {}, lambda x: hessian(F.sin_sq)(x)),
        ("vjp", {"cotangents": [1, 2, 3]}, lambda x: vjp(F.sin_sq, x)[1](torch.tensor([1, 2, 3], dtype=x.dtype))[0]),
        ("jvp", {"tangents": [1, 2, 3]}, lambda x: jvp(F.sin_sq, (x,), (torch.tensor([1, 2, 3], dtype=x.dtype),))[1]),
    ],
)
def test_float_dtypes_as_torch(c, dtype, endpoint, options, want):
    x = X.astype(dtype)
    got, _ = answer(post(c, "sin_sq", endpoint, [x], **options), endpoint)
    same(got, want(t(x)), rtol=1e-3 if dtype == "float16" else None)


@pytest.mark.parametrize(
    ("endpoint", "options", "want"),
    [
        ("jacobian", {}, lambda x: jacrev(F.sin_sq)(x)),
        ("jacobian", {"mode": "fwd"}, lambda x: jacrev(F.sin_sq)(x)),
        ("jacobian", {"batched": True}, lambda x: vmap(jacrev(F.sin_sq))(x.reshape(3, 1))),
        ("vjp", {"cotangents": [1, 2, 3]}, lambda x: vjp(F.sin_sq, x)[1](torch.tensor([1.0, 2, 3]).bfloat16())[0]),
        ("jvp", {"tangents": [1, 2, 3]}, lambda x: jvp(F.sin_sq, (x,), (torch.tensor([1.0, 2, 3]).bfloat16(),))[1]),
        ("evaluate", {}, F.sin_sq),
    ],
)
def test_bfloat16_computes_in_bfloat16(c, endpoint, options, want):
    """NumPy has no bfloat16: sent in JSON, it computes in bfloat16 and answers
    torch's bfloat16 values exactly, as float32 arrays (README)."""
    x = np.array([0.3, -1.2, 2.0], np.float32)
    shape = [3, 1] if options.get("batched") else [3]
    r = c.post(f"/v1/functions/sin_sq/{endpoint}",
               json={"inputs": [{"dtype": "bfloat16", "shape": shape, "data": x.reshape(shape).tolist()}], **options})
    got, _ = answer(r, "output" if endpoint == "evaluate" else endpoint)
    w = want(torch.tensor(x).bfloat16())
    assert w.dtype == torch.bfloat16
    same(got, w.float(), rtol=0)


def test_a_float32_input_keeps_its_dtype_under_a_bfloat16_output(c):
    """jacrev's blocks take the input's dtype (float32), whatever the output's."""
    for mode in ("rev", "fwd"):
        got, _ = answer(post(c, "returns_bfloat16", "jacobian", [X], mode=mode), "jacobian")
        same(got, jacrev(F.returns_bfloat16)(t(X)))


def test_complex_inputs_are_refused_as_jacrev_refuses_them(c):
    """test_complex_error (C -> C): jacrev wants real inputs; the wire carries none."""
    r = c.post("/v1/functions/sin_sq/jacobian", json={"inputs": [{"dtype": "complex64", "shape": [1], "data": [1]}]})
    assert "unsupported dtype complex64 here: inputs and tangents are real" in assert_problem(r, 422, "invalid_input")["detail"]
    buf = io.BytesIO()
    np.save(buf, np.array([1 + 2j], np.complex64))
    r = c.post("/v1/functions/sin_sq/jacobian", content=buf.getvalue(), headers={"content-type": wire.NPY})
    assert "unsupported dtype complex64" in assert_problem(r, 422, "invalid_input")["detail"]
    with pytest.raises(RuntimeError, match="jacrev: Expected all inputs"):
        jacrev(lambda z: z.conj())(torch.ones(1, dtype=torch.cfloat))


@pytest.mark.parametrize("media", [wire.NPY, wire.NPZ])
def test_fortran_order_arrays_as_their_values(c, media):
    x = np.asfortranarray(rand(3, 2, dtype="float64"))
    buf = io.BytesIO()
    np.save(buf, x) if media == wire.NPY else np.savez(buf, x=x)
    r = c.post("/v1/functions/sin_sq/jacobian", content=buf.getvalue(), headers={"content-type": media, "accept": media})
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content)) if media == wire.NPY else wire.read_result_npz(r.content)[0]["jacobian"]
    same(got, jacrev(F.sin_sq)(torch.from_numpy(np.ascontiguousarray(x))))


def test_a_bfloat16_output_keeps_vmap(c, caplog):
    """vmap's products are checked against one product of combined vectors, in the
    vectors' dtype: a bfloat16 output's cotangents rounded the random weights, 2^-9 off
    against a float32 tolerance, so every Jacobian of a bfloat16 output (and stacked
    vectors, per-example Jacobians) was taken for vmap being wrong: "vmap of
    scaled_bfloat16's pullback disagrees with one VJP; using the row loop", one VJP per
    row for every later request of the function."""
    xs = rand(2, 5)
    with caplog.at_level("WARNING", logger="jacobian_service.engine"):
        got, _ = answer(post(c, "scaled_bfloat16", "jacobian", [xs[0]]), "jacobian")
        same(got, jacrev(F.scaled_bfloat16)(t(xs[0])))
        got, _ = answer(post(c, "scaled_bfloat16", "jacobian", [xs], batched=True), "jacobian")
        same(got, vmap(jacrev(F.scaled_bfloat16))(t(xs)))
        vs = rand(3, 5)
        got, _ = answer(post(c, "scaled_bfloat16", "vjp", [xs[0]], cotangents=vs.tolist(), batched_vectors=True), "vjp")
        _, pullback = vjp(F.scaled_bfloat16, t(xs[0]))
        same(got, vmap(pullback)(t(vs).bfloat16())[0])
    assert not [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]


def test_meta_chunk_size_is_one_where_rows_ran_one_by_one(c):
    """test_chunk_jacrev_chunksize_one: where vmap cannot run the backward, the rows
    run one VJP each, and meta.chunk_size (the rows one vmap took) said the chunk asked
    for (5, or 2 with chunk_size=2) while no vmap ran; it says 1, as per-example
    Jacobians of the same function say."""
    x = rand(5)
    want = jacrev(F.row_by_row, chunk_size=1)(t(x))
    with pytest.raises(RuntimeError):
        jacrev(F.row_by_row, chunk_size=2)(t(x))
    for options in ({}, {"chunk_size": 2}, {"rows": [1, 4]}, {"mode": "fwd"}):
        got, doc = answer(post(c, "row_by_row", "jacobian", [x], **options), "jacobian")
        same(got, want[slice(*options.get("rows", [0, 5]))])
        assert doc["meta"]["chunk_size"] == 1, options


def test_a_streamed_jacobian_says_one_row_per_vmap_where_rows_run_one_by_one():
    """The same for a streamed .npy, whose X-Chunk-Size is sent before any row runs:
    once the function is known to run its rows one by one."""
    from jacobian_service import Settings, create_app
    from starlette.testclient import TestClient

    x = rand(6)
    buf = io.BytesIO()
    np.save(buf, x)
    settings = Settings(warmup=False, functions=FUNCTIONS, stream_threshold_bytes=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for _ in range(2):  # the first learns that vmap cannot run it; the second streams knowing
            r = client.post("/v1/functions/row_by_row/jacobian", content=buf.getvalue(),
                            headers={"content-type": wire.NPY, "accept": wire.NPY})
            assert r.status_code == 200, r.text
            same(np.load(io.BytesIO(r.content)), jacrev(F.row_by_row, chunk_size=1)(t(x)))
        assert r.headers["x-chunk-size"] == "1"


def test_a_shared_parameter_is_in_dims_null_or_sent_repeated_alike(c):
    """Per-example requests were vmap(jacrev(f)) over every input's leading dimension
    only, a 422 for in_dims / out_dims: they are options now (tests/test_parity_round10.py).
    A parameter shared by every example, in_dims=None, answers as the same parameter sent
    once per example does (test_torch_eager_transform_cases, net_loss)."""
    x, y = rand(2, 3), rand(2, 2)
    repeated = [{k: np.stack([v] * 2) for k, v in PARAMS.items()}, x, y]
    got, _ = answer(post(c, "net_loss", "jacobian", [PARAMS, x, y], batched=True, in_dims=[None, 0, 0]), "jacobian")
    want, _ = answer(post(c, "net_loss", "jacobian", repeated, batched=True), "jacobian")
    same(got, want)
    same(got, vmap(jacrev(F.net_loss), in_dims=(None, 0, 0))(t(PARAMS), t(x), t(y)))
