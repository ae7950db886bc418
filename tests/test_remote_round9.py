"""Remote functions inside the caller's torch, JAX and SciPy code, round 9: the client's
timeout as the server's deadline, SciPy's Jacobian prefetch and cache under stiff ODE
solvers, and users' idioms compared with torch.func / jax in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)

f = torch.func


def _sent_timeouts(client: jc.Client) -> list[tuple[str, str | None]]:
    """Record each request's endpoint and X-Request-Timeout."""
    seen: list[tuple[str, str | None]] = []
    client._http.event_hooks["request"].append(
        lambda r: seen.append((r.url.path.rsplit("/", 1)[-1], r.headers.get("x-request-timeout"))))
    return seen


# --------------------------------------------------------------------------- the client's timeout


def test_every_computing_request_carries_the_clients_timeout(cc, url):
    """The SDK's ``timeout`` goes with each request that runs the function, as
    ``X-Request-Timeout`` (a tenth less, at most 0.5 s less, so the server's 504 comes
    first), whichever adapter sends it; metadata requests and a client whose own headers
    name one are left alone."""
    seen = _sent_timeouts(cc.client)
    arm = remote(cc.client, "planar_arm")
    q = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    arm(q).sum().backward()
    cc.client.sparsity("lorenz96", (8,))
    cc.client.function("sin")
    assert seen == [("evaluate", "59.5"), ("vjp", "59.5"), ("sparsity", "59.5"), ("sin", None)]
    with jc.Client(url, timeout=2.0) as short, jc.Client(url, timeout=None) as endless, \
            jc.Client(url, timeout=2.0, headers={"X-Request-Timeout": "7"}) as own:
        for client, want in ((short, "1.8"), (endless, None), (own, "7")):
            sent = _sent_timeouts(client)
            client.evaluate("sin", np.array([0.1]))
            assert sent == [("evaluate", want)]
    assert jc._protocol.server_deadline(0.2) == "0.18"


def test_an_error_answered_late_in_the_attempt_keeps_its_problem(monkeypatch):
    """The server's 504 at the X-Request-Timeout a client sent comes near the end of the
    client's time, and after a long upload past it: the client's clock for the head
    starts over as the upload ends, but the error's body was read against the attempt's
    clock, which had run out, so the problem document was dropped and the caller saw
    "Timeout: 504: Gateway Timeout", without its code, detail or request id. The body of
    an error gets a window of its own now, as a 200's does (sync and async). Here the
    attempt's clock started 10 s before a 5 s timeout, as a slow upload's would."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from jacobian_client import _protocol

    class Late(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"type": "urn:jacobian-service:problem:timeout", "title": "Timeout", "status": 504,
                               "detail": "the request ran past its deadline", "code": "timeout",
                               "request_id": "late"}).encode()
            self.send_response(504)
            self.send_header("content-type", "application/problem+json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    def started_long_ago(self, call):
        first = [time.monotonic() - 10]
        return _protocol.Deadline(self.timeout, progress_bytes=_protocol.STREAM_PROGRESS_BYTES,
                                  clock=lambda: first.pop() if first else time.monotonic())

    monkeypatch.setattr(_protocol.Protocol, "deadline", started_long_ago)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Late)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    late = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with jc.Client(late, timeout=5, max_retries=0) as client:
            with pytest.raises(jc.Timeout, match=r"504 timeout: the request ran past its deadline \(request late\)"):
                client.evaluate("sin", np.array([0.1]))

        async def main() -> None:
            async with jc.AsyncClient(late, timeout=5, max_retries=0) as client:
                await client.evaluate("sin", np.array([0.1]))

        with pytest.raises(jc.Timeout, match=r"504 timeout: the request ran past its deadline \(request late\)"):
            asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- SciPy: stiff ODE solvers


@pytest.mark.parametrize("method", ["Radau", "BDF", "LSODA"])
def test_stiff_solvers_fetch_the_jacobians_they_use(cc, method):
    """``solve_ivp(method=Radau | BDF | LSODA, jac=)`` keeps one Jacobian over many steps:
    Radau evaluated 45 points of this Lorenz-96 system and differentiated 2, but with
    ``prefetch`` (the default) each of the 45 requests computed and sent the Jacobian
    along (n x n numbers where an evaluate sends n), and BDF's first Jacobian, at the
    point before its last evaluation, was asked again (one point cached). The objective
    now sees how few points are differentiated and asks for values alone (after 4
    points), keeps two points, and solves as the local callables do, step for step."""
    si = pytest.importorskip("scipy.integrate")
    from jacobian_client.scipy import remote_objective

    def lf(y):
        return ex.lorenz96(torch.from_numpy(y)).numpy()

    def lj(y):
        return f.jacrev(ex.lorenz96)(torch.from_numpy(y)).numpy()

    y0 = np.linspace(0.0, 1.0, 8) + 8.0
    l96 = remote_objective(cc.client, "lorenz96")
    cc.take()
    got = si.solve_ivp(lambda t, y: l96.fun(y), (0, 2), y0, method=method, jac=lambda t, y: l96.jac(y))
    want = si.solve_ivp(lambda t, y: lf(y), (0, 2), y0, method=method, jac=lambda t, y: lj(y))
    assert (got.status, got.nfev, got.njev) == (want.status, want.nfev, want.njev) and got.nfev > 20
    np.testing.assert_allclose(got.y, want.y, rtol=1e-12)
    sent = cc.take()
    jacobians = sum(r.startswith("jacobian") for r in sent)
    assert jacobians <= 4 + got.njev, sent  # the first points', then the ones used
    assert len(sent) <= got.nfev + got.njev and set(sent) <= {"evaluate", "jacobian", "jacobian+return_output"}


# --------------------------------------------------------------------------- integer leaves of a dict parameter


def test_a_derivative_beside_an_integer_leaf_says_why_it_is_refused(cc):
    """``grad`` over ``cfg["w"]`` of ``tree_int(cfg, x)`` with ``cfg = {"w": w, "k": 3}``:
    in-process it closes over ``k``; through the service it asks for the whole parameter,
    which the service (as torch.func, "only Tensors of floating point dtype can require
    gradients") refuses, and the adapters raised its 422 alone, naming a leaf the caller
    never differentiated (``cfg.k``). The 422 now says why and the way out (torch and
    JAX alike); the value, and derivatives in the other input, equal torch.func's."""
    jax = pytest.importorskip("jax")
    from jacobian_client.jax import remote as jremote

    from . import pytree_functions as pf

    fn = remote(cc.client, "tree_int")
    w, x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    k = torch.tensor(3)
    why = r"leaf 0\['k'\] is int(64|32), which the service, as torch.func, does not differentiate: pass integer values"
    with pytest.raises(jc.InvalidInput, match=why):
        f.grad(lambda w: fn({"w": w, "k": k}, x).sum())(w)
    jfn = jremote(cc.client, "tree_int")
    with pytest.raises(jc.InvalidInput, match=why):
        jax.grad(lambda w: jfn({"w": w, "k": k.numpy()}, x.numpy()).sum())(w.numpy().astype(np.float32))
    want = f.grad(lambda x: pf.tree_int({"w": w, "k": k}, x).sum())(x)
    torch.testing.assert_close(f.grad(lambda x: fn({"w": w, "k": k}, x).sum())(x), want)
    torch.testing.assert_close(fn({"w": w, "k": k}, x), pf.tree_int({"w": w, "k": k}, x))


# --------------------------------------------------------------------------- API keys, errors in the adapters


class _Gate:
    """An httpx transport in front of the session server: it demands ``Authorization:
    Bearer k9`` (401 otherwise, as a server with API keys answers), answers an endpoint
    with a problem it is told to (``fail``), and passes the rest on."""

    def __init__(self, url: str) -> None:
        self.url, self.fail, self.keys = url, {}, []
        self.real = httpx.Client(timeout=30)

    def __enter__(self) -> _Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("authorization"))
        endpoint = request.url.path.rsplit("/", 1)[-1]
        if request.headers.get("authorization") != "Bearer k9":
            return self._problem(401, "unauthorized")
        if endpoint in self.fail:
            return self._problem(*self.fail[endpoint])
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "authorization")}
        answer = self.real.send(httpx.Request(request.method, self.url + request.url.raw_path.decode(), headers=headers,
                                              content=request.content))
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    @staticmethod
    def _problem(status: int, code: str) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": "application/problem+json", "retry-after": "0"},
                              json={"type": f"urn:jacobian-service:problem:{code}", "title": code, "status": status,
                                    "detail": f"the gate's {code}", "code": code, "request_id": "r9"})


def test_an_api_key_from_the_environment_reaches_every_adapter(url, monkeypatch):
    """``$JACOBIAN_SERVICE_API_KEY``, which the command line's ``--api-key`` reads, was
    ignored by the SDK: with the key exported, ``jacobian-service call`` was served and a
    remote function in torch, JAX or SciPy (a ``Client(url)`` made without a key) got
    401. A client made without ``api_key`` now sends the variable's key; ``api_key=""``
    sends none (401, raised as ``Unauthorized`` from inside ``backward``), an explicit
    key wins. Each adapter's answer equals the in-process one."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from jacobian_client.jax import remote as jremote
    from jacobian_client.scipy import remote_objective

    monkeypatch.setenv("JACOBIAN_SERVICE_API_KEY", "k9")
    with _Gate(url) as gate, jc.Client("http://gate", http_transport=httpx.MockTransport(gate)) as client:
        q = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
        remote(client, "sum_sin")(q).backward()
        torch.testing.assert_close(q.grad, torch.cos(q.detach()))
        x = jnp.array([0.3, -0.2, 0.5], dtype=jnp.float32)
        np.testing.assert_allclose(jax.grad(jremote(client, "sum_sin"))(x), jax.grad(lambda x: jnp.sin(x).sum())(x),
                                   rtol=1e-6)
        objective = remote_objective(client, "sum_sin")
        x = np.array([0.3, -0.2, 0.5])
        np.testing.assert_allclose((objective.fun(x), *objective.jac(x)), (np.sin(x).sum(), *np.cos(x)), rtol=1e-12)
        assert set(gate.keys) == {"Bearer k9"} and len(gate.keys) == 5  # evaluate, vjp (torch, jax), jacobian
        assert jc.AsyncClient("http://gate")._proto.base_headers["Authorization"] == "Bearer k9"
        assert jc.Client("http://gate", api_key="mine")._proto.base_headers["Authorization"] == "Bearer mine"
        with jc.Client("http://gate", api_key="", http_transport=httpx.MockTransport(gate)) as keyless:
            with pytest.raises(jc.Unauthorized, match="401 unauthorized"):
                remote(keyless, "sum_sin")(q).backward()


def test_a_failed_derivative_request_raises_its_code_inside_grad_and_backward(url):
    """The service answering the backward's request with a problem (the forward's went
    through): ``loss.backward()`` and ``jax.grad`` raise the SDK's exception for its code
    (429 and 503 after the client's retries, which the Retry-After of 0 keeps short),
    naming it; under ``jax.jit`` XLA's JaxRuntimeError carries it."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from jacobian_client.jax import remote as jremote

    with _Gate(url) as gate, jc.Client("http://gate", api_key="k9", http_transport=httpx.MockTransport(gate),
                                       retry=jc.RetryPolicy(max_retries=2, backoff_base=0.001)) as client:
        fn = jremote(client, "sum_sin")
        jitted = jax.jit(jax.grad(fn))
        x = jnp.array([0.3, -0.2, 0.5])
        for status, code, error, tries in ((422, "invalid_input", jc.InvalidInput, 1),
                                           (500, "function_error", jc.FunctionError, 1),
                                           (429, "overloaded", jc.Overloaded, 3), (503, "unavailable", jc.Unavailable, 3)):
            gate.fail["vjp"], gate.keys = (status, code), []
            q = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
            loss = remote(client, "sum_sin")(q)
            with pytest.raises(error, match=f"{status} {code}: the gate's {code}"):
                loss.backward()
            with pytest.raises(error, match=f"{status} {code}"):
                jax.grad(fn)(x)
            with pytest.raises(jax.errors.JaxRuntimeError, match=f"{error.__name__}: {status} {code}"):
                jitted(x)
            assert len(gate.keys) == 2 + 3 * tries  # torch's and jax's evaluate; each vjp (jit's evaluate is dropped)


# --------------------------------------------------------------------------- last: it replaces the engine


def test_a_call_past_the_clients_timeout_stops_the_engine_soon_after(url):
    """One call of the function that runs long (``r9_stall``: a 30 s sleep, which no
    cancel interrupts) under a client whose ``timeout`` is 1 s: the client gave up at 1 s,
    but the server's deadline was its own REQUEST_TIMEOUT_S (60 s), so the engine stayed
    in the call, every other request waiting behind it, until it returned (30 s) or that
    deadline and the hang grace passed. The SDK now sends its timeout as
    X-Request-Timeout: the caller gets the server's 504 (``Timeout``), and the engine,
    past that deadline plus the grace (1 s on this server), is replaced, its queue served
    by the new one within seconds."""
    before = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
    with jc.Client(url, timeout=1.0, max_retries=0) as hasty:
        stall = remote(hasty, "r9_stall")
        started = time.monotonic()
        with pytest.raises((jc.Timeout, jc.TransportError)):  # the 504, or the client's own clock on a loaded box
            stall(torch.tensor([30.0, 1.0], dtype=torch.float64))
    replaced = None
    while time.monotonic() - started < 20:
        pids = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
        if pids and pids[0] != before[0]:
            replaced = time.monotonic() - started
            break
        time.sleep(0.1)
    assert replaced is not None and replaced < 20  # not at the 30 s the call would take
    with jc.Client(url, timeout=60) as other:  # the new engine answers (its start waited for)
        other.wait_ready(60)
        np.testing.assert_allclose(other.evaluate("sin", np.array([0.1, 0.2])), np.sin([0.1, 0.2]), rtol=1e-6)
