"""Remote functions and the SDK in real programs, round 18: JAX's ``shard_map`` over two
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), the SDK's
exception for every problem code the server answers, and a proxy named by the
environment; each case compared with the same computation in-process (or the server's
own words).

One server: the session's ``jacobian-service serve`` subprocess (``url``), shared with
the other adapter test files. The JAX cases run in one child process, since the device
count is fixed when jax is first imported (the rest of the session has one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client import wire  # noqa: E402
from jacobian_client._errors import error_from_response  # noqa: E402

from ._remote_support import counted, url  # noqa: E402,F401 (fixtures)
from ._ports import dead_port  # noqa: E402
from .conftest import CHILD_PYTHONPATH  # noqa: E402

# The child: each case computed through the adapter and in-process, under shard_map on a
# mesh of the two devices; what each gave (values, or the exception's class) goes back as
# JSON on its last line.
SHARDED = r"""
import json, sys
import httpx
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
try:
    from jax import shard_map
except ImportError:  # jax < 0.7
    from jax.experimental.shard_map import shard_map
jax.config.update("jax_enable_x64", True)
import jacobian_client as jc
from jacobian_client.jax import remote

assert len(jax.devices()) == 2, jax.devices()
client = jc.Client(sys.argv[1])
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jnp.array([0.3, -0.7, 1.1, 0.4, -1.3, 0.9])
y = jnp.array([0.5, 0.2, -0.4])

def sharded(f, out=P("d"), ins=P("d")):
    return shard_map(f, mesh=mesh, in_specs=ins, out_specs=out)

cases = {
    # grad through shard_map: the transpose's cotangent must vary as x does
    "grad": lambda sin, add_square: jax.grad(lambda v: sharded(sin)(v).sum())(x),
    "jit_grad": lambda sin, add_square: jax.jit(jax.grad(lambda v: (sharded(sin)(v) ** 2).sum()))(x),
    # an output of device-varying inputs is not replicated: P() is refused, in-process too
    "replicated_out": lambda sin, add_square: sharded(sin, out=P())(x),
    # y is shared by both devices (P()): its gradient is the sum of theirs
    "shared_grad": lambda sin, add_square: jax.grad(
        lambda v, w: sharded(add_square, ins=(P("d"), P()))(v, w).sum(), argnums=(0, 1))(x, y),
    # grad of grad: the second derivative's primitive and its transpose
    "grad_grad": lambda sin, add_square: jax.grad(lambda v: jax.grad(lambda u: sharded(sin)(u).sum())(v).sum())(x),
}
local = {"sin": jnp.sin, "add_square": lambda a, b: a + b ** 2}
theirs = {"sin": remote(client, "sin"), "add_square": remote(client, "add_square")}
out = {}
for name, case in cases.items():
    for side, fns in (("remote", theirs), ("local", local)):
        try:
            got = jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), case(**fns))
        except Exception as exc:
            got = {"raised": type(exc).__name__}
        out[f"{name}/{side}"] = got
print(json.dumps(out))
"""


def test_remote_functions_under_shard_map_type_their_results_as_varying(url):
    """Under ``shard_map`` (check_vma, its default) the adapter's primitives typed their
    results invariant over the mesh whatever their inputs: ``grad`` through shard_map
    raised "ValueError: Expected cotangent type float64[3]{V:d} but got float64[3]"
    where in-process it answers, and ``out_specs=P()`` of a device-varying result, which
    in-process JAX refuses (it cannot be replicated), answered the first device's block
    alone, silently wrong. Results now vary over every axis an operand varies over, and a
    cotangent of a shared (invariant) input is summed over the axes it does not vary
    over, as jax's own primitives have it: grad (jitted too), the gradient of an input
    every device shares and a grad of grad all equal in-process, and P() is refused alike."""
    pytest.importorskip("jax")
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", SHARDED, url], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("grad", "jit_grad", "shared_grad", "grad_grad"):
        remote_side, local_side = got[f"{case}/remote"], got[f"{case}/local"]
        assert isinstance(local_side, (list, float)) and not isinstance(remote_side, dict), (case, remote_side)
        pairs = zip(remote_side, local_side) if case == "shared_grad" else [(remote_side, local_side)]
        for r, w in pairs:  # shared_grad: (d/dx, d/dy)
            np.testing.assert_allclose(np.array(r, dtype=float), np.array(w, dtype=float), rtol=1e-12, atol=1e-12,
                                       err_msg=case)
    assert got["replicated_out/local"] == {"raised": "ValueError"}
    assert got["replicated_out/remote"] == got["replicated_out/local"]


# --------------------------------------------------------------------------- every problem code


def test_every_problem_code_the_server_answers_has_its_sdk_exception():
    """The wire's table of codes (``wire.PROBLEM_STATUS``: the server raises by it) had ten
    codes without an SDK class, among them 412 ``precondition_failed``, 404 ``not_found``
    and 500 ``internal_error``: each came back as a bare ``APIError``, so a caller could
    tell them apart only by comparing ``.code`` strings, unlike every other code. Each code
    now has its class, exported by ``jacobian_client``, of that code and status; a body
    without a code falls back to a class of its status (500 and 499 excepted: ambiguous)."""
    for code, status in wire.PROBLEM_STATUS.items():
        response = httpx.Response(status, json={"code": code, "detail": "d"},
                                  request=httpx.Request("GET", "http://x/v1/info"))
        exc = error_from_response(response)
        assert type(exc) is not jc.APIError, code
        assert (exc.code_name, exc.status, exc.code, exc.status_code) == (code, status, code, status)
        assert getattr(jc, type(exc).__name__) is type(exc), type(exc).__name__
        assert type(exc).__name__ in jc.__all__
    for status in set(wire.PROBLEM_STATUS.values()) - {499, 500}:
        response = httpx.Response(status, text="<html>proxy</html>", request=httpx.Request("GET", "http://x/"))
        assert error_from_response(response).status == status, status


def test_a_precondition_and_a_wrong_path_raise_their_own_exceptions(url):
    """Against the real server: an ``If-Match`` sent with ``headers=`` is a 412
    ``PreconditionFailed`` for a GET and for a Jacobian's POST alike (once: not retried,
    nothing computed), and a ``base_url`` with a path the service does not serve is a 404
    ``NotFound``, not a ``FunctionNotFound`` (the function exists). Before, both were
    plain ``APIError``s."""
    with counted(url, headers={"If-Match": '"r18"'}) as cc18:
        with pytest.raises(jc.PreconditionFailed) as info:
            cc18.client.function("sin")
        assert info.value.status_code == 412 and info.value.code == "precondition_failed"
        assert "If-Match" in info.value.detail
        with pytest.raises(jc.PreconditionFailed):
            cc18.client.jacobian("sin", np.array([0.1, 0.2]))
        assert cc18.take() == ["sin", "jacobian"]
    with jc.Client(url + "/api") as wrong:
        with pytest.raises(jc.NotFound) as info:
            wrong.function("sin")
        assert info.value.status_code == 404 and info.value.code == "not_found"
        assert not isinstance(info.value, jc.FunctionNotFound)


# --------------------------------------------------------------------------- proxies from the environment


def test_a_proxy_from_the_environment_is_named_when_it_cannot_be_reached(url, monkeypatch):
    """The clients honour HTTP_PROXY / HTTPS_PROXY / ALL_PROXY and NO_PROXY (httpx's
    ``trust_env``). With HTTP_PROXY naming a proxy that is down, a call to a service that
    is up raised ``ServiceUnreachable`` "Connection refused; is the service running, and
    is the client's base_url its address?": the proxy was named nowhere. It now says the
    request went through that proxy (its credentials not shown) and that NO_PROXY can
    exempt the host; with NO_PROXY naming the host the same client answers, equal to
    in-process."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    x = np.array([0.3, -0.7])
    with dead_port() as dead:  # (no proxy answers there while the client tries it)
        monkeypatch.setenv("HTTP_PROXY", f"http://user:hunter2@127.0.0.1:{dead}")
        with jc.Client(url, max_retries=0) as client:
            with pytest.raises(jc.ServiceUnreachable) as info:
                client.jacobian("sin", x)
    message = str(info.value)
    assert f"through the proxy http://127.0.0.1:{dead}/" in message and "NO_PROXY" in message
    assert "hunter2" not in message and "user" not in message
    assert "is the service running" not in message
    monkeypatch.setenv("NO_PROXY", httpx.URL(url).host)
    with jc.Client(url, max_retries=0) as client:
        np.testing.assert_allclose(client.jacobian("sin", x), np.diag(np.cos(x)), rtol=1e-6)
