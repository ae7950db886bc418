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
import time

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from jacobian_client import wire

from . import parity9_functions as F
from .conftest import assert_problem
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
    from starlette.testclient import TestClient

    from jacobian_service import Settings, create_app

    with TestClient(create_app(Settings(warmup=False, functions=FUNCTIONS)), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
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
    # input vmap would take with in_dims=None is sent repeated (the service has no in_dims)
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
