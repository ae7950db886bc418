"""Remote functions inside the caller's torch / JAX / SciPy code, round 16: a new SDK
against an older service (one that answered a missing forward-mode rule without the
``unsupported`` member); each case compared with the same computation in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``, ``url``), shared
with the other adapter test files. The older service is that server behind an
``httpx.MockTransport`` that takes out what round 15 added to its answers.
"""

from __future__ import annotations

import json
import warnings

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client import wire  # noqa: E402
from jacobian_client._errors import error_from_response  # noqa: E402
from jacobian_client._remote import lacks_forward_mode  # noqa: E402
from jacobian_client.torch import remote  # noqa: E402

from . import _client_functions as cf  # noqa: E402
from ._remote_support import Counted, cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
X = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
T = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)


def close(got, want, **kw):
    torch.testing.assert_close(got, want, **kw)


# --------------------------------------------------------------------------- an older service


class OlderService:
    """The session's server as a service older than round 15 answered: a problem without
    the ``unsupported`` member, a ``/v1/info`` without ``capabilities``. Every answer is
    the real server's, the rest of its bytes untouched."""

    def __init__(self) -> None:
        self.http = httpx.Client(timeout=60)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        r = self.http.send(httpx.Request(request.method, request.url, headers=request.headers,
                                         content=request.read()))
        content, path = r.content, request.url.path
        if r.headers.get("content-type", "").startswith(wire.PROBLEM) or path == "/v1/info":
            body = json.loads(content)
            body.pop("unsupported", None)
            body.pop("capabilities", None)
            content = json.dumps(body).encode()
        headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in ("content-length",
                                                                                   "content-encoding")]
        return httpx.Response(r.status_code, headers=headers, content=content)


@pytest.fixture
def old(url):
    service = OlderService()
    c = Counted(url, http_transport=httpx.MockTransport(service))
    yield c
    c.close()
    service.http.close()


def test_the_service_lists_what_an_answer_alone_does_not_say(url):
    """``/v1/info``'s ``capabilities``: ``unsupported_member``, the member a missing
    forward-mode rule's 500 carries (its absence then means another failure)."""
    info = httpx.get(f"{url}/v1/info", timeout=30).json()
    assert info["capabilities"] == ["unsupported_member"]


def test_a_new_sdk_falls_back_to_reverse_mode_against_an_older_service(old):
    """An older service answers a jvp / hvp of a function without a forward-mode rule with
    a plain 500 ``function_error`` ("NotImplementedError: You must implement the jvp
    function ..."), no ``unsupported`` member. Round 15's SDK read the member alone, so
    ``torch.func.jvp``, ``torch.func.hessian`` and SciPy's ``hessp`` of such a function
    raised ``FunctionError`` where they had fallen back to the Jacobian / Hessian before
    (and so did a double backward, ``jax.hessian``, ``constraint_hess``).
    Now a 500 without the member whose detail carries torch's exception asks the service,
    once per client, whether it sets the member: an older one lists no capabilities, and
    torch's words decide, as before round 15."""
    sq = remote(old.client, "square_no_jvp")
    want = f.jvp(lambda x: torch.sin(x) ** 2, (X,), (T,))  # in-process forward mode raises: its math
    with pytest.warns(RuntimeWarning, match=r"jvp of 'square_no_jvp' failed \(NotImplementedError"):
        got = f.jvp(sq, (X,), (T,))
    close(got, want)
    assert old.take() == ["evaluate", "jvp", "info", "jacobian+batched"]
    close(f.jvp(sq, (X,), (T,)), want)  # from now on the Jacobian alone
    assert old.take() == ["evaluate", "jacobian+batched"]

    # a double backward (grad of a gradient): the hvp, then the Hessian
    energy = remote(old.client, "energy_no_jvp")

    def double_backward(fn):
        x = X.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        return torch.autograd.grad(g, x, T)[0]

    with pytest.warns(RuntimeWarning, match=r"hvp of 'energy_no_jvp' failed \(NotImplementedError.*Hessian"):
        close(double_backward(energy), double_backward(cf.energy_no_jvp))  # reverse over reverse in-process
    assert old.take() == ["evaluate", "vjp", "hvp", "hessian"]  # /v1/info asked once per client

    # SciPy's hessp (the Newton-CG / trust-krylov product): the Hessian at that point
    from jacobian_client.scipy import remote_objective

    obj = remote_objective(old.client, "energy_no_jvp")
    y, p = np.array([0.4, -0.3, 1.0]), np.array([1.0, 2.0, -0.5])
    want = f.jacrev(f.jacrev(cf.energy_no_jvp))(torch.from_numpy(y)).numpy() @ p
    with pytest.warns(RuntimeWarning, match="hvp of 'energy_no_jvp' failed"):
        np.testing.assert_allclose(obj.hessp(y, p), want, rtol=1e-6)
    np.testing.assert_allclose(obj.hessp(y, 2 * p), 2 * want, rtol=1e-6)
    assert old.take() == ["hvp", "hessian"]  # the second product from the kept Hessian


def test_a_functions_own_error_asks_nothing_more_of_either_service(old, cc):
    """A function's own error under a transform, whatever its words ("forward", "jvp"), is
    no missing rule on either service: raised after its one jvp, no ``/v1/info`` and no
    reverse-mode request."""
    t = torch.ones(2, dtype=torch.float64)
    for client in (old, cc):
        fn = remote(client.client, "r15_says_forward")
        client.take()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(jc.FunctionError, match="the forward solver takes plain tensors"):
                f.jvp(fn, (X[:2],), (t,))
        assert client.take() == ["evaluate", "jvp"]


def test_a_new_service_without_the_member_is_believed(cc):
    """On a service that lists ``unsupported_member`` a 500 without it is the function's
    failure even where its detail reads like torch's (the service marks every
    ``NotImplementedError`` of a forward-mode product, so no answer of it is so: the
    error is made here, the service's capabilities asked of the real one): one
    ``/v1/info`` per client, then nothing more."""
    response = httpx.Response(500, json={"code": "function_error", "title": "Function error",
                                         "detail": "NotImplementedError: not for these inputs"},
                              request=httpx.Request("POST", "http://x/v1/functions/f/jvp"))
    exc = error_from_response(response)
    assert isinstance(exc, jc.FunctionError)
    cc.take()
    assert not lacks_forward_mode(cc.client, exc)
    assert not lacks_forward_mode(cc.client, exc)
    assert cc.take() == ["info"]


# --------------------------------------------------------------------------- forward AD's symbolic zeros


def test_a_tangent_that_is_a_symbolic_zero_is_sent_as_zeros(cc):
    """``jacfwd(jacfwd(lambda r, t: polar(2 * r, t)[1].sum()))``: the inner jacfwd's tangent
    of ``2 * r`` is ``2 e_i``, constant in ``r``, so the outer level's tangent of it is
    torch's ``ZeroTensor`` (forward AD's symbolic zero), which reached the adapter's
    conversion to numpy: ``RuntimeError: Cannot convert a ZeroTensor to numpy``, where
    in-process answers. A ZeroTensor is now sent as the zeros it stands for; the same with
    one handed to ``torch.func.jvp`` as a tangent."""
    from jacobian_service import examples as ex

    polar = remote(cc.client, "polar")
    r, t = X, torch.tensor([0.5, 0.2, -0.4], dtype=torch.float64)

    def loss(fn):
        return lambda r, t: (fn(r, t)[0] * fn(2 * r, t)[1]).sum()

    def twice(g):
        return f.jacfwd(f.jacfwd(g, argnums=(0, 1)), argnums=(0, 1))

    got, want = twice(loss(polar))(r, t), twice(loss(ex.polar))(r, t)
    for row_got, row_want in zip(got, want):
        for g, w in zip(row_got, row_want):
            close(g, w)
    zero = torch._efficientzerotensor(3, dtype=torch.float64)
    close(f.jvp(lambda r: polar(r, t), (r,), (zero,)), f.jvp(lambda r: ex.polar(r, t), (r,), (zero,)))


# --------------------------------------------------------------------------- tensors no request can carry


def test_a_sparse_or_nested_input_is_refused_by_name_before_any_request(cc):
    """A sparse (COO, CSR) or nested tensor has no array a request can carry (in-process
    ``sin`` takes them). The adapter's conversion raised torch's words from inside it:
    "can't convert Sparse layout tensor to numpy", or for a nested tensor "Internal
    error: NestedTensorImpl doesn't support sizes. Please file an issue". Now a
    ``TypeError`` names the function, the input and the way to densify it, and nothing is
    sent; its dense form answers as in-process."""
    fn = remote(cc.client, "sin")
    x = X.float()
    cc.take()
    for make, layout, dense in [(lambda: x.to_sparse(), "torch.sparse_coo", "x.to_dense()"),
                                (lambda: x[None].to_sparse_csr(), "torch.sparse_csr", "x.to_dense()"),
                                (lambda: torch.nested.nested_tensor([x, x]), "nested",
                                 "torch.nested.to_padded_tensor")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (CSR, nested: torch's beta / prototype warnings)
            t = make()
        with pytest.raises(TypeError) as info:
            fn(t)
        assert str(info.value).startswith(f"the remote function 'sin' got a {layout} tensor (input 0): requests "
                                          f"carry dense arrays; pass it dense ({dense}"), str(info.value)
    assert cc.take() == []
    close(fn(x.to_sparse().to_dense()), torch.sin(x))


# --------------------------------------------------------------------------- JAX: the shape probe's hint


def _answering(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    """A service that answers every request with one problem (no retries asked of it)."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": wire.PROBLEM, **(headers or {})},
                              content=json.dumps({"code": code, "title": code, "status": status,
                                                  "detail": "the service is busy"}).encode())
    return httpx.MockTransport(handler)


def test_the_shape_probes_hint_is_only_for_what_the_zeros_may_have_caused():
    """Under ``jax.jit`` a first call learns the output shapes from one ``evaluate`` at
    zeros; its failure was raised with a hint (the function "failed in the shape probe
    ...; pass out_shape= to remote(), or call it once outside jit"), which suits a
    function that cannot take zeros (``cholesky``) but sent a caller whose service was
    busy (429), restarting (503) or refused the key (401) off to change working code. Those
    are raised as they are now, their class and words the service's; a quarantine (503
    ``function_quarantined``, which a crash at zeros may have earned) and the function's
    own error keep the hint."""
    jax = pytest.importorskip("jax")
    from jacobian_client.jax import remote as jremote

    x = np.zeros(3, np.float32)
    for status, code, cls, hinted in [(429, "overloaded", jc.Overloaded, False),
                                      (503, "unavailable", jc.Unavailable, False),
                                      (401, "unauthorized", jc.Unauthorized, False),
                                      (503, "function_quarantined", jc.FunctionQuarantined, True),
                                      (500, "function_error", jc.FunctionError, True)]:
        with jc.Client("http://service.test", max_retries=0, http_transport=_answering(status, code)) as client:
            with pytest.raises(cls) as info:
                jax.jit(jremote(client, "sin"))(x)
        assert ("failed in the shape probe" in info.value.detail) is hinted, (code, info.value.detail)
        assert info.value.detail.endswith("the service is busy")
