"""Hessian, evaluate, vjp and jvp through HTTP equal their torch.func counterparts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import assert_problem, assert_tree_close, decode, npy_bytes, npz_bytes
from .test_api_jacobian import BUILTINS, example_inputs, post


def tensors(arrays):
    return [torch.from_numpy(a.copy()) for a in arrays]


@pytest.mark.parametrize("name", ["sum_sin", "sin", "softmax", "planar_arm", "lorenz96", "polar", "sin_aux"])
@pytest.mark.parametrize("transport", ["json", "npz"])
def test_hessian_equals_torch_func_hessian(client, builtins, name, transport):
    spec = builtins.get(name)
    inputs = example_inputs(name)
    got, doc = decode(post(client, name, inputs, transport, endpoint="hessian", accept=wire.NPZ if transport == "npz" else None), "hessian")
    fn = (lambda *a: spec.fn(*a)[0]) if spec.has_aux else spec.fn
    want = torch.func.hessian(fn)(*tensors(inputs))
    assert_tree_close(got, want, rtol=1e-6, atol=1e-8)
    if spec.has_aux:
        aux = doc["aux"] if transport == "npz" else wire.decode_tree(doc["aux"])
        assert_tree_close(aux, spec.fn(*tensors(inputs))[1])


@pytest.mark.parametrize("name", ["no_grad_square", "sin"])
def test_the_hessian_of_an_empty_input_is_torchs(client, name):
    """A function that computes under no_grad is held to torch's own Hessian strategy
    (jacfwd over jacrev), which cannot take the service's aux over an input of no
    elements (IndexError in jacfwd): /hessian of no_grad_square at x = [] was a 500 where
    torch.func.hessian answers an empty (0, 0, 0). (Found by test_fuzz.)"""
    from jacobian_service import examples

    want = torch.func.hessian(getattr(examples, name))(torch.zeros(0))
    r = client.post(f"/v1/functions/{name}/hessian", json={"inputs": [[]]})
    got, _ = decode(r, "hessian")
    assert np.asarray(got).shape == tuple(want.shape) == (0, 0, 0)


def test_hessian_sum_sin_is_diag_minus_sin(client):
    x = example_inputs("sum_sin")[0]
    got, _ = decode(post(client, "sum_sin", [x], "json", endpoint="hessian"), "hessian")
    np.testing.assert_allclose(got, np.diag(-np.sin(x)), rtol=1e-12)


@pytest.mark.parametrize("argnums", [(0, 1), 1])
def test_hessian_argnums(client, builtins, argnums):
    inputs = example_inputs("add_square")
    wire_argnums = list(argnums) if isinstance(argnums, tuple) else argnums
    got, _ = decode(post(client, "add_square", inputs, "json", endpoint="hessian", argnums=wire_argnums), "hessian")
    want = torch.func.hessian(builtins.get("add_square").fn, argnums=argnums)(*tensors(inputs))
    assert_tree_close(got, want)


def test_batched_hessian(client, builtins):
    xs = example_inputs("sum_sin", batch=3)
    got, _ = decode(post(client, "sum_sin", xs, "json", endpoint="hessian", batched=True), "hessian")
    want = torch.func.vmap(torch.func.hessian(builtins.get("sum_sin").fn))(*tensors(xs))
    assert_tree_close(got, want)


@pytest.mark.parametrize("name", BUILTINS)
def test_evaluate(client, builtins, name):
    spec = builtins.get(name)
    inputs = example_inputs(name)
    got, doc = decode(post(client, name, inputs, "json", endpoint="evaluate"), "output")
    want = spec.fn(*tensors(inputs))
    if spec.has_aux:
        want, aux = want
        assert_tree_close(wire.decode_tree(doc["aux"]), aux)
    assert_tree_close(got, want)


def test_evaluate_batched_npy(client, builtins):
    xs = example_inputs("mlp", batch=5)
    got, _ = decode(post(client, "mlp", xs, "npy", endpoint="evaluate", accept=wire.NPY, batched=True), "output")
    assert_tree_close(got, torch.func.vmap(builtins.get("mlp").fn)(*tensors(xs)), rtol=1e-5)


def test_vjp_single_and_batched(client, builtins):
    x = example_inputs("softmax")[0]
    v = np.random.default_rng(1).standard_normal((3, x.size))
    _, pullback = torch.func.vjp(builtins.get("softmax").fn, torch.from_numpy(x))
    doc = client.post("/v1/functions/softmax/vjp", json={"inputs": [x.tolist()], "cotangents": v[0].tolist()})
    got, _ = decode(doc, "vjp")
    # plain numbers take float32 for a floating input
    assert_tree_close(got, pullback(torch.from_numpy(v[0]))[0].float(), rtol=1e-5, atol=1e-6)
    body = {"inputs": [wire.encode_tree(x)], "cotangents": wire.encode_tree(v), "batched_vectors": True}
    got, _ = decode(client.post("/v1/functions/softmax/vjp", content=wire.dumps(body)), "vjp")
    want = torch.func.vmap(pullback)(torch.from_numpy(v))[0]
    assert_tree_close(got, want)


def test_vjp_tuple_output_and_argnums_npz(client, builtins):
    r, th = example_inputs("polar")
    cot = [np.ones(r.size), np.arange(r.size, dtype=np.float64)]
    _, pullback = torch.func.vjp(builtins.get("polar").fn, *tensors([r, th]))
    want = pullback(tuple(tensors(cot)))
    body = npz_bytes(r=r, theta=th, **{"cotangents/0": cot[0], "cotangents/1": cot[1]})
    response = client.post("/v1/functions/polar/vjp?argnums=0,1", content=body, headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    got, _ = decode(response, "vjp")
    assert_tree_close(got, want)


def test_tuple_cotangents_as_plain_nested_lists(client, builtins):
    """Found by a red team: [[1, 0], [0, 1]] for polar's two outputs was read as one 2x2
    array and refused ("expected 2 entries"); its rows are the two cotangents."""
    r, th = np.array([1.0, 2.0]), np.array([0.3, -0.4])
    _, pullback = torch.func.vjp(builtins.get("polar").fn, *tensors([r, th]))
    want = pullback((torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)))[0]
    body = {"inputs": [r.tolist(), th.tolist()], "cotangents": [[1, 0], [0, 1]]}
    got, _ = decode(client.post("/v1/functions/polar/vjp", json=body), "vjp")
    np.testing.assert_allclose(got, want.numpy().astype(got.dtype), rtol=1e-6)
    # batched: rows of (batch, n) each
    body = {"inputs": [r.tolist(), th.tolist()], "cotangents": [[[1, 0], [2, 0]], [[0, 1], [0, 0]]], "batched_vectors": True}
    got, _ = decode(client.post("/v1/functions/polar/vjp", json=body), "vjp")
    want = torch.func.vmap(pullback)((torch.tensor([[1.0, 0], [2, 0]], dtype=torch.float64),
                                      torch.tensor([[0.0, 1], [0, 0]], dtype=torch.float64)))[0]
    np.testing.assert_allclose(got, want.numpy().astype(got.dtype), rtol=1e-6)


def test_jvp_single_and_batched(client, builtins):
    r, th = example_inputs("polar")
    fn = builtins.get("polar").fn
    t = np.random.default_rng(2).standard_normal((4, r.size))
    body = {"inputs": [wire.encode_tree(r), wire.encode_tree(th)], "tangents": wire.encode_tree(t[0]), "argnums": "theta"}
    got, _ = decode(client.post("/v1/functions/polar/jvp", content=wire.dumps(body)), "jvp")
    want = torch.func.jvp(lambda a: fn(torch.from_numpy(r), a), (torch.from_numpy(th),), (torch.from_numpy(t[0]),))[1]
    assert_tree_close(got, want)
    body = {"inputs": [wire.encode_tree(r), wire.encode_tree(th)], "tangents": [wire.encode_tree(t), wire.encode_tree(t)], "argnums": [0, 1], "batched_vectors": True}
    got, _ = decode(client.post("/v1/functions/polar/jvp", content=wire.dumps(body)), "jvp")
    want = torch.func.vmap(lambda a: torch.func.jvp(fn, tuple(tensors([r, th])), (a, a))[1])(torch.from_numpy(t))
    assert_tree_close(got, want)


def test_derivatives_torch_answers_with_a_zero_tensor(client):
    """Found by an OpInfo sweep: torch answers some derivatives with its storage-less zero
    tensor, which ``.numpy()`` refuses: a 500 ``internal_error`` (with a logged traceback)
    for ``jvp`` of ``slogdet`` (the sign's tangent), batched or not, and for the Hessian
    of ``|x|.sum()`` (``l1_loss``, ``norm(x, inf)``: ``jacrev(jacrev)`` gives one)."""
    from .user_functions import slogdet_2x2 as fn

    x = np.array([1.0, 2.0, 3.0, 4.0])
    t = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, -1.0, 2.0, 0.0]])
    for tangents, batched in ((t[0], False), (t, True)):
        body = {"inputs": [wire.encode_tree(x)], "tangents": wire.encode_tree(tangents), "batched_vectors": batched}
        for accept in (wire.JSON, wire.NPZ):
            got, _ = decode(client.post("/v1/functions/slogdet_2x2/jvp", content=wire.dumps(body), headers={"accept": accept}), "jvp")
            push = lambda v: torch.func.jvp(fn, (torch.from_numpy(x),), (v,))[1]  # noqa: E731
            want = torch.func.vmap(push)(torch.from_numpy(t)) if batched else push(torch.from_numpy(t[0]))
            assert_tree_close(got, tuple(w if not w._is_zerotensor() else torch.zeros_like(w) for w in want))
    body = {"inputs": [wire.encode_tree(x)], "mode": "fwd"}
    got, _ = decode(client.post("/v1/functions/slogdet_2x2/jacobian", content=wire.dumps(body)), "jacobian")
    assert_tree_close(got, torch.func.jacrev(fn)(torch.from_numpy(x)))
    for accept in (wire.JSON, wire.NPY):
        got, _ = decode(client.post("/v1/functions/l1_norm/hessian", json={"inputs": [[0.5, -1.0, 2.0]]}, headers={"accept": accept}), "hessian")
        np.testing.assert_array_equal(got, np.zeros((3, 3), dtype=np.float32))
        got, _ = decode(client.post("/v1/functions/l1_norm/hessian", json={"inputs": [[[0.5, -1.0], [2.0, 1.0]]], "batched": True},
                                    headers={"accept": accept}), "hessian")
        np.testing.assert_array_equal(got, np.zeros((2, 2, 2), dtype=np.float32))


def test_outputs_torch_answers_as_a_lazily_negated_view(client):
    """Found by a hostile-function probe: ``polar(1, t).conj().imag`` is ``-sin t``, which
    torch answers as a view with its negative bit set; ``.numpy()`` refuses such a tensor,
    and ``evaluate`` (JSON, .npz, batched), the output beside a Jacobian, and aux holding
    one were a 500 ``internal_error`` with a logged traceback."""
    from .user_functions import imag_of_conjugate as fn

    t = np.array([0.5, 1.0, 2.0])
    want, aux = fn(torch.from_numpy(t))
    for accept in (wire.JSON, wire.NPZ):
        got, doc = decode(client.post("/v1/functions/imag_of_conjugate/evaluate", json={"inputs": [t.tolist()]},
                                      headers={"accept": accept}), "output")
        assert_tree_close(got, want.resolve_neg())
        assert_tree_close(doc["aux"] if accept == wire.NPZ else wire.decode_tree(doc["aux"]), {"y": aux["y"].resolve_neg()})
    got, _ = decode(client.post("/v1/functions/imag_of_conjugate/evaluate", json={"inputs": [[t.tolist()] * 2], "batched": True},
                                headers={"accept": wire.NPZ}), "output")
    assert_tree_close(got, torch.stack([want, want]).resolve_neg())
    got, doc = decode(client.post("/v1/functions/imag_of_conjugate/jacobian", json={"inputs": [t.tolist()], "return_output": True}))
    assert_tree_close(got, torch.func.jacrev(lambda x: fn(x)[0])(torch.from_numpy(t)))
    assert_tree_close(wire.decode_tree(doc["output"]), want.resolve_neg())


def test_a_nested_tensor_output_is_the_functions_error(client):
    """``torch.nested.nested_tensor`` (of layout strided) passed the layout check: its copy
    to the host raised torch's "Internal error", our 500 ``internal_error`` for
    ``evaluate`` (``jacrev`` itself refuses one, as the function's error)."""
    r = client.post("/v1/functions/nested_rows/evaluate", json={"inputs": [[0.5, 1.0]]})
    assert_problem(r, 500, "function_error")
    assert "holds a nested tensor" in r.json()["detail"], r.text
    assert_problem(client.post("/v1/functions/nested_rows/jacobian", json={"inputs": [[0.5, 1.0]]}), 500, "function_error")


@pytest.mark.parametrize("transport", ["json", "npz"])
def test_cotangents_for_an_int_keyed_dict_output_go_by_key(client, transport):
    """Found by a torch.func parity probe: an output ``{1: a, 0: b}`` (torch's pytrees take
    int keys) has cotangents keyed ``"1"`` and ``"0"`` on the wire, which were read as
    positions: ``"0"`` went to the output's first entry, key ``1``, and the ``vjp`` was
    wrong with a 200."""
    from .user_functions import int_keyed

    x = np.array([0.3, -0.7, 1.1])
    c1, c0 = np.array([1.0, 2.0, 3.0]), np.array([-1.0, 0.5, 4.0])
    _, pullback = torch.func.vjp(int_keyed, torch.from_numpy(x))
    want = pullback({1: torch.from_numpy(c1), 0: torch.from_numpy(c0)})[0]
    if transport == "json":
        body = {"inputs": [wire.encode_tree(x)], "cotangents": {"1": wire.encode_tree(c1), "0": wire.encode_tree(c0)}}
        response = client.post("/v1/functions/int_keyed/vjp", content=wire.dumps(body))
    else:
        response = client.post("/v1/functions/int_keyed/vjp", content=npz_bytes(x=x, **{"cotangents/1": c1, "cotangents/0": c0}),
                               headers={"content-type": wire.NPZ})
    got, _ = decode(response, "vjp")
    assert_tree_close(got, want)


def test_vjp_shape_mismatch_is_422(client):
    response = client.post("/v1/functions/sin/vjp", json={"inputs": [[1.0, 2.0]], "cotangents": [1.0, 2.0, 3.0]})
    assert response.status_code == 422 and response.json()["code"] == "invalid_input"
    assert "cotangents" in response.json()["detail"]


def test_hessian_strategy_is_measured_and_forward_ad_gaps_are_bridged(client):
    from .user_functions import no_forward_ad

    x = [0.3, -0.7, 1.1]
    with pytest.raises(NotImplementedError, match="jvp"):  # torch.func.hessian is jacfwd(jacrev)
        torch.func.hessian(no_forward_ad)(torch.tensor(x))
    want = torch.func.jacrev(torch.func.jacrev(no_forward_ad))(torch.tensor(x))
    for _ in range(2):  # first call measures, second uses the remembered strategy
        got, doc = decode(client.post("/v1/functions/no_forward_ad/hessian", json={"inputs": [x]}), "hessian")
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
        # reverse over reverse, whole or by output rows (the same products): the faster
        assert doc["meta"]["mode"] in ("jacrev_jacrev", "jacrev_rows")
    got, doc = decode(client.post("/v1/functions/sum_sin/hessian", json={"inputs": [x]}), "hessian")
    assert doc["meta"]["mode"] in ("jacrev_grad", "jacfwd_jacrev", "jacrev_jacrev")


def test_a_hessian_strategy_that_cannot_win_is_not_timed(make_client, monkeypatch):
    """Measuring strategies runs each: reverse over reverse, one pullback per output and
    input element, was timed for mlp's 64 outputs too (3.6 s of a 4 s first Hessian, to
    find it 10x slower). It is timed where it can win (few outputs), and mlp's first
    Hessian is torch's or by output rows (gaps round 1), as every later one."""
    from jacobian_service.engine import hessian as hessian_module
    from jacobian_service.examples import mlp, planar_arm

    ran: list[str] = []

    def counted(name: str, make):
        def make_counted(g, a):
            fn = make(g, a)
            return lambda *p: (ran.append(name), fn(*p))[1]

        return make_counted

    monkeypatch.setattr(hessian_module, "STRATEGIES", {k: counted(k, v) for k, v in hessian_module.STRATEGIES.items()})
    client = make_client()  # in process: the engine runs the patched strategies
    for fn, x in ((mlp, np.linspace(-1, 1, 128, dtype=np.float32)), (planar_arm, np.array([0.3, -0.2, 0.5], np.float32))):
        ran.clear()
        for _ in range(2):
            got, doc = decode(client.post(f"/v1/functions/{fn.__name__}/hessian", json={"inputs": [x.tolist()]}),
                              "hessian")
            np.testing.assert_allclose(got, torch.func.hessian(fn)(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
        if fn is mlp:
            # (reverse over reverse by output rows is timed too, and as fast here: either may win)
            assert "jacrev_jacrev" not in ran and doc["meta"]["mode"] in ("jacfwd_jacrev", "jacrev_rows")
        else:  # two outputs: both timed on the first call
            assert {"jacfwd_jacrev", "jacrev_jacrev"} <= set(ran)


# torch.no_grad stops reverse mode only: forward mode sees through it, so for a function
# that uses it jacfwd is not jacrev, and Hessian strategies are not torch.func.hessian.
X3 = [1.5, -0.3, 2.0]


@pytest.mark.parametrize("mode", ["fwd", "auto"])
@pytest.mark.parametrize("batched", [False, True])
def test_forward_modes_answer_jacrev_for_a_function_computing_under_no_grad(client, mode, batched):
    from .user_functions import no_grad_long

    x = np.array([X3, [0.5, 1.0, -2.0]] if batched else X3, np.float32)
    jac = torch.func.jacrev(no_grad_long)
    want = torch.func.vmap(jac)(torch.from_numpy(x)) if batched else jac(torch.from_numpy(x))
    assert not torch.allclose(want, torch.func.jacfwd(no_grad_long)(torch.from_numpy(x[-1] if batched else x)))
    for _ in range(2):  # the first call finds it out, the second remembers
        got, doc = decode(post(client, "no_grad_long", [x], "json", mode=mode, batched=batched), "jacobian")
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        assert doc["meta"]["mode"] == "rev"


@pytest.mark.parametrize("batched", [False, True])
def test_forward_mode_without_a_forward_rule_answers_jacrev(make_client, batched):
    """`mode=fwd` on a custom autograd.Function without jvp: jacrev's Jacobian, not a 500
    (the result never depends on `mode`); a function that fails of itself still fails."""
    from .user_functions import no_forward_ad

    client = make_client()  # a fresh engine: nothing learnt yet about the function
    x = np.array([X3, [0.5, 1.0, -2.0]] if batched else X3, np.float32)
    jac = torch.func.jacrev(no_forward_ad)
    want = torch.func.vmap(jac)(torch.from_numpy(x)) if batched else jac(torch.from_numpy(x))
    for _ in range(2):  # the first call finds out, the second goes straight to reverse mode
        got, doc = decode(post(client, "no_forward_ad", [x], "json", mode="fwd", batched=batched), "jacobian")
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        assert doc["meta"]["mode"] == "rev"
    r = post(client, "broken", [x], "json", mode="fwd", batched=batched)
    assert r.status_code == 500 and r.json()["code"] == "function_error"


@pytest.mark.parametrize("mode", ["fwd", "auto"])
def test_forward_mode_blocks_take_jacrevs_dtypes(client, mode):
    from .user_functions import mixed_dtypes, to_float32

    x = np.array(X3)  # float64 in, float32 out: jacrev's Jacobian is float64, jacfwd's float32
    got, doc = decode(post(client, "to_float32", [x], "npz", mode=mode, accept=wire.NPZ), "jacobian")
    want = torch.func.jacrev(to_float32)(torch.from_numpy(x))
    # jacfwd's values are float32's (the cast rounds its tangents), jacrev's float64's:
    # reverse mode answers (forward mode's dtypes: test_parity_round19's float32 input)
    assert doc["meta"]["mode"] == "rev" and got.dtype == np.float64 and want.dtype == torch.float64
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
    inputs = [np.array(X3, np.float32), np.array([0.2, 0.4, -1.0])]
    got, _ = decode(post(client, "mixed_dtypes", inputs, "json", mode="fwd", argnums=[0, 1]), "jacobian")
    want = torch.func.jacrev(mixed_dtypes, argnums=(0, 1))(*tensors(inputs))
    assert [g.dtype for g in got] == [np.float32, np.float64] == [w.numpy().dtype for w in want]
    assert_tree_close(got, want)


@pytest.mark.parametrize("name", ["no_grad_scalar", "grad_off_vector"])
def test_hessian_of_a_function_computing_under_no_grad_is_torchs_every_time(client, name):
    from . import user_functions

    fn = getattr(user_functions, name)
    x = np.array(X3, np.float64)
    want = torch.func.hessian(fn)(torch.from_numpy(x))
    assert not torch.allclose(want, torch.func.jacrev(torch.func.jacrev(fn))(torch.from_numpy(x)))
    for _ in range(3):  # the first call measures strategies for other functions; every call is torch's
        got, doc = decode(post(client, name, [x], "json", endpoint="hessian"), "hessian")
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
        assert doc["meta"]["mode"] == "jacfwd_jacrev"
    xs = np.array([X3, [0.5, 1.0, -2.0]])
    got, _ = decode(post(client, name, [xs], "json", endpoint="hessian", batched=True), "hessian")
    np.testing.assert_allclose(got, torch.func.vmap(torch.func.hessian(fn))(torch.from_numpy(xs)).numpy(), rtol=1e-12)


def test_hessian_blocks_take_torchs_dtypes(client):
    from .user_functions import mixed_dtypes

    inputs = [np.array(X3, np.float32), np.array([0.2, 0.4, -1.0])]
    want = torch.func.hessian(mixed_dtypes, argnums=(0, 1))(*tensors(inputs))
    for transport in ("json", "npz"):
        got, doc = decode(post(client, "mixed_dtypes", inputs, transport, endpoint="hessian", argnums=[0, 1],
                               accept=wire.NPZ if transport == "npz" else None), "hessian")
        assert [[b.dtype for b in row] for row in got] == [[b.numpy().dtype for b in row] for row in want]
        assert_tree_close(got, want, rtol=1e-5)
    xs = [np.stack([inputs[0], inputs[0] * 2]), np.stack([inputs[1], inputs[1]])]
    got, _ = decode(post(client, "mixed_dtypes", xs, "json", endpoint="hessian", argnums=[0, 1], batched=True), "hessian")
    want = torch.func.vmap(torch.func.hessian(mixed_dtypes, argnums=(0, 1)))(*tensors(xs))
    assert [[b.dtype for b in row] for row in got] == [[b.numpy().dtype for b in row] for row in want]


def test_batched_hessian_tries_the_next_strategy_where_one_fails(client):
    """Found by an OpInfo sweep (native_layer_norm): a per-example Hessian of a scalar ran
    ``jacrev(grad)`` alone, and torch has none for a layer norm with a bias and no weight
    (an undefined gradient in its double backward), so ``batched=true`` was a 500
    ``function_error`` where ``vmap(torch.func.hessian)`` answers and the plain Hessian
    tries the next strategy. Now per-example Hessians try them too."""
    from .user_functions import layer_norm_bias_loss as fn

    rng = np.random.default_rng(3)
    xs, bs = rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 3))
    with pytest.raises(RuntimeError, match="undefined Tensor"):  # the premise: torch lacks this strategy
        torch.func.jacrev(torch.func.grad(fn, argnums=(0, 1)), argnums=(0, 1))(*tensors([xs[0], bs[0]]))
    want = torch.func.vmap(torch.func.hessian(fn, argnums=(0, 1)))(*tensors([xs, bs]))
    for _ in range(2):  # the second learned which strategy runs
        got, doc = decode(post(client, "layer_norm_bias_loss", [xs, bs], "json", endpoint="hessian", argnums=[0, 1],
                               batched=True), "hessian")
        assert_tree_close(got, want, rtol=1e-10, atol=1e-12)
        assert doc["meta"]["mode"] == "jacrev_jacrev"


def test_stacked_vectors_are_answered_where_vmap_cannot_run_their_products(client):
    """Found by an OpInfo sweep: ``batched_vectors`` ran the products under ``vmap`` only,
    so where torch's vmap cannot run them (no batching rule for ``masked_select``'s
    backward with a broadcast mask, a custom ``autograd.Function`` without a vmap rule)
    vjp, jvp and hvp were a 500 ``function_error`` for a stack of vectors while each
    vector alone is answered, and so is the Jacobian (its rows then loop). Now the
    vectors go one at a time there: the stack of the single answers."""
    from .user_functions import cube_no_vmap_sum, masked_select_broadcast

    x3, xn = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    vs = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 4)))
    ts = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 3)))
    _, pullback = torch.func.vjp(masked_select_broadcast, x3)
    push = lambda t: torch.func.jvp(cube_no_vmap_sum, (xn,), (t,))[1]  # noqa: E731
    hvp = lambda t: torch.func.jvp(torch.func.grad(cube_no_vmap_sum), (xn,), (t,))[1]  # noqa: E731
    cases = [("masked_select_broadcast", "vjp", x3, "cotangents", vs, lambda v: pullback(v)[0]),
             ("cube_no_vmap_sum", "jvp", xn, "tangents", ts, push),
             ("cube_no_vmap_sum", "hvp", xn, "tangents", ts, hvp)]
    for name, endpoint, x, key, vectors, one in cases:
        with pytest.raises(RuntimeError):  # the premise: torch's vmap cannot run these products
            torch.func.vmap(one)(vectors)
        want = torch.stack([one(v) for v in vectors])
        for accept in (wire.JSON, wire.NPZ):
            body = {"inputs": [wire.encode_tree(x.numpy())], key: wire.encode_tree(vectors.numpy()), "batched_vectors": True}
            got, _ = decode(client.post(f"/v1/functions/{name}/{endpoint}", content=wire.dumps(body), headers={"accept": accept}),
                            endpoint)
            assert_tree_close(got, want, rtol=1e-12, atol=1e-12)


def test_per_example_jacobians_where_torchs_vmap_of_the_pullback_fails_or_is_wrong(client):
    """Found with the probe behind the test below: per-example Jacobians ran
    ``vmap(jacrev(f, chunk_size))`` as it is, so where torch's vmap of the pullback fails
    (``masked_select`` with a broadcast mask, 4 rows) ``batched=true`` was a 500 while
    the plain Jacobian loops over its rows, and where it is silently wrong (chunks of 2
    rows) 2.0 off with a 200. Now the first example is checked against one VJP (once per
    signature and chunk size) and the rows go one at a time where vmap fails or is wrong.
    (Runs before the plain test below: a plain Jacobian's finding also serves batches.)"""
    from .user_functions import masked_select_broadcast as fn

    xs = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    want = np.stack([torch.func.jacrev(fn, chunk_size=1)(torch.from_numpy(x)).numpy() for x in xs])
    for chunk_size in (2, None):
        body = {"inputs": [wire.encode_tree(xs)], "batched": True, "chunk_size": chunk_size}
        got, _ = decode(client.post("/v1/functions/masked_select_broadcast/jacobian", content=wire.dumps(body)))
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_products_torchs_vmap_gets_wrong_are_computed_one_at_a_time(client):
    """Found by an OpInfo sweep: torch's vmap of ``masked_select``'s backward, with a mask
    broadcast over the input, is silently wrong when it batches as many vectors as the
    mask has rows (two here): a Jacobian asked in chunks of 2 rows was 2.0 off and a vjp
    of 2 stacked cotangents 2.4 off, with a 200 (``torch.func.jacrev(chunk_size=2)`` is
    wrong the same way; ``chunk_size=1`` is right: the result depended on ``chunk_size``).
    vmap's products are now checked once per signature and batch size against one
    product (linearity), and computed one at a time where they disagree."""
    from .user_functions import masked_select_broadcast as fn

    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    _, pullback = torch.func.vjp(fn, x)
    want = torch.stack([pullback(e)[0] for e in torch.eye(4, dtype=torch.float64)])
    assert not torch.allclose(torch.func.jacrev(fn, chunk_size=2)(x), want)  # the premise: torch's own is wrong
    body = {"inputs": [wire.encode_tree(x.numpy())], "chunk_size": 2}
    got, _ = decode(client.post("/v1/functions/masked_select_broadcast/jacobian", content=wire.dumps(body)))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
    cotangents = np.random.default_rng(6).standard_normal((2, 4))
    body = {"inputs": [wire.encode_tree(x.numpy())], "cotangents": wire.encode_tree(cotangents), "batched_vectors": True}
    got, _ = decode(client.post("/v1/functions/masked_select_broadcast/vjp", content=wire.dumps(body)), "vjp")
    np.testing.assert_allclose(got, cotangents @ want.numpy(), rtol=1e-12)


def test_sparse_products_torchs_vmap_gets_wrong_are_computed_one_at_a_time(client):
    """The same torch vmap bug in the sparse path: a compressed reverse-mode Jacobian of
    ``masked_select`` with a broadcast mask takes 2 VJPs, vmapped over 2 seeds, as many as
    the mask has rows: 2.0 off with a 200. Checked once per function, shapes and seeds."""
    from .user_functions import masked_select_broadcast as fn

    x = np.array([1.0, 2.0, 3.0])
    want = torch.func.jacrev(fn, chunk_size=1)(torch.from_numpy(x)).numpy()
    body = {"inputs": [wire.encode_tree(x)], "sparsity": "auto", "mode": "rev", "sparse_format": "dense"}
    for _ in range(2):  # the second knows the verdict
        got, doc = decode(client.post("/v1/functions/masked_select_broadcast/jacobian", content=wire.dumps(body)))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert doc["meta"]["products"] == 2


def test_the_check_of_vmaps_products_keeps_vmap_where_rows_are_not_finite(client):
    """The check above compares vmap's rows with one product by linearity, which does not
    hold for infinities (``log`` at 0: a row's 0/0 is NaN where the mixed product's w/0 is
    infinite): such entries give no verdict, so the function keeps vmap of its pullback."""
    from .user_functions import log

    x = np.array([0.0, 1.0, 2.0])
    got, _ = decode(client.post("/v1/functions/log/jacobian", content=wire.dumps({"inputs": [wire.encode_tree(x)]})))
    np.testing.assert_array_equal(got, torch.func.jacrev(log)(torch.from_numpy(x)).numpy())
    assert client.app.service_state.engines.workers[0].worker.engine.profiles["log"].vmap_pullback


def test_a_hessian_torchs_vmap_gets_wrong_is_not_answered(client):
    """Found by an OpInfo sweep: where torch.func.hessian raises (its vmap of
    ``masked_select``'s backward with a broadcast mask fails), ``jacrev(grad)`` runs and is
    silently wrong (36 off here), and the check meant for such answers (central differences
    of jacrev) gave up because jacrev itself fails under vmap: a 200 with the wrong Hessian,
    batched or not. The check now takes jacrev row by row there and refuses it: torch's error."""
    from .user_functions import masked_select_cube as fn

    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    true = torch.diag(6 * x * torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    assert (torch.func.jacrev(torch.func.grad(fn))(x) - true).abs().max() > 1  # the premise: torch's vmap is wrong
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        torch.func.hessian(fn)(x)
    for inputs, options in (([1.0, 2.0, 3.0], {}), ([[1.0, 2.0, 3.0]], {"batched": True})):
        body = {"inputs": [wire.encode_tree(np.array(inputs))], **options}
        response = client.post("/v1/functions/masked_select_cube/hessian", content=wire.dumps(body))
        assert "split_with_sizes" in assert_problem(response, 500, "function_error")["detail"]


def test_a_hessian_strategy_torchs_vmap_gets_wrong_is_not_chosen(client):
    """Found by an OpInfo sweep: ``torch.func.hessian`` (and ``jacrev(jacrev)``) of a layer
    norm's weighted sum is wrong in torch 2.13 (its vmap of layer_norm's double backward),
    1.7 off here, while ``jacrev(grad)``, one HVP and finite differences agree: which the
    service answered depended on the strategy measured fastest. Each measured strategy is
    now checked against one HVP (no vmap) and one that disagrees is not chosen."""
    from jacobian_service.engine.hessian import agrees_with_hvp

    from .user_functions import layer_norm_affine_sum as fn

    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((2, 3)), rng.standard_normal(3), rng.standard_normal(3)]
    x = tuple(tensors(inputs))
    right = torch.func.jacrev(torch.func.grad(fn, argnums=(0, 1, 2)), argnums=(0, 1, 2))(*x)
    torchs = torch.func.hessian(fn, argnums=(0, 1, 2))(*x)
    assert max((a - b).abs().max() for a, b in zip(torch.utils._pytree.tree_leaves(right),
                                                   torch.utils._pytree.tree_leaves(torchs))) > 0.5  # the premise
    g = lambda *p: (fn(*p), ())  # noqa: E731
    assert agrees_with_hvp(g, x, (0, 1, 2), right) and not agrees_with_hvp(g, x, (0, 1, 2), torchs)
    for _ in range(2):  # the first call measures the strategies
        got, _ = decode(post(client, "layer_norm_affine_sum", inputs, "json", endpoint="hessian", argnums=[0, 1, 2]), "hessian")
        assert_tree_close(got, right, rtol=1e-9, atol=1e-10)


def test_a_hessian_through_a_function_reading_one_triangle_is_torchs(client):
    """Found by the same sweep: ``jacrev(grad)`` of a function of ``linalg.cholesky(a)``
    symmetrises the triangle cholesky does not read, torch's own forward over reverse
    does not, so the service answered ``torch.func.hessian``'s or another (0.2 off) by
    which strategy was measured fastest. The HVP check keeps torch's."""
    from jacobian_service.engine.hessian import agrees_with_hvp

    from .user_functions import cholesky_weighted as fn

    m = np.random.default_rng(8).standard_normal((3, 3))
    a = m @ m.T + 3 * np.eye(3)
    (x,) = tensors([a])
    torchs, revgrad = torch.func.hessian(fn)(x), torch.func.jacrev(torch.func.grad(fn))(x)
    assert (torchs - revgrad).abs().max() > 0.05  # the premise: the strategies differ
    g = lambda p: (fn(p), ())  # noqa: E731
    assert agrees_with_hvp(g, (x,), 0, torchs) and not agrees_with_hvp(g, (x,), 0, revgrad)
    got, _ = decode(post(client, "cholesky_weighted", [a], "json", endpoint="hessian"), "hessian")
    np.testing.assert_allclose(got, torchs.numpy(), rtol=1e-10, atol=1e-12)


def test_a_per_example_hessian_through_a_function_reading_one_triangle_is_torchs(client):
    """The same for ``batched=true``: per-example Hessians of a scalar ran ``jacrev(grad)``
    under vmap, 0.2 off torch's own for every example. The first example is now checked
    against one HVP (once per signature), and torch's own runs example by example."""
    from .user_functions import cholesky_weighted as fn

    ms = np.random.default_rng(9).standard_normal((2, 3, 3))
    a = ms @ ms.transpose(0, 2, 1) + 3 * np.eye(3)
    want = torch.stack([torch.func.hessian(fn)(x) for x in tensors([a])[0]])
    for _ in range(2):  # the second knows the strategy
        got, doc = decode(post(client, "cholesky_weighted", [a], "json", endpoint="hessian", batched=True), "hessian")
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
        assert doc["meta"]["mode"] == "jacfwd_jacrev"


# ----------------------------------------------------------------------------- hvp (issue 12)


def _hvp_reference(fn, x, t):
    return torch.func.jvp(torch.func.grad(fn), (torch.from_numpy(x),), (torch.from_numpy(t),))[1]


def test_hvp_single_batched_and_with_output(client, builtins):
    fn = builtins.get("sum_sin").fn
    x = example_inputs("sum_sin")[0]
    t = np.random.default_rng(3).standard_normal((4, x.size))
    body = {"inputs": [wire.encode_tree(x)], "tangents": wire.encode_tree(t[0])}
    got, doc = decode(client.post("/v1/functions/sum_sin/hvp", content=wire.dumps(body)), "hvp")
    assert_tree_close(got, _hvp_reference(fn, x, t[0]), rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, -np.sin(x) * t[0], rtol=1e-12)  # H = diag(-sin x)
    assert "output" not in doc
    body = {"inputs": [wire.encode_tree(x)], "tangents": wire.encode_tree(t), "batched_vectors": True, "return_output": True}
    got, doc = decode(client.post("/v1/functions/sum_sin/hvp", content=wire.dumps(body)), "hvp")
    assert got.shape == t.shape
    want = torch.func.vmap(lambda v: torch.func.jvp(torch.func.grad(fn), (torch.from_numpy(x),), (v,))[1])(torch.from_numpy(t))
    assert_tree_close(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(wire.decode_tree(doc["output"]), np.sin(x).sum(), rtol=1e-12)


def test_hvp_npz_and_query_options(client, builtins):
    x = example_inputs("sum_sin")[0]
    t = np.random.default_rng(4).standard_normal((2, x.size))
    body = npz_bytes(x=x, tangents=t)
    response = client.post("/v1/functions/sum_sin/hvp?batched_vectors=true&return_output=true", content=body,
                           headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    got, doc = decode(response, "hvp")
    np.testing.assert_allclose(got, -np.sin(x) * t, rtol=1e-12)
    np.testing.assert_allclose(doc["output"], np.sin(x).sum(), rtol=1e-12)


def test_hvp_refuses_non_scalar_outputs_and_bad_tangents(client):
    for name, inputs in (("sin", [[0.1, 0.2]]), ("polar", [[1.0], [0.5]])):
        response = client.post(f"/v1/functions/{name}/hvp", json={"inputs": inputs, "tangents": [1.0]})
        assert response.status_code == 422 and response.json()["code"] == "invalid_input", response.text
        assert "scalar" in response.json()["detail"]
    response = client.post("/v1/functions/sum_sin/hvp", json={"inputs": [[1.0, 2.0]], "tangents": [1.0, 2.0, 3.0]})
    assert response.status_code == 422 and "tangents" in response.json()["detail"]
    response = client.post("/v1/functions/sum_sin/hvp", json={"inputs": [[1.0, 2.0]]})
    assert response.status_code == 422 and "tangents" in response.json()["detail"]
    response = client.post("/v1/functions/sum_sin/hvp", json={"inputs": [[1.0, 2.0]], "tangents": [1.0, 2.0], "batched": True})
    assert response.status_code == 422 and "batched_vectors" in response.json()["detail"]


def test_hvp_is_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "post" in paths["/v1/functions/{name}/hvp"]
    schema = paths["/v1/functions/{name}/hvp"]["post"]["requestBody"]["content"][wire.JSON]["schema"]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    while "$ref" in schema:  # the request body is a named component
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    assert "tangents" in schema["required"] and "tangents" in schema["properties"]


# ----------------------------------------------------------------------------- functions that write into their inputs

XW = np.array([1.0, 2.0, -3.0], np.float32)


def _fresh(fn):
    """``fn`` on a copy of its inputs every call: torch's answer for the values sent."""
    return lambda *a: fn(*[t.clone() for t in a])


def _torch_answer(endpoint, fn, x, vector=None):
    t = torch.from_numpy(x.copy())
    if endpoint == "jacobian":
        return torch.func.jacrev(fn)(t)
    if endpoint == "jacobian_fwd":
        return torch.func.jacfwd(fn)(t)
    if endpoint == "batched":
        return torch.func.vmap(torch.func.jacrev(_fresh(fn)))(t)
    if endpoint == "hessian":
        return torch.func.hessian(fn)(t)
    if endpoint == "vjp":
        return torch.func.vjp(fn, t)[1](torch.from_numpy(vector))[0]
    if endpoint == "jvp":
        return torch.func.jvp(fn, (t,), (torch.from_numpy(vector),))[1]
    return torch.func.jvp(torch.func.grad(fn), (t,), (torch.from_numpy(vector),))[1]  # hvp


@pytest.mark.parametrize(
    "endpoint, name, options",
    [
        ("jacobian", "doubles_in_place", {}),
        ("jacobian", "doubles_in_place", {"return_output": True}),
        ("batched", "doubles_in_place", {"batched": True}),
        ("batched", "doubles_in_place", {"batched": True, "mode": "fwd", "return_output": True}),
        ("hessian", "doubles_in_place_sum", {}),
        ("vjp", "doubles_in_place", {"cotangents": [1.0, 0.5, 2.0]}),
        ("jvp", "doubles_in_place_fwd", {"tangents": [1.0, 0.5, 2.0]}),
        ("hvp", "doubles_in_place_sum", {"tangents": [1.0, 0.5, 2.0]}),
    ],
)
def test_a_function_writing_into_its_inputs_is_differentiated_at_the_values_sent(make_client, endpoint, name, options):
    """jacrev calls the function once; the service may call it more often (to learn the
    output's size, whether it switches grad off, which Hessian strategy is fastest), and
    each of those calls once doubled the inputs again: 48 x**2 where torch says 12 x**2."""
    from . import user_functions

    fn = getattr(user_functions, name)
    client = make_client()  # nothing learnt yet: the first call looks at the function most
    x = np.stack([XW, XW * 0.5]) if endpoint == "batched" else XW
    vector = np.array(options.get("cotangents") or options.get("tangents") or [0.0], np.float32)
    want = _torch_answer(endpoint, fn, x, vector)
    path = {"jacobian_fwd": "jacobian", "batched": "jacobian"}.get(endpoint, endpoint)
    key = {"vjp": "vjp", "jvp": "jvp", "hvp": "hvp", "hessian": "hessian"}.get(path, "jacobian")
    for _ in range(2):  # what the first call learns must not change the second's answer
        got, doc = decode(post(client, name, [x], "json", endpoint=path, **options), key)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        if options.get("return_output"):
            out = torch.func.vmap(_fresh(fn))(torch.from_numpy(x)) if x.ndim == 2 else fn(torch.from_numpy(x.copy()))
            np.testing.assert_allclose(wire.decode_tree(doc["output"]), out.numpy(), rtol=1e-6)


def test_stacked_requests_of_a_function_writing_into_its_inputs_get_their_own_answers(make_client):
    from concurrent.futures import ThreadPoolExecutor

    from .user_functions import doubles_in_place

    client = make_client(max_batch_wait_ms=300, max_batch_size=8)
    decode(post(client, "doubles_in_place", [XW], "json"))  # a key seen the first time runs alone
    xs = [XW * (i + 1) for i in range(6)]
    with ThreadPoolExecutor(len(xs)) as pool:
        responses = list(pool.map(lambda x: post(client, "doubles_in_place", [x], "json"), xs))
    sizes = []
    for x, r in zip(xs, responses):
        got, doc = decode(r)
        sizes.append(doc["meta"]["batch_size"])
        np.testing.assert_allclose(got, torch.func.jacrev(doubles_in_place)(torch.from_numpy(x.copy())).numpy(), rtol=1e-6)
    assert max(sizes) > 1, sizes  # the stacked path ran


@pytest.mark.parametrize("batched", [False, True])
def test_a_hessian_where_a_faster_strategy_gives_nan_is_torchs(make_client, batched):
    """|x|**3 at 0: jacrev(grad) answers NaN, torch.func.hessian (jacfwd over jacrev) 0."""
    from .user_functions import norm_cubed

    client = make_client()
    x = np.zeros((2, 3) if batched else 3, np.float32)
    hess = torch.func.hessian(norm_cubed)
    want = torch.func.vmap(hess)(torch.from_numpy(x)) if batched else hess(torch.from_numpy(x))
    assert torch.isnan(torch.func.jacrev(torch.func.grad(norm_cubed))(torch.zeros(3))).all()
    away = np.array([[0.5, -1.0, 2.0]] * 2 if batched else [0.5, -1.0, 2.0], np.float32)
    for point in (away, x, away, x):  # the winner is measured away from 0, then kept
        got, doc = decode(post(client, "norm_cubed", [point], "json", endpoint="hessian", batched=batched), "hessian")
        if point is x:
            np.testing.assert_array_equal(got, want.numpy())
            assert doc["meta"]["mode"] == "jacfwd_jacrev"
        else:
            assert np.isfinite(got).all() and doc["meta"]["mode"] in ("jacrev_grad", "jacfwd_jacrev", "jacrev_jacrev")


def _fd_hessian(fn, x, eps=1e-6):
    """Central differences of jacrev: the Hessian as a check independent of any strategy."""
    jac = torch.func.jacrev(fn)
    return torch.stack([(jac(x + eps * e) - jac(x - eps * e)) / (2 * eps) for e in torch.eye(x.numel(), dtype=x.dtype)], -1)


@pytest.mark.parametrize("name", ["once_cube_sum", "once_cube_vector"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_hessian_through_a_once_differentiable_backward_is_torchs_not_zero(make_client, name, batched):
    """A custom Function whose backward is @once_differentiable runs it under no_grad:
    reverse over reverse (measured fastest, and the batched default) answered 0 with a
    200 where torch.func.hessian (forward over reverse, through the backward's no_grad)
    and finite differences say 6x (for x**3 * x: a part of the answer missing)."""
    from . import user_functions

    fn = getattr(user_functions, name)
    client = make_client()  # nothing learnt yet: the first call measures strategies
    x = np.array([[0.5, -1.2, 2.0], [1.0, 0.3, -0.7]] if batched else [0.5, -1.2, 2.0])
    t = torch.from_numpy(x)
    want = torch.func.vmap(torch.func.hessian(fn))(t) if batched else torch.func.hessian(fn)(t)
    fd = torch.stack([_fd_hessian(fn, row) for row in t]) if batched else _fd_hessian(fn, t)
    torch.testing.assert_close(want, fd, rtol=1e-5, atol=1e-5)  # torch's is the true Hessian ...
    rev_rev = torch.func.jacrev(torch.func.jacrev(fn))(t[-1] if batched else t)  # ... reverse over reverse
    assert not torch.allclose(rev_rev, want[-1] if batched else want)  # misses the backward's part
    for _ in range(2):  # the first call finds it out, the second remembers
        got, doc = decode(post(client, name, [x], "json", endpoint="hessian", batched=batched), "hessian")
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
        assert doc["meta"]["mode"] == "jacfwd_jacrev"


@pytest.mark.parametrize("options", [{}, {"batched": True}])
def test_a_hessian_through_a_once_differentiable_backward_without_jvp_is_torchs_error(make_client, options):
    """Without a jvp rule torch.func.hessian raises; reverse over reverse answered 0."""
    from .user_functions import once_cube_sum_no_jvp

    client = make_client()
    x = np.array([[0.5, -1.2, 2.0]] * 2 if options else [0.5, -1.2, 2.0])
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.hessian(once_cube_sum_no_jvp)(torch.from_numpy(x[0] if options else x))
    for _ in range(2):
        r = post(client, "once_cube_sum_no_jvp", [x], "json", endpoint="hessian", **options)
        body = assert_problem(r, 500, "function_error")
        assert body["detail"].startswith("NotImplementedError: You must implement the jvp function")


@pytest.mark.parametrize("options", [{}, {"batched": True}])
def test_a_hessian_torch_cannot_compute_is_checked_against_finite_differences(make_client, options):
    """torch.func.hessian raises (no jvp rule); reverse over reverse answered a 200
    missing the part a backward's detached graph hides (-sin x where finite differences
    of jacrev say 6x - sin x). Such an answer is checked, and fails as torch's does;
    one whose backward is whole (no_forward_ad) is still answered."""
    from .user_functions import detached_backward_sum, no_forward_ad

    client = make_client()
    x = np.array([[0.5, -1.2, 2.0], [1.0, 0.3, -0.7]] if options else [0.5, -1.2, 2.0])
    one = torch.from_numpy(x[0] if options else x)
    with pytest.raises(NotImplementedError, match="jvp") as raised:
        torch.func.hessian(detached_backward_sum)(one)
    rev_rev = torch.func.jacrev(torch.func.jacrev(detached_backward_sum))(one)
    assert not torch.allclose(rev_rev, _fd_hessian(detached_backward_sum, one), atol=1e-3)  # the premise
    for _ in range(2):  # measured, then remembered
        body = assert_problem(post(client, "detached_backward_sum", [x], "json", endpoint="hessian", **options),
                              500, "function_error")
        assert body["detail"] == f"NotImplementedError: {raised.value}".splitlines()[0]
    for _ in range(2):
        got, _ = decode(post(client, "no_forward_ad", [x], "json", endpoint="hessian", **options), "hessian")
        hess = torch.func.jacrev(torch.func.jacrev(no_forward_ad))
        want = torch.func.vmap(hess)(torch.from_numpy(x)) if options else hess(torch.from_numpy(x))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)


def test_checking_a_hessian_against_differences_leaves_its_aux_whole(make_client):
    """The check calls the function near x: its aux (a number) is still the one at x."""
    client = make_client()
    x = np.array([0.5, -1.2, 2.0])
    for _ in range(2):
        got, doc = decode(post(client, "no_forward_ad_aux", [x], "json", endpoint="hessian"), "hessian")
        assert doc["meta"]["mode"] in ("jacrev_grad", "jacrev_jacrev") and doc["aux"] == {"sum": x.sum()}


@pytest.mark.parametrize("name", ["custom_op_cube", "doubles_in_place_fwd"])
@pytest.mark.parametrize("sparsity", ["dense", "auto"])
def test_forward_mode_answers_only_where_reverse_mode_does(make_client, name, sparsity):
    """Through a torch.library custom op torch's forward mode drops the tangent silently
    (jacfwd answered the identity, finite differences say 3x**2 + 1) while jacrev raises:
    `mode=fwd` answered that with a 200. It cannot be told from a function only forward
    mode differentiates (an in-place write into its input), so neither is answered where
    jacrev is not: the result never depends on `mode`."""
    from . import user_functions

    fn = getattr(user_functions, name)
    client = make_client()
    x = np.array([0.5, -1.2, 2.0])
    with pytest.raises(RuntimeError) as raised:
        torch.func.jacrev(fn)(torch.from_numpy(x))
    if name == "custom_op_cube":
        fd = torch.stack([(fn(torch.from_numpy(x) + 1e-6 * e) - fn(torch.from_numpy(x) - 1e-6 * e)) / 2e-6
                          for e in torch.eye(3, dtype=torch.float64)], -1)
        torch.testing.assert_close(fd, torch.diag(torch.from_numpy(3 * x**2 + 1)))
        assert not torch.allclose(torch.func.jacfwd(fn)(torch.from_numpy(x)), fd)  # the premise: jacfwd is wrong
    rev = assert_problem(post(client, name, [x], "json", sparsity=sparsity), 500, "function_error")
    assert rev["detail"].startswith(f"RuntimeError: {str(raised.value).splitlines()[0]}"[:80])
    for mode in ("fwd", "auto", "fwd"):
        body = assert_problem(post(client, name, [x], "json", mode=mode, sparsity=sparsity), 500, "function_error")
        assert body["detail"] == rev["detail"]


@pytest.mark.parametrize("options", [{}, {"mode": "fwd"}, {"mode": "auto"}, {"batched": True}, {"batched": True, "mode": "fwd"}])
def test_an_integer_output_is_refused_in_every_mode(client, options):
    x = np.array([[1.0, 2.0]] if options.get("batched") else [1.0, 2.0], np.float32)
    r = post(client, "int_output", [x], "json", **options)
    assert r.status_code == 422 and r.json()["code"] == "invalid_input"  # the request's: no derivative to take
    assert "int64" in r.json()["detail"] and "floating" in r.json()["detail"]  # jacrev's words, or ours in its place


@pytest.mark.parametrize("transport", ["json", "npy"])
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "uint8"])
@pytest.mark.parametrize("endpoint", ["jacobian", "hessian"])
def test_integers_sent_for_a_floating_input_to_differentiate_are_refused(client, transport, dtype, endpoint):
    """jacrev refuses them ("only Tensors of floating point dtype can require gradients");
    plain JSON numbers, which carry no dtype, still take float32."""
    x = np.array([1, 0, 1], dtype)
    r = post(client, "sum_sin", [x], transport, endpoint=endpoint, accept=wire.JSON)
    assert r.status_code == 422 and r.json()["code"] == "invalid_input", r.text
    assert r.json()["detail"].startswith(f"input 'x' is {dtype}; only floating inputs can be differentiated: send it as floats")
    r = client.post(f"/v1/functions/sum_sin/{endpoint}", json={"inputs": [[1, 0, 1]]})
    assert r.status_code == 200 and np.asarray(decode(r, endpoint)[0]).dtype == np.float32
    assert client.post("/v1/functions/sum_sin/evaluate", content=npy_bytes(x), headers={"content-type": wire.NPY}).status_code == 200


@pytest.mark.parametrize("endpoint, options", [
    ("jacobian", {}), ("jacobian", {"mode": "fwd", "return_output": True}), ("hessian", {}), ("evaluate", {}),
])
def test_a_batch_of_no_examples_is_answered_as_vmap_answers_it(client, endpoint, options):
    """torch.vmap over a batch of size 0 answers empty results of the right shape (it was
    a 422); a function vmap cannot run has no answer for it (a loop has no example to
    learn the output from)."""
    x = np.zeros((0, 3), np.float32)
    fn = torch.func.jacrev(torch.sin) if endpoint == "jacobian" else torch.func.hessian(lambda t: t.sin().sum()) \
        if endpoint == "hessian" else torch.sin
    name = "sum_sin" if endpoint == "hessian" else "sin"
    want = torch.func.vmap(fn)(torch.from_numpy(x))
    key = "output" if endpoint == "evaluate" else endpoint
    for transport in ("json", "npz"):
        got, doc = decode(post(client, name, [x], transport, endpoint=endpoint, batched=True,
                               accept=wire.NPZ if transport == "npz" else None, **options), key)
        assert got.shape == tuple(want.shape) and got.dtype == np.float32
        if options.get("return_output"):
            assert np.asarray(doc["output"] if transport == "npz" else wire.decode_tree(doc["output"])).shape == (0, 3)
    r = post(client, "branchy", [x], "json", batched=True)
    assert r.status_code == 422 and "a batch of no examples has no answer" in r.json()["detail"]
    vectors = wire.encode_tree(np.zeros((0, 3), np.float32))
    for ep, key in (("vjp", "cotangents"), ("jvp", "tangents")):
        r = client.post(f"/v1/functions/sin/{ep}", content=wire.dumps({"inputs": [[1.0, 2.0, 3.0]], key: vectors, "batched_vectors": True}))
        assert decode(r, ep)[0].shape == (0, 3)


# ----------------------------------------------------------------------------- forward mode under vmap (torch 2.13)


def _solve_inputs(batch):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((batch, 3, 3)) + 3 * np.eye(3)
    return a, rng.standard_normal((batch, 3))


def test_torch_gets_forward_mode_under_vmap_wrong_for_solve():
    """The premise (if a torch release fixes it, this fails, and the service may use
    forward mode under vmap again)."""
    from .user_functions import det, solve

    a, b = (torch.from_numpy(v) for v in _solve_inputs(4))
    alone = torch.stack([torch.func.jacrev(solve, argnums=1)(a[i], b[i]) for i in range(4)])
    assert (torch.func.vmap(torch.func.jacfwd(solve, argnums=1))(a, b) - alone).abs().max() > 1
    alone = torch.stack([torch.func.hessian(det)(a[i]) for i in range(4)])
    assert (torch.func.vmap(torch.func.hessian(det))(a) - alone).abs().max() > 1


@pytest.mark.parametrize("options", [{"mode": "fwd"}, {"mode": "auto"}, {}])
def test_batched_jacobians_of_solve_equal_each_examples_in_every_mode(client, options):
    from .user_functions import solve

    a, b = _solve_inputs(4)
    got, doc = decode(post(client, "solve", [a, b], "json", batched=True, argnums=[0, 1], **options))
    for i in range(4):
        assert_tree_close(got[0][i], torch.func.jacrev(solve, argnums=0)(*tensors([a[i], b[i]])), rtol=1e-10, atol=1e-12)
        assert_tree_close(got[1][i], torch.func.jacrev(solve, argnums=1)(*tensors([a[i], b[i]])), rtol=1e-10, atol=1e-12)
    assert doc["meta"]["mode"] == "rev"


def test_batched_hessians_of_det_equal_each_examples(client):
    from .user_functions import det

    a, _ = _solve_inputs(4)
    got, doc = decode(post(client, "det", [a], "json", endpoint="hessian", batched=True), "hessian")
    want = torch.stack([torch.func.hessian(det)(torch.from_numpy(a[i])) for i in range(4)])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-10)
    assert doc["meta"]["mode"] in ("jacrev_grad", "jacrev_rows")


@pytest.mark.parametrize("endpoint, options", [("jacobian", {"mode": "fwd"}), ("hessian", {})])
def test_stacked_requests_of_det_and_solve_get_their_own_answers(make_client, endpoint, options):
    """Request batching stacks plain requests into one vmap: forward mode (asked for,
    or a Hessian strategy measured fastest) must not run under it."""
    from concurrent.futures import ThreadPoolExecutor

    from .user_functions import det, solve

    client = make_client(max_batch_wait_ms=300, max_batch_size=8)
    a, b = _solve_inputs(6)
    name, inputs = ("solve", lambda i: [a[i], b[i]]) if endpoint == "jacobian" else ("det", lambda i: [a[i]])
    key = "hessian" if endpoint == "hessian" else "jacobian"
    decode(post(client, name, inputs(0), "json", endpoint=endpoint, **options), key)  # the key's first call runs alone
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: post(client, name, inputs(i), "json", endpoint=endpoint, **options), range(6)))
    sizes = []
    for i, r in enumerate(responses):
        got, doc = decode(r, key)
        sizes.append(doc["meta"]["batch_size"])
        want = torch.func.hessian(det)(torch.from_numpy(a[i])) if endpoint == "hessian" else \
            torch.func.jacrev(solve)(*tensors(inputs(i)))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-10)
    assert max(sizes) > 1, sizes


@pytest.mark.parametrize("batched", [False, True])
def test_the_output_asked_for_is_the_one_differentiated(client, batched):
    """A function drawing at every call: the output comes from the same call as the
    derivative (it came from another call, another draw), batched or not."""
    x = np.array([[1.0, -2.0, 3.0], [0.5, 1.5, -1.0]] if batched else [1.0, -2.0, 3.0], np.float32)
    got, doc = decode(post(client, "noisy", [x], "json", batched=batched, return_output=True))
    diag = np.diagonal(got, axis1=-2, axis2=-1)
    np.testing.assert_allclose(wire.decode_tree(doc["output"]), x * diag, rtol=1e-6)
    got, doc = decode(post(client, "noisy_energy", [x], "json", endpoint="hessian", batched=batched, return_output=True),
                      "hessian")
    diag = np.diagonal(got, axis1=-2, axis2=-1)
    np.testing.assert_allclose(wire.decode_tree(doc["output"]), (diag * x**2).sum(-1) / 2, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fwd", "auto"])
@pytest.mark.parametrize("case", ["prelu at 0", "det of a singular matrix", "away from the kinks"])
def test_forward_mode_answers_jacrevs_jacobian_where_the_function_is_not_differentiable(client, mode, case):
    """Where f has a kink each mode makes its own one-sided choice (jacfwd of prelu at 0
    says 1, jacrev 0.2; of det at a singular matrix 0, jacrev the adjugate); the result
    must not depend on `mode` (SPEC): one reverse product tells, and jacrev answers."""
    from .user_functions import det, prelu3

    name, fn, x = {
        "prelu at 0": ("prelu3", prelu3, np.array([0.0, 1.0, -1.0])),
        "det of a singular matrix": ("det", det, np.array([[1.0, 2.0], [2.0, 4.0]])),
        "away from the kinks": ("prelu3", prelu3, np.array([0.5, 1.0, -1.0])),
    }[case]
    want = torch.func.jacrev(fn)(torch.from_numpy(x))
    differs = not torch.allclose(torch.func.jacfwd(fn)(torch.from_numpy(x)), want)
    assert differs == (case != "away from the kinks")
    got, doc = decode(post(client, name, [x.astype(np.float64 if name == "det" else np.float32)], "json", mode=mode))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)
    if case == "away from the kinks" or mode == "fwd":
        assert doc["meta"]["mode"] == ("fwd" if case == "away from the kinks" else "rev")


@pytest.mark.parametrize("name, options", [
    ("grows_every_other_call", {"mode": "fwd"}),
    ("aux_every_other_call", {"mode": "fwd"}),
    ("grows_every_other_call", {"batched": True}),
    ("keeps_positives", {"batched": True}),
])
def test_results_that_change_between_calls_are_the_functions_error_not_ours(client, name, options):
    """Found by a red team: they were 500 internal_error with a logged traceback (a shape
    mismatch in forward mode's check, StopIteration restoring aux, torch.stack), or a
    200 whose aux mixed two calls."""
    x = np.array([[1.0, -2.0, 3.0], [-1.0, -2.0, 3.0]] if options.get("batched") else [1.0, -2.0, 3.0], np.float32)
    for _ in range(3):  # whichever parity of the call count it starts at
        r = post(client, name, [x], "json", **options)
        if r.status_code == 200:
            got, doc = decode(r)
            if name == "aux_every_other_call":  # an answer's aux is one call's, whole
                assert set(doc["aux"]) in ({"a"}, {"a", "b", "label"})
            continue
        assert r.status_code == 500 and r.json()["code"] == "function_error", r.text
        assert "changed between its calls" in r.json()["detail"] or "cannot be stacked" in r.json()["detail"]
