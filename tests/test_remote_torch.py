"""jacobian_client.torch: remote functions inside torch autograd and torch.func, compared
with the same functions run in-process, with the exact requests each operation makes."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import Input, register  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from . import user_functions as uf  # noqa: E402
from ._remote_support import Counted, cc, counted, oc, own_url, url  # noqa: E402,F401 (fixtures)

f = torch.func


def close(got, want, tol=1e-12):
    if isinstance(want, (tuple, list)):
        assert isinstance(got, type(want)) and len(got) == len(want)
        for g, w in zip(got, want):
            close(g, w, tol)
        return
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            close(got[k], want[k], tol)
        return
    assert isinstance(got, torch.Tensor), type(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- training


class Model(torch.nn.Module):
    """features -> joint angles (local layers) -> end effector (remote or local planar_arm)."""

    def __init__(self, arm) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(4, 8, dtype=torch.float64)
        self.angles = torch.nn.Linear(8, 3, dtype=torch.float64)
        self.arm = arm

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.arm(self.angles(torch.tanh(self.hidden(features))))


def _train(model: Model, features: torch.Tensor, target: torch.Tensor, steps: int = 20):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(features) - target) ** 2).sum()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return losses, grads


def test_the_server_runs_in_its_process_layout(cc):
    """The adapters are tested against `jacobian-service serve` as deployed: engines in
    their own process, behind more than one front end (not the in-process app)."""
    info = cc.client.info()
    assert info["engines"] == "processes" and info["front_ends"] == 2, info
    cc.take()


def test_training_through_a_remote_function_equals_local_training(cc):
    features = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
    target = torch.tensor([1.5, 1.2], dtype=torch.float64)
    local_losses, local_grads = _train(Model(ex.planar_arm), features, target)
    remote_losses, remote_grads = _train(Model(remote(cc.client, "planar_arm")), features, target)
    assert cc.take() == ["evaluate", "vjp"] * 20  # one value and one vjp per step
    np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-10, atol=1e-10)
    assert local_losses[-1] < local_losses[0] / 2  # it did train
    for got, want in zip(remote_grads, local_grads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_batched_training_with_vmap_equals_local(cc):
    """A minibatch through vmap(remote): one batched evaluate and one batched Jacobian
    (per-example vjps) per step."""
    torch.manual_seed(1)
    features = torch.randn(6, 4, dtype=torch.float64)
    target = torch.randn(6, 2, dtype=torch.float64)
    local_losses, local_grads = _train(Model(f.vmap(ex.planar_arm)), features, target)
    remote_losses, remote_grads = _train(Model(f.vmap(remote(cc.client, "planar_arm"))), features, target)
    assert cc.take() == ["evaluate+batched", "jacobian+batched"] * 20
    np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-10, atol=1e-10)
    for got, want in zip(remote_grads, local_grads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- torch.func


def test_jacrev_is_one_evaluate_and_one_batched_vjp(cc):
    arm = remote(cc.client, "planar_arm")
    x = torch.tensor([0.3, -0.2, 0.5, 1.1], dtype=torch.float64)
    close(f.jacrev(arm)(x), f.jacrev(ex.planar_arm)(x))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    close(f.jacfwd(arm)(x), f.jacfwd(ex.planar_arm)(x))
    assert cc.take() == ["evaluate", "jvp+batched_vectors"]


def test_vmap_is_one_batched_evaluate(cc):
    arm = remote(cc.client, "planar_arm")
    xs = torch.randn(5, 3, dtype=torch.float64)
    close(f.vmap(arm)(xs), f.vmap(ex.planar_arm)(xs))
    assert cc.take() == ["evaluate+batched"]
    # in_dims other than 0, and an input left unbatched (sent once: the request's in_dims)
    r, th = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    close(f.vmap(remote(cc.client, "polar"), in_dims=(1, None))(r, th), f.vmap(ex.polar, in_dims=(1, None))(r, th))
    assert cc.take() == ["evaluate+batched"]
    # nested vmap: still one request
    xss = torch.randn(2, 3, 4, dtype=torch.float64)
    close(f.vmap(f.vmap(arm))(xss), f.vmap(f.vmap(ex.planar_arm))(xss))
    assert cc.take() == ["evaluate+batched"]


def test_per_example_derivatives(cc):
    arm = remote(cc.client, "planar_arm")
    xs = torch.randn(4, 3, dtype=torch.float64)
    close(f.vmap(f.jacrev(arm))(xs), f.vmap(f.jacrev(ex.planar_arm))(xs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]
    loss = lambda g: lambda x: (g(x) ** 2).sum()  # noqa: E731
    close(f.vmap(f.grad(loss(arm)))(xs), f.vmap(f.grad(loss(ex.planar_arm)))(xs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]
    close(f.vmap(f.jacfwd(arm))(xs), f.vmap(f.jacfwd(ex.planar_arm))(xs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]
    # jacrev of a vmapped function: per-example inputs and a batch of cotangents
    close(f.jacrev(f.vmap(arm))(xs), f.jacrev(f.vmap(ex.planar_arm))(xs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]


def test_jvp_and_grad(cc):
    arm = remote(cc.client, "planar_arm")
    x, t = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    close(f.jvp(arm, (x,), (t,)), f.jvp(ex.planar_arm, (x,), (t,)))
    assert cc.take() == ["evaluate", "jvp"]
    s = remote(cc.client, "sum_sin")
    close(f.grad(s)(x), f.grad(ex.sum_sin)(x))
    assert cc.take() == ["evaluate", "vjp"]
    close(f.vjp(arm, x)[1](t[:2])[0], f.vjp(ex.planar_arm, x)[1](t[:2])[0])
    assert cc.take() == ["evaluate", "vjp"]


def test_tuple_outputs_several_inputs_and_argnums(cc):
    polar = remote(cc.client, "polar")
    r, th = torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64)
    close(polar(r, th), ex.polar(r, th))
    assert cc.take() == ["evaluate"]
    close(f.jacrev(polar, argnums=(0, 1))(r, th), f.jacrev(ex.polar, argnums=(0, 1))(r, th))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    close(f.jacrev(polar, argnums=1)(r, th), f.jacrev(ex.polar, argnums=1)(r, th))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    close(f.jacfwd(polar, argnums=(0, 1))(r, th), f.jacfwd(ex.polar, argnums=(0, 1))(r, th))
    assert cc.take() == ["evaluate", "jvp+batched_vectors"]
    # only one output used: the other gets zero cotangents, still one vjp
    rg = r.clone().requires_grad_()
    polar(rg, th)[1].sum().backward()
    rl = r.clone().requires_grad_()
    ex.polar(rl, th)[1].sum().backward()
    close(rg.grad, rl.grad)
    assert cc.take() == ["evaluate", "vjp"]


def test_a_backward_pass_asks_only_for_the_gradients_it_uses(cc):
    """torch.autograd.grad(loss, x) (an input gradient: saliency, adversarial examples,
    PDE residuals) or backward(inputs=[...]) while the function's other inputs (weights)
    require grad too: the vjp request asked for every input's gradient (needs_input_grad
    is fixed at the forward), the service's work and the answer's bytes for gradients
    thrown away. Now it asks for those the pass uses (still one vjp)."""
    argnums: list[str] = []
    cc.client._http.event_hooks["request"].append(
        lambda r: argnums.append(r.url.params.get("argnums")) if r.url.path.endswith("/vjp") else None)
    g = remote(cc.client, "add_square")
    x0, y0 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def leaves():
        return x0.clone().requires_grad_(), y0.clone().requires_grad_()

    def loss(fn, x, y):
        return (fn(x * 1, y * 1) ** 2).sum()  # non-leaf inputs: the engine can say which it runs

    x, y = leaves()
    xl, yl = leaves()
    close(torch.autograd.grad(loss(g, x, y), x)[0], torch.autograd.grad(loss(ex.add_square, xl, yl), xl)[0])
    x, y = leaves()
    xl, yl = leaves()
    loss(g, x, y).backward(inputs=[y])
    loss(ex.add_square, xl, yl).backward(inputs=[yl])
    close(y.grad, yl.grad)
    assert x.grad is None
    x, y = leaves()
    xl, yl = leaves()
    loss(g, x, y).backward()  # both used: both asked
    loss(ex.add_square, xl, yl).backward()
    close((x.grad, y.grad), (xl.grad, yl.grad))
    assert cc.take() == ["evaluate", "vjp"] * 3
    assert argnums == ["0,", "1,", "0,1"]


def test_aux_comes_back_as_with_has_aux(cc):
    sa = remote(cc.client, "sin_aux")
    x = torch.randn(4, dtype=torch.float64)
    out, aux = sa(x)
    close((out, aux), ex.sin_aux(x))
    assert not aux.requires_grad
    cc.take()
    close(f.jacrev(sa, has_aux=True)(x), f.jacrev(ex.sin_aux, has_aux=True)(x))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    # mixed aux (a tensor and plain values) and an integer input that is not differentiated
    sn = remote(cc.client, "scaled_norm")
    xs = torch.randn(5, 3, dtype=torch.float64)
    scale, power = torch.tensor(2.0, dtype=torch.float64), torch.tensor(2)
    (norms, aux) = sn(xs, scale, power)
    want_norms, want_aux = uf.scaled_norm(xs, scale, power)
    close(norms, want_norms)
    close(aux["total"], want_aux["total"])
    assert aux["label"] == "norms"
    cc.take()
    def tensor_aux(fn):  # torch.func's has_aux takes tensors only, here as in-process
        def g(*args):
            out, aux = fn(*args)
            return out, aux["total"]
        return g

    got = f.jacrev(tensor_aux(sn), argnums=(0, 1), has_aux=True)(xs, scale, power)
    want = f.jacrev(tensor_aux(uf.scaled_norm), argnums=(0, 1), has_aux=True)(xs, scale, power)
    close(got, want)
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]


def test_dtypes_round_trip(cc):
    arm = remote(cc.client, "planar_arm")
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([0.3, -0.2, 0.5], dtype=dtype, requires_grad=True)
        y = arm(x)
        assert y.dtype == dtype
        y.sum().backward()
        assert x.grad.dtype == dtype
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.bfloat16, requires_grad=True)
    y = arm(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    # mlp declares float32: float64 in is computed in float32; the gradient is float64 again
    mlp = remote(cc.client, "mlp")
    x = torch.randn(128, dtype=torch.float64, requires_grad=True)
    y = mlp(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float64
    want = f.grad(lambda v: ex.mlp(v).sum())(x.detach().float())
    torch.testing.assert_close(x.grad.float(), want, rtol=1e-5, atol=1e-6)


def test_a_half_precision_input_beside_a_float64_one_gets_torchs_promoted_dtype(cc):
    """The outputs were cast to the first float16/bfloat16 input's dtype whatever the
    others were: x (float16) + y**2 (float64) came back float16, 1e-3 off, where torch
    and the service computed float64. Only inputs all in one low precision get it back."""
    add = remote(cc.client, "add_square")
    x16 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float16)
    y = torch.tensor([1.1, 2.3, -3.7], dtype=torch.float64)
    close(add(x16, y), ex.add_square(x16, y))  # float64, exactly
    close(add(y, x16), ex.add_square(y, x16))
    close(f.jvp(lambda b: add(x16, b), (y,), (y,)), f.jvp(lambda b: ex.add_square(x16, b), (y,), (y,)))
    close(add(x16, x16), ex.add_square(x16, x16), tol=1e-3)  # float16 alone: float16
    bf = x16.to(torch.bfloat16)
    assert add(bf, bf).dtype == torch.bfloat16 and add(bf, y).dtype == torch.float64


def test_third_derivatives_are_refused_clearly(cc):
    """Second derivatives go through (tests/test_remote_round5.py); a third does not."""
    s = remote(cc.client, "sum_sin")
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="third derivatives through the remote function 'sum_sin'"):
        f.jacrev(f.hessian(s))(x)
    # a first derivative torch computes by double backward asks for no second derivative
    got = torch.autograd.functional.jvp(s, x, torch.ones(3, dtype=torch.float64))
    want = torch.autograd.functional.jvp(ex.sum_sin, x, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(got, want)


def test_lazily_negated_and_conjugated_views_are_sent_by_value(cc):
    """`z.conj().imag` is a real tensor with torch's negation bit set: `.numpy()` refuses
    it, so the remote call, its derivatives and Client.evaluate raised RuntimeError
    ("negative bit set"); a bfloat16 one failed in a dtype-changing view."""
    sin = remote(cc.client, "sin")
    z = torch.tensor([1 + 0.3j, 2 - 0.2j, 3 + 0.5j], dtype=torch.complex128)
    x = z.conj().imag
    assert x.is_neg()
    want = x.resolve_neg()
    close(sin(x), torch.sin(want))
    close(f.jacrev(sin)(x), torch.diag(torch.cos(want)))
    close(f.vjp(sin, x)[1](x)[0], torch.cos(want) * want)
    close(f.jvp(sin, (x,), (x,))[1], torch.cos(want) * want)
    assert cc.take() == ["evaluate", "evaluate", "vjp+batched_vectors", "evaluate", "vjp", "evaluate", "jvp"]
    np.testing.assert_allclose(cc.client.evaluate("sin", x), torch.sin(want).numpy(), rtol=1e-12)
    for transport in ("binary", "json"):
        np.testing.assert_allclose(cc.client.evaluate("sin", x, transport=transport), torch.sin(want).numpy())
    half = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)._neg_view()
    np.testing.assert_allclose(cc.client.evaluate("sin", half), np.sin([-1.0, 2.0]), rtol=1e-2)


def test_tracing_the_remote_function_into_a_graph_is_refused_clearly(cc):
    """make_fx records a request's answer as a constant: torch.func.linearize's jvp_fn
    answered the same garbage for every tangent (uninitialised memory, once traced), and
    a make_fx graph the traced call's value for every input, silently. Tracing now
    raises, whatever the tracing mode; eager calls are unaffected."""
    from torch.fx.experimental.proxy_tensor import make_fx

    sin = remote(cc.client, "sin")
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    refused = "the remote function 'sin' cannot be traced into a graph"
    with pytest.raises(RuntimeError, match=refused):
        f.linearize(sin, x)
    for mode in ("real", "fake", "symbolic"):
        with pytest.raises(RuntimeError, match=refused):
            make_fx(sin, tracing_mode=mode)(x)

    class Arm(torch.nn.Module):
        def forward(self, z):
            return sin(z)

    with pytest.raises(RuntimeError, match=refused):
        torch.export.export(Arm(), (x,), strict=False)
    close(f.jvp(sin, (x,), (torch.ones(3, dtype=torch.float64),))[1], torch.cos(x))  # what linearize would give


def test_torch_autograds_legacy_batching_is_refused_clearly(cc):
    """autograd.functional.jacobian(vectorize=True), autograd.grad(is_grads_batched=True)
    and gradcheck's batched check hand the Function legacy batched tensors, whose values
    cannot be read: torch's own "Batching rule not implemented for aten::detach" came
    out of the SDK. Now an error that names the way that works."""
    sin = remote(cc.client, "sin")
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    refused = "cannot run under torch.autograd's legacy batching"
    for strategy in ("reverse-mode", "forward-mode"):
        with pytest.raises(RuntimeError, match=refused):
            torch.autograd.functional.jacobian(sin, x, vectorize=True, strategy=strategy)
    xr = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(sin(xr), xr, torch.eye(3, dtype=torch.float64), is_grads_batched=True)
    close(torch.autograd.functional.jacobian(sin, x), torch.diag(torch.cos(x)))  # not vectorized: one vjp per row
    assert torch.autograd.gradcheck(sin, (xr,), check_forward_ad=True)


def test_service_errors_propagate(cc):
    import jacobian_client as jc

    with pytest.raises(jc.FunctionError, match="diverged"):
        remote(cc.client, "broken")(torch.ones(2))
    with pytest.raises(jc.FunctionNotFound):
        remote(cc.client, "no_such_function")(torch.ones(2))
    with pytest.raises(TypeError, match="synchronous"):
        remote(jc.AsyncClient("http://127.0.0.1:1"), "sin")


class _SinDataset(torch.utils.data.Dataset):
    """Each item: the remote sin of a point, and the local port of the connection that
    carried the request (recorded by the client's response hook, in whichever process)."""

    def __init__(self, sin, ports: list) -> None:
        self.sin, self.ports = sin, ports

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return self.sin(torch.full((3,), 0.1 * i, dtype=torch.float64)), torch.tensor(self.ports[-1])


# JAX's own warning at any fork once jax is imported (test_remote_jax runs first): the
# workers never touch JAX
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_dataloader_workers_forked_after_a_call_each_use_a_connection_of_their_own(cc):
    """A forked worker inherited the parent's pooled keep-alive connection: processes
    writing to and reading from one socket got 400s, or each other's answers (6 wrong
    values in 60 calls of 4 children at once, silently). A child now opens its own."""
    ports: list[int] = []
    cc.client._http.event_hooks["response"] = [
        lambda r: ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1])]
    sin = remote(cc.client, "sin")
    sin(torch.zeros(3, dtype=torch.float64))  # the parent's connection, now pooled
    parent_port = ports[-1]
    loader = torch.utils.data.DataLoader(_SinDataset(sin, ports), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    values, used = zip(*loader)
    want = torch.stack([torch.sin(torch.full((3,), 0.1 * i, dtype=torch.float64)) for i in range(8)])
    close(torch.cat(values), want)
    assert parent_port not in torch.cat(used).tolist()
    sin(torch.zeros(3, dtype=torch.float64))
    assert ports[-1] == parent_port  # the parent's pool is untouched


def test_a_remote_function_pickles_with_its_client(cc, url):
    """A spawned DataLoader worker (the default on macOS and Windows), a process pool or
    torch.save pickles the remote function: it was a closure ("Can't pickle local
    object"), and the Client held locks. Both now pickle as the calls that made them."""
    import io
    import pickle

    import jacobian_client as jc

    client = jc.Client(url, timeout=7.0, max_retries=1)
    sin = remote(client, "sin")
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    again, copy = pickle.loads(pickle.dumps((sin, client)))  # pickled once: `again` holds `copy`
    assert again.__name__ == "remote_sin"
    close(again(x), torch.sin(x))
    close(f.jacrev(again)(x), torch.diag(torch.cos(x)))
    assert (copy.base_url, copy._proto.retry.max_retries, copy._proto.timeout) == (client.base_url, 1, 7.0)
    model = torch.nn.Module()
    model.arm = remote(client, "planar_arm")
    saved = io.BytesIO()
    torch.save((model, client), saved)
    saved.seek(0)
    loaded, loaded_client = torch.load(saved, weights_only=False)
    q = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    close(loaded.arm(q), ex.planar_arm(q))
    with jc.Client(url, http_transport=httpx.MockTransport(lambda request: httpx.Response(200))) as mocked:
        with pytest.raises(TypeError, match="made with http_transport= cannot be pickled"):
            pickle.dumps(mocked)
    for c in (client, copy, loaded_client):
        c.close()


@pytest.mark.gpu
def test_cuda_tensor_in_cuda_tensor_out(cc):
    arm = remote(cc.client, "planar_arm")
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, device="cuda", requires_grad=True)
    y = arm(x)
    assert y.device.type == "cuda"
    y.sum().backward()
    assert x.grad.device.type == "cuda"
    xl = x.detach().cpu().requires_grad_()
    ex.planar_arm(xl).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xl.grad, rtol=1e-12, atol=1e-12)
    J = f.jacrev(arm)(x.detach())
    assert J.device.type == "cuda"
    torch.testing.assert_close(J.cpu(), f.jacrev(ex.planar_arm)(x.detach().cpu()), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- compile, plain aux, empty batches


# torch's own warning when a tensor that requires grad crosses a graph break (any graph
# break, not only this one), raised to an error by the suite's filterwarnings
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_torch_compile_graph_breaks_around_the_remote_call(cc):
    """dynamo used to trace into the request and fail (in wire.read_npy); the call now
    runs outside the graph and the code around it compiles."""
    import torch._dynamo

    sin = remote(cc.client, "sin")
    x = torch.tensor([0.3, -0.2, 0.5])
    try:
        close(torch.compile(sin, backend="eager")(x), torch.sin(x))
        assert cc.take() == ["evaluate"]
        step = lambda fn: lambda z: fn(z * 2).sum() + (z**2).sum()  # noqa: E731
        xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        compiled = torch.compile(step(sin), backend="eager")
        compiled(xr).backward()
        step(torch.sin)(xl).backward()
        close(xr.grad, xl.grad, tol=1e-6)
        assert cc.take() == ["evaluate", "vjp"]
        close(compiled(x + 1), step(torch.sin)(x + 1), tol=1e-6)  # compiled once, one request a call
        assert cc.take() == ["evaluate"]
    finally:
        torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo in torch.optim
def test_a_backward_pass_inside_a_compiled_function_goes_through_the_remote_call(cc):
    """A compiled training step (backward and optimizer step inside torch.compile),
    autograd.grad or jacrev inside a compiled function: dynamo traced the backward's
    request into the wire decoding and crashed (AssertionError "Expected np.nditer
    base"). Every request now runs outside the graph."""
    import torch._dynamo

    sin = remote(cc.client, "sin")
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)

    def trainer(fn):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 3, dtype=torch.float64)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)

        def step(z):
            opt.zero_grad()
            loss = fn(layer(z)).pow(2).sum()
            loss.backward()
            opt.step()
            return loss.detach()

        return layer, step

    try:
        (remote_layer, remote_step), (local_layer, local_step) = trainer(sin), trainer(torch.sin)
        compiled = torch.compile(remote_step, backend="eager")
        for _ in range(3):
            close(compiled(x), local_step(x), tol=1e-12)
        for p_remote, p_local in zip(remote_layer.parameters(), local_layer.parameters()):
            close(p_remote.detach(), p_local.detach(), tol=1e-12)
        assert cc.take() == ["evaluate", "vjp"] * 3
        grad_in = torch.compile(lambda z: torch.autograd.grad(sin(z).sum(), z)[0], backend="eager")
        close(grad_in(x.clone().requires_grad_()), torch.cos(x))
        jac_in = torch.compile(lambda z: f.jacrev(sin)(z), backend="eager")
        close(jac_in(x), torch.diag(torch.cos(x)))
    finally:
        torch._dynamo.reset()


# Functions whose aux holds plain numbers computed from the values (`.item()`, so the
# service loops over a batch's examples), which the shared server does not serve: this
# module registers them and serves itself, in-process.


@register(inputs=[Input("x", shape=("n",))], has_aux=True, description="sin; aux: numbers from the values, a fixed tag")
def numbers_aux(x: torch.Tensor):
    d = x.detach()
    return torch.sin(x), {"norm": float(d.norm()), "count": int((d > 0).sum()), "positive": bool(d.sum() > 0),
                          "tag": "sin", "first": x[0] * 1}


def test_vmap_carries_plain_number_aux_as_tensors(oc, cc):
    """vmap may return tensors only ("must only return Tensors"): numbers in aux come
    back as tensors, one value per example; strings as they are."""
    X = torch.tensor([[3.0, 4.0, 0.0], [-6.0, -8.0, 0.0], [1.0, 2.0, 2.0]], dtype=torch.float64)
    f = remote(oc.client, "numbers_aux")
    tags: list[Any] = []

    def numbers(z):
        out, aux = f(z)
        tags.append(aux.pop("tag"))
        return out, aux

    want = lambda X: {"norm": X.norm(dim=1), "count": (X > 0).sum(1), "positive": X.sum(1) > 0, "first": X[:, 0]}  # noqa: E731
    close(torch.func.vmap(numbers)(X), (torch.sin(X), want(X)))
    assert tags == ["sin"]
    # the service looped over the examples; to read its aux the client needs one example's
    # structure: one unbatched evaluate (the first example) learns it, once per signature
    assert oc.take() == ["evaluate+batched", "evaluate"]
    close(torch.func.vmap(numbers)(2 * X), (torch.sin(2 * X), want(2 * X)))
    assert oc.take() == ["evaluate+batched"]
    _, aux = remote(oc.client, "numbers_aux")(X[0])  # unbatched: plain Python values, as the function gave
    assert aux["norm"] == 5.0 and aux["count"] == 2 and aux["positive"] is True and aux["tag"] == "sin"
    # per-example gradients with the same function: aux does not get in the way
    close(torch.func.vmap(torch.func.grad(lambda z: f(z)[0].sum()))(X), torch.cos(X))
    # numbers computed once for the whole batch (the service's vmap ran): spread over it
    sn = remote(cc.client, "scaled_norm")
    labels: list[Any] = []

    def sizes(a):
        _, aux = sn(a, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1))
        labels.append(aux["label"])
        return aux["sizes"]

    # "sizes" is a list in the function, and so it comes back (meta.lists; a tuple before)
    close(torch.func.vmap(sizes)(torch.ones(2, 4, 3, dtype=torch.float64)), [torch.tensor([4, 4]), torch.tensor([3, 3])])
    assert labels == ["norms"]


def test_an_empty_batch_is_answered_without_a_request(cc):
    """vmap over 0 examples: the service refuses an empty batch (422); torch gives (0, ...)."""
    arm = remote(cc.client, "planar_arm")
    empty = torch.zeros(0, 3, dtype=torch.float64)
    close(f.vmap(arm)(empty), f.vmap(ex.planar_arm)(empty))
    assert cc.take() == ["evaluate"]  # nothing known yet: one evaluate at zeros of one example
    close(f.vmap(arm)(empty), f.vmap(ex.planar_arm)(empty))
    close(f.vmap(f.jacrev(arm))(empty), f.vmap(f.jacrev(ex.planar_arm))(empty))
    close(f.vmap(f.jacfwd(arm))(empty), f.vmap(f.jacfwd(ex.planar_arm))(empty))
    loss = lambda g: lambda x: (g(x) ** 2).sum()  # noqa: E731
    close(f.vmap(f.grad(loss(arm)))(empty), f.vmap(f.grad(loss(ex.planar_arm)))(empty))
    xe = empty.clone().requires_grad_()
    f.vmap(arm)(xe).sum().backward()
    close(xe.grad, torch.zeros(0, 3, dtype=torch.float64))
    assert cc.take() == []


@register(inputs=[Input("x", shape=("n",))], description="sin(x), and how many entries so far are positive (int64)")
def sin_and_count(x: torch.Tensor):
    return torch.sin(x), (x > 0).to(torch.int64).cumsum(0)


def test_forward_mode_through_a_function_with_an_integer_output(oc):
    """The float output's tangent is as in-process; the integer one's is zeros, as
    torch.func gives it. The jvp rule returned the integer output a tangent, which torch
    refused ("returned a gradient at position 1, but the corresponding forward output is
    not a differentiable Tensor")."""
    g = remote(oc.client, "sin_and_count")
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    close(f.jvp(g, (x,), (t,)), f.jvp(sin_and_count, (x,), (t,)))
    close(f.jacfwd(g)(x), f.jacfwd(sin_and_count)(x))
    close(f.jacfwd(lambda z: g(z)[0])(x), torch.diag(torch.cos(x)))
    assert oc.take() == ["evaluate", "jvp", "evaluate", "jvp+batched_vectors", "evaluate", "jvp+batched_vectors"]
